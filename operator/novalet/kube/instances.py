"""VirtualInstance reads and compare-and-swap writes.

Every write carries `metadata.resourceVersion`: the apiserver answers 409 when another writer
got there first, and the caller re-reads and decides again. kopf's own patches carry no
resourceVersion, which is why the agent writes status itself.

The store also keeps the newest body it has seen of each instance (from the watch, from its own
writes' answers, from reads), so a reconcile starts without a GET. A stale body costs nothing
but a 409: every decision is written with compare-and-swap before anything is done, and a
conflict drops the cached body, so the next look reads afresh. Bodies are kept as compact JSON
(a fraction of the memory of the parsed dict; a thousand per node) and each read returns a
fresh dict: no caller can change what another one reads.
"""
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from .. import GROUP, PLURAL, VERSION
from ..api.models import VirtualInstance, VirtualInstanceStatus
from ..api.policies import MIGRATING, UNPLACED
from ..core import migration
from . import WriteGuard, no_guard

MERGE_PATCH = "application/merge-patch+json"
NODE_LABEL = "novalet.io/node"  # api/policies.py: a pinned instance's node, else Unplaced until its agent labels it
LIST_PAGE = 250  # objects per page of a full listing


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


Key = tuple[str, str]


def _key(body: dict[str, Any]) -> Key:
    return body["metadata"]["namespace"], body["metadata"]["name"]


@dataclass(frozen=True, slots=True)
class _Kept:
    """One cached body: its identity and version beside the compact JSON of it."""
    uid: str | None
    resource_version: str
    json: bytes

    @classmethod
    def of(cls, body: dict[str, Any]) -> "_Kept":
        meta = body["metadata"]
        return cls(meta.get("uid"), meta.get("resourceVersion", ""),
                   json.dumps(body, separators=(",", ":")).encode())

    def body(self) -> dict[str, Any]:
        return json.loads(self.json)


def _newer(body: dict[str, Any], than: _Kept) -> bool:
    """etcd's resourceVersions of one object grow; where they are not numbers, trust the later."""
    new, old = body["metadata"].get("resourceVersion", ""), than.resource_version
    if new.isdigit() and old.isdigit() and body["metadata"].get("uid") == than.uid:
        return int(new) >= int(old)
    return True


def _no_gate(namespace: str) -> AbstractAsyncContextManager[None]:
    return contextlib.nullcontext()


class InstanceStore:
    def __init__(self, api: client.ApiClient, guard: WriteGuard = no_guard,
                 observe_write: Callable[[str, float], None] = lambda write, seconds: None,
                 admit: Callable[[str], AbstractAsyncContextManager[None]] = _no_gate):
        """`guard(what)` runs right before every write and raises to refuse it (the agent's fence);
        `observe_write(write, seconds)` is told how long each write's answer took; `admit(namespace)`
        is held while a write is at the apiserver (the agent's WriteGate: a bound on writes in flight)."""
        self.custom = client.CustomObjectsApi(api)
        self.guard, self.observe_write, self.admit = guard, observe_write, admit
        self._latest: dict[Key, _Kept] = {}

    # ---- the newest body seen ----------------------------------------------------------
    def remember(self, body: dict[str, Any]) -> dict[str, Any]:
        key = _key(body)
        known = self._latest.get(key)
        if known is None or _newer(body, known):
            self._latest[key] = _Kept.of(body)
        return body

    def seen(self, body: dict[str, Any]) -> bool:
        """Is this exact version of the object the newest one seen already (the watch's echo
        of the agent's own write, or an event repeated)?"""
        known = self._latest.get(_key(body))
        return known is not None and known.resource_version == body["metadata"].get("resourceVersion")

    def forget(self, namespace: str, name: str) -> None:
        self._latest.pop((namespace, name), None)

    def cached(self) -> list[bytes]:
        """The compact JSON of every body kept (for figures: see agent/metrics.py)."""
        return [kept.json for kept in self._latest.values()]

    async def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The newest body seen, or a GET when there is none."""
        known = self._latest.get((namespace, name))
        return known.body() if known is not None else await self.get(namespace, name)

    # ---- the apiserver -------------------------------------------------------------------
    async def write_label(self, body: dict[str, Any], inst: VirtualInstance) -> None:
        """Give the instance the NODE_LABEL value the watches need (node_label), when it has another."""
        wanted = node_label(inst)
        if not labelled(body, wanted):
            await label_node(self.custom, body, wanted, self.guard)

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            body = await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                self.forget(namespace, name)
                return None
            raise
        self._latest[(namespace, name)] = _Kept.of(body)  # a read is the truth: it replaces the cached
        return body

    async def list_all(self, label_selector: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every VirtualInstance (with the labels, if given), read a page at a time: a thousand
        bodies are never parsed into memory at once."""
        token = None
        while True:
            page = await self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=LIST_PAGE,
                                                                _continue=token, label_selector=label_selector)
            for body in page["items"]:
                yield body
            token = page["metadata"].get("continue")
            if not token:
                return

    async def write_status(self, body: dict[str, Any], status: VirtualInstanceStatus) -> dict[str, Any]:
        """Replace status if the object is still at the resourceVersion `body` was read at."""
        return await self._write(body, "status", {"status": status.model_dump(mode="json")},
                                 self.custom.patch_namespaced_custom_object_status)

    async def write_finalizers(self, body: dict[str, Any], finalizers: list[str]) -> dict[str, Any]:
        return await self._write(body, "finalizers", {"metadata": {"finalizers": finalizers}},
                                 self.custom.patch_namespaced_custom_object)

    async def _write(self, body: dict[str, Any], what: str, patch: dict[str, Any], send) -> dict[str, Any]:
        """A merge patch at body's resourceVersion, through the gate and the fence, timed."""
        meta = body["metadata"]
        patch = {**patch, "metadata": {**patch.get("metadata", {}), "resourceVersion": meta["resourceVersion"]}}
        async with self.admit(meta["namespace"]):
            self.guard(f"write {what}")  # after the wait for a slot: the fence may have closed meanwhile
            started = time.monotonic()
            try:
                return self.remember(await send(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch,
                                                _content_type=MERGE_PATCH))
            except ApiException as error:
                self.forget(meta["namespace"], meta["name"])
                raise _translate(error) from error
            finally:
                self.observe_write(what, time.monotonic() - started)

async def label_node(custom: client.CustomObjectsApi, body: dict[str, Any], node: str,
                     guard: WriteGuard = no_guard) -> None:
    """Label an instance with the node it is placed on (NODE_LABEL): that node's agent watches
    only its own instances by it. A merge patch of one label: no resourceVersion needed."""
    meta = body["metadata"]
    guard("write the node label")
    await custom.patch_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
                                                {"metadata": {"labels": {NODE_LABEL: node}}},
                                                _content_type=MERGE_PATCH)


def labelled(body: dict[str, Any], value: str) -> bool:
    return (body["metadata"].get("labels") or {}).get(NODE_LABEL) == value


def node_label(inst: VirtualInstance) -> str:
    """The value of NODE_LABEL the agents' watches need: Migrating while a migration runs (every
    agent watches it, so source and target both see each step), else the node it is pinned or
    placed on, else Unplaced."""
    if migration.is_migration(inst.status.currentTask):
        return MIGRATING
    return inst.spec.nodeName or inst.status.node or UNPLACED


def parse(body: dict[str, Any]) -> VirtualInstance:
    return VirtualInstance.model_validate(body)
