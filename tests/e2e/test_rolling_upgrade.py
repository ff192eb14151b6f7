"""Rolling upgrade: status fields written by a newer agent are kept, not dropped, while an
agent of this version carries out actions on the instance.

The newer CRD (installed first, as a Helm upgrade does) has a top-level status field, a field
in history items and one in currentTask. A "newer agent" (this test) writes them, with a hard
reboot it acknowledged and then left (its node was rolled back to this version). This agent
takes the task over, is killed between two of its writes, recovers it, then stops, starts and
reboots the instance: every write it makes is a merge patch of its whole status model, and
every newer field is still there after each.
"""
import asyncio
import time
from datetime import UTC, datetime

import pytest

from novalet import GROUP, PLURAL, VERSION

from . import libvirt_checks as lv
from .crd_changes import newer_crd, until_kept
from .harness import status_of, unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
MERGE = "application/merge-patch+json"
NEWER = [
    {"op": "add", "path": "/properties/status/properties/newerSummary",
     "value": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    {"op": "add", "path": "/properties/status/properties/history/items/properties/newerNote",
     "value": {"type": "string"}},
    {"op": "add", "path": "/properties/status/properties/lastAction/properties/newerNote",
     "value": {"type": "string"}},
    {"op": "add", "path": "/properties/status/properties/currentTask/properties/newerStep",
     "value": {"type": "string"}},
]
SUMMARY = {"offloadedAt": "2026-12-01T00:00:00Z", "offloaded": False, "hints": ["kept"]}


def assert_kept(body: dict, notes: dict[str, str], task: bool = False) -> None:
    status = status_of(body)
    assert status.get("newerSummary") == SUMMARY, status
    for record in status["history"]:
        if record["id"] in notes:
            assert record.get("newerNote") == notes[record["id"]], record
    assert {r["id"] for r in status["history"]} >= set(notes)
    if task:
        assert status["currentTask"].get("newerStep") == "kept-task", status["currentTask"]


async def wait_dead(agent, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while agent.process.poll() is None:
        assert time.monotonic() < deadline, agent.tail()
        await asyncio.sleep(0.1)


async def test_newer_status_fields_survive_this_agents_writes(instances, agents, control_plane, libvirt_view):
    node = unique_node()
    agent = agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    uid = body["metadata"]["uid"]
    agent.stop()  # the node's agent is upgraded...
    try:
        with newer_crd(control_plane, NEWER):
            # ...the newer one acknowledges a hard reboot, writing its own fields, and is rolled back
            await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "r-newer"})
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            current = status_of(await instances.get("vm"))
            notes = {r["id"]: f"note of {r['id']}" for r in current["history"]}
            newer_status = {
                "newerSummary": SUMMARY,
                "history": [{**r, "newerNote": notes[r["id"]]} for r in current["history"]],
                "lastAction": {**current["lastAction"], "newerNote": notes[current["lastAction"]["id"]]},
                "taskState": "reboot_pending_hard", "phase": "Rebooting",
                "handledAction": {"id": "r-newer", "name": "RebootHard", "handledAt": now},
                "currentTask": {"name": "RebootHard", "id": "r-newer", "taskState": "reboot_pending_hard",
                                "originVmState": "active", "originPowerState": "running",
                                "owner": f"{node}/newer-host/1/abcdef", "startedAt": now, "attempt": 1,
                                "newerStep": "kept-task"},
            }

            async def write():
                await instances.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, instances.namespace, PLURAL, "vm", {"status": newer_status},
                    _content_type=MERGE)

            async def kept():
                body = await instances.get("vm")
                task = status_of(body).get("currentTask") or {}
                return body if status_of(body).get("newerSummary") and task.get("newerStep") else None

            assert_kept(await until_kept(write, kept), notes, task=True)
            counter = lv.BootCounter(libvirt_view, uid)
            try:
                # this version takes the task over (one write) and starts the reboot (a second
                # write); it dies right after that second write, before the reboot is issued
                crashing = agents.start(node, crash_at="after_started@RebootHard")
                await wait_dead(crashing)
                body = await instances.get("vm")
                task = status_of(body)["currentTask"]
                assert task["taskState"] == "reboot_started_hard" and task["attempt"] == 2
                assert task["owner"] != newer_status["currentTask"]["owner"]
                assert_kept(body, notes, task=True)

                agents.start(node)  # recovers the reboot, then carries out more actions
                await instances.wait_done("vm", "r-newer", agents=agents)
                body = await instances.wait_idle("vm", "active", agents=agents, last_id="r-newer")
                assert_kept(body, notes)
                assert counter.starts == 1  # at libvirt: one hard reboot
                await instances.patch_spec("vm", {"powerState": "Stopped"})
                assert_kept(await instances.wait_idle("vm", "stopped", agents=agents), notes)
                assert lv.power(libvirt_view, uid) == "shutoff"
                await instances.patch_spec("vm", {"powerState": "Running"})
                assert_kept(await instances.wait_idle("vm", "active", agents=agents), notes)
                await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "r-old"})
                body = await instances.wait_idle("vm", "active", agents=agents, last_id="r-old")
                assert_kept(body, notes)
                ids = [r["id"] for r in status_of(body)["history"]]
                assert ids[-4] == "r-newer" and ids[-1] == "r-old", ids
                assert counter.starts == 3  # the start after the stop, and the second hard reboot
            finally:
                counter.close()
    finally:
        agents.stop_all()
        await instances.custom.patch_namespaced_custom_object(
            GROUP, VERSION, instances.namespace, PLURAL, "vm", {"metadata": {"finalizers": None}},
            _content_type=MERGE)
        await instances.delete("vm")
        dom = lv.domain(libvirt_view, uid)
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
