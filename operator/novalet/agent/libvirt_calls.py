"""Blocking libvirt calls run off the event loop, on threads of their own, each with a deadline.

libvirt's Python binding blocks the calling thread until libvirtd answers, and a libvirtd that
hangs (a stuck QEMU monitor, a stopped daemon, a dead NFS mount under a disk) never answers.
Run on asyncio's default executor (a handful of threads shared with everything else), a few
such calls starve every other libvirt call of the node. So:

- libvirt calls have their own bounded thread pools: `calls` for operations that should answer
  promptly, `waits` for those that wait on the guest by design (a soft reboot, a graceful stop):
  a node full of guests that ignore ACPI fills `waits`, never `calls`;
- every call has a deadline, counted from the moment it is submitted (time in the queue counts:
  the caller's budget is what matters); past it the caller gets `CallTimedOut` at once. A call
  still queued then is withdrawn (it is never issued late); a running one is abandoned: its
  thread finishes on its own and its answer is dropped;
- the caller's context variables (the fence's work tenure) follow the call into its thread,
  as `asyncio.to_thread` does;
- the threads are daemon threads: a call hung in libvirt never holds up the agent's exit
  (ThreadPoolExecutor, and so asyncio's default executor, joins its threads at exit).
"""
import asyncio
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)
R = TypeVar("R")


class CallTimedOut(Exception):
    def __init__(self, what: str, timeout_s: float):
        super().__init__(f"libvirt did not answer {what} within {timeout_s:g} s")
        self.what, self.timeout_s = what, timeout_s


class DaemonPool:
    """At most `size` daemon threads running submitted calls in order of submission."""

    def __init__(self, size: int, name: str):
        if size < 1:
            raise ValueError("a thread pool needs at least one thread")
        self.size, self.name = size, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} pool is shut down")
            self._queue.put((future, fn, args, kwargs))
            if self._idle == 0 and len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                self._idle = max(0, self._idle - 1)  # one idle thread is taking this call
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)
                else:
                    future.set_result(result)
                del future, fn, args, kwargs, item
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        """No more calls; idle threads end, busy ones end after their call. Never waits."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class LibvirtCalls:
    def __init__(self, threads: int = 16, wait_threads: int = 64, name: str = "libvirt"):
        self.calls = DaemonPool(threads, f"{name}-call")
        self.waits = DaemonPool(wait_threads, f"{name}-wait")
        self._abandoned = 0
        self._lock = threading.Lock()

    @property
    def abandoned(self) -> int:
        """Calls whose deadline passed and whose thread has not finished yet."""
        with self._lock:
            return self._abandoned

    async def run(self, fn: Callable[..., R], *args: Any, timeout_s: float, what: str,
                  waits: bool = False, **kwargs: Any) -> R:
        """fn(*args, **kwargs) on a pool thread; CallTimedOut after `timeout_s`. A call still
        queued at its deadline is withdrawn (never issued late); a running one is abandoned."""
        pool = self.waits if waits else self.calls
        job = pool.submit(contextvars.copy_context().run, fn, *args, **kwargs)
        answer = asyncio.wrap_future(job)
        answer.add_done_callback(_retrieve)  # a late answer nobody awaits is not an error to log
        try:
            return await asyncio.wait_for(asyncio.shield(answer), timeout_s)
        except TimeoutError:
            if not job.cancel():
                self._abandon(job, what, timeout_s)
            raise CallTimedOut(what, timeout_s) from None
        except asyncio.CancelledError:  # the caller gave up (e.g. fenced)
            if not job.cancel():
                self._abandon(job, what, None)
            raise

    def _abandon(self, job: Future, what: str, timeout_s: float | None) -> None:
        with self._lock:
            self._abandoned += 1
        if timeout_s is not None:
            log.error("libvirt did not answer %s within %g s; the call is abandoned (its thread "
                      "finishes on its own; %d abandoned calls outstanding)", what, timeout_s, self.abandoned)

        def finished(f: Future) -> None:
            with self._lock:
                self._abandoned -= 1
            error = f.exception()
            log.info("abandoned libvirt call %s %s; its answer is dropped", what,
                     f"ended with: {error}" if error else "finished late")

        job.add_done_callback(finished)

    def shutdown(self) -> None:
        """Stop taking calls; never waits for a hung one."""
        self.calls.shutdown()
        self.waits.shutdown()
