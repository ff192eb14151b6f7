"""Waits on the guest are deadlines, not blocked threads.

A soft reboot and an ACPI stop ask the guest to act and give it time: the deadline is recorded
in `currentTask.deadline` with the step's task state (so a restarted agent keeps it), the button
is pressed, and the agent looks again when libvirt reports the guest's answer (an event) or
when the deadline comes, whichever is first. Past the deadline the soft reboot escalates to a
hard one and the stop forces the power off, as Nova does.
"""
from datetime import datetime
from typing import Literal

from .vocabulary import Op

# The plan operations that wait on the guest (each is the last operation of its plan).
WAITING_OPS = frozenset({Op.REBOOT_SOFT, Op.STOP})

# Look again at least this often while waiting: an event lost with a dropped libvirt
# connection must not hold a task until its deadline.
POLL_S = 5.0


def look_again(answered: bool, deadline: datetime, now: datetime,
               poll_s: float = POLL_S) -> Literal["answered", "expired"] | float:
    """What a wait comes to at `now`: the guest answered, the deadline passed, or the seconds
    after which to look again."""
    if answered:
        return "answered"
    left = (deadline - now).total_seconds()
    if left <= 0:
        return "expired"
    return min(left, poll_s)
