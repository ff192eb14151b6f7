"""A persistent network namespace, `ip netns`-style: bound to a file of the stack's state directory.

The local stack's guests (libvirtd.py) and its node (node.py) each live in one: every address
they are given, and every connection they open, stays inside it (the network rule in
docs/development.md).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


class NetworkNamespaceError(RuntimeError):
    pass


class NetworkNamespace:
    def __init__(self, path: Path):
        self.path = path

    def _id(self) -> tuple[int, int] | None:
        """(device, inode) of the namespace bound to ``path``, or None when none is bound there
        (a namespace file lives on nsfs, like /proc/self/ns/net)."""
        try:
            st = os.stat(self.path)
            nsfs = os.stat("/proc/self/ns/net").st_dev
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if st.st_dev == nsfs else None

    def exists(self) -> bool:
        return self._id() is not None

    def contains(self, pid: int) -> bool:
        """Whether process ``pid`` lives in this namespace."""
        ours = self._id()
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            return False
        return ours is not None and (st.st_dev, st.st_ino) == ours

    def processes(self) -> list[int]:
        """Every process living in this namespace now."""
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and self.contains(int(p))]

    def wait_empty(self, timeout: float) -> list[int]:
        """Wait until no process lives in the namespace (helpers of the processes just ended,
        such as dnsmasq's lease helper, go a moment after them); the ones left at the timeout."""
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def command(self, argv: list[str] | tuple[str, ...]) -> list[str]:
        """``argv`` run inside this namespace (an argv list; needs root)."""
        nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
        return [nsenter, f"--net={self.path}", "--", *[str(a) for a in argv]]

    def run(self, argv: list[str] | tuple[str, ...], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside this namespace (kwargs: check, capture_output, ...)."""
        if not self.exists():
            raise NetworkNamespaceError(f"the network namespace {self.path} is not there")
        check = kwargs.pop("check", False)
        return subprocess.run(self.command(argv), check=check, **kwargs)

    def ensure(self) -> None:
        """Create the namespace with ``lo`` up, unless it exists."""
        if self.exists():
            return
        self.path.unlink(missing_ok=True)
        self.path.touch(mode=0o600)
        ip = shutil.which("ip") or "/usr/sbin/ip"
        r = subprocess.run(["unshare", f"--net={self.path}", "--", ip, "link", "set", "lo", "up"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if r.returncode != 0 or not self.exists():
            self.unmount()
            raise NetworkNamespaceError(f"creating the network namespace {self.path} failed "
                                        f"(exit {r.returncode}): {r.stderr.strip()}")

    def unmount(self) -> None:
        """Unbind the namespace (it ends with the last process in it) and remove the file."""
        if self.exists():
            r = subprocess.run(["umount", "--", str(self.path)], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, check=False)
            if r.returncode != 0:
                print(f"novalet: umount {self.path} failed: {r.stderr.strip()}", file=sys.stderr)
                return
        self.path.unlink(missing_ok=True)
