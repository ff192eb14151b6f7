"""The agent's write gate (agent/writegate.py): at most N writes in flight, the waiting ones let
through namespaces in turn, and a waiter that gives up neither holds nor loses a slot. Driven
with plain asyncio (the writes are stand-ins that wait on events)."""
import asyncio

import pytest

from novalet.agent.writegate import WriteGate


class Writes:
    """Writes that hold their slot until released; records the order they got one."""

    def __init__(self, gate: WriteGate):
        self.gate, self.order, self.release = gate, [], {}

    async def write(self, flow: str, name: str) -> None:
        self.release[name] = asyncio.Event()
        async with self.gate.slot(flow):
            self.order.append(name)
            await self.release[name].wait()

    def start(self, flow: str, name: str) -> asyncio.Task:
        return asyncio.create_task(self.write(flow, name))


async def turns() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_no_more_than_the_limit_in_flight_and_quiet_namespaces_go_first():
    gate = WriteGate(2)
    w = Writes(gate)
    tasks = [w.start("storm", f"s{n}") for n in range(5)]
    await turns()
    assert w.order == ["s0", "s1"] and gate.in_flight == 2
    tasks.append(w.start("probe", "p0"))  # queued behind three of the storm's
    await turns()
    w.release["s0"].set()
    await turns()
    assert w.order == ["s0", "s1", "s2"]  # the storm's next was first in line
    w.release["s1"].set()
    await turns()
    assert w.order[-1] == "p0"  # then the probe's namespace has its turn, before s3 and s4
    for event in w.release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert gate.in_flight == 0 and w.order[3:] == ["p0", "s3", "s4"]


async def test_a_waiter_that_gives_up_is_skipped_and_slots_are_not_lost():
    gate = WriteGate(1)
    w = Writes(gate)
    first = w.start("a", "a0")
    await turns()
    gone = w.start("b", "b0")
    after = w.start("c", "c0")
    await turns()
    gone.cancel()  # e.g. the fence stopped its reconcile while it waited
    await turns()
    w.release["a0"].set()
    await turns()
    assert w.order == ["a0", "c0"]
    w.release["c0"].set()
    await asyncio.gather(first, after)
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert gate.in_flight == 0
    w.start("d", "d0")  # the slot is free again
    await turns()
    assert w.order[-1] == "d0"
    w.release["d0"].set()
    await turns()


async def test_a_write_that_fails_frees_its_slot():
    gate = WriteGate(1)
    with pytest.raises(RuntimeError):
        async with gate.slot("a"):
            raise RuntimeError("409")
    assert gate.in_flight == 0
    async with gate.slot("a"):
        assert gate.in_flight == 1


def test_a_gate_needs_a_slot():
    with pytest.raises(ValueError):
        WriteGate(0)
