"""The container image (hack/build-image.sh: Debian's packages by mmdebstrap, no registry) runs the
agent for real: podman with runc, the host's network (the apiserver is on loopback), the private
libvirtd's socket, the image pool and the state directory mounted at their own paths. An instance
goes through a lifecycle driven by the agent in the container: create, hard reboot, stop, delete."""
import asyncio
import resource
import subprocess
import uuid
from pathlib import Path

import pytest

from . import libvirt_checks as lv
from .harness import status_of, unique_node

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parents[2]
FLAVOR = {"vcpus": 1, "memoryMiB": 96}
PODMAN = ["podman", "--runtime", "/usr/sbin/runc"]


def limits() -> list[str]:
    """podman as root asks for limits above this machine's hard ones (runc then refuses with
    "error setting rlimits"): ask for ones under them."""
    nofile = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[1])
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


async def test_the_agent_runs_from_the_image(novalet_image, control_plane, libvirt_uri, libvirtd, image_pool,
                                             libvirt_domain_type, namespace, agents, instances, libvirt_view,
                                             tmp_path):
    node, name = unique_node(), f"novalet-agent-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    state.mkdir()
    kubeconfig = str(control_plane.kubeconfig)
    mounts = []
    for path in (kubeconfig, str(libvirtd.socket_path), str(image_pool), str(state)):
        mounts += ["-v", f"{path}:{path}"]
    run = [*PODMAN, "run", "--detach", "--name", name, "--network", "host", *limits(), *mounts,
           "-e", f"KUBECONFIG={kubeconfig}", novalet_image,
           "run", "--node-name", node, "--libvirt-uri", libvirt_uri, "--image-pool", str(image_pool),
           "--state-dir", str(state), "--namespace", namespace, "--domain-type", libvirt_domain_type,
           "--stop-timeout", "1", "--migration-socket-dir", str(state / "migration")]
    started = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, f"podman run failed: {started.stderr}"
    try:
        await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
        body = await instances.wait_idle("vm", "active", timeout=90)
        uid = body["metadata"]["uid"]
        assert lv.power(libvirt_view, uid) == "running"
        agent = next(c for c in status_of(body)["conditions"] if c["type"] == "HostAgentReady")
        assert agent["message"] == f"agent on node {node} is handling this instance"

        before = lv.domain(libvirt_view, uid).ID()
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "hard-1"})
        assert (await instances.wait_done("vm", "hard-1"))["result"] == "Succeeded"
        assert lv.domain(libvirt_view, uid).ID() != before  # a new QEMU process

        await instances.patch_spec("vm", {"powerState": "Stopped"})
        await instances.wait_idle("vm", "stopped")
        assert lv.power(libvirt_view, uid) == "shutoff"

        await instances.delete("vm")
        await instances.wait_gone("vm")
        assert lv.domain(libvirt_view, uid) is None
        assert not (state / "instances" / uid).exists()
    except BaseException:
        logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True, timeout=30)
        print(f"--- the agent container's log\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
        raise
    finally:
        subprocess.run([*PODMAN, "rm", "--force", "--time", "5", name], capture_output=True, timeout=60)
        await asyncio.sleep(0)
