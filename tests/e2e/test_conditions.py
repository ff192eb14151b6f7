"""Ready tells the truth to the tools that read it (kstatus; `kubectl wait --for=condition=Ready`):
False while a resize awaits confirmation, True once confirmed; False when the domain vanished
out of band. Real apiserver, real libvirtd, real kubectl."""
import asyncio

import libvirt
import pytest

from . import libvirt_checks as lv
from .harness import status_of, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def ready(body: dict) -> dict:
    return next((c for c in status_of(body).get("conditions", []) if c["type"] == "Ready"), {})


async def kubectl_wait_ready(control_plane, namespace: str, timeout_s: int) -> bool:
    """`kubectl wait --for=condition=Ready`, as a user or a pipeline runs it."""
    done = await asyncio.to_thread(control_plane.kubectl, "wait", "-n", namespace, "--for=condition=Ready",
                                   "virtualinstance/vm", f"--timeout={timeout_s}s", check=False,
                                   timeout=timeout_s + 30)
    return done.returncode == 0


async def test_kubectl_wait_ready_follows_a_resize_and_its_confirmation(instances, agents, control_plane):
    node = unique_node()
    agents.start(node, stop_timeout=1.0)  # the diskless guest ignores ACPI: the resize forces it off
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    assert await kubectl_wait_ready(control_plane, instances.namespace, 60)
    body = await instances.get("vm")
    assert ready(body)["observedGeneration"] == body["metadata"]["generation"]

    await instances.patch_spec("vm", {"flavor": {"vcpus": 2, "memoryMiB": 192}})
    body = await instances.wait_idle("vm", "resized", agents=agents)
    assert (ready(body)["status"], ready(body)["reason"]) == ("False", "ResizeNotConfirmed")
    assert not await kubectl_wait_ready(control_plane, instances.namespace, 3)

    await instances.request("vm", {"name": "ConfirmResize", "id": "confirm-1"})
    assert await kubectl_wait_ready(control_plane, instances.namespace, 60)
    assert status_of(await instances.get("vm"))["vmState"] == "active"


async def test_ready_turns_false_when_the_domain_vanishes_out_of_band(instances, agents, libvirt_view):
    node = unique_node()
    agents.start(node)
    created = await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    await instances.wait_idle("vm", "active", agents=agents)
    domain = lv.domain(libvirt_view, created["metadata"]["uid"])
    domain.destroy()  # someone else's virsh destroy + undefine
    domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    body = await instances.wait("vm", lambda b: ready(b).get("reason") == "DomainMissing",
                                what="Ready=False, DomainMissing", agents=agents)
    assert ready(body)["status"] == "False" and status_of(body)["powerState"] == "nostate"
