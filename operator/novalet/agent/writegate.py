"""At most N of the agent's VirtualInstance writes at the apiserver at once, namespaces in turn.

In a storm the agent's workers spend most of a reconcile waiting for the apiserver's answers to
their writes (bench/storms.py reports the share), and this apiserver answers fewer writes per
second at 32 or 64 writers than at 16 (bench/write_limit.py): past a point, more writes in
flight only lengthen each one's wait. So the agent keeps at most `--write-concurrency` of them
in flight (client-go bounds a client's requests the same way, by rate). The others wait here,
their namespaces taken in turn and FIFO within one (the work queue's fairness carried on to the
apiserver): a request in a quiet namespace waits for one free slot, not behind a storm's writes.
"""
import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable

from .workqueue import FairQueue


class WriteGate:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("a write gate needs at least one slot")
        self.limit = limit
        self.in_flight = 0
        self._waiting = FairQueue(flow_of=lambda waiter: waiter[0])  # (flow, future)

    @contextlib.asynccontextmanager
    async def slot(self, flow: Hashable) -> AsyncIterator[None]:
        """Hold one of the slots while the body runs (a write and its answer)."""
        if self.in_flight < self.limit and not self._waiting:
            self.in_flight += 1
        else:
            handed = asyncio.get_running_loop().create_future()
            self._waiting.append((flow, handed))
            try:
                await handed  # a finishing write hands its slot over: in_flight stays as it is
            except asyncio.CancelledError:
                if handed.done() and not handed.cancelled():
                    self._release()  # handed over just as the caller gave up: pass it on
                else:
                    handed.cancel()  # still queued: skipped when its turn comes
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, handed = self._waiting.popleft()
            if not handed.done():
                handed.set_result(None)
                return
        self.in_flight -= 1
