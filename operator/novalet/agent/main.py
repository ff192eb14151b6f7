"""`novalet run`: the agent for one hypervisor node, on kopf.

kopf watches VirtualInstances; every reason to look at an instance (a watch event, a libvirt
event, the startup sweep, the periodic resync, a backoff, a wait's deadline) queues its key in
one work queue (agent/workqueue.py), and a fixed number of workers reconcile the keys. The
engine writes status itself with compare-and-swap, so no handler returns a value into status
and kopf's own bookkeeping (progress annotations, posted events, peering) is switched off.
"""
import argparse
import asyncio
import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes_asyncio import client
from pydantic import ValidationError

from .. import GROUP, PLURAL, VERSION
from ..api.models import AllocationRatios, Resources, VirtualInstance
from ..api.policies import MIGRATING, UNPLACED
from ..core import migration
from ..core.backoff import BackoffPolicy
from ..core.catalog import SnapshotQuota
from ..core.fencing import LeaseTiming
from ..core.reaping import ReapPolicy
from ..kube.client import RetryForever, api_client, health_endpoint, register_login
from ..kube.events import EventRecorder
from ..kube.instances import LIST_PAGE, NODE_LABEL, InstanceStore
from ..kube.lease import NodeLease, view
from ..virt.kvm import domain_type
from .engine import Engine
from .fence import Fence, Fenced
from .images import ImageCatalog
from .libvirt_calls import LibvirtCalls
from .metrics import AgentMetrics, statuses_in
from .operations import DEFAULT_NETWORKS, LibvirtTimeouts, MigrationEndpoint, Operations
from .orphans import OrphanReaper
from .resources import ResourceTracker
from .unreadable import Unreadable
from .workqueue import WorkQueue
from .writegate import WriteGate

log = logging.getLogger("novalet.agent")
EVENTS_FLUSH_S = 1.0  # a clean stop posts the Events queued so far, for at most this long
RELEASE_TIMEOUT_S = 3.0  # a clean stop takes well under the 10 s DESIGN.md allows (SIGTERM to exit)


