"""The fence an agent checks right before every libvirt operation and every write.

`Fence.check()` raises `Fenced` once the agent can no longer prove it holds the node's Lease
(core/fencing.py has the rule). The clock is CLOCK_BOOTTIME: it keeps counting while the
process is stopped (SIGSTOP, a frozen VM) and while the host is suspended, so a process that
wakes after a long freeze finds itself fenced before it does anything.
"""
import time
from collections.abc import Callable
from contextvars import ContextVar

from ..core.fencing import LeaseTiming, may_act


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Fenced(Exception):
    """This agent can no longer prove it holds the node's Lease: it must not act."""


# The tenure a piece of work began under. Work that outlives a lost Lease (a thread blocked in
# libvirt, a coroutine that was waiting) stays fenced even if this process holds the Lease
# again later: the new tenure's recovery sweep decides afresh. Context variables follow the
# work into asyncio tasks and into `asyncio.to_thread` threads.
WORK_TENURE: ContextVar[int | None] = ContextVar("novalet_work_tenure", default=None)


class Fence:
    def __init__(self, timing: LeaseTiming, clock: Callable[[], float] = boottime):
        self.timing, self.clock = timing, clock
        self._renewal_started_at: float | None = None
        self.tenure = 0  # counts the times this process lost the Lease

    def renewed(self, started_at: float) -> None:
        """A renewal that began at `started_at` (this clock) succeeded."""
        self._renewal_started_at = started_at

    def lose(self) -> None:
        if self._renewal_started_at is not None:
            self.tenure += 1
        self._renewal_started_at = None

    def holds(self) -> bool:
        return may_act(self._renewal_started_at, self.clock(), self.timing)

    def begin_work(self) -> None:
        """Mark the current task (and what it starts) as work of the present tenure."""
        WORK_TENURE.set(self.tenure)

    def check(self, what: str = "act") -> None:
        if not self.holds():
            raise Fenced(f"cannot {what}: this agent no longer holds the node's Lease")
        tenure = WORK_TENURE.get()
        if tenure is not None and tenure != self.tenure:
            raise Fenced(f"cannot {what}: the work began before this agent lost the node's Lease")
