"""The Helm chart's pods, running for real on a kubelet node (novalet_dev.node): a stack of the
test's own (control plane, host-1's libvirtd, the node), the image from hack/build-image.sh loaded
into the node's containerd, `helm install` with `novalet dev chart-values`.

What a user of the chart sees: the agent DaemonSet's pod and both controller pods Ready on the
node, the agent's initContainer having chosen the domain type by booting a probe guest; the
apiserver calling the webhook through its Service; the agent pod driving libvirtd
through the mounted socket, with its own ServiceAccount's token (no other credential is in the
pods); `helm upgrade` rolling the agent while guests run (none restarted, a request made during
the roll done once); `helm uninstall` leaving nothing of the release, webhook included."""
import asyncio
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from kubernetes_asyncio import client, config

from novalet_dev.controlplane import ControlPlane, find_bin_dir
from novalet_dev.guest import build_tiny_image
from novalet_dev.hosts import Host, Hosts
from novalet_dev.node import IMAGES, NODE_NAME, Node, chart_values
from novalet_dev.testing import TINY

from . import libvirt_checks as lv
from .conftest import machine_dirs_lock
from .harness import Instances

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parents[2]
RELEASE, NAMESPACE, GUESTS = "novalet", "novalet-system", "vms"
FLAVOR = {"vcpus": 1, "memoryMiB": 96}
RELEASE_LABEL = f"app.kubernetes.io/instance={RELEASE}"


@dataclass
class NodeCluster:
    control_plane: ControlPlane
    host: Host
    node: Node
    values: Path

    def run(self, tool: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(self.control_plane.bin_dir / tool), f"--kubeconfig={self.control_plane.kubeconfig}",
                            *args], capture_output=True, text=True, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({r.returncode}):\n{r.stderr}\n{self.diagnostics()}")
        return r

    def objects(self, kinds: str, *args: str) -> list[dict]:
        return json.loads(self.run("kubectl", "get", kinds, "-o", "json", *args).stdout)["items"]

    def diagnostics(self) -> str:
        parts = []
        for pod in json.loads(subprocess.run(
                [str(self.control_plane.bin_dir / "kubectl"), f"--kubeconfig={self.control_plane.kubeconfig}",
                 "get", "pods", "-n", NAMESPACE, "-o", "json"], capture_output=True, text=True,
                check=False).stdout or '{"items": []}')["items"]:
            name = pod["metadata"]["name"]
            logs = self.run("kubectl", "logs", "-n", NAMESPACE, name, "--all-containers", "--tail=30", check=False)
            parts.append(f"--- pod {name}: {pod['status'].get('phase')}\n{logs.stdout}{logs.stderr}")
        return "\n".join(parts) + "\n--- kubelet\n" + "\n".join(
            self.node.log_file("kubelet").read_text(errors="replace").splitlines()[-15:])


@pytest.fixture
def node_cluster(tmp_path_factory, novalet_image):
    """A stack of this test's own: the chart's cluster-scoped objects (webhook, policies) and its
    agent (which owns every domain of its libvirtd) must not meet the session's tests."""
    state = tmp_path_factory.mktemp("kn")
    control_plane = ControlPlane(state / "kube", bin_dir=find_bin_dir())
    host = Hosts(state).host(1)
    node = Node(control_plane, NODE_NAME)
    values = state / "values.json"
    with machine_dirs_lock():  # kind (test_chart_on_kind.py) uses the machine's /var/lib/cni too
        yield from _node_cluster(control_plane, host, node, state, values)


def _node_cluster(control_plane, host, node, state, values):
    try:
        control_plane.start()
        host.libvirtd.start()
        node.start()
        node.load_images(IMAGES)
        host.image_pool.mkdir(parents=True, exist_ok=True)
        build_tiny_image(host.image_pool, TINY)  # preloaded: the pods cannot reach a loopback image server
        values.write_text(json.dumps(chart_values(state, host)))  # agent.domainType auto: the probe decides
        yield NodeCluster(control_plane, host, node, values)
    finally:
        node.stop()
        host.libvirtd.stop(destroy_domains=True)
        control_plane.stop()


def pods(cluster: NodeCluster, component: str) -> list[dict]:
    return cluster.objects("pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/component={component}")


