"""Nothing hangs: a libvirt call that never returns (its QEMU process is frozen, so the
monitor never answers) does not hold a delete behind it, and is itself given up after the
libvirt timeout with a clear error, leaving no task stuck."""
import asyncio
import os
import signal
import time

import pytest

from . import libvirt_checks as lv
from .harness import status_of, unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def frozen_qemu(libvirtd, uid: str) -> int:
    pid = libvirtd.qemu_pid(f"novalet-{uid}")
    assert pid, f"no QEMU pid for {uid}"
    os.kill(pid, signal.SIGSTOP)
    return pid


def thaw(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


async def pause_a_frozen_guest(instances, agents, libvirtd, *flags: str) -> tuple[str, int]:
    """A running instance whose QEMU is then frozen, asked to pause: libvirt's call hangs.
    Returns the instance's uid and the QEMU pid (thaw it in the end)."""
    agents.start(unique_node(), extra_args=list(flags))
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": agents.started[-1].node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    uid = body["metadata"]["uid"]
    pid = frozen_qemu(libvirtd, uid)
    await instances.patch_spec("vm", {"powerState": "Paused"})
    return uid, pid


async def test_delete_does_not_wait_behind_a_hung_pause(instances, agents, libvirt_view, libvirtd):
    uid, pid = await pause_a_frozen_guest(instances, agents, libvirtd, "--libvirt-timeout", "300")
    try:
        await instances.wait("vm", lambda b: status_of(b).get("taskState") == "pausing",
                             what="the pause under way", agents=agents)
        asked = time.monotonic()
        await instances.delete("vm")
        await instances.wait_gone("vm", timeout=60, agents=agents)
        assert time.monotonic() - asked < 60
        assert lv.domain(libvirt_view, uid) is None
    finally:
        thaw(pid)


async def test_a_hung_call_times_out_and_the_instance_is_not_stuck(instances, agents, libvirt_view, libvirtd):
    uid, pid = await pause_a_frozen_guest(instances, agents, libvirtd, "--libvirt-timeout", "5",
                                          "--backoff-base", "60")
    try:
        body = await instances.wait("vm", lambda b: (status_of(b).get("lastAction") or {}).get("result") == "Failed",
                                    timeout=40, what="the pause to be given up", agents=agents)
        status = status_of(body)
        assert status.get("taskState") is None and status["vmState"] == "active"
        assert "did not answer" in status["lastAction"]["message"], status["lastAction"]
        thaw(pid)  # the abandoned call now completes: QEMU pauses late, and the agent sees the drift
        await instances.patch_spec("vm", {"powerState": "Running"})  # a new desire runs at once
        deadline = time.monotonic() + 30
        while lv.power(libvirt_view, uid) != "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        assert lv.power(libvirt_view, uid) == "running"
        body = await instances.wait_idle("vm", "active", agents=agents, timeout=30)
        assert status_of(body)["powerState"] == "running"
    finally:
        thaw(pid)


async def test_an_admin_reset_state_does_not_wait_behind_a_hung_pause(instances, agents, libvirt_view, libvirtd):
    _uid, pid = await pause_a_frozen_guest(instances, agents, libvirtd, "--libvirt-timeout", "300")
    try:
        await instances.wait("vm", lambda b: status_of(b).get("taskState") == "pausing",
                             what="the pause under way", agents=agents)
        await instances.request("vm", {"name": "ResetState", "id": "reset-1", "state": "error"})  # as admin
        body = await instances.wait_idle("vm", "error", agents=agents, last_id="reset-1", timeout=30)
        history = {r["id"]: r for r in status_of(body)["history"]}
        assert history["spec-g2-pause"]["message"] == "superseded by reset-state reset-1"
        assert history["reset-1"]["result"] == "Succeeded"
    finally:
        thaw(pid)
