"""The Lease is a fence: the seed thread's locked-up compute node, made real.

Two agents serve one node, a holder and a hot standby. The holder is frozen (SIGSTOP) while it
carries out an action; the standby takes the node's Lease and recovers the instance; then the
old holder wakes (SIGCONT). It must issue no libvirt operation and no write, and stand by.
What happened is counted where it happened: libvirt's own events for the domain, the object's
resourceVersion and Events at the apiserver, the Lease's holder.
"""
import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from . import libvirt_checks as lv
from .harness import status_of, unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
# Short timings so the test takes seconds, with the production shape: deadline < duration.
TIMING = ["--lease-duration", "6", "--renew-deadline", "3", "--lease-retry-period", "0.5"]


async def lease_holder(kube_api, node: str) -> str | None:
    try:
        lease = await client.CoordinationV1Api(kube_api).read_namespaced_lease(
            f"novalet-agent-{node}", "kube-node-lease")
    except client.exceptions.ApiException:
        return None
    return lease.spec.holder_identity


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def pid_of(identity: str | None) -> int | None:
    return int(identity.split("/")[2]) if identity else None


async def wait_holder(kube_api, node: str, pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_of(await lease_holder(kube_api, node)) == pid:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"agent {pid} never took the Lease of {node}: {await lease_holder(kube_api, node)}")


async def holder_and_standby(agents, kube_api, node: str, freeze_at: str | None = None, **options):
    """Two agents for one node: the first holds its Lease (and freezes itself at `freeze_at`, if
    given), the second stands by."""
    freeze = {"NOVALET_FREEZE_AT": freeze_at} if freeze_at else None
    holder = agents.start(node, extra_args=TIMING, extra_env=freeze, **options)
    await wait_holder(kube_api, node, holder.process.pid)
    return holder, agents.start(node, extra_args=TIMING, **options)


async def event_count(kube_api, namespace: str, pid: int) -> int:
    """Events posted by the agent process `pid` (its identity names it: node/host/pid/nonce)."""
    events = await client.EventsV1Api(kube_api).list_namespaced_event(namespace)
    return sum(1 for e in events.items if f"/{pid}/" in (e.reporting_instance or ""))


async def assert_woken_holder_does_nothing(instances, kube_api, events: lv.DomainEvents, frozen, node: str,
                                           standby_pid: int, watch_s: float = 8.0) -> None:
    """SIGCONT the frozen holder, then watch: no libvirt event for the domain, no new
    resourceVersion, no new Event, the Lease stays with the standby, the old holder runs on."""
    body = await instances.settled("vm")
    version = body["metadata"]["resourceVersion"]
    posted = await event_count(kube_api, instances.namespace, frozen.process.pid)
    woke = time.monotonic()
    os.kill(frozen.process.pid, signal.SIGCONT)
    await asyncio.sleep(watch_s)
    assert events.since(woke) == [], f"libvirt saw operations after the old holder woke: {events.since(woke)}"
    body = await instances.get("vm")
    assert body["metadata"]["resourceVersion"] == version, (
        f"the object was written after the old holder woke: {body['metadata'].get('managedFields')}"
        f" {status_of(body)}\n{frozen.tail()}")
    assert await event_count(kube_api, instances.namespace, frozen.process.pid) == posted
    assert pid_of(await lease_holder(kube_api, node)) == standby_pid
    assert frozen.process.poll() is None, "the old holder must stand by, not exit"
    assert "fenced" in frozen.log.read_text(), frozen.tail()


