"""Named crash points for the recovery and fencing tests.

Inert unless NOVALET_CRASH_AT or NOVALET_FREEZE_AT names a point (optionally `point@action`).
At a crash point the agent SIGKILLs itself there, the way a power cut or OOM kill would stop it;
at a freeze point it SIGSTOPs itself once, the way a node that locks up (the seed thread's
twelve hours) stops it, and carries on where it was when someone sends SIGCONT.
"""
import os
import signal

POINTS = ("after_claim", "after_started", "after_call", "between_steps")
_frozen = False


def _wanted(variable: str, point: str, action: str) -> bool:
    wanted = os.environ.get(variable)
    if not wanted:
        return False
    name, _, only = wanted.partition("@")
    return name == point and (not only or only == action)


def crash_if(point: str, action: str = "") -> None:
    global _frozen
    if _wanted("NOVALET_CRASH_AT", point, action):
        os.kill(os.getpid(), signal.SIGKILL)
    if not _frozen and _wanted("NOVALET_FREEZE_AT", point, action):
        _frozen = True
        os.kill(os.getpid(), signal.SIGSTOP)
