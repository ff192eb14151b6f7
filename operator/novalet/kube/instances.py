"""VirtualInstance reads and compare-and-swap writes.

Every write carries `metadata.resourceVersion`: the apiserver answers 409 when another writer
got there first, and the caller re-reads and decides again. kopf's own patches carry no
resourceVersion, which is why the agent writes status itself.
"""
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from .. import GROUP, PLURAL, VERSION
from ..api.models import VirtualInstance, VirtualInstanceStatus
from . import WriteGuard, no_guard

MERGE_PATCH = "application/merge-patch+json"


class Conflict(Exception):
    """Another writer changed the object since it was read."""


class Gone(Exception):
    """The object no longer exists."""


def _translate(error: ApiException) -> Exception:
    if error.status == 409:
        return Conflict(error.reason)
    if error.status == 404:
        return Gone(error.reason)
    return error


class InstanceStore:
    def __init__(self, api: client.ApiClient, guard: WriteGuard = no_guard):
        """`guard(what)` runs right before every write and raises to refuse it (the agent's fence)."""
        self.custom = client.CustomObjectsApi(api)
        self.guard = guard

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def list_all(self) -> list[dict[str, Any]]:
        result = await self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        return result["items"]

    async def write_status(self, body: dict[str, Any], status: VirtualInstanceStatus) -> dict[str, Any]:
        """Replace status if the object is still at the resourceVersion `body` was read at."""
        meta = body["metadata"]
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]},
                 "status": status.model_dump(mode="json")}
        self.guard("write status")
        try:
            return await self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch, _content_type=MERGE_PATCH)
        except ApiException as error:
            raise _translate(error) from error

    async def write_finalizers(self, body: dict[str, Any], finalizers: list[str]) -> dict[str, Any]:
        meta = body["metadata"]
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"], "finalizers": finalizers}}
        self.guard("write finalizers")
        try:
            return await self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch, _content_type=MERGE_PATCH)
        except ApiException as error:
            raise _translate(error) from error


def parse(body: dict[str, Any]) -> VirtualInstance:
    return VirtualInstance.model_validate(body)
