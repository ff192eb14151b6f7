"""Every libvirt call has a deadline (agent/libvirt_calls.py), shown with fake blocking
functions: a hung call fails its caller in time, never starves the other calls, is never
issued late, and its thread finishes on its own."""
import asyncio
import contextvars
import threading
import time

import pytest

from novalet.agent.libvirt_calls import CallTimedOut, LibvirtCalls


@pytest.fixture
def release():
    """Set at the end of each test, so no fake call outlives it."""
    event = threading.Event()
    yield event
    event.set()


async def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_an_answer_comes_back():
    calls = LibvirtCalls(threads=2, wait_threads=2)
    assert await calls.run(lambda a, b=0: a + b, 1, b=2, timeout_s=1, what="add") == 3


async def test_a_hung_call_fails_in_time_and_its_thread_finishes_on_its_own(release):
    calls = LibvirtCalls(threads=2, wait_threads=2)
    finished = threading.Event()

    def hang():
        release.wait(10)
        finished.set()
        return "late"

    started = time.monotonic()
    with pytest.raises(CallTimedOut) as caught:
        await calls.run(hang, timeout_s=0.2, what="start")
    assert 0.2 <= time.monotonic() - started < 1.0
    assert str(caught.value) == "libvirt did not answer start within 0.2 s"
    assert calls.abandoned == 1
    release.set()
    await wait_for(finished.is_set)
    await wait_for(lambda: calls.abandoned == 0)


async def test_hung_calls_do_not_starve_the_others(release):
    calls = LibvirtCalls(threads=4, wait_threads=2)
    for _ in range(3):
        with pytest.raises(CallTimedOut):
            await calls.run(release.wait, 10, timeout_s=0.05, what="hang")
    assert calls.abandoned == 3
    answers = await asyncio.gather(*(calls.run(lambda i=i: i, timeout_s=1, what="facts") for i in range(20)))
    assert answers == list(range(20))


async def test_waits_on_guests_have_their_own_pool(release):
    """A node full of guests ignoring ACPI fills the waits pool, never the calls pool."""
    calls = LibvirtCalls(threads=2, wait_threads=2)
    waiting = [asyncio.ensure_future(calls.run(release.wait, 10, timeout_s=5, what="reboot soft", waits=True))
               for _ in range(2)]
    await asyncio.sleep(0.05)
    assert await calls.run(lambda: "ok", timeout_s=1, what="facts") == "ok"
    release.set()
    assert await asyncio.gather(*waiting) == [True, True]


async def test_a_call_still_queued_at_its_deadline_is_never_issued(release):
    calls = LibvirtCalls(threads=1, wait_threads=1)
    issued = threading.Event()
    hung = asyncio.ensure_future(calls.run(release.wait, 10, timeout_s=5, what="hang"))
    await asyncio.sleep(0.05)
    with pytest.raises(CallTimedOut):
        await calls.run(issued.set, timeout_s=0.1, what="start")
    assert calls.abandoned == 0  # withdrawn from the queue, not abandoned
    release.set()
    await hung
    await asyncio.sleep(0.1)
    assert not issued.is_set()


async def test_a_cancelled_caller_leaves_the_thread_to_finish(release):
    calls = LibvirtCalls(threads=1, wait_threads=1)
    call = asyncio.ensure_future(calls.run(release.wait, 10, timeout_s=5, what="hang"))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert calls.abandoned == 1
    release.set()
    await wait_for(lambda: calls.abandoned == 0)


TENURE: contextvars.ContextVar[int] = contextvars.ContextVar("tenure", default=0)


async def test_context_follows_the_call_into_its_thread():
    """The fence's work tenure is a context variable: it must reach the libvirt thread."""
    calls = LibvirtCalls(threads=1, wait_threads=1)
    TENURE.set(7)
    assert await calls.run(TENURE.get, timeout_s=1, what="get") == 7


async def test_pools_are_bounded_daemon_threads(release):
    """Bounded, and a hung call never holds up the agent's exit (daemon threads)."""
    calls = LibvirtCalls(threads=3, wait_threads=1)
    running = []

    def hang():
        running.append(threading.current_thread())
        release.wait(10)

    pending = [asyncio.ensure_future(calls.run(hang, timeout_s=5, what="hang")) for _ in range(10)]
    await wait_for(lambda: len(running) == 3)
    await asyncio.sleep(0.1)
    assert len(running) == 3 and all(t.daemon for t in running)
    release.set()
    await asyncio.gather(*pending)
    assert len(running) == 10 and len({t.name for t in running}) == 3
