"""Ready tells the truth to the tools that read it (kstatus; `kubectl wait --for=condition=Ready`;
the chart's Argo CD health check, run by Lua 5.1 on the real objects): False while a resize
awaits confirmation, True once confirmed; False when a declarative change is refused, or the
domain vanished out of band. Real apiserver, real libvirtd, real kubectl.

kstatus itself (sigs.k8s.io/cli-utils `status.Compute`, built by hack/build-kstatus.sh) judges
each object as Flux, kpt and Config Sync do: observedGeneration < generation, Reconciling=True or
a Ready other than True is InProgress, Stalled=True is Failed, Ready=True is Current, a
deletionTimestamp is Terminating."""
import asyncio
import os
import signal
from pathlib import Path

import libvirt
import pytest

from novalet import GROUP, PLURAL, VERSION

from . import libvirt_checks as lv
from .harness import argocd_health, kstatus, status_of, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def condition(body: dict, kind: str) -> dict:
    return next((c for c in status_of(body).get("conditions", []) if c["type"] == kind), {})


def ready(body: dict) -> dict:
    return condition(body, "Ready")


async def wake_when_frozen(pid: int, timeout_s: float = 30.0) -> None:
    """SIGCONT the agent once it has stopped itself at its freeze point: it writes the task
    state first, so the test can read that write before the SIGSTOP lands (a SIGCONT sent
    then would be lost, and the agent would stay frozen)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in "Tt":
            break
        await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGCONT)


async def kubectl_wait_ready(control_plane, namespace: str, timeout_s: int) -> bool:
    """`kubectl wait --for=condition=Ready`, as a user or a pipeline runs it."""
    done = await asyncio.to_thread(control_plane.kubectl, "wait", "-n", namespace, "--for=condition=Ready",
                                   "virtualinstance/vm", f"--timeout={timeout_s}s", check=False,
                                   timeout=timeout_s + 30)
    return done.returncode == 0


async def test_kubectl_wait_ready_follows_a_resize_and_its_confirmation(instances, agents, control_plane):
    node = unique_node()
    # the diskless guest ignores ACPI: the resize forces it off; frozen once the resize's task
    # state is written, so the test reads the instance in flight
    agent = agents.start(node, stop_timeout=1.0, extra_env={"NOVALET_FREEZE_AT": "after_started@Resize"})
    created = await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    # no status yet, so no condition and no observedGeneration: kstatus's rule for an unknown
    # kind calls that Current (Argo CD's check waits for an agent to take it)
    assert kstatus(created) == ("Current", "Resource is current")
    assert argocd_health(created)[0] == "Progressing"
    assert await kubectl_wait_ready(control_plane, instances.namespace, 60)
    body = await instances.get("vm")
    assert ready(body)["observedGeneration"] == body["metadata"]["generation"]
    assert argocd_health(body)[0] == "Healthy"
    assert kstatus(body) == ("Current", "Resource is Ready")

    patched = await instances.patch_spec("vm", {"flavor": {"vcpus": 2, "memoryMiB": 192}})
    generation = patched["metadata"]["generation"]
    unseen = f"VirtualInstance generation is {generation}, but latest observed generation is {generation - 1}"
    assert kstatus(patched) == ("InProgress", unseen)
    try:
        body = await instances.wait("vm", lambda b: status_of(b).get("taskState") is not None,
                                    what="the resize in flight", agents=agents)
        assert status_of(body)["observedGeneration"] == generation
        reconciling = next(c for c in status_of(body)["conditions"] if c["type"] == "Reconciling")
        assert reconciling["status"] == "True" and reconciling["message"].startswith("Resize in resize_")
        assert kstatus(body) == ("InProgress", reconciling["message"])
    finally:
        await wake_when_frozen(agent.process.pid)
    body = await instances.wait_idle("vm", "resized", agents=agents)
    assert (ready(body)["status"], ready(body)["reason"]) == ("False", "ResizeNotConfirmed")
    assert argocd_health(body)[0] == "Suspended"  # waits for a person: confirm or revert
    # a resize awaiting its confirmation is not a failure (Argo CD: Suspended): kstatus waits on it
    assert kstatus(body) == ("InProgress", ready(body)["message"])
    assert not await kubectl_wait_ready(control_plane, instances.namespace, 3)

    await instances.request("vm", {"name": "ConfirmResize", "id": "confirm-1"})
    assert await kubectl_wait_ready(control_plane, instances.namespace, 60)
    body = await instances.get("vm")
    assert status_of(body)["vmState"] == "active" and argocd_health(body)[0] == "Healthy"
    assert kstatus(body) == ("Current", "Resource is Ready")

    # the delete's answer: the finalizer holds the object, its deletionTimestamp set
    deleting = await instances.custom.delete_namespaced_custom_object(
        GROUP, VERSION, instances.namespace, PLURAL, "vm")
    assert kstatus(deleting) == ("Terminating", "Resource scheduled for deletion")


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
    # refused until the spec changes again: Stalled, which kstatus (Flux, kpt) reads as Failed
    stalled = condition(body, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "SpecRejected"), stalled
    assert kstatus(body) == ("Failed", stalled["message"]) and "Rejected" in stalled["message"]


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
    health, said = argocd_health(body)
    assert health == "Degraded" and said.startswith("libvirt has no domain for this instance: ")
    # only a person can resolve it: Stalled, and kstatus says Failed
    assert (condition(body, "Stalled")["status"], condition(body, "Stalled")["reason"]) == ("True", "DomainMissing")
    assert kstatus(body) == ("Failed", condition(body, "Stalled")["message"])

    # an administrator marks it broken: vmState error, Stalled=True, and kstatus says Failed
    await instances.request("vm", {"name": "ResetState", "id": "reset-1", "state": "error"})
    body = await instances.wait_idle("vm", "error", agents=agents, last_id="reset-1")
    stalled = condition(body, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "Error"), stalled
    assert kstatus(body) == ("Failed", stalled["message"])
    assert argocd_health(body)[0] == "Degraded"


async def test_a_step_in_backoff_is_stalled_and_kstatus_says_failed(instances, agents):
    node = unique_node()
    agents.start(node)  # retried 10 s after the first failure: the test reads the pause between tries
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    await instances.wait_idle("vm", "active", agents=agents)
    await instances.patch_spec("vm", {"image": "no-such-image"})  # a typo: the rebuild cannot succeed
    body = await instances.wait("vm", lambda b: status_of(b).get("backoff") and not status_of(b).get("taskState"),
                                what="a pause between tries", agents=agents)
    stalled = condition(body, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "Backoff"), stalled
    assert ready(body)["status"] == "False"  # its reason: Error (the failed rebuild left vmState error)
    status, message = kstatus(body)
    assert (status, message) == ("Failed", stalled["message"]) and "no-such-image" in message
    assert argocd_health(body)[0] == "Degraded"
