"""The scheduler: places unpinned instances on nodes (core/placement.py decides; this reads and writes).

One scheduler acts at a time: it holds the Lease `novalet-scheduler` (`--scheduler-lease`; the
chart creates `<release>-novalet-scheduler`, the only Lease its RBAC lets it write) (the agents' Lease code,
the same takeover rules) and places only within the renew deadline of its last renewal, so a
frozen scheduler that wakes up writes nothing before it has renewed. Each round (every
`interval_s`) it reads the Hypervisors (allocatable, labels, networks, images), the agents'
Leases (alive or not), every instance (what is placed or pinned where, what waits), and the
images a waiting instance names (a round first lists the instances labelled Unplaced, and stops
there when none waits); then it places the waiting instances oldest first, each a
compare-and-swap write of `status.node` and the `Scheduled` condition. An instance that fits
nowhere gets `Scheduled=False` (reason `Unschedulable`, the reason of each node) and is looked
at again next round.
"""
import asyncio
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from .. import GROUP, VERSION
from ..api.models import MigrationRecord, Resources, VirtualInstance, VirtualInstanceStatus
from ..api.policies import MIGRATING, UNPLACED
from ..core import authorization, capacity, conditions, migration, placement, transitions
from ..core.desire import seen_ids
from ..core.fencing import LeaseTiming
from ..core.interfaces import interfaces_of
from ..core.policy import refusal as state_refusal
from ..core.presentation import with_presentation
from ..core.vocabulary import Action, TaskState, VmState
from ..kube.access import Access
from ..kube.instances import NODE_LABEL, Conflict, Gone, InstanceStore, parse
from ..kube.lease import LeaseView, NodeLease, view

log = logging.getLogger(__name__)

LEASE = "novalet-scheduler"
SCHEDULED = "Scheduled"


def demand_of(inst: VirtualInstance, image_nodes: frozenset[str] | None) -> placement.Demand:
    return placement.Demand(flavor=inst.spec.flavor, node_selector=inst.spec.nodeSelector or {},
                            networks=frozenset(i.network for i in interfaces_of(inst.spec)),
                            image=inst.spec.image, image_nodes=image_nodes)


def scheduled(status: VirtualInstanceStatus, node: str | None, message: str, uid: str,
              now: datetime) -> VirtualInstanceStatus:
    """The status once placed on `node` (None: left waiting, saying why)."""
    if node is None:
        return conditions.set_condition(status, SCHEDULED, False, "Unschedulable", message, now)
    status = status.model_copy(update={"node": node, "domainUUID": uid})
    return conditions.set_condition(status, SCHEDULED, True, "Scheduled", message, now)


