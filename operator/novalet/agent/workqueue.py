"""One work queue per agent: every reason to look at an instance becomes its key in here.

Watch events, libvirt events, the periodic resync, the startup sweep, a failed step's backoff
and a task's deadline all `add` (or `add_after`) the instance's key; a fixed number of workers
take keys and reconcile them. What client-go's `workqueue` guarantees, the shell relies on:

- a key is queued at most once, however many events name it (de-duplication);
- a key is never processed by two workers at once; one added while it is processed is marked
  dirty and queued again when that reconcile ends, so its latest event is never lost;
- `add_after` keeps the earliest wake-up of a key (a backoff or a deadline), and `add` makes
  any pending wake-up moot;
- a reconcile that raises is retried after an exponential per-key delay (`retry_delay`), reset
  by the key's next success.

One thing it adds: keys belong to flows (the agent's flow is the namespace, its tenant), and
the ready keys of the flows are taken in turn, FIFO within each flow (fair queuing, as the
apiserver's Priority and Fairness does for requests). One namespace's storm of a thousand
creates then delays another namespace's request by one reconcile, not by the whole storm.

The queue knows nothing of Kubernetes or libvirt: `reconcile(key)` returns the seconds after
which the key wants to be looked at again, or None.
"""
import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)


class FairQueue:
    """Ready keys, FIFO within a flow, the flows taken in turn (round robin)."""

    def __init__(self, flow_of: Callable[[Hashable], Hashable]):
        self.flow_of = flow_of
        self._flows: dict[Hashable, deque[Hashable]] = {}  # flow -> its ready keys
        self._turns: deque[Hashable] = deque()              # the flows with ready keys, in turn

    def __bool__(self) -> bool:
        return bool(self._turns)

    def append(self, key: Hashable) -> None:
        flow = self.flow_of(key)
        keys = self._flows.get(flow)
        if keys is None:
            keys = self._flows[flow] = deque()
            self._turns.append(flow)
        keys.append(key)

    def popleft(self) -> Hashable:
        flow = self._turns.popleft()
        keys = self._flows[flow]
        key = keys.popleft()
        if keys:
            self._turns.append(flow)  # its next key waits for every other flow's turn
        else:
            del self._flows[flow]
        return key

    def clear(self) -> None:
        self._flows.clear()
        self._turns.clear()


class WorkQueue:
    def __init__(self, reconcile: Callable[[Hashable], Awaitable[float | None]], workers: int = 16,
                 retry_base_s: float = 0.5, retry_cap_s: float = 60.0,
                 flow_of: Callable[[Hashable], Hashable] = lambda key: None,
                 observe_wait: Callable[[float], None] = lambda seconds: None):
        if workers < 1:
            raise ValueError("a work queue needs at least one worker")
        self.reconcile = reconcile
        self.observe_wait = observe_wait  # a key's time in the queue, as each is taken
        self.workers = workers
        self.retry_base_s, self.retry_cap_s = retry_base_s, retry_cap_s
        self._queue: FairQueue = FairQueue(flow_of)
        self._queued: dict[Hashable, float] = {}       # key -> when it was queued (monotonic)
        self._processing: dict[Hashable, asyncio.Task] = {}
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[Hashable, int] = {}
        self._ready = asyncio.Event()
        self._runners: list[asyncio.Task] = []
        self.processed = 0

    # ---- feeding ----------------------------------------------------------------------
    def add(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued[key] = time.monotonic()
            self._queue.append(key)
            self._ready.set()

    def add_after(self, key: Hashable, delay_s: float) -> None:
        """Queue `key` in `delay_s` seconds, unless something queues it sooner."""
        if delay_s <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay_s
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._wake, key))

    def _wake(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def retry_delay(self, failures: int) -> float:
        return min(self.retry_cap_s, self.retry_base_s * 2 ** max(0, failures - 1))

    # ---- taking keys away -----------------------------------------------------------------
    def interrupt(self, key: Hashable) -> bool:
        """Cancel the key's running reconcile (it may wait on a hung call) and queue the key
        again at once. True if one was running."""
        running = self._processing.get(key)
        self.add(key)
        if running is None or running.done():
            return False
        running.cancel()
        return True

    def clear(self) -> None:
        """Drop every queued key, wake-up and failure count, and cancel every running
        reconcile (the Lease is lost: the next tenure's sweep looks at everything again)."""
        for _, timer in self._timers.values():
            timer.cancel()
        for task in self._processing.values():
            task.cancel()
        self._queue.clear()
        self._queued.clear()
        self._timers.clear()
        self._dirty.clear()
        self._failures.clear()

    # ---- figures ----------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._queued)

    @property
    def busy(self) -> int:
        return len(self._processing)

    def saturated(self) -> bool:
        """Every worker busy, or keys waiting for one: the node's work is backed up."""
        return bool(self._queued) or len(self._processing) >= self.workers

    def idle(self) -> bool:
        return not self._queued and not self._processing

    # ---- the workers --------------------------------------------------------------------
    def start(self, may_work: Callable[[], Awaitable[None]] | None = None) -> list[asyncio.Task]:
        """Start the workers; each awaits `may_work()` (e.g. the Lease held) before a key."""
        self._runners = [asyncio.create_task(self._worker(may_work), name=f"novalet-worker-{n}")
                         for n in range(self.workers)]
        return self._runners

    async def stop(self) -> None:
        self.clear()
        for runner in self._runners:
            runner.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        self._runners = []

    async def _next(self) -> Hashable:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        key = self._queue.popleft()
        self.observe_wait(time.monotonic() - self._queued.pop(key))
        return key

    async def _worker(self, may_work: Callable[[], Awaitable[None]] | None) -> None:
        while True:
            if may_work is not None:
                await may_work()
            key = await self._next()  # never one in `_processing`: `add` marks those dirty instead
            task = asyncio.create_task(self.reconcile(key))
            self._processing[key] = task
            again: float | None = None
            try:
                again = await asyncio.shield(task)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # the worker itself is being stopped
                    task.cancel()
                    raise
                # only the reconcile was cancelled: `interrupt` or `clear` decided what comes next
            except Exception:
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                again = self.retry_delay(failures)
                log.exception("%s: reconcile failed (%d in a row); again in %.1f s", key, failures, again)
            finally:
                if self._processing.get(key) is task:
                    del self._processing[key]
                self.processed += 1
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            elif again is not None:
                self.add_after(key, again)
