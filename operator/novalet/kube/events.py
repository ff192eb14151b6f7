"""Kubernetes Events for each step a user should see (`kubectl describe vinst`).

The same Event again (same object, reason, note and type: a failing step retried) is counted
on the Event first posted (events.k8s.io `series`: count and last time), as client-go's event
recorder does, instead of posted anew.
"""
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import WriteGuard, no_guard

log = logging.getLogger(__name__)


class EventRecorder:
    def __init__(self, api: client.ApiClient, component: str, instance: str,
                 guard: WriteGuard = no_guard):
        """`guard(what)` runs right before every write and raises to refuse it (the agent's fence)."""
        self.events = client.EventsV1Api(api)
        self.component, self.instance, self.guard = component, instance, guard
        self._posted: OrderedDict[tuple[str, ...], tuple[str, str, int]] = OrderedDict()  # -> ns, name, count

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
        try:
            if key in self._posted and await self._count_again(key, now):
                return
            posted = await self._answer(self.events.create_namespaced_event(
                meta["namespace"], event, _preload_content=False))
            self._remember(key, (meta["namespace"], posted["metadata"]["name"], 1))
        except ApiException as error:  # an Event is best effort: never fail an action for it
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"],
                        meta["name"], error.reason)

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
