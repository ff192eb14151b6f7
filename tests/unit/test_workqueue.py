"""The agent's work queue: de-duplication, one reconcile per key at a time, no lost event,
earliest wake-up wins, retries after failures. Driven with a fake reconcile (pure asyncio)."""
import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novalet.agent.workqueue import FairQueue, WorkQueue


class Recorder:
    """A reconcile that records calls and can be held open per key."""

    def __init__(self):
        self.calls: list[str] = []
        self.running: set[str] = set()
        self.overlaps = 0
        self.gates: dict[str, asyncio.Event] = {}
        self.results: dict[str, list] = {}

    async def __call__(self, key):
        if key in self.running:
            self.overlaps += 1
        self.running.add(key)
        self.calls.append(key)
        try:
            if key in self.gates:
                await self.gates[key].wait()
            result = self.results.get(key, [None]).pop(0) if self.results.get(key) else None
            if isinstance(result, Exception):
                raise result
            return result
        finally:
            self.running.discard(key)


async def run_briefly(queue: WorkQueue, *keys, seconds: float = 0.1) -> None:
    """Start the workers, queue `keys`, let them work for `seconds`, stop."""
    queue.start()
    for key in keys:
        queue.add(key)
    await asyncio.sleep(seconds)
    await queue.stop()


async def settle(queue: WorkQueue, rounds: int = 50):
    for _ in range(rounds):
        await asyncio.sleep(0)
        if queue.idle():
            await asyncio.sleep(0)
            if queue.idle():
                return


async def test_a_key_added_many_times_is_reconciled_once():
    rec = Recorder()
    queue = WorkQueue(rec, workers=4)
    for _ in range(10):
        queue.add("a")
    queue.add("b")
    assert queue.depth == 2
    queue.start()
    await settle(queue)
    await queue.stop()
    assert sorted(rec.calls) == ["a", "b"]


async def test_an_event_during_a_reconcile_runs_it_again_afterwards_never_beside_it():
    rec = Recorder()
    rec.gates["a"] = asyncio.Event()
    queue = WorkQueue(rec, workers=4)
    queue.start()
    queue.add("a")
    await asyncio.sleep(0.01)
    assert rec.calls == ["a"]
    queue.add("a")
    queue.add("a")
    await asyncio.sleep(0.01)
    assert rec.calls == ["a"] and rec.overlaps == 0  # the other workers stay off it
    rec.gates["a"].set()
    await settle(queue)
    await queue.stop()
    assert rec.calls == ["a", "a"] and rec.overlaps == 0


async def test_add_after_keeps_the_earliest_wakeup_and_add_makes_it_moot():
    rec = Recorder()
    queue = WorkQueue(rec, workers=1)
    queue.start()
    queue.add_after("a", 0.05)
    queue.add_after("a", 10)     # later: ignored
    queue.add_after("b", 10)
    queue.add("b")               # now: the wake-up is dropped
    await asyncio.sleep(0.12)
    await queue.stop()
    assert rec.calls.count("a") == 1 and rec.calls.count("b") == 1


async def test_a_reconcile_asks_to_be_looked_at_again():
    rec = Recorder()
    rec.results["a"] = [0.02, None]
    await run_briefly(WorkQueue(rec, workers=1), "a")
    assert rec.calls == ["a", "a"]


async def test_failures_back_off_exponentially_and_a_success_resets_them():
    queue = WorkQueue(Recorder(), workers=1, retry_base_s=0.5, retry_cap_s=4)
    assert [queue.retry_delay(n) for n in range(1, 6)] == [0.5, 1, 2, 4, 4]
    rec = Recorder()
    rec.results["a"] = [RuntimeError("boom"), None]
    await run_briefly(WorkQueue(rec, workers=1, retry_base_s=0.02), "a")
    assert rec.calls == ["a", "a"]


async def test_interrupt_cancels_the_running_reconcile_and_runs_the_key_again():
    rec = Recorder()
    rec.gates["a"] = asyncio.Event()  # a reconcile stuck in a hung call
    queue = WorkQueue(rec, workers=2)
    queue.start()
    queue.add("a")
    await asyncio.sleep(0.01)
    assert queue.interrupt("a") is True
    rec.gates["a"].set()  # the second reconcile goes through
    await settle(queue)
    await queue.stop()
    assert rec.calls == ["a", "a"] and rec.overlaps == 0