async def test_frozen_holder_mid_soft_reboot_is_fenced_when_it_wakes(instances, agents, libvirt_view, kube_api):
    """A diskless guest ignores ACPI: the holder waits in the soft reboot (12 s before it would
    escalate to hard). Frozen there longer than that, it would wake and reboot hard, a
    second reboot of a guest the standby has already recovered; fenced, it does nothing."""
    node = unique_node()
    holder, standby = await holder_and_standby(agents, kube_api, node, soft_reboot_timeout=12)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    events = lv.DomainEvents(libvirt_view, body["metadata"]["uid"])
    try:
        await instances.request("vm", {"name": "Reboot", "type": "Soft", "id": "soft-1"})
        await instances.wait("vm", lambda b: status_of(b).get("taskState") == "reboot_started",
                             what="the soft reboot under way", agents=agents)
        os.kill(holder.process.pid, signal.SIGSTOP)  # the node locks up
        frozen_at = time.monotonic()
        await wait_holder(kube_api, node, standby.process.pid)
        takeover_s = time.monotonic() - frozen_at
        await instances.wait_idle("vm", "active", agents=agents, last_id="soft-1", timeout=60)
        await asyncio.sleep(max(0.0, 13 - (time.monotonic() - frozen_at)))  # past the escalation point
        await assert_woken_holder_does_nothing(instances, kube_api, events, holder, node, standby.process.pid)
        # the holder renewed at most one retry period (0.5 s) before it froze: the standby may
        # take over 6 s after that renewal, never before the holder's 3 s renew deadline ran out.
        # Only this safety bound is asserted: how soon after it the standby takes over depends
        # on the machine's load (a benchmark's business, docs/recovery.md quotes the figures)
        assert takeover_s >= 5.4, f"takeover after {takeover_s:.1f}s, before a 6 s lease could expire"
    finally:
        if holder.process.poll() is None:
            os.kill(holder.process.pid, signal.SIGCONT)
        events.close()


async def test_frozen_holder_between_create_steps_is_fenced_and_stands_by(
        instances, agents, libvirt_view, kube_api):
    """Frozen between the steps of a create (after networking, before the disks and the
    spawn): the standby finishes the build; the woken holder spawns nothing, and takes over
    properly (a fresh recovery sweep) when the standby dies in turn."""
    node = unique_node()
    holder, standby = await holder_and_standby(agents, kube_api, node, freeze_at="between_steps@Create")
    created = await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    events = lv.DomainEvents(libvirt_view, created["metadata"]["uid"])
    try:
        deadline = time.monotonic() + 30
        while holder.process.poll() is None and time.monotonic() < deadline:
            if process_state(holder.process.pid) == "T":  # stopped itself at the point
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the holder never froze between the create's steps\n{holder.tail()}")
        assert status_of(await instances.get("vm")).get("taskState") == "networking"
        await wait_holder(kube_api, node, standby.process.pid)
        await instances.wait_idle("vm", "active", agents=agents, timeout=60)
        assert events.starts == 1
        await assert_woken_holder_does_nothing(instances, kube_api, events, holder, node, standby.process.pid)
        assert events.starts == 1, "the domain was started once, by the standby"

        standby.kill(signal.SIGKILL)  # the old holder, standing by, takes the node over cleanly
        await wait_holder(kube_api, node, holder.process.pid)
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "after-1"})
        body = await instances.wait_idle("vm", "active", agents=agents, last_id="after-1")
        assert status_of(body)["lastAction"]["result"] == "Succeeded"
        await asyncio.sleep(1)
        assert events.starts == 2, f"one start for the build, one for the hard reboot: {events.log}"
    finally:
        if holder.process.poll() is None:
            os.kill(holder.process.pid, signal.SIGCONT)
        events.close()


async def test_frozen_holder_between_its_write_and_the_libvirt_call_is_fenced(
        instances, agents, libvirt_view, kube_api):
    """The narrowest window: the holder wrote `reboot_started_hard` and froze right before the
    libvirt call. No compare-and-swap stands between it and libvirt when it wakes: only the
    fence. The standby redoes the reboot (the domain id shows it had not happened); the woken
    holder must not reboot the guest a second time."""
    node = unique_node()
    holder, standby = await holder_and_standby(agents, kube_api, node, freeze_at="after_started@RebootHard")
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    events = lv.DomainEvents(libvirt_view, body["metadata"]["uid"])
    try:
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "hard-1"})
        await instances.wait("vm", lambda b: status_of(b).get("taskState") == "reboot_started_hard",
                             what="the hard reboot started", agents=agents)
        await wait_holder(kube_api, node, standby.process.pid)
        body = await instances.wait_idle("vm", "active", agents=agents, last_id="hard-1", timeout=60)
        assert status_of(body)["lastAction"]["result"] == "Succeeded"
        assert events.starts == 1, f"the standby's redo: {events.log}"
        await assert_woken_holder_does_nothing(instances, kube_api, events, holder, node, standby.process.pid)
        assert events.starts == 1, "the woken holder rebooted the guest a second time"
    finally:
        if holder.process.poll() is None:
            os.kill(holder.process.pid, signal.SIGCONT)
        events.close()
