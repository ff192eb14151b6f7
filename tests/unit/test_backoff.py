"""Failures back off: exponential with a cap, recorded in status, shown in Stalled."""
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novalet.api.models import CurrentTask, HandledAction, VirtualInstanceStatus
from novalet.core import backoff, transitions
from novalet.core.backoff import BackoffPolicy
from novalet.core.plans import plan_of
from novalet.core.vocabulary import Action, TaskState, VmState

NOW = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = BackoffPolicy(base_s=10, cap_s=300)


def test_delays_double_from_the_base_up_to_the_cap():
    assert [POLICY.delay_s(n) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]


@given(st.integers(1, 10_000))
def test_delay_is_bounded_and_never_shrinks(failures):
    assert 10 <= POLICY.delay_s(failures) <= 300
    assert POLICY.delay_s(failures + 1) >= POLICY.delay_s(failures)


def test_base_must_not_exceed_the_cap():
    with pytest.raises(ValueError):
        BackoffPolicy(base_s=10, cap_s=5)


def running(task_id: str, handled: str | None = None) -> VirtualInstanceStatus:
    task = CurrentTask(name="Rebuild", id=task_id, taskState=TaskState.REBUILDING, originVmState=VmState.ACTIVE,
                       owner="agent", startedAt=NOW)
    return VirtualInstanceStatus(
        vmState=VmState.ACTIVE, taskState=TaskState.REBUILDING, currentTask=task,
        handledAction=HandledAction(id=handled, name="Rebuild", handledAt=NOW) if handled else None)


def fail(status: VirtualInstanceStatus, at: datetime) -> VirtualInstanceStatus:
    return transitions.finish(status, plan_of(Action.REBUILD), False, "no image named typo", at, None,
                              backoff_policy=POLICY)


def test_a_failing_declarative_step_backs_off_and_says_so_in_stalled():
    status = fail(running("spec-g2-rebuild"), NOW)
    assert status.backoff.failures == 1 and status.backoff.nextRetryAt == NOW + timedelta(seconds=10)
    again = status.model_copy(update={"currentTask": running("spec-g2-rebuild").currentTask})
    status = fail(again, NOW + timedelta(seconds=10))
    assert status.backoff.failures == 2
    assert status.backoff.nextRetryAt == NOW + timedelta(seconds=30)
    stalled = next(c for c in status.conditions if c.type == "Stalled")
    assert (stalled.status, stalled.reason) == ("True", "Backoff")
    assert "spec-g2-rebuild failed 2 times: no image named typo" in stalled.message
    assert f"next retry at {status.backoff.nextRetryAt.isoformat()}" in stalled.message
    assert next(c for c in status.conditions if c.type == "Ready").status == "False"
    assert backoff.waiting(status, "spec-g2-rebuild", NOW + timedelta(seconds=20)) == 10
    assert backoff.waiting(status, "spec-g2-rebuild", NOW + timedelta(seconds=30)) is None
    assert backoff.waiting(status, "spec-g3-rebuild", NOW) is None  # a spec change: at once


def test_a_one_shot_request_is_answered_once_and_not_retried():
    status = fail(running("rebuild-1", handled="rebuild-1"), NOW)
    assert status.backoff is None
    assert status.lastAction.result == "Failed"


def test_a_success_ends_the_backoff():
    failed = fail(running("spec-g2-rebuild"), NOW)
    retried = failed.model_copy(update={"currentTask": running("spec-g3-rebuild").currentTask,
                                        "taskState": TaskState.REBUILDING})
    done = transitions.finish(retried, plan_of(Action.REBUILD), True, "", NOW, None, backoff_policy=POLICY)
    assert done.backoff is None
    assert next(c for c in done.conditions if c.type == "Stalled").status == "False"
