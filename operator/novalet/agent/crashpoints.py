"""Named crash points for the recovery tests.

Inert unless NOVALET_CRASH_AT names a point (optionally `point@action`): the agent then
SIGKILLs itself there, the way a power cut or OOM kill would stop it.
"""
import os
import signal

POINTS = ("after_claim", "after_started", "after_call", "between_steps")


def crash_if(point: str, action: str = "") -> None:
    wanted = os.environ.get("NOVALET_CRASH_AT")
    if not wanted:
        return
    name, _, only = wanted.partition("@")
    if name == point and (not only or only == action):
        os.kill(os.getpid(), signal.SIGKILL)
