"""Small process and path helpers shared by the local stack's daemons."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from novalet.virt.kvm import cache_root  # noqa: F401 - one rule for the product and the stack


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def stop_group(pid: int, timeout: float, reap: Callable[[], None]) -> None:
    """Stop a process started with start_new_session (its group, pgid == pid): SIGTERM, then
    SIGKILL after ``timeout``; ``reap`` collects it if it is our child."""
    for sig, budget in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + budget
        while pid_alive(pid) and time.monotonic() < deadline:
            reap()
            time.sleep(0.02)
