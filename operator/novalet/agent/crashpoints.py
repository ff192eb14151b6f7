"""Named crash points for the recovery and fencing tests.

Inert unless NOVALET_CRASH_AT or NOVALET_FREEZE_AT names a point, optionally narrowed to an
action and to the task state on record there: `point`, `point@Action` or
`point@Action:task_state` (e.g. `between_steps@Create:block_device_mapping`, the boundary after
the disks were prepared; `point@:task_state` for any action). A plan with several operations
passes `after_started` and `between_steps` once per operation: the task state tells them apart.
At a crash point the agent SIGKILLs itself there, the way a power cut or OOM kill would stop it;
at a freeze point it SIGSTOPs itself once, the way a node that locks up (the seed thread's
twelve hours) stops it, and carries on where it was when someone sends SIGCONT.
"""
import os
import signal

POINTS = ("after_claim", "after_started", "after_call", "between_steps")
_frozen = False


def parse(wanted: str) -> tuple[str, str, str]:
    """`point@Action:task_state` -> (point, action, task_state); "" where not given."""
    name, _, rest = wanted.partition("@")
    action, _, task_state = rest.partition(":")
    return name, action, task_state


def _wanted(variable: str, point: str, action: str, task_state: str) -> bool:
    wanted = os.environ.get(variable)
    if not wanted:
        return False
    name, only_action, only_state = parse(wanted)
    return (name == point and (not only_action or only_action == action)
            and (not only_state or only_state == task_state))


def crash_if(point: str, action: str = "", task_state: str = "") -> None:
    global _frozen
    if _wanted("NOVALET_CRASH_AT", point, action, task_state):
        os.kill(os.getpid(), signal.SIGKILL)
    if not _frozen and _wanted("NOVALET_FREEZE_AT", point, action, task_state):
        _frozen = True
        os.kill(os.getpid(), signal.SIGSTOP)
