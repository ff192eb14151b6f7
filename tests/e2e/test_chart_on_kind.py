"""The Helm chart on kind (hack/kind-up.sh): a kind cluster made on this machine from node images
built here (no registry), its podman network inside a network namespace of its own, the image
loaded with `kind load image-archive`, the stack's libvirtd reached through its socket, bound into
the kind node at the same path. What a user of kind sees: the pods Ready, the webhook called
through its Service, a lifecycle through the pods, `helm upgrade` and `helm uninstall`."""
import json
import os
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from novalet_dev.controlplane import find_bin_dir
from novalet_dev.guest import build_tiny_image
from novalet_dev.hosts import Hosts
from novalet_dev.node import chart_values
from novalet_dev.processes import cache_root
from novalet_dev.testing import TINY

from . import libvirt_checks as lv
from .conftest import machine_dirs_lock

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parents[2]
KIND_UP = ROOT / "hack" / "kind-up.sh"
NODE = "novalet-control-plane"  # kind's node for the cluster `novalet`
RELEASE, NAMESPACE, GUESTS = "novalet", "novalet-system", "vms"


class KindCluster:
    def __init__(self, state: Path, host):
        self.state, self.host = state, host
        self.values = state / "values.json"
        kind_bin = cache_root() / "kind" / "bin"
        self.env = {**os.environ, "NOVALET_KIND_MOUNTS": str(state),
                    "PATH": f"{kind_bin}:{find_bin_dir()}:{os.environ['PATH']}"}
        self.kind_ns = str(kind_bin / "kind-ns")

    def script(self, *args: str) -> str:
        r = subprocess.run(["bash", str(KIND_UP), *args], env=self.env, capture_output=True, text=True,
                           timeout=1800, stdin=subprocess.DEVNULL, check=False)
        if r.returncode != 0:
            raise AssertionError(f"hack/kind-up.sh {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return r.stdout

    def run(self, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run([self.kind_ns, *argv], env=self.env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr}\n{self.diagnostics()}")
        return r

    def objects(self, kinds: str, *args: str) -> list[dict]:
        return json.loads(self.run("kubectl", "get", kinds, "-o", "json", *args).stdout)["items"]

    def get(self, name: str) -> dict | None:
        r = self.run("kubectl", "get", "vinst", name, "-n", GUESTS, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def wait(self, name: str, predicate, what: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.get(name)
            if body is not None and predicate(body):
                return body
            time.sleep(0.5)
        raise AssertionError(f"{name}: no {what} within {timeout}s: {body}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        parts = []
        r = subprocess.run([self.kind_ns, "kubectl", "get", "pods", "-A", "-o", "wide"], env=self.env,
                           capture_output=True, text=True, check=False, timeout=60)
        parts.append(r.stdout + r.stderr)
        for pod in ("daemonset/novalet-agent", "deployment/novalet-controller"):
            r = subprocess.run([self.kind_ns, "kubectl", "logs", "-n", NAMESPACE, pod, "--all-containers",
                                "--tail=20"], env=self.env, capture_output=True, text=True, check=False, timeout=60)
            parts.append(f"--- {pod}\n{r.stdout}{r.stderr}")
        return "\n".join(parts)


def status(body: dict) -> dict:
    return body.get("status") or {}


def idle(vm_state: str, last_id: str | None = None):
    def check(body: dict) -> bool:
        s = status(body)
        return (s.get("vmState") == vm_state and s.get("taskState") is None
                and (last_id is None or (s.get("lastAction") or {}).get("id") == last_id))
    return check


@pytest.fixture
def kind_cluster(tmp_path_factory, novalet_image):
    state = tmp_path_factory.mktemp("kind")
    host = Hosts(state).host(1)
    cluster = KindCluster(state, host)
    archive = state / "novalet-image.tar"
    with machine_dirs_lock():  # the kubelet node's tests use the machine's /var/lib/cni too
        try:
            host.libvirtd.start()
            host.image_pool.mkdir(parents=True, exist_ok=True)
            build_tiny_image(host.image_pool, TINY)
            cluster.values.write_text(json.dumps(chart_values(state, host)))
            cluster.script("down")  # a cluster left by hand may have other mounts
            cluster.script()
            subprocess.run(["podman", "--runtime", "/usr/sbin/runc", "save", "-o", str(archive), novalet_image],
                           check=True, capture_output=True, timeout=300)
            cluster.run("kind", "load", "image-archive", str(archive), "--name", "novalet")
            archive.unlink()
            yield cluster
        finally:
            cluster.script("down")
            host.libvirtd.stop(destroy_domains=True)


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_the_chart_runs_on_kind(kind_cluster):
    cluster = kind_cluster
    chart = str(ROOT / "charts" / "novalet")
    cluster.run("helm", "install", RELEASE, chart, "-n", NAMESPACE, "--create-namespace", "-f", str(cluster.values),
                "--wait", "--timeout", "240s")
    cluster.run("kubectl", "rollout", "status", "-n", NAMESPACE, "daemonset/novalet-agent", "--timeout=240s")
    pods = cluster.objects("pods", "-n", NAMESPACE)
    assert sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods) == [
        "agent", "controller", "controller"], cluster.diagnostics()
    assert all(ready(p) and p["spec"]["nodeName"] == NODE for p in pods), cluster.diagnostics()

    cluster.run("kubectl", "create", "namespace", GUESTS)
    manifest = cluster.state / "vms.json"
    manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "novalet.io/v1alpha1", "kind": "VirtualInstance",
         "metadata": {"name": "vm", "namespace": GUESTS},
         "spec": {"flavor": {"vcpus": 1, "memoryMiB": 96}, "image": TINY}}]}))
    cluster.run("kubectl", "apply", "-f", str(manifest))
    body = cluster.wait("vm", idle("active"), "vmState active")
    assert status(body)["node"] == NODE  # placed by the controller pod's scheduler
    uid = body["metadata"]["uid"]
    conn = libvirt.open(cluster.host.uri)
    try:
        assert lv.power(conn, uid) == "running"
        # a hard reboot through the pods: a new QEMU process
        before = lv.domain(conn, uid).ID()
        patch = json.dumps({"spec": {"action": {"name": "Reboot", "type": "Hard", "id": "hard-1"}}})
        cluster.run("kubectl", "patch", "vinst", "vm", "-n", GUESTS, "--type=merge", "-p", patch)
        body = cluster.wait("vm", idle("active", "hard-1"), "the hard reboot done")
        assert status(body)["lastAction"]["result"] == "Succeeded" and lv.domain(conn, uid).ID() != before
        # stop; then the webhook, called through its Service, refuses a soft reboot
        cluster.run("kubectl", "patch", "vinst", "vm", "-n", GUESTS, "--type=merge",
                    "-p", json.dumps({"spec": {"powerState": "Stopped"}}))
        cluster.wait("vm", idle("stopped"), "vmState stopped")
        assert lv.power(conn, uid) == "shutoff"
        soft = json.dumps({"spec": {"action": {"name": "Reboot", "type": "Soft", "id": "soft-1"}}})
        refused = cluster.run("kubectl", "patch", "vinst", "vm", "-n", GUESTS, "--type=merge", "-p", soft, check=False)
        assert refused.returncode != 0 and "cannot reboot (soft) while vm_state is stopped" in refused.stderr
        # delete: the agent pod removes the domain
        cluster.run("kubectl", "delete", "vinst", "vm", "-n", GUESTS, "--timeout=120s")
        assert lv.domain(conn, uid) is None
    finally:
        conn.close()

    cluster.run("helm", "uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "180s")
    assert cluster.objects("validatingwebhookconfigurations") == []
