"""The orphan reaper's I/O: ask libvirt and the apiserver, let core/reaping.py decide, act.

Runs at the end of every sweep (at start and every resync) and once more when a candidate's
grace period ends before the next resync. A refused mass reap is reported as a Warning Event on
the node's Lease (kube-node-lease/novalet-agent-<node>) and an ERROR line.
"""
import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..core.reaping import Lookup, ReaperMemory, ReapPolicy, Verdict, decide
from ..kube.events import EventRecorder
from ..kube.instances import InstanceStore
from ..kube.lease import NodeLease
from .operations import Operations

log = logging.getLogger(__name__)
LOOKUP_TIMEOUT_S = 10.0
SHOWN = 5  # instances named in a report


class OrphanReaper:
    def __init__(self, ops: Operations, store: InstanceStore, events: EventRecorder, lease: NodeLease,
                 node: str, policy: ReapPolicy, active: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic):
        self.ops, self.store, self.events, self.lease = ops, store, events, lease
        self.node, self.policy, self.active, self.clock = node, policy, active, clock
        self.memory = ReaperMemory()
        self._timer: asyncio.TimerHandle | None = None
        self._due: float | None = None
        self._pending: asyncio.Future | None = None
        self._lock = asyncio.Lock()  # one look at a time

    async def sweep(self, listed_uids: set[str]) -> list[str]:
        """`listed_uids`: the uids of every VirtualInstance in a listing made just before.
        Returns the uids reaped."""
        async with self._lock:
            return await self._sweep(listed_uids)

    async def _sweep(self, listed_uids: set[str]) -> list[str]:
        domains = {m.uid: m for m in await self.ops.list_domains() if m.node == self.node}
        lookups = {uid: Lookup.PRESENT if uid in listed_uids else await self._lookup(meta)
                   for uid, meta in domains.items()}
        verdict = decide(list(domains), lookups, self.memory, self.clock(), self.policy)
        self.memory = verdict.memory
        if verdict.announce:
            await self._report(verdict, domains)
        for uid in verdict.reap:
            meta = domains[uid]
            log.warning("reaping orphan domain of %s/%s (uid %s): confirmed gone for %gs or more",
                        meta.namespace, meta.name, uid, self.policy.grace_s)
            await self.ops.remove_domain(uid)
        self._look_again_at(verdict.next_due)
        return list(verdict.reap)

    async def _lookup(self, meta) -> Lookup:
        """Only a 404, or an object of that name with another uid, is "gone"."""
        try:
            body = await asyncio.wait_for(self.store.get(meta.namespace, meta.name), LOOKUP_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any other answer is no answer
            log.info("orphan check of %s/%s (uid %s): no answer (%s); not reaped", meta.namespace,
                     meta.name, meta.uid, error or type(error).__name__)
            return Lookup.UNKNOWN
        if body is None or body.get("metadata", {}).get("uid") != meta.uid:
            return Lookup.GONE
        return Lookup.PRESENT

    async def _report(self, verdict: Verdict, domains: dict[str, Any]) -> None:
        uids = verdict.refused or verdict.waiting
        names = ", ".join(f"{domains[u].namespace}/{domains[u].name}" for u in uids[:SHOWN])
        names += f" and {len(uids) - SHOWN} more" if len(uids) > SHOWN else ""
        if not verdict.refused:  # reaping is off
            log.warning("node %s: %s (%s); remove them by hand if they are not needed", self.node,
                        verdict.reason, names)
            return
        message = (f"{verdict.reason}: {names}. Nothing was destroyed. Check that this agent talks to "
                   "the right cluster (its kubeconfig or in-cluster account) and may read "
                   "VirtualInstances in every namespace. If these instances really were deleted, "
                   "remove their domains by hand (virsh undefine --remove-all-storage) or raise "
                   "--max-orphans-per-sweep.")
        log.error("node %s: %s", self.node, message)
        try:
            lease = await self.lease.read()
        except Exception as error:  # noqa: BLE001 - the ERROR line above is the report then
            log.warning("cannot read the node's Lease to report the refused reap: %s", error)
            return
        if lease is None:
            return
        regarding = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": lease.metadata.name, "namespace": lease.metadata.namespace,
                                  "uid": lease.metadata.uid,
                                  "resourceVersion": lease.metadata.resource_version}}
        await self.events.emit(regarding, "OrphanReapRefused", message, warning=True, action="ReapOrphans")

    # ---- a look when a grace period ends ---------------------------------------------
    def _look_again_at(self, due: float | None) -> None:
        if due is None or (self._due is not None and self._due <= due and self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._due = due
        delay = max(0.0, due - self.clock()) + 0.5
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = self._due = None
        self._pending = asyncio.ensure_future(self._look_again())

    async def _look_again(self) -> None:
        if not self.active():
            return  # the next tenure's sweep looks again
        try:
            await self.sweep({b["metadata"]["uid"] async for b in self.store.list_all()})
        except Exception as error:  # noqa: BLE001 - the next resync looks again
            log.warning("orphan check failed: %s", error or type(error).__name__)