class Scheduler:
    def __init__(self, api: client.ApiClient, lease_namespace: str, identity: str,
                 policy: placement.Policy = "spread", interval_s: float = 1.0,
                 timing: LeaseTiming | None = None, lease_name: str = LEASE, evacuate_after_s: float = 60.0) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        self.store = InstanceStore(api)
        self.timing = timing or LeaseTiming()
        self.lease = NodeLease(api, lease_namespace, "scheduler", identity, self.timing, name=lease_name, labels={})
        self.lease_namespace, self.policy, self.interval_s = lease_namespace, policy, interval_s
        self._renewed_at: float | None = None
        self.evacuate_after_s = evacuate_after_s
        self.access = Access(api)
        self._leases: dict[str, LeaseView] = {}  # node -> its agent's Lease, as the last hosts() read it

    def holds(self) -> bool:
        return self._renewed_at is not None and time.monotonic() - self._renewed_at < self.timing.renew_deadline_s

    async def _read_leases(self) -> set[str]:
        """The agents' Leases (kept for Evacuate); returns the nodes whose agent is alive."""
        leases = await self.coordination.list_namespaced_lease(self.lease_namespace, label_selector=NODE_LABEL)
        now = datetime.now(UTC)
        self._leases = {lease.metadata.labels[NODE_LABEL]: view(lease) for lease in leases.items}
        return {node for node, lease in self._leases.items() if not lease.expired(now)}

    async def hosts(self) -> list[placement.Host]:
        alive = await self._read_leases()
        listed = await self.custom.list_cluster_custom_object(GROUP, VERSION, "hypervisors")
        hosts = []
        for item in listed["items"]:
            status = item.get("status") or {}
            if not status.get("allocatable"):
                continue
            name = item["metadata"]["name"]
            hosts.append(placement.Host(
                name=name, allocatable=Resources.model_validate(status["allocatable"]), alive=name in alive,
                labels=item["metadata"].get("labels") or {}, networks=frozenset(status.get("networks") or ()),
                images=frozenset(status.get("imagesCached") or ())))
        return hosts

    async def _image(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        plural = "virtualimages" if namespace else "clustervirtualimages"
        try:
            if namespace:
                return await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            return await self.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def image_nodes(self, inst: VirtualInstance, hosts: list[placement.Host]) -> frozenset[str] | None:
        """Where the instance's image can be had (core/catalog.py's order): None = anywhere."""
        name = inst.spec.image
        if not name:
            return None
        namespaced = await self._image("VirtualImage", inst.metadata.namespace, name)
        if namespaced is not None:
            snapshot = (namespaced.get("spec", {}).get("source") or {}).get("snapshot")
            return frozenset({snapshot["node"]}) if snapshot else None
        if await self._image("ClusterVirtualImage", None, name) is not None:
            return None
        return frozenset(h.name for h in hosts if name in h.images)  # preloaded: where it is

    @staticmethod
    def _waits(body: dict[str, Any]) -> bool:
        spec, status = body.get("spec") or {}, body.get("status") or {}
        return not (spec.get("nodeName") or status.get("node") or body["metadata"].get("deletionTimestamp"))

    @staticmethod
    def _migration_waits(body: dict[str, Any]) -> bool:
        task = (body.get("status") or {}).get("currentTask") or {}
        return task.get("taskState") == TaskState.MIGRATE_SCHEDULING.value

    async def schedule_once(self) -> int:
        """One round; returns how many instances (and migrations) it placed. A round with nothing
        to place costs two lists, of the instances labelled Unplaced and of those labelled
        Migrating (api/policies.py): the full list of every instance, to count what each node
        holds, only when one waits. Migrations asked for are placed first."""
        if not ([b async for b in self.store.list_all(f"{NODE_LABEL}={UNPLACED}") if self._waits(b)]
                or [b async for b in self.store.list_all(f"{NODE_LABEL}={MIGRATING}") if self._migration_waits(b)]
                or await self._evacuations()):
            return 0
        hosts = await self.hosts()
        bodies, waiting, moving = [], [], []
        async for body in self.store.list_all():
            bodies.append(body)
            if not (self._waits(body) or self._migration_waits(body)):
                continue
            try:
                (moving if self._migration_waits(body) else waiting).append((body, parse(body)))
            except ValidationError:
                continue  # a newer version's object: not for this scheduler
        used = {h.name: capacity.allocated(bodies, h.name)[0] for h in hosts}
        placed = 0
        now = datetime.now(UTC).replace(microsecond=0)
        for body, inst in moving:
            if not self.holds():
                return placed
            placed += await self._target(body, inst, hosts, used, now)
        for body in await self._evacuations():
            if not self.holds():
                return placed
            placed += await self._evacuate(body, parse(body), hosts, used, now)
        waiting.sort(key=lambda pair: (pair[0]["metadata"].get("creationTimestamp") or "", pair[1].metadata.name))
        demands = [(i, demand_of(inst, await self.image_nodes(inst, hosts))) for i, (_, inst) in enumerate(waiting)]
        for index, node, message in placement.schedule(((str(i), d) for i, d in demands), hosts, used, self.policy):
            body, inst = waiting[int(index)]
            if not self.holds():
                return placed
            placed += await self._write(body, inst, node, message, now)
        return placed

    async def _evacuations(self) -> list[dict[str, Any]]:
        """Instances on nodes whose agent is not alive (labelled with neither a live node, nor
        Unplaced, nor Migrating) with an Evacuate request not answered yet."""
        alive = sorted(await self._read_leases())
        selector = f"{NODE_LABEL} notin ({','.join([*alive, UNPLACED, MIGRATING])})"
        found = []
        async for body in self.store.list_all(selector):
            action = (body.get("spec") or {}).get("action") or {}
            if action.get("name") == Action.EVACUATE.value:
                try:
                    inst = parse(body)
                except ValidationError:
                    continue
                if action["id"] not in seen_ids(inst.status):
                    found.append(body)
        return found

    async def _evacuate(self, body: dict[str, Any], inst: VirtualInstance, hosts: list[placement.Host],
                        used: dict[str, Resources], now: datetime) -> int:
        """Evacuate (core/migration.py): refused (who asks may not; the node is not dead long
        enough), or begun straight on the target the filters pick, which rebuilds the guest."""
        asked = inst.spec.action
        refusal = await self._who_may(inst)
        node_name = inst.status.node or ""
        lease = self._leases.get(node_name)
        dead_for = lease.dead_for(now, self.evacuate_after_s) if lease is not None else self.evacuate_after_s
        refusal = refusal or state_refusal(Action.EVACUATE, inst.status.vmState or VmState.BUILDING, None) \
            or migration.evacuation_refusal(inst.spec.nodeName, inst.status.node, dead_for, self.evacuate_after_s,
                                            inst.status.currentTask)
        target, message = None, refusal
        if refusal is None:
            demand = demand_of(inst, await self.image_nodes(inst, hosts))
            target, message = placement.choose_target(demand, hosts, used, node_name, asked.targetNode, self.policy)
        if target is None:
            status = transitions.reject(inst.status, Action.EVACUATE.value, asked.id,
                                        message if refusal else f"no target: {message}", now, handled=True,
                                        requested_by=asked.requestedBy)
        else:
            record = MigrationRecord(sourceNode=node_name, targetNode=target)
            status = transitions.begin_migration(inst.status, asked.id, "scheduler", now, inst.status.powerState,
                                                 record, TaskState.EVACUATE_REBUILDING,
                                                 requested_by=asked.requestedBy, action=Action.EVACUATE)
        status = with_presentation(status, now, inst.spec, inst.metadata.generation)
        try:
            body = await self.store.write_status(body, status)
        except (Conflict, Gone):
            return 0
        log.info("%s/%s: Evacuate %s: %s", inst.metadata.namespace, inst.metadata.name, asked.id,
                 f"rebuilding on node {target}" if target else message)
        if target is not None:  # the target's watch sees it from now on
            await self.store.write_label(body, parse(body))
        return int(target is not None)

    async def _who_may(self, inst: VirtualInstance) -> str | None:
        """Evacuate is for administrators: as the agents do, trust the requester only as far as the
        apiserver vouches for it, and ask the apiserver again (core/authorization.py)."""
        asked = inst.spec.action
        asking = authorization.Asking(Action.EVACUATE, True, asked.requestedBy, False, inst.metadata.namespace,
                                      inst.metadata.name)
        asking = replace(asking, trusted=bool(asked.requestedBy) and await self.access.policies_in_force(fresh=True))
        answers = {check: await self.access.allowed(asked.requestedBy, asked.requesterGroups, check)
                   for check in authorization.checks(asking)}
        return authorization.refusal(asking, answers)

    async def _target(self, body: dict[str, Any], inst: VirtualInstance, hosts: list[placement.Host],
                      used: dict[str, Resources], now: datetime) -> int:
        """A migration's target: the node asked for if it passes the filters (as in Nova), else the
        best other node; none: the task ends, failed, saying why (the guest never left)."""
        task = inst.status.currentTask
        demand = demand_of(inst, await self.image_nodes(inst, hosts))
        node, message = placement.choose_target(demand, hosts, used, task.migration.sourceNode,
                                                task.migration.targetNode, self.policy)
        if node is None:
            status = transitions.finish(inst.status, None, False, f"no target: {message}", now, inst.status.powerState,
                                        vm_state=task.originVmState)
        else:
            status = transitions.migration_step(inst.status, TaskState.MIGRATE_PREPARING_TARGET, "scheduler", now,
                                                targetNode=node)
            before = used.get(node, Resources(vcpus=0, memoryMiB=0))
            used[node] = Resources(vcpus=before.vcpus + demand.flavor.vcpus,
                                   memoryMiB=before.memoryMiB + demand.flavor.memoryMiB)
        status = with_presentation(status, now, inst.spec, inst.metadata.generation)
        try:
            await self.store.write_status(body, status)
        except (Conflict, Gone):
            return 0
        log.info("%s/%s: migration %s: %s", inst.metadata.namespace, inst.metadata.name, task.id,
                 message if node else f"no target: {message}")
        return int(node is not None)

    async def _write(self, body: dict[str, Any], inst: VirtualInstance, node: str | None, message: str,
                     now: datetime) -> int:
        status = scheduled(inst.status, node, message, inst.metadata.uid, now)
        if node is None and conditions.same(conditions.find(inst.status, SCHEDULED),
                                            conditions.find(status, SCHEDULED)):
            return 0  # already says so
        status = with_presentation(status, now, inst.spec, inst.metadata.generation)
        try:
            await self.store.write_status(body, status)
        except (Conflict, Gone):
            return 0  # changed meanwhile (pinned, deleted): the next round decides again
        if node is not None:
            log.info("%s/%s: %s", inst.metadata.namespace, inst.metadata.name, message)
        return int(node is not None)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                due = self._renewed_at is None or started - self._renewed_at >= self.timing.retry_period_s
                if due and await self.lease.try_acquire_or_renew():
                    self._renewed_at = started
                if self.holds():
                    await self.schedule_once()
            except Exception:
                log.exception("scheduling round failed")
            await asyncio.sleep(self.interval_s)