async def test_clear_drops_queued_keys_and_cancels_running_ones():
    rec = Recorder()
    rec.gates["a"] = asyncio.Event()
    queue = WorkQueue(rec, workers=1)
    queue.start()
    queue.add("a")
    await asyncio.sleep(0.01)
    queue.add("b")
    queue.add_after("c", 0.01)
    queue.clear()
    await asyncio.sleep(0.05)
    assert queue.idle()
    await queue.stop()
    assert rec.calls == ["a"]


async def test_workers_wait_until_they_may_work():
    rec = Recorder()
    allowed = asyncio.Event()
    queue = WorkQueue(rec, workers=2)
    queue.start(allowed.wait)
    queue.add("a")
    await asyncio.sleep(0.02)
    assert rec.calls == []
    allowed.set()
    await settle(queue)
    await queue.stop()
    assert rec.calls == ["a"]


async def test_many_keys_share_a_bounded_number_of_workers():
    rec = Recorder()
    peak = 0

    async def reconcile(key):
        nonlocal peak
        await rec(key)
        peak = max(peak, len(queue._processing))
        await asyncio.sleep(0.001)

    queue = WorkQueue(reconcile, workers=3)
    for n in range(30):
        queue.add(n)
    queue.start()
    for _ in range(200):
        await asyncio.sleep(0.002)
        if queue.idle():
            break
    await queue.stop()
    assert sorted(rec.calls) == list(range(30)) and peak <= 3


def test_a_queue_without_workers_is_refused():
    with pytest.raises(ValueError):
        WorkQueue(Recorder(), workers=0)


async def test_flows_take_turns_so_one_flows_storm_does_not_hold_another_flows_key():
    rec = Recorder()
    queue = WorkQueue(rec, workers=1, flow_of=lambda key: key[0])
    for n in range(100):
        queue.add(("storm", n))
    queue.add(("tenant", 0))
    queue.add(("tenant", 1))
    queue.add(("other", 0))
    queue.start()
    await settle(queue, rounds=1000)
    await queue.stop()
    assert rec.calls[:6] == [("storm", 0), ("tenant", 0), ("other", 0), ("storm", 1), ("tenant", 1), ("storm", 2)]
    assert [k for k in rec.calls if k[0] == "storm"] == [("storm", n) for n in range(100)]  # FIFO within a flow
    assert len(rec.calls) == 103


async def test_a_key_of_a_flow_that_ran_dry_starts_a_new_turn_behind_the_others():
    rec = Recorder()
    queue = WorkQueue(rec, workers=1, flow_of=lambda key: key[0])
    queue.add(("a", 0))
    queue.add(("b", 0))
    queue.add(("b", 1))
    queue.start()
    await settle(queue, rounds=1000)
    queue.add(("a", 1))
    queue.add(("c", 0))
    await settle(queue, rounds=1000)
    await queue.stop()
    assert rec.calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("c", 0)]


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 50)), unique=True, max_size=60))
def test_a_fair_queue_keeps_each_flows_order_and_serves_backlogged_flows_in_turn(keys):
    fair = FairQueue(lambda key: key[0])
    for key in keys:
        fair.append(key)
    taken = []
    while fair:
        taken.append(fair.popleft())
    assert sorted(taken) == sorted(keys)
    for flow in "abcd":
        assert [k for k in taken if k[0] == flow] == [k for k in keys if k[0] == flow]
    # in any stretch where every flow still has keys, no flow is served twice before another once
    served = {flow: 0 for flow in "abcd"}
    left = {flow: sum(1 for k in keys if k[0] == flow) for flow in "abcd"}
    for key in taken:
        served[key[0]] += 1
        left[key[0]] -= 1
        backlogged = [f for f in "abcd" if left[f] > 0]
        if backlogged:
            assert max(served[f] for f in backlogged) - min(served[f] for f in backlogged) <= 1


async def test_saturated_while_every_worker_is_busy_or_a_key_waits():
    rec = Recorder()
    rec.gates = {key: asyncio.Event() for key in "abc"}
    queue = WorkQueue(rec, workers=2)
    queue.start()
    queue.add("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not queue.saturated()  # one of two workers busy, nothing waiting
    queue.add("b")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert queue.saturated() and queue.depth == 0  # both workers busy
    queue.add("c")
    rec.gates["a"].set()
    rec.gates["b"].set()
    rec.gates["c"].set()
    await settle(queue)
    assert not queue.saturated()
    await queue.stop()
