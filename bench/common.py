"""Shared set-up for the benchmarks: a throw-away local stack, an agent process, libvirt's events."""
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from novalet_dev.controlplane import ControlPlane, find_bin_dir
from novalet_dev.libvirtd import Libvirtd, domain_type

RESULTS = Path(os.environ.get("NOVALET_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


@dataclass
class Stack:
    workdir: Path
    control_plane: ControlPlane
    libvirtd: Libvirtd
    started: list[subprocess.Popen] = field(default_factory=list)  # every agent, to stop by pid

    def agent(self, node: str, pool: Path, *extra: str) -> subprocess.Popen:
        env = {**os.environ, "KUBECONFIG": str(self.control_plane.kubeconfig)}
        path = self.workdir / f"agent-{node}.log"
        offset = path.stat().st_size if path.exists() else 0  # an earlier agent of the node wrote before it
        log = path.open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "novalet.cli", "run", "--node-name", node, "--libvirt-uri",
             self.libvirtd.uri, "--image-pool", str(pool), "--state-dir", str(self.workdir / node),
             "--domain-type", domain_type(), "--stop-timeout", "5", "--soft-reboot-timeout", "5", *extra,
             *shlex.split(os.environ.get("NOVALET_BENCH_AGENT_ARGS", ""))],  # e.g. another --write-concurrency
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_offset = offset  # where this agent's lines begin (bench/storms.py wait_ready)
        self.started.append(proc)
        return proc

    def stop_agents(self) -> None:
        """Every agent this stack started that still runs (by its pid)."""
        for proc in self.started:
            stop_process(proc)

    def test_driver_uri(self, path: str = "/default") -> str:
        """libvirt's test driver inside the private libvirtd. `/default` is one driver shared by every
        connection to it (a benchmark's own connection sees the agent's domains and their events);
        a file path gives each connection a driver of its own."""
        socket = urllib.parse.quote(str(self.libvirtd.socket_path), safe="/")
        return f"test+unix://{path}?socket={socket}"


def stop_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL after timeout_s: this process only, by its pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def _terminated(_signum, _frame) -> None:
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def local_stack() -> Iterator[Stack]:
    """The stack, stopped on the way out, also on SIGTERM (e.g. `timeout`)."""
    signal.signal(signal.SIGTERM, _terminated)
    with tempfile.TemporaryDirectory(prefix="novalet-bench-") as tmp:
        workdir = Path(tmp)
        cp = ControlPlane(workdir / "kube", bin_dir=find_bin_dir())
        lv = Libvirtd(workdir / "libvirt")
        cp.start()
        try:
            cp.apply_crds()
            lv.start()
            stack = Stack(workdir, cp, lv)
            try:
                yield stack
            finally:
                stack.stop_agents()
                lv.stop(destroy_domains=True)
        finally:
            cp.stop()


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "domain_type": domain_type(), "loadavg_at_write": [round(x, 2) for x in os.getloadavg()]}


def host_details() -> dict:
    """What machine() leaves out: the CPU and the load when the run began."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"cpu_model": model, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> dict:
    """p50/p99/max in milliseconds of latencies given in seconds."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": len(values), "p50_ms": round(1000 * percentile(values, 0.5), 1),
            "p99_ms": round(1000 * percentile(values, 0.99), 1), "max_ms": round(1000 * max(values), 1)}


class LibvirtEvents:
    """The benchmark's own libvirt connection, subscribed to every domain's lifecycle events.

    Each event is stamped (time.monotonic()) on libvirt's event thread as it arrives;
    `await wait(uuid, event, after)` gives the time of the first such event of that domain
    stamped after `after` (event: a VIR_DOMAIN_EVENT_* lifecycle constant)."""

    def __init__(self, uri: str):
        from novalet.virt.hypervisor import ensure_event_loop  # libvirt's event loop thread

        ensure_event_loop()
        self.conn = libvirt.open(uri)
        self.loop = asyncio.get_running_loop()
        self.seen: dict[str, list[tuple[float, int, int]]] = {}
        self.waiters: list[tuple[str, int, float, asyncio.Future]] = []
        self.lock = threading.Lock()
        self.count = 0
        self.callback = self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                         self._event, None)

    def _event(self, _conn, dom, event: int, detail: int, _opaque) -> None:
        stamp = time.monotonic()
        try:
            uuid = dom.UUIDString()
        except libvirt.libvirtError:
            return
        with self.lock:
            self.count += 1
            self.seen.setdefault(uuid, []).append((stamp, event, detail))
            del self.seen[uuid][:-50]
        self.loop.call_soon_threadsafe(self._wake, uuid, event, stamp)

    def _wake(self, uuid: str, event: int, stamp: float) -> None:
        for waiter in list(self.waiters):
            w_uuid, w_event, after, future = waiter
            if w_uuid == uuid and w_event == event and stamp >= after and not future.done():
                future.set_result(stamp)
                self.waiters.remove(waiter)

    async def wait(self, uuid: str, event: int, after: float, timeout_s: float) -> float | None:
        """The stamp of `event` on `uuid` at or after `after`; None if none came within timeout_s."""
        with self.lock:
            for stamp, ev, _ in self.seen.get(uuid, ()):
                if ev == event and stamp >= after:
                    return stamp
        future = self.loop.create_future()
        waiter = (uuid, event, after, future)
        self.waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    def close(self) -> None:
        try:
            self.conn.domainEventDeregisterAny(self.callback)
            self.conn.close()
        except libvirt.libvirtError:
            pass


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path