def review_by(cluster: NodeCluster, pod: str) -> dict:
    """The AdmissionReview answer of one controller pod's webhook to a valid create (dry run)."""
    kind = {"group": "novalet.io", "version": "v1alpha1", "kind": "VirtualInstance"}
    resource = {"group": "novalet.io", "version": "v1alpha1", "resource": "virtualinstances"}
    body = {"apiVersion": "novalet.io/v1alpha1", "kind": "VirtualInstance",
            "metadata": {"name": "probe", "namespace": GUESTS}, "spec": {"flavor": FLAVOR, "image": TINY}}
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": pod, "kind": kind, "resource": resource, "requestKind": kind, "requestResource": resource,
        "operation": "CREATE", "namespace": GUESTS, "name": "probe", "object": body, "oldObject": None,
        "userInfo": {"username": "test"}, "dryRun": True, "options": None}}
    path = cluster.values.parent / f"review-{pod}.json"
    path.write_text(json.dumps(review))
    port = cluster.objects("pods", "-n", NAMESPACE, "--field-selector", f"metadata.name={pod}")[0]["spec"][
        "containers"][0]["ports"]
    webhook = next(p["containerPort"] for p in port if p.get("name") == "webhook")
    out = cluster.run("kubectl", "create", "--raw",
                      f"/api/v1/namespaces/{NAMESPACE}/pods/https:{pod}:{webhook}/proxy/validate", "-f", str(path))
    return json.loads(out.stdout)


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


