"""The Event recorder (kube/events.py) posts asynchronously: `emit` returns at once, an
object's Events are posted in order, a repeat is counted on the first, a fenced agent posts
nothing it emitted before, and a full backlog drops rather than blocks. Driven with a fake
events API (the posting itself is exercised against the real apiserver by the e2e tests)."""
import asyncio
import json

import pytest

from novalet.kube.events import EventRecorder


class Response:
    def __init__(self, payload: dict, status: int = 201):
        self.payload, self.status, self.reason = payload, status, "Created"

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def read(self) -> bytes:
        return json.dumps(self.payload).encode()


class EventsApi:
    def __init__(self):
        self.created: list[dict] = []
        self.patched: list[tuple[str, dict]] = []
        self.open = asyncio.Event()
        self.open.set()

    async def create_namespaced_event(self, namespace, body, _preload_content=True):
        await self.open.wait()
        name = f"{body['metadata']['generateName']}{len(self.created)}"
        self.created.append({**body, "metadata": {**body["metadata"], "name": name}})
        return Response({"metadata": {"name": name}})

    async def patch_namespaced_event(self, name, namespace, body, _preload_content=True):
        await self.open.wait()
        self.patched.append((name, body))
        return Response({"metadata": {"name": name}}, status=200)


def instance(name: str = "vm", uid: str = "u1") -> dict:
    return {"apiVersion": "novalet.io/v1alpha1", "kind": "VirtualInstance",
            "metadata": {"namespace": "ns", "name": name, "uid": uid, "resourceVersion": "7"}}


class Fence:
    def __init__(self):
        self.holds = True

    def check(self, what: str) -> None:
        if not self.holds:
            raise RuntimeError(f"fenced: may not {what}")


@pytest.fixture
def recorder():
    fence = Fence()
    rec = EventRecorder(object(), "novalet.io/agent", "node-1/test", guard=fence.check, senders=2, backlog=3)
    rec.events = EventsApi()
    rec.fence = fence
    return rec


async def test_emit_returns_before_the_event_is_posted(recorder):
    recorder.events.open.clear()  # an apiserver that has not answered yet
    await asyncio.wait_for(recorder.emit(instance(), "Started", "Pause p-1: pausing"), timeout=1)
    assert recorder.events.created == []
    recorder.events.open.set()
    assert await recorder.flush(1)
    [event] = recorder.events.created
    assert (event["reason"], event["note"], event["regarding"]["uid"]) == ("Started", "Pause p-1: pausing", "u1")
    await recorder.close()


async def test_an_objects_events_keep_their_order_and_a_repeat_is_counted_on_the_first(recorder):
    for note in ("first", "second", "first"):
        await recorder.emit(instance(), "Failed", note, warning=True)
    assert await recorder.flush(1)
    assert [e["note"] for e in recorder.events.created] == ["first", "second"]
    [(name, patch)] = recorder.events.patched
    assert name == recorder.events.created[0]["metadata"]["name"] and patch["series"]["count"] == 2
    await recorder.close()


async def test_a_fenced_agent_posts_nothing_it_emitted_before(recorder):
    recorder.events.open.clear()
    await recorder.emit(instance(), "Succeeded", "done")
    recorder.fence.holds = False  # the Lease lapsed while the Event waited
    recorder.events.open.set()
    assert await recorder.flush(1)
    assert recorder.events.created == [] and recorder.dropped == 1
    with pytest.raises(RuntimeError, match="fenced"):
        await recorder.emit(instance(), "Succeeded", "after the fence")
    await recorder.close()


async def test_a_full_backlog_drops_events_rather_than_block_the_reconcile(recorder, caplog):
    recorder.events.open.clear()
    for n in range(10):  # one object: one sender, a backlog of 3 behind the one in flight
        await asyncio.wait_for(recorder.emit(instance(), "Started", f"step {n}"), timeout=1)
    assert recorder.dropped >= 5 and "event backlog full" in caplog.text
    recorder.events.open.set()
    assert await recorder.flush(1)
    assert len(recorder.events.created) == 10 - recorder.dropped
    await recorder.close()


async def test_while_the_work_is_backed_up_one_sender_posts_and_the_rest_trail(recorder):
    """busy(): one sender keeps posting, the others' Events wait until the work lets up, and a
    flush (the agent stopping) posts them busy or not."""
    busy = [True]
    recorder.busy = lambda: busy[0]
    # one instance for each sender (an object's Events all go to one, by its uid's hash)
    uids = {hash(f"u{n}") % recorder.senders: f"u{n}" for n in range(64)}
    first, other = uids[0], uids[1]
    await recorder.emit(instance("a", first), "Started", "to sender 0")
    await recorder.emit(instance("b", other), "Started", "to sender 1")
    await asyncio.sleep(0.6)
    assert [e["regarding"]["uid"] for e in recorder.events.created] == [first]
    busy[0] = False
    await asyncio.sleep(0.6)
    assert [e["regarding"]["uid"] for e in recorder.events.created] == [first, other]

    busy[0] = True
    await recorder.emit(instance("b", other), "Succeeded", "at the stop")
    assert await recorder.flush(1)
    assert recorder.events.created[-1]["note"] == "at the stop"
    await recorder.close()