def agent_identity(node: str) -> str:
    return f"{node}/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.node = args.node_name
        self.identity = agent_identity(self.node)
        self.timing = LeaseTiming(args.lease_duration, args.renew_deadline, args.lease_retry_period)
        self.backoff = BackoffPolicy(args.backoff_base, args.backoff_cap)
        self.fence = Fence(self.timing)
        # the node's networks: `--network` entries (the last of a name wins), or `default` alone
        self.networks = dict(args.network) if args.network else dict(DEFAULT_NETWORKS)
        self.metrics = AgentMetrics()
        self.lease_held = asyncio.Event()
        self.activation: asyncio.Task | None = None
        self.background: list[asyncio.Task] = []

    async def start(self) -> None:
        from ..virt.hypervisor import Hypervisor

        api = await api_client()
        gate = WriteGate(self.args.write_concurrency)
        self.store = InstanceStore(api, guard=self.fence.check, admit=gate.slot,
                                   observe_write=lambda write, s: self.metrics.write_seconds.labels(write).observe(s))
        self.custom = client.CustomObjectsApi(api)
        self.events = events = EventRecorder(api, "novalet.io/agent", self.identity, guard=self.fence.check,
                                             busy=lambda: self.queue.saturated())
        # the Lease gets a client (and connection pool) of its own: renewals must never queue
        # behind the node's instance traffic, or a busy agent fences itself
        self.lease = NodeLease(await api_client(), self.args.lease_namespace, self.node, self.identity,
                               self.timing, networks=self.networks)
        uri = self.args.libvirt_uri or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
        kind = self.args.domain_type
        if kind == "auto":  # TCG unless a probe has booted a real guest under KVM
            kind = domain_type()
        hypervisor = await asyncio.to_thread(
            Hypervisor, uri, self.args.image_pool, self.args.state_dir, kind, guard=self.fence.check)
        log.info("node %s: libvirt %s, domain type %s, images in %s", self.node, uri, kind,
                 self.args.image_pool)
        self.catalog = ImageCatalog(api, hypervisor.images, self.node, guard=self.fence.check, quota=SnapshotQuota(
            self.args.snapshot_quota_count, self.args.snapshot_quota_bytes))
        self.ops = Operations(hypervisor, api, self.node, self.args.soft_reboot_timeout, self.args.stop_timeout,
                              LibvirtTimeouts(self.args.libvirt_timeout, self.args.libvirt_query_timeout),
                              LibvirtCalls(self.args.libvirt_threads), self.metrics, self.networks, self.catalog,
                              MigrationEndpoint(self.args.migration_uri or uri, self.args.migration_socket_dir,
                                                self.args.migration_timeout))
        self.engine = Engine(self.store, events, self.ops, self.node, self.identity,
                             self.backoff, self.metrics, self.peer_dead_for, self.args.migration_peer_dead_after)
        # one flow per namespace: a tenant's storm does not hold another tenant's request
        self.queue = WorkQueue(self.reconcile, workers=self.args.workers, flow_of=lambda key: key[0],
                               observe_wait=self.metrics.queue_wait.observe)
        self.metrics.queue_depth.set_function(lambda: self.queue.depth)
        self.metrics.count_instances(lambda: statuses_in(self.store.cached(), self.node))
        if self.args.metrics_port:
            self.metrics.serve(self.args.metrics_port, self.args.metrics_address)
            log.info("metrics on http://%s:%d/metrics", self.args.metrics_address, self.args.metrics_port)
        self.keys_by_uid: dict[str, tuple[str, str]] = {}
        self.unswept: set[tuple[str, str]] = set()  # the tenure's sweep: keys not looked at yet
        loop = asyncio.get_running_loop()
        self.ops.on_domain_event(lambda uid: loop.call_soon_threadsafe(self.kick_uid, uid))
        self.reaper = OrphanReaper(self.ops, self.store, events, self.lease, self.node, ReapPolicy(
            self.args.reap_orphans, self.args.orphan_grace_seconds, self.args.max_orphans_per_sweep),
            self.lease_held.is_set)
        self.unreadable = Unreadable(events, self.node, self.fence.holds)
        self.resources = ResourceTracker(
            api, self.node, self.identity, capacity_of=self.node_capacity, bodies=self.store.cached,
            pool=hypervisor.images, networks=self.networks, domain_type=kind, guard=self.fence.check,
            ratios=AllocationRatios(cpu=self.args.cpu_allocation_ratio, memory=self.args.memory_allocation_ratio))
        self._host: tuple[int, int] | None = None

    async def node_capacity(self) -> Resources:
        """`--vcpus` / `--memory-mib`, else the host's as libvirt says (asked once)."""
        if self._host is None and not (self.args.vcpus and self.args.memory_mib):
            self._host = await self.ops.host_resources()
        cpus, memory = self._host or (0, 0)
        return Resources(vcpus=self.args.vcpus or cpus, memoryMiB=self.args.memory_mib or memory)

    async def hold_lease(self) -> None:
        """Renew the node Lease every retry period; act only while the fence holds. On
        (re)gaining the Lease, sweep first. A failed renewal keeps the agent acting until the
        renew deadline (the fence lapses by itself then); a Lease someone else holds ends it
        at once."""
        retry = self.timing.retry_period_s
        while True:
            started = self.fence.clock()
            lost = False
            try:
                held = await asyncio.wait_for(self.lease.try_acquire_or_renew(),
                                              timeout=self.timing.renew_deadline_s / 2)
                lost = not held
                self.metrics.lease_renewals.labels("lost" if lost else "renewed").inc()
            except Exception as error:  # noqa: BLE001 - apiserver down or slow: the deadline decides
                log.warning("lease renewal failed: %s", error or type(error).__name__)
                self.metrics.lease_renewals.labels("failed").inc()
                held = False
            if held:
                self.fence.renewed(started)
                if not self.lease_held.is_set() and (self.activation is None or self.activation.done()):
                    log.info("holding lease for node %s as %s: recovery sweep", self.node, self.identity)
                    self.activation = asyncio.create_task(self.activate())
            elif (lost or not self.fence.holds()) and (self.lease_held.is_set() or self.activation):
                self.stand_down("another agent holds it" if lost else "renewals failed past the renew deadline")
            await asyncio.sleep(max(0.0, started + retry - self.fence.clock()))

    async def stop(self) -> None:
        """A clean stop (SIGTERM): end all work first, then hand the node over at once by
        releasing the Lease. Nothing is left for kopf to wait on (it gives tasks it did not
        start 5 s before cancelling them)."""
        for task in self.background:
            task.cancel()
        await self.events.flush(EVENTS_FLUSH_S)  # what the work so far said, while the fence holds
        if self.lease_held.is_set() or self.activation:
            self.stand_down("the agent is stopping", stopping=True)
        await asyncio.gather(self.queue.stop(), *self.background, return_exceptions=True)
        await self.catalog.close()  # a download in flight is left partial: the next fetch replaces it
        await self.events.close(timeout_s=0)
        try:  # an apiserver that does not answer must not keep the agent from exiting
            await asyncio.wait_for(self.lease.release(), timeout=RELEASE_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - the Lease then expires and a standby takes over
            log.warning("could not release the Lease of node %s (%s); it expires on its own",
                        self.node, error or type(error).__name__)

    def stand_down(self, why: str, stopping: bool = False) -> None:
        """Stop acting on the node: every libvirt call and write checks the fence, which now
        refuses; in-flight work is cancelled and never resumes (its tenure is over)."""
        if stopping:
            log.info("stopping: ending work on node %s, then releasing its Lease", self.node)
        else:
            log.warning("fenced: lost the lease for node %s (%s): standing by", self.node, why)
        self.fence.lose()
        self.lease_held.clear()
        if self.activation:
            self.activation.cancel()
        self.activation = None
        self.queue.clear()
        self.engine.forget_waits()
        self.unswept.clear()

    async def activate(self) -> None:
        """Queue every instance of this node (the recovery sweep), then let the workers take
        keys. Runs beside the lease renewals: a long listing must not let the lease run out.
        Every task left on record is recovered by its instance's first reconcile, before any
        new request of that instance (engine._round)."""
        self.fence.begin_work()
        while True:
            try:
                self.unswept = set(await self.sweep())
                break
            except Fenced:  # the fence lapsed mid-sweep: the next renewal starts a new one
                return
            except Exception:
                log.exception("recovery sweep failed; retrying")
                await asyncio.sleep(2)
        log.info("recovery sweep: %d instances of node %s queued", len(self.unswept), self.node)
        self._sweep_progress()
        self.lease_held.set()
        self.activation = None

    def _sweep_progress(self, key: tuple[str, str] | None = None) -> None:
        if key is not None and key in self.unswept:
            self.unswept.discard(key)
            if not self.unswept:
                log.info("recovery sweep done: every instance of node %s looked at", self.node)
        elif key is None and not self.unswept:
            log.info("recovery sweep done: no instance on node %s", self.node)

    async def sweep(self) -> list[tuple[str, str]]:
        """Queue every instance of this node (in the namespaces it serves: `--namespace`, or
        all); reap orphans. Returns the keys queued."""
        keys, uids, elsewhere = [], set(), {}
        served = set(self.args.namespace or ())
        async for body in self.store.list_all():
            uids.add(body["metadata"]["uid"])  # any namespace's, unreadable ones too: they exist
            if served and body["metadata"]["namespace"] not in served:
                continue  # kopf watches only those namespaces: the sweep looks at no other
            inst = await self.unreadable.parse(body)  # None: reported on the object, skipped
            if inst is not None and self.engine.is_mine(inst):
                await self.label(body, inst)  # else its changes would never reach this agent's watch
                self.remember(body)
                keys.append(key_of(body))
            elif inst is not None:
                elsewhere[inst.metadata.uid] = key_of(body)
        for key in keys:
            self.queue.add(key)
        await self.remove_left_behind(elsewhere)
        await self.reaper.sweep(uids)
        return keys

    async def remove_left_behind(self, elsewhere: dict[str, tuple[str, str]]) -> None:
        """What this node holds of instances that live on another node now: the stale copy of one
        evacuated from here (even running: it must never run twice), and what a migration left
        when this node died in the middle of it (never a running domain). A failure is logged:
        the next sweep tries again."""
        for uid in sorted(set(await self.ops.local_uids()) & set(elsewhere)):
            body = await self.store.get(*elsewhere[uid])
            inst = await self.unreadable.parse(body) if body is not None else None
            if inst is None or self.engine.is_mine(inst):
                continue
            try:
                evacuated = migration.evacuated_here(inst.status.evacuatedFrom, inst.status.node,
                                                     inst.status.currentTask, self.node)
                removed = await (self.ops.remove_evacuated(inst) if evacuated else self.ops.remove_leftover(inst))
            except Exception as error:  # noqa: BLE001
                log.warning("%s/%s: what this node holds of it (placed on %s) not removed: %s", *key_of(body),
                            inst.status.node, error)
                continue
            if removed:
                what = ("evacuated while this node was dead: its stale domain and disks destroyed, not started"
                        if evacuated else "left behind by a migration this node died in: domain and disks removed")
                log.warning("%s/%s: placed on node %s, %s", *key_of(body), inst.status.node, what)
                await self.engine.events.emit(body, "StaleGuestDestroyed" if evacuated else "LeftoversRemoved",
                                              f"node {self.node}: {what}", warning=True)

    async def resync(self) -> None:
        while True:
            await asyncio.sleep(self.args.resync_seconds)
            if self.lease_held.is_set():
                self.fence.begin_work()
                try:
                    await self.sweep()
                except Fenced:
                    pass
                except Exception:
                    log.exception("periodic resync failed")

    # ---- the work queue's feeds and its reconcile -------------------------------------------
    def remember(self, body: dict[str, Any]) -> None:
        self.store.remember(body)
        self.keys_by_uid[body["metadata"]["uid"]] = key_of(body)

    def forget(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self.store.forget(meta["namespace"], meta["name"])
        self.keys_by_uid.pop(meta["uid"], None)
        self.engine.forget(meta["uid"])

    async def label(self, body: dict[str, Any], inst: VirtualInstance) -> None:
        """Give an instance of this node the label the watches need (kube/instances.node_label)
        when it has another; a failure is logged: the next event or sweep tries again."""
        try:
            await self.store.write_label(body, inst)
        except Fenced:
            raise
        except Exception as error:  # noqa: BLE001
            log.warning("%s/%s: node label not written: %s", *key_of(body), error)

    async def peer_dead_for(self, node: str) -> float | None:
        """Seconds since `node`'s agent Lease ran out (None: alive, or unknown: never taken over)."""
        try:
            lease = await self.lease.read(node)
        except Exception as error:  # noqa: BLE001
            log.warning("reading node %s's Lease: %s", node, error)
            return None
        return view(lease).dead_for(datetime.now(UTC), never=float("inf")) if lease is not None else float("inf")

    def kick_uid(self, uid: str) -> None:
        """libvirt reported a change of a domain: look at its instance."""
        key = self.keys_by_uid.get(uid)
        if key is not None:
            self.queue.add(key)

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        self.fence.begin_work()
        started = time.monotonic()
        try:
            return await self.engine.reconcile(*key)
        except Fenced as why:
            log.info("%s/%s: %s", *key, why)
        except ValidationError:  # unreadable by this version: reported on the object, skipped
            log.info("%s/%s: cannot read the object; waiting for it to change", *key)
        finally:
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)
            self._sweep_progress(key)
        return None


def key_of(body: dict[str, Any]) -> tuple[str, str]:
    return body["metadata"]["namespace"], body["metadata"]["name"]


class NoDiffBase(kopf.DiffBaseStorage):
    """The agent has on-event handlers only: kopf's diff of each event against the last handled
    essence (a deep copy of every body) is never used, so none is built, kept or written."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


def build_registry(agent: Agent) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register_login(registry)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False          # our Events say what happened, once
        settings.watching.server_timeout = 300
        # memory at a thousand instances: the initial list a page at a time, and kopf's
        # per-object worker (holding the object's last event) gone soon after its event
        settings.watching.chunk_size = LIST_PAGE
        # only this node's instances (labelled so by the novalet-placement policy when pinned, by
        # this agent when the scheduler placed them here), those not placed yet and those migrating
        # (api/policies.py)
        settings.watching.label_selectors[GROUP, PLURAL] = f"{NODE_LABEL} in ({agent.node},{UNPLACED},{MIGRATING})"
        settings.queueing.idle_timeout = 1.0
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.networking.error_backoffs = RetryForever()
        await agent.start()
        loop = asyncio.get_running_loop()
        agent.background = [loop.create_task(agent.hold_lease()), loop.create_task(agent.resync()),
                            loop.create_task(agent.resources.run(agent.lease_held.is_set, agent.fence.clock))]
        agent.queue.start(agent.lease_held.wait)

    @kopf.on.cleanup(registry=registry)
    async def release(**_: Any) -> None:
        await agent.stop()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def on_event(body: kopf.Body, type: str | None, **_: Any) -> None:
        body = dict(body)
        if type == "DELETED":
            agent.forget(body)
            return
        if agent.store.seen(body):
            return  # the echo of the agent's own write: the reconcile that wrote it looks again
        inst = await agent.unreadable.parse(body)
        if inst is None:
            return  # reported on the object; the next change is looked at again
        mine = agent.engine.is_mine(inst)
        agent.metrics.watch_events.labels("mine" if mine else "other").inc()
        if not mine:  # not placed yet, or placed on another node: its agent takes it
            agent.forget(body)
            return
        await agent.label(body, inst)  # placed here by the scheduler, migrating: the watches' label
        agent.remember(body)
        key = key_of(body)
        if agent.engine.preempts(inst):
            if agent.queue.interrupt(key):
                log.info("%s/%s: preempting the running reconcile", *key)
        else:
            agent.queue.add(key)

    return registry


def run_agent(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kopf.objects", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        agent = Agent(args)
    except ValueError as error:  # timings that break the fence or the backoff
        log.error("novalet run: %s", error)
        return 2
    registry = build_registry(agent)
    namespaces = args.namespace or []
    asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=not namespaces,
                              liveness_endpoint=health_endpoint(args),
                              namespaces=namespaces))
    return 0