async def test_the_chart_runs_on_a_real_node(node_cluster, libvirt_domain_type):
    cluster = node_cluster
    chart = str(ROOT / "charts" / "novalet")
    await asyncio.to_thread(cluster.run, "helm", "install", RELEASE, chart, "-n", NAMESPACE, "--create-namespace",
                            "-f", str(cluster.values), "--wait", "--timeout", "240s")
    # helm's --wait lets a DaemonSet be short of its maxUnavailable (1: the only agent pod here)
    await asyncio.to_thread(cluster.run, "kubectl", "rollout", "status", "-n", NAMESPACE,
                            "daemonset/novalet-agent", "--timeout=240s")

    # the pods run on the node and are Ready, each with its own ServiceAccount and no other credential
    agents, controllers = pods(cluster, "agent"), pods(cluster, "controller")
    assert len(agents) == 1 and len(controllers) == 2, cluster.diagnostics()
    for pod, account in [(agents[0], "novalet-agent"), *((p, "novalet-controller") for p in controllers)]:
        assert ready(pod) and pod["spec"]["nodeName"] == NODE_NAME, cluster.diagnostics()
        assert pod["spec"]["serviceAccountName"] == account
        for container in pod["spec"]["containers"]:
            assert "KUBECONFIG" not in {e["name"] for e in container.get("env", [])}
    # the agent's initContainer probed the node's domain type, and the agent uses what it found:
    # the development stack's own probe (a real kernel booted) says the same
    probe = agents[0]["status"]["initContainerStatuses"]
    assert [(c["name"], c["state"]["terminated"]["exitCode"]) for c in probe] == [("probe-domain-type", 0)]
    deadline = time.monotonic() + 60  # the agent writes its Hypervisor's status once it runs

    def types() -> list[tuple[str, str | None]]:
        return [(h["metadata"]["name"], h.get("status", {}).get("domainType")) for h in cluster.objects("hypervisors")]
    while not all(kind for _, kind in types() or [("", None)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert types() == [
        (NODE_NAME, libvirt_domain_type)]
    # one controller replica holds the scheduler's Lease (and so places and marks); both serve the
    # webhook: each answers an AdmissionReview sent to it alone, through the apiserver's pod proxy
    lease = cluster.objects("leases", "-n", "kube-node-lease", "--field-selector", "metadata.name=novalet-scheduler")
    holder = lease[0]["spec"]["holderIdentity"]
    assert sum(f"/{p['metadata']['name']}/" in holder for p in controllers) == 1, holder
    for pod in controllers:
        answer = review_by(cluster, pod["metadata"]["name"])
        assert answer["response"]["uid"] == pod["metadata"]["name"] and answer["response"]["allowed"] is True
    # the webhook is registered by Service reference: the apiserver reaches it through the Service
    hooks = cluster.objects("validatingwebhookconfigurations", "-l", RELEASE_LABEL)
    assert [h["clientConfig"].get("service", {}).get("name") for h in hooks[0]["webhooks"]] == ["novalet-controller"]

    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(cluster.control_plane.kubeconfig), client_configuration=cfg)
    conn = libvirt.open(cluster.host.uri)
    async with client.ApiClient(cfg) as api:
        await client.CoreV1Api(api).create_namespace({"metadata": {"name": GUESTS}})
        instances = Instances(api, GUESTS)
        await instances.create("steady", {"flavor": FLAVOR, "image": TINY})
        await instances.create("vm", {"flavor": FLAVOR, "image": TINY})
        steady = await instances.wait_idle("steady", "active", timeout=180)
        body = await instances.wait_idle("vm", "active", timeout=180)
        assert body["status"]["node"] == NODE_NAME  # placed by the controller pod's scheduler
        uid, steady_uid = body["metadata"]["uid"], steady["metadata"]["uid"]
        assert lv.power(conn, uid) == "running" and lv.power(conn, steady_uid) == "running"

        # a lifecycle through the pods: hard reboot (a new QEMU), stop, a refused request, start
        before = lv.domain(conn, uid).ID()
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "hard-1"})
        assert (await instances.wait_done("vm", "hard-1"))["result"] == "Succeeded"
        assert lv.domain(conn, uid).ID() != before
        await instances.patch_spec("vm", {"powerState": "Stopped"})
        await instances.wait_idle("vm", "stopped")
        assert lv.power(conn, uid) == "shutoff"
        with pytest.raises(client.exceptions.ApiException) as refused:  # the webhook, through its Service
            await instances.request("vm", {"name": "Reboot", "type": "Soft", "id": "soft-1"})
        assert "cannot reboot (soft) while vm_state is stopped" in refused.value.body
        await instances.patch_spec("vm", {"powerState": "Running"})
        await instances.wait_idle("vm", "active")

        # helm upgrade rolls the agent while the guests run; a request made during the roll is done once
        old_agent = agents[0]["metadata"]["uid"]
        steady_qemu = cluster.host.libvirtd.qemu_pid(lv.domain(conn, steady_uid).name())
        steady_history = len((await instances.get("steady"))["status"].get("history", []))
        await asyncio.to_thread(cluster.run, "helm", "upgrade", RELEASE, chart, "-n", NAMESPACE, "--reuse-values",
                                "--set-string", "agent.podAnnotations.rollout=2")
        during = lv.domain(conn, uid).ID()
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "hard-2"})
        await asyncio.to_thread(cluster.run, "kubectl", "rollout", "status", "-n", NAMESPACE,
                                "daemonset/novalet-agent", "--timeout=240s")
        rolled = pods(cluster, "agent")
        assert [p["metadata"]["uid"] for p in rolled] != [old_agent] and ready(rolled[0])
        record = await instances.wait_done("vm", "hard-2", timeout=180)
        assert record["result"] == "Succeeded"
        assert lv.domain(conn, uid).ID() != during
        assert [r["id"] for r in (await instances.get("vm"))["status"]["history"]].count("hard-2") == 1
        assert cluster.host.libvirtd.qemu_pid(lv.domain(conn, steady_uid).name()) == steady_qemu  # not restarted
        assert lv.power(conn, steady_uid) == "running"
        assert len((await instances.get("steady"))["status"].get("history", [])) == steady_history

        for name in ("vm", "steady"):
            await instances.delete(name)
        for name in ("vm", "steady"):
            await instances.wait_gone(name, timeout=120)
        assert lv.domain(conn, uid) is None and lv.domain(conn, steady_uid) is None
    conn.close()

    # helm uninstall leaves nothing of the release: pods, namespaced and cluster-scoped objects
    await asyncio.to_thread(cluster.run, "helm", "uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "180s")
    deadline = time.monotonic() + 120
    while cluster.objects("pods", "-n", NAMESPACE) and time.monotonic() < deadline:
        await asyncio.sleep(1)
    assert cluster.objects("pods", "-n", NAMESPACE) == []
    namespaced = ("all,secrets,serviceaccounts,roles,rolebindings,configmaps,poddisruptionbudgets,"
                  "networkpolicies")
    assert cluster.objects(namespaced, "-n", NAMESPACE, "-l", RELEASE_LABEL) == []
    cluster_scoped = ("validatingwebhookconfigurations,validatingadmissionpolicies,"
                      "validatingadmissionpolicybindings,clusterroles,clusterrolebindings")
    assert cluster.objects(cluster_scoped, "-l", RELEASE_LABEL) == []
    assert cluster.objects("validatingwebhookconfigurations") == []

    # and the node stops without a trace: no process, cgroup, namespace, mount or directory of it
    assert cluster.node.leftovers() != []  # (what the check below would see while it runs)
    cluster.node.stop()
    assert cluster.node.leftovers() == []
