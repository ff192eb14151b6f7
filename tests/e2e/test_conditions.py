"""Ready tells the truth to the tools that read it (kstatus; `kubectl wait --for=condition=Ready`;
the chart's Argo CD health check, run by Lua 5.1 on the real objects): False while a resize
awaits confirmation, True once confirmed; False when a declarative change is refused, or the
domain vanished out of band. Real apiserver, real libvirtd, real kubectl."""
import asyncio

import libvirt
import pytest

from . import libvirt_checks as lv
from .harness import argocd_health, status_of, unique_node

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
    assert argocd_health(body)[0] == "Healthy"

    await instances.patch_spec("vm", {"flavor": {"vcpus": 2, "memoryMiB": 192}})
    body = await instances.wait_idle("vm", "resized", agents=agents)
    assert (ready(body)["status"], ready(body)["reason"]) == ("False", "ResizeNotConfirmed")
    assert argocd_health(body)[0] == "Suspended"  # waits for a person: confirm or revert
    assert not await kubectl_wait_ready(control_plane, instances.namespace, 3)

    await instances.request("vm", {"name": "ConfirmResize", "id": "confirm-1"})
    assert await kubectl_wait_ready(control_plane, instances.namespace, 60)
    body = await instances.get("vm")
    assert status_of(body)["vmState"] == "active" and argocd_health(body)[0] == "Healthy"


async def test_a_refused_declarative_change_is_not_ready_and_degraded(instances, agents):
    node = unique_node()
    agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node, "powerState": "Suspended"})
    await instances.wait_idle("vm", "suspended", agents=agents)
    await instances.patch_spec("vm", {"flavor": {"vcpus": 2, "memoryMiB": 192}})  # no resize while suspended
    body = await instances.wait("vm", lambda b: (status_of(b).get("lastAction") or {}).get("result") == "Rejected",
                                what="the refusal", agents=agents)
    assert (ready(body)["status"], ready(body)["reason"]) == ("False", "SpecNotMet"), ready(body)
    assert "Rejected" in ready(body)["message"]
    status, message = argocd_health(body)
    assert status == "Degraded" and "Rejected" in message


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
    assert argocd_health(body) == ("Degraded", "libvirt has no domain for this instance")
