"""Kubernetes Events for each step a user should see (`kubectl describe vinst`)."""
import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)


class EventRecorder:
    def __init__(self, api: client.ApiClient, component: str, instance: str):
        self.events = client.EventsV1Api(api)
        self.component, self.instance = component, instance

    async def emit(self, body: dict[str, Any], reason: str, note: str, warning: bool = False,
                   action: str = "Reconcile") -> None:
        meta = body["metadata"]
        now = datetime.now(UTC)
        event = client.EventsV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}-", namespace=meta["namespace"]),
            event_time=now, action=action, reason=reason, note=note[:1024],
            type="Warning" if warning else "Normal",
            reporting_controller=self.component, reporting_instance=self.instance,
            regarding=client.V1ObjectReference(
                api_version=body["apiVersion"], kind=body["kind"], name=meta["name"],
                namespace=meta["namespace"], uid=meta["uid"], resource_version=meta.get("resourceVersion")))
        try:
            await self.events.create_namespaced_event(meta["namespace"], event)
        except ApiException as error:  # an Event is best effort: never fail an action for it
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"],
                        meta["name"], error.reason)
