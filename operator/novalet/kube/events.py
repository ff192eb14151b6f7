"""Kubernetes Events for each step a user should see (`kubectl describe vinst`).

The same Event again (same object, reason, note and type: a failing step retried) is counted
on the Event first posted (events.k8s.io `series`: count and last time), as client-go's event
recorder does, instead of posted anew.

Posting is asynchronous, as client-go's is: `emit` queues the Event and returns, and a few
senders post them (an object's Events all by one sender, in order). A reconcile never waits on
an Event, so a request's libvirt call does not queue behind one. While the agent's work is
backed up (`busy()`: a storm, a recovery sweep) one sender posts and the others wait: the status
is the record, an Event its echo, so Events then trail the status writes instead of taking the
apiserver's writes from them, and catch up when the work lets up (or at a flush). An Event is
best effort: one that cannot be posted, or that finds the backlog full, is dropped and logged.
"""
import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import WriteGuard, no_guard

log = logging.getLogger(__name__)
BUSY_LOOK_S = 0.25  # how often a waiting sender looks whether the agent's work has let up


class EventRecorder:
    def __init__(self, api: client.ApiClient, component: str, instance: str,
                 guard: WriteGuard = no_guard, senders: int = 4, backlog: int = 4096,
                 busy: Callable[[], bool] = lambda: False):
        """`guard(what)` runs when an Event is emitted and again right before it is posted, and
        raises to refuse it (the agent's fence: a fenced agent posts nothing, not even what it
        emitted before). `busy()`: the agent's work is backed up, Events wait (all but one sender)."""
        self.events = client.EventsV1Api(api)
        self.component, self.instance, self.guard, self.busy = component, instance, guard, busy
        self._flushing = 0
        self.senders, self.backlog = senders, backlog
        self._posted: OrderedDict[tuple[str, ...], tuple[str, str, int]] = OrderedDict()  # -> ns, name, count
        self._queues: list[asyncio.Queue] = []
        self._tasks: list[asyncio.Task] = []
        self.dropped = 0

    async def emit(self, body: dict[str, Any], reason: str, note: str, warning: bool = False,
                   action: str = "Reconcile") -> None:
        meta = body["metadata"]
        now = datetime.now(UTC)
        event = {  # a plain body: kubernetes_asyncio's models cost more CPU than the post itself
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}-", "namespace": meta["namespace"]},
            "eventTime": _micro_time(now), "action": action, "reason": reason, "note": note[:1024],
            "type": "Warning" if warning else "Normal",
            "reportingController": self.component, "reportingInstance": self.instance,
            "regarding": {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"],
                          "namespace": meta["namespace"], "uid": meta["uid"],
                          "resourceVersion": meta.get("resourceVersion")}}
        key = (meta["uid"], reason, event["note"], event["type"])
        self.guard("post an Event")
        if not self._tasks:
            self._start()
        try:
            self._queues[hash(meta["uid"]) % len(self._queues)].put_nowait((key, event, now))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("event backlog full (%d): dropped %s for %s/%s", self.backlog, reason,
                        meta["namespace"], meta["name"])

    def _start(self) -> None:
        self._queues = [asyncio.Queue(maxsize=self.backlog) for _ in range(self.senders)]
        self._tasks = [asyncio.create_task(self._send_from(queue, n), name=f"novalet-events-{n}")
                       for n, queue in enumerate(self._queues)]

    async def _send_from(self, queue: asyncio.Queue, index: int) -> None:
        while True:
            key, event, now = await queue.get()
            try:
                while index and self.busy() and not self._flushing:  # sender 0 keeps a trickle going
                    await asyncio.sleep(BUSY_LOOK_S)
                self.guard("post an Event")
                await self._post(key, event, now)
            except Exception as error:  # noqa: BLE001 - best effort: never fail an action for an Event
                self.dropped += 1
                log.warning("could not post event %s for %s/%s: %s", event["reason"],
                            event["metadata"]["namespace"], event["regarding"]["name"],
                            getattr(error, "reason", None) or error or type(error).__name__)
            finally:
                queue.task_done()

    async def _post(self, key: tuple[str, ...], event: dict[str, Any], now: datetime) -> None:
        if key in self._posted and await self._count_again(key, now):
            return
        namespace = event["metadata"]["namespace"]
        posted = await self._answer(self.events.create_namespaced_event(namespace, event, _preload_content=False))
        self._remember(key, (namespace, posted["metadata"]["name"], 1))

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every Event emitted so far is posted (or dropped), busy or not; False on
        timeout."""
        self._flushing += 1
        try:
            await asyncio.wait_for(asyncio.gather(*(queue.join() for queue in self._queues)), timeout_s)
        except TimeoutError:
            return False
        finally:
            self._flushing -= 1
        return True

    async def close(self, timeout_s: float = 1.0) -> None:
        """Post what is queued (for at most `timeout_s`), then stop the senders."""
        await self.flush(timeout_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks, self._queues = [], []

    async def _count_again(self, key: tuple[str, ...], now: datetime) -> bool:
        """Count a repeat on the Event posted first; False when that Event is gone (expired)."""
        namespace, name, count = self._posted[key]
        series = {"series": {"count": count + 1, "lastObservedTime": _micro_time(now)}}
        try:
            await self._answer(self.events.patch_namespaced_event(name, namespace, series,
                                                                  _preload_content=False))
        except ApiException as error:
            if error.status != 404:
                raise
            del self._posted[key]
            return False
        self._remember(key, (namespace, name, count + 1))
        return True

    @staticmethod
    async def _answer(request: Awaitable[Any]) -> dict[str, Any]:
        """The answer's JSON, or ApiException: the raw response, not a model built from it."""
        response = await request
        async with response:
            payload = await response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=response.reason)
        return json.loads(payload)

    def _remember(self, key: tuple[str, ...], value: tuple[str, str, int], limit: int = 4096) -> None:
        self._posted[key] = value
        self._posted.move_to_end(key)
        while len(self._posted) > limit:
            self._posted.popitem(last=False)


def _micro_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
