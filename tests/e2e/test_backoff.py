"""Failures back off: a step that keeps failing (a mistyped image) is retried exponentially
slower, says so in Stalled with the next retry time, posts one Event per distinct failure
(counted on it), and is tried again at once when the spec changes."""
import asyncio
import time
from datetime import UTC, datetime

import pytest

from .conftest import TINY
from .harness import events_until, status_of, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def condition(body: dict, kind: str) -> dict:
    return next((c for c in status_of(body).get("conditions", []) if c["type"] == kind), {})


def rebuild_failures(events: list) -> list:
    return [e for e in events if e.reason == "Failed" and "spec-g2-rebuild" in e.note]


def counted(events: list, times: int) -> bool:
    """The rebuild's failures are on one Event, counted at least `times` times."""
    failures = rebuild_failures(events)
    return len(failures) == 1 and failures[0].series is not None and failures[0].series.count >= times


async def test_a_mistyped_image_backs_off_and_a_fix_is_tried_at_once(instances, agents, kube_api, namespace):
    node = unique_node()
    # 2 s doubling: tries at about 0, 2, 6, 14, 30 s; resyncs every 2 s must not add tries
    agents.start(node, extra_args=["--backoff-base", "2", "--backoff-cap", "60", "--resync-seconds", "2"])
    created = await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    uid = created["metadata"]["uid"]
    await instances.wait_idle("vm", "active", agents=agents)
    await instances.patch_spec("vm", {"image": "no-such-image"})  # a typo: the rebuild cannot succeed
    started = time.monotonic()
    body = await instances.wait("vm", lambda b: (status_of(b).get("backoff") or {}).get("failures", 0) >= 3,
                                timeout=60, what="three failures", agents=agents)
    await asyncio.sleep(max(0.0, 16 - (time.monotonic() - started)))
    # between tries, not during one (while a try runs, Stalled says the instance is in error)
    body = await instances.wait("vm", lambda b: not status_of(b).get("taskState"), timeout=30,
                                what="a pause between tries", agents=agents)
    status = status_of(body)
    retry = status["backoff"]
    assert retry["request"] == "spec-g2-rebuild" and "no-such-image" in retry["lastError"]
    assert 3 <= retry["failures"] <= 5, f"{retry['failures']} tries in 16 s with a 2 s doubling backoff"
    tries = [r for r in status["history"] if r["id"] == "spec-g2-rebuild"]
    assert len(tries) == retry["failures"] and all(r["result"] == "Failed" for r in tries)
    stalled = condition(body, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "Backoff"), stalled
    assert f"next retry at {retry['nextRetryAt'].replace('Z', '+00:00')}" in stalled["message"], stalled
    assert condition(body, "Ready")["status"] == "False"

    events = [e for e in await events_until(kube_api, namespace, lambda items: counted(
        [e for e in items if e.regarding.uid == uid], retry["failures"] - 1)) if e.regarding.uid == uid]
    assert counted(events, retry["failures"] - 1), [e.note for e in events]  # one Event, counted
    assert len(events) <= 8, [f"{e.reason}: {e.note}" for e in events]  # create's two, the rebuild's

    # the fix is a new generation: tried at once, not at the next retry time
    next_retry = datetime.fromisoformat(retry["nextRetryAt"])
    await instances.patch_spec("vm", {"image": TINY})
    fixed_at = datetime.now(UTC)
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="spec-g3-rebuild", timeout=30)
    assert datetime.now(UTC) < next_retry or (next_retry - fixed_at).total_seconds() < 3, (
        "the fix waited for the old backoff")
    assert "backoff" not in status_of(body) or status_of(body)["backoff"] is None
    assert condition(body, "Stalled")["status"] == "False"
