"""The node Lease as a fence: the holder stops acting before anyone may take over."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from novalet.agent.fence import WORK_TENURE, Fence, Fenced
from novalet.core.fencing import LeaseTiming, may_act, may_take_over

TIMING = LeaseTiming(duration_s=20, renew_deadline_s=10, retry_period_s=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("duration, deadline, retry", [(20, 20, 2), (20, 25, 2), (20, 10, 10), (20, 10, 0)])
def test_timing_must_stop_the_holder_before_a_takeover(duration, deadline, retry):
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        LeaseTiming(duration, deadline, retry)


def test_default_timing_figures():
    timing = LeaseTiming()
    assert (timing.duration_s, timing.renew_deadline_s, timing.retry_period_s) == (20, 10, 2)
    assert timing.margin_s == 10 and timing.worst_case_takeover_s == 22


@given(renewed=st.floats(0, 1e6), holder_clock=st.floats(0, 1e6), observed_after=st.floats(0, 100))
def test_the_holder_never_acts_once_a_standby_may_take_over(renewed, holder_clock, observed_after):
    """The standby starts its clock when it first sees the renewal, which is never before the
    renewal began (same host clock here; on two hosts each uses its own, only durations count)."""
    seen = renewed + observed_after
    now = max(holder_clock, seen)
    if may_take_over(seen, now, TIMING):
        assert not may_act(renewed, now, TIMING)


def test_the_holder_acts_until_the_renew_deadline_then_never():
    assert may_act(100.0, 109.9, TIMING)
    assert not may_act(100.0, 110.0, TIMING)
    assert not may_act(None, 100.0, TIMING)


def test_a_frozen_process_wakes_fenced():
    clock = Clock()
    fence = Fence(TIMING, clock)
    fence.renewed(clock.now)
    fence.check()  # holds
    clock.now += 12 * 3600  # the seed thread's twelve hours, SIGSTOP or a locked-up kernel
    with pytest.raises(Fenced, match="no longer holds the node's Lease"):
        fence.check("reboot")


def test_work_begun_before_a_lost_lease_stays_fenced_after_it_is_held_again():
    clock = Clock()
    fence = Fence(TIMING, clock)
    fence.renewed(clock.now)
    fence.begin_work()  # a reconcile of the first tenure
    old_tenure = WORK_TENURE.get()
    fence.lose()
    fence.renewed(clock.now)  # held again: a new tenure, with its own recovery sweep
    with pytest.raises(Fenced, match="began before this agent lost"):
        fence.check()
    fence.begin_work()
    fence.check()  # new work is fine
    assert WORK_TENURE.get() == old_tenure + 1
