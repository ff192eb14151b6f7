"""The node Lease as a fence: the timing rules, pure.

The holder of a node's Lease is the one agent allowed to act on that node's instances. The
rules follow client-go's leader election (tools/leaderelection: LeaseDuration, RenewDeadline,
RetryPeriod) and Proxmox's watchdog: the holder stops acting `renew_deadline_s` after the
start of its last successful renewal, which is earlier than anyone else may take the Lease
(`duration_s` after they last saw it change). The margin between the two covers the time
between a fence check and the operation it guards.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class LeaseTiming:
    duration_s: float = 20.0        # a standby takes over after seeing no renewal for this long
    renew_deadline_s: float = 10.0  # the holder acts only this long after its last renewal began
    retry_period_s: float = 2.0     # how often the holder renews (and a standby looks)

    def __post_init__(self) -> None:
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.duration_s:
            raise ValueError("lease timing needs 0 < retry period < renew deadline < lease duration "
                             f"(got {self.retry_period_s}, {self.renew_deadline_s}, {self.duration_s})")

    @property
    def margin_s(self) -> float:
        """Time between the holder stopping and the earliest takeover."""
        return self.duration_s - self.renew_deadline_s

    @property
    def worst_case_takeover_s(self) -> float:
        """From the holder freezing to a standby holding the Lease: the holder renewed just
        before it froze; the standby notices `duration_s` after it last saw the renewal, at its
        next look."""
        return self.duration_s + self.retry_period_s


def may_act(renewal_started_at: float | None, now: float, timing: LeaseTiming) -> bool:
    """The holder may still act: its last successful renewal began less than the renew
    deadline ago. Times are the holder's own monotonic clock (it keeps counting while the
    process is stopped)."""
    return renewal_started_at is not None and now < renewal_started_at + timing.renew_deadline_s


def may_take_over(unchanged_since: float, now: float, timing: LeaseTiming) -> bool:
    """Another agent's Lease has not changed for a whole lease duration, as this agent saw it
    on its own clock (no trust in the holder's clock: client-go's observedTime)."""
    return now >= unchanged_since + timing.duration_s
