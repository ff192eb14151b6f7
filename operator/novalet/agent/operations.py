"""The hypervisor operations a plan step names, run off the event loop.

Every libvirt call runs on the agent's own bounded thread pools with a deadline
(agent/libvirt_calls.py): a hung libvirtd fails the task with "libvirt did not answer <op>
within N s" (LibvirtTimeout) instead of leaving it, and every other call of the node, stuck.
A soft reboot and a graceful stop do not wait in a thread: `press` asks the guest and returns,
and the engine keeps the wait as a deadline (core/waits.py); a resize's power-off still waits
on the `waits` pool, with that wait on top of its call's deadline.

Before a soft reboot the agent journals `<task id>:<op>` into the domain's own metadata, so
after a crash the recovery table can tell a soft reboot that was issued from one that was not
(a reboot is never issued twice for one request; core/recovery.JOURNALED_OPS).
"""
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from ..api.models import InterfaceStatus, SnapshotSource, VirtualInstance
from ..core.authorization import secret_check
from ..core.catalog import DOWNLOADING, PRESENT, UNAVAILABLE, snapshot_pool_name
from ..core.facts import MISSING, Facts
from ..core.interfaces import interface_status, interfaces_of, mac_address
from ..core.migration import NOT_YET
from ..core.recovery import JOURNALED_OPS
from ..core.vocabulary import Op, PowerState, VmState
from ..kube.access import Access, SecretError
from ..virt.cidata import CloudInit, meta_data
from ..virt.domain_xml import InstanceMetadata, NetworkInterface
from ..virt.hypervisor import DomainFacts, Hypervisor, HypervisorError, InstanceSpec
from .images import ImageCatalog, ImageUnavailable
from .libvirt_calls import CallTimedOut, LibvirtCalls
from .metrics import AgentMetrics

log = logging.getLogger(__name__)


class OperationError(Exception):
    """An operation failed; the message is what the user reads in lastAction."""


USER_DATA_KEYS = ("userdata", "userData")  # the Secret keys KubeVirt's cloudInitNoCloud reads too
DEFAULT_NETWORKS = {"default": ("network", "default")}


def parse_network(text: str) -> tuple[str, tuple[str, str]]:
    """`--network NAME=network:LIBVIRT_NETWORK` or `NAME=bridge:HOST_BRIDGE`."""
    name, sep, target = text.partition("=")
    kind, sep2, source = target.partition(":")
    if not (sep and sep2 and name and source) or kind not in ("network", "bridge"):
        raise ValueError(f"expected NAME=network:LIBVIRT_NETWORK or NAME=bridge:HOST_BRIDGE, got {text!r}")
    NetworkInterface("probe", "52:54:00:00:00:00", kind, source)  # the same checks as the domain XML's
    return name, (kind, source)


class LibvirtTimeout(OperationError):
    """libvirt did not answer within the call's deadline; the call's thread was abandoned."""

    def __init__(self, what: str, timeout_s: float):
        super().__init__(f"libvirt did not answer {what} within {timeout_s:g} s")
        self.what, self.timeout_s = what, timeout_s


@dataclass(frozen=True)
class LibvirtTimeouts:
    """Deadlines of libvirt calls, in seconds (`--libvirt-timeout`, `--libvirt-query-timeout`)."""

    call_s: float = 120.0       # an operation: define, start, destroy, pause, hard reboot, ...
    query_s: float = 30.0       # a read: a domain's facts, the node's domain list
    disk_copy_s: float = 1800.0  # a snapshot flattens the whole disk into the image pool

    def __post_init__(self) -> None:
        if min(self.call_s, self.query_s, self.disk_copy_s) <= 0:
            raise ValueError("libvirt timeouts must be > 0")

    def for_call(self, wait_s: float = 0.0) -> float:
        """An operation that legitimately waits `wait_s` on the guest gets that on top."""
        return self.call_s + max(0.0, wait_s)


def facts_of(domain: DomainFacts) -> Facts:
    """libvirt's view of a domain, in the core's vocabulary (core/facts.py)."""
    if not domain.exists:
        return MISSING
    return Facts(True, PowerState(domain.power_state), domain.config, domain.issued, domain.has_managed_save,
                 domain.domain_id)


@dataclass(frozen=True)
class MigrationEndpoint:
    """Where this node takes incoming guests: its libvirtd for the source's (`--migration-uri`,
    default the agent's own libvirt URI) and a directory for the streams' unix sockets
    (`--migration-socket-dir`), which the source's QEMU must reach."""

    libvirt_uri: str
    socket_dir: Path = Path("/run/novalet/migration")
    timeout_s: float = 300.0

    def for_instance(self, uid: str) -> dict[str, str]:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        return {"targetURI": self.libvirt_uri, "dataURI": f"unix://{self.socket_dir / uid}.mem.sock",
                "disksURI": f"unix://{self.socket_dir / uid}.disk.sock"}


class Operations:
    def __init__(self, hypervisor: Hypervisor, api: client.ApiClient, node: str, soft_reboot_timeout: float,
                 stop_timeout: float = 60.0, timeouts: LibvirtTimeouts | None = None,
                 calls: LibvirtCalls | None = None, metrics: AgentMetrics | None = None,
                 networks: dict[str, tuple[str, str]] | None = None, catalog: ImageCatalog | None = None,
                 migration: MigrationEndpoint | None = None):
        self.hv, self.node = hypervisor, node
        self.migration = migration or MigrationEndpoint(hypervisor.uri)
        if catalog is not None:
            self.catalog = catalog  # else built on first use (cached_property below)
        self.networks = DEFAULT_NETWORKS if networks is None else networks  # name -> (kind, source)
        self.metrics = metrics or AgentMetrics()
        self.core = client.CoreV1Api(api)
        self.soft_reboot_timeout, self.stop_timeout = soft_reboot_timeout, stop_timeout
        self.timeouts = timeouts or LibvirtTimeouts()
        self.calls = calls or LibvirtCalls()
        self._handlers = self.handlers()

    async def _call(self, fn, *args, wait_s: float = 0.0, timeout_s: float | None = None, **kwargs) -> Any:
        """fn(*args, **kwargs) on the libvirt pools, within its deadline: the call deadline
        plus `wait_s` (a wait on the guest the operation does by design), or `timeout_s`."""
        budget = timeout_s if timeout_s is not None else self.timeouts.for_call(wait_s)
        name = getattr(fn, "__name__", "call")
        what = name.replace("_", " ")
        started = time.monotonic()
        try:
            return await self.calls.run(fn, *args, timeout_s=budget, what=what, waits=wait_s > 0, **kwargs)
        except CallTimedOut as error:
            self.metrics.libvirt_errors.labels(name).inc()
            raise LibvirtTimeout(error.what, error.timeout_s) from None
        except HypervisorError as error:
            self.metrics.libvirt_errors.labels(name).inc()
            raise OperationError(str(error)) from error
        finally:
            self.metrics.libvirt_seconds.labels(name).observe(time.monotonic() - started)

    async def _query(self, fn, *args) -> Any:
        return await self._call(fn, *args, timeout_s=self.timeouts.query_s)

    async def facts(self, inst: VirtualInstance) -> Facts:
        return facts_of(await self._query(self.hv.facts, inst.metadata.uid))

    async def migration_facts(self, inst: VirtualInstance) -> Facts:
        """The facts with whether a migration job runs on the domain (core/migration.py)."""
        facts = await self.facts(inst)
        if not facts.exists:
            return facts
        return replace(facts, migrating=await self._query(self.hv.migration_in_progress, inst.metadata.uid))

    async def host_resources(self) -> tuple[int, int]:
        """The host's CPUs and memory (MiB) as libvirt sees them."""
        return await self._query(self.hv.host_resources)

    def on_domain_event(self, callback) -> None:
        """Subscribe to libvirt's domain events. Subscribing opens the connection: on a libvirt
        pool thread, so a libvirtd that does not answer cannot block the agent's start (events
        flow from whichever connection the next call opens)."""
        subscribing = self.calls.calls.submit(self.hv.subscribe, lambda uid, event, detail: callback(uid))
        subscribing.add_done_callback(
            lambda f: f.exception() and log.warning("libvirt events: %s; subscribed for the next connection",
                                                    f.exception()))

    def handlers(self) -> dict[Op, Callable[[VirtualInstance], Awaitable[Any]]]:
        """The operation each Op names; the two that wait on the guest go through `press`."""
        return {
            Op.PLUG_NETWORK: self.op_plug_network, Op.PREPARE_DISKS: self.op_prepare_disks,
            Op.SPAWN: self.op_spawn, Op.START: self.op_start, Op.PAUSE: self.op_pause,
            Op.UNPAUSE: self.op_unpause, Op.SUSPEND: self.op_suspend, Op.RESUME: self.op_resume,
            Op.REBOOT_HARD: self.op_reboot_hard, Op.RESCUE: self.op_rescue, Op.UNRESCUE: self.op_unrescue,
            Op.RESIZE_POWER_OFF: self.op_resize_power_off, Op.RESIZE_APPLY_FLAVOR: self.op_resize_apply_flavor,
            Op.RESIZE_FINISH: self.op_resize_finish, Op.CONFIRM_RESIZE: self.op_confirm_resize,
            Op.REVERT_RESIZE: self.op_revert_resize, Op.REBUILD_TEARDOWN: self.op_rebuild_teardown,
            Op.REBUILD_DISKS: self.op_rebuild_disks, Op.SNAPSHOT: self.op_snapshot,
            Op.SET_PASSWORD: self.op_set_password, Op.DELETE: self.op_delete,
            Op.REMOVE_PARTIAL_SNAPSHOT: self.op_remove_partial_snapshot,
            Op.REVERT_RESIZE_INFLIGHT: self.op_revert_resize_inflight,
            Op.MIGRATE_PREPARE_TARGET: self.op_migrate_prepare_target,
            Op.MIGRATE_POWER_OFF: self.op_resize_power_off,
            Op.MIGRATE: self.op_migrate, Op.MIGRATE_CLEAN_SOURCE: self.op_migrate_clean_source,
            Op.MIGRATE_FINISH_TARGET: self.op_migrate_finish_target,
            Op.MIGRATE_REVERT_SOURCE: self.op_migrate_revert_source,
            Op.MIGRATE_REVERT_TARGET: self.op_migrate_revert_target,
            Op.EVACUATE_REBUILD: self.op_evacuate_rebuild,
        }

    async def run(self, op: Op, inst: VirtualInstance) -> Any:
        return await self._handlers[op](inst)

    # ---- operations that wait on the guest (core/waits.py) ------------------------------
    def wait_s(self, op: Op | None) -> float | None:
        """How long `op` gives the guest to answer, if it waits on the guest at all."""
        return {Op.REBOOT_SOFT: self.soft_reboot_timeout, Op.STOP: self.stop_timeout}.get(op)

    async def press(self, op: Op, inst: VirtualInstance) -> int | None:
        """Press the guest's ACPI button for `op` and return at once: the baseline to tell its
        answer by, or None when there is nothing to wait for (a soft reboot of a guest that is
        not running: reboot hard; a stop of a guest already off, or paused and so destroyed)."""
        uid, task = inst.metadata.uid, inst.status.currentTask
        if op == Op.REBOOT_SOFT:
            if task is not None and op in JOURNALED_OPS:
                await self._call(self.hv.mark_issued, uid, f"{task.id}:{op}")
            return await self._call(self.hv.press_reboot, uid)
        return 0 if await self._call(self.hv.press_power_button, uid) else None

    def rebooted_since(self, inst: VirtualInstance, baseline: int) -> bool:
        """Has libvirt reported the guest's reset since the press? (no call: events counted)"""
        return self.hv.reboots(inst.metadata.uid) > baseline

    async def force_off(self, inst: VirtualInstance) -> None:
        """The guest ignored the ACPI shutdown until the deadline: power it off."""
        await self._call(self.hv.destroy, inst.metadata.uid)

    @staticmethod
    def image_of(inst: VirtualInstance) -> str:
        """The image name the instance's disk is (to be) built from: the task's target, else the record's."""
        task = inst.status.currentTask
        return task.targetImage if task and task.targetImage is not None else (inst.status.image or "")

    def _spec(self, inst: VirtualInstance, pool_image: str, cidata: CloudInit | None = None) -> InstanceSpec:
        """The domain to define; `pool_image`: the pool's name of the image (pool_image())."""
        task = inst.status.currentTask
        flavor = (task and task.targetFlavor) or inst.status.flavor or inst.spec.flavor
        return InstanceSpec(uid=inst.metadata.uid, namespace=inst.metadata.namespace, name=inst.metadata.name,
                            vcpus=flavor.vcpus, memory_mib=flavor.memoryMiB, image=pool_image, node=self.node,
                            interfaces=self.nics(inst), cidata=cidata)

    # ---- images (agent/images.py) --------------------------------------------------------
    async def image_state(self, inst: VirtualInstance, name: str) -> tuple[str, str]:
        """Before a create or rebuild begins: is image `name` on this node (Present), on its way
        (Downloading: its download runs), or not to be had (Unavailable: the step will fail,
        saying why)? With the message for the instance's ImageReady condition."""
        try:
            waiting = self.catalog.prepare(await self.catalog.resolve(inst.metadata.namespace, name), consume=False)
        except ImageUnavailable as error:
            return UNAVAILABLE, str(error)
        if waiting:
            return DOWNLOADING, waiting
        return PRESENT, f"image {name} is on node {self.node}"

    async def pool_image(self, inst: VirtualInstance, name: str) -> str:
        """The pool's name of image `name` for this instance ("" for none); OperationError when
        it is missing, failed, or (after a restart mid-task) not downloaded yet."""
        if not name:
            return ""
        try:
            resolved = await self.catalog.resolve(inst.metadata.namespace, name)
            waiting = self.catalog.prepare(resolved)
        except ImageUnavailable as error:
            raise OperationError(str(error)) from None
        if waiting:
            raise OperationError(f"{waiting}; not on this node yet")
        return resolved.pool_name

    def nics(self, inst: VirtualInstance) -> tuple[NetworkInterface, ...]:
        """The instance's interfaces on this node's networks; a network it does not provide fails."""
        nics = []
        for index, iface in enumerate(interfaces_of(inst.spec)):
            if iface.network not in self.networks:
                offered = ", ".join(sorted(self.networks)) or "none"
                raise OperationError(f"interface {iface.name}: node {self.node} provides no network "
                                     f"{iface.network} (it provides: {offered})")
            kind, source = self.networks[iface.network]
            nics.append(NetworkInterface(iface.name, mac_address(inst.metadata.uid, index), kind, source))
        return tuple(nics)

    async def cloud_init(self, inst: VirtualInstance) -> CloudInit:
        """The cidata disk's content from the spec as it is now (user data inline or from a
        Secret its requester may read, the SSH keys)."""
        spec, meta = inst.spec, inst.metadata
        user_data = spec.userData.encode() if spec.userData is not None else None
        if spec.userDataSecretRef is not None:
            user_data = (await self._user_data_secret(inst)).encode()
        return CloudInit(meta_data(meta.uid, meta.name, spec.sshAuthorizedKeys), user_data)

    async def _user_data_secret(self, inst: VirtualInstance) -> str:
        """The apiserver's admission policy (novalet-requests) let the reference in only if its
        author, with every group they had, may get the Secret: trusted while it is in force."""
        name, namespace = inst.spec.userDataSecretRef.name, inst.metadata.namespace
        if not await self.access.policies_in_force():
            raise OperationError(f"spec.userDataSecretRef names Secret {name}, but the admission policy "
                                 "that checks its author may read it is not in force: no Secret is read")
        try:
            return await self.access.read_secret_key(namespace, name, USER_DATA_KEYS[0])
        except SecretError as first:
            try:
                return await self.access.read_secret_key(namespace, name, USER_DATA_KEYS[1])
            except SecretError:
                raise OperationError(str(first)) from None

    async def interfaces(self, inst: VirtualInstance) -> list[InterfaceStatus]:
        """status.interfaces as libvirt has them: the NICs the domain was built with, their leases."""
        nics, addresses = await self._query(self.hv.interfaces, inst.metadata.uid)
        return interface_status(((nic.name, nic.mac) for nic in nics), addresses)

    async def _guest_spec(self, inst: VirtualInstance) -> InstanceSpec:
        image = await self.pool_image(inst, self.image_of(inst))
        return self._spec(inst, image, await self.cloud_init(inst) if image else None)

    # ---- build -----------------------------------------------------------------------
    async def op_plug_network(self, inst: VirtualInstance) -> None:
        """Every interface's network is one this node provides, and a libvirt network is up."""
        for nic in self.nics(inst):
            if nic.kind == "network" and not await self._query(self.hv.network_active, nic.source):
                raise OperationError(f"interface {nic.name}: libvirt network {nic.source} of node {self.node} "
                                     "is not active (virsh net-start)")

    async def op_prepare_disks(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.define, await self._guest_spec(inst))

    async def op_spawn(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.define, await self._guest_spec(inst))
        await self._call(self.hv.start, inst.metadata.uid)

    # ---- power -----------------------------------------------------------------------
    async def op_start(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.start, inst.metadata.uid)

    async def op_pause(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.pause, inst.metadata.uid)

    async def op_unpause(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.unpause, inst.metadata.uid)

    async def op_suspend(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.suspend, inst.metadata.uid)

    async def op_resume(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.resume, inst.metadata.uid)

    async def op_reboot_hard(self, inst: VirtualInstance) -> None:
        # Nova regenerates the domain too; the image matters only when the domain is gone
        name = self.image_of(inst)
        image = await self.pool_image(inst, name) if name and not await self._query(self.hv.defined,
                                                                                      inst.metadata.uid) else name
        await self._call(self.hv.define, self._spec(inst, image))
        await self._call(self.hv.reboot_hard, inst.metadata.uid)

    # ---- rescue, resize, rebuild -----------------------------------------------------
    async def op_rescue(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.rescue, inst.metadata.uid)

    async def op_unrescue(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.unrescue, inst.metadata.uid)

    async def op_resize_power_off(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.stop, inst.metadata.uid, True, self.stop_timeout, wait_s=self.stop_timeout)

    async def op_resize_apply_flavor(self, inst: VirtualInstance) -> None:
        flavor = inst.status.currentTask.targetFlavor
        await self._call(self.hv.resize, inst.metadata.uid, flavor.vcpus, flavor.memoryMiB, power_on=False,
                         stop_timeout_s=self.stop_timeout, wait_s=self.stop_timeout)

    async def op_resize_finish(self, inst: VirtualInstance) -> None:
        if inst.status.currentTask.originPowerState == PowerState.RUNNING:
            await self._call(self.hv.start, inst.metadata.uid)

    async def op_confirm_resize(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.confirm_resize, inst.metadata.uid)

    async def op_revert_resize(self, inst: VirtualInstance) -> None:
        origin = inst.status.resizedFrom
        power_on = origin is not None and origin.powerState == PowerState.RUNNING
        await self._call(self.hv.revert_resize, inst.metadata.uid, power_on=power_on,
                         stop_timeout_s=self.stop_timeout, wait_s=self.stop_timeout)

    async def op_revert_resize_inflight(self, inst: VirtualInstance) -> None:
        """Recovery of an interrupted resize: back to the origin flavor and power state."""
        task = inst.status.currentTask
        power_on = task.originPowerState == PowerState.RUNNING
        flavor = task.originFlavor
        await self._call(self.hv.resize, inst.metadata.uid, flavor.vcpus, flavor.memoryMiB, power_on=power_on,
                         stop_timeout_s=self.stop_timeout, wait_s=self.stop_timeout)
        await self._call(self.hv.confirm_resize, inst.metadata.uid)

    async def op_rebuild_teardown(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.destroy, inst.metadata.uid)

    async def op_rebuild_disks(self, inst: VirtualInstance) -> None:
        image = await self.pool_image(inst, inst.status.currentTask.targetImage or "")
        cidata = await self.cloud_init(inst) if image else None  # the user data as the spec has it now
        await self._call(self.hv.rebuild, inst.metadata.uid, image, power_on=False, cidata=cidata)

    # ---- snapshot, password, delete --------------------------------------------------
    def _snapshot_of(self, inst: VirtualInstance) -> tuple[SnapshotSource, str]:
        """The snapshot the task on record writes: its source, and its file in the pool's catalog."""
        meta, task = inst.metadata, inst.status.currentTask
        source = SnapshotSource(instanceName=meta.name, instanceUID=meta.uid, actionId=task.id, node=self.node)
        return source, snapshot_pool_name(meta.namespace, meta.uid, task.id)

    async def op_snapshot(self, inst: VirtualInstance) -> None:
        """The disk, flattened into this node's pool, lands as the VirtualImage `snapshotName` of
        the instance's namespace (docs/images.md), within the namespace's snapshot quota."""
        namespace, name = inst.metadata.namespace, inst.spec.action.snapshotName
        source, pool_name = self._snapshot_of(inst)
        try:
            await self.catalog.check_snapshot(namespace, name, source)
            if not await self._query(self.hv.images.exists, pool_name):
                path = await self._call(self.hv.snapshot, inst.metadata.uid, pool_name,
                                        timeout_s=self.timeouts.disk_copy_s)
                try:
                    await self.catalog.check_snapshot(namespace, name, source, new_bytes=path.stat().st_size)
                except ImageUnavailable:
                    await self._call(self.hv.images.remove, pool_name)
                    raise
            await self.catalog.record_snapshot(namespace, name, source, pool_name)
        except ImageUnavailable as error:
            raise OperationError(str(error)) from None

    async def op_remove_partial_snapshot(self, inst: VirtualInstance) -> str:
        """Returns a note for the user: whether the image had completed before the crash (a
        complete image is never removed: it may be one the user already relies on)."""
        name = inst.spec.action.snapshotName if inst.spec.action else None
        source, pool_name = self._snapshot_of(inst)
        await self._call(self.hv.abort_snapshot, inst.metadata.uid, pool_name)
        if name and await self._query(self.hv.images.exists, pool_name):
            try:
                await self.catalog.record_snapshot(inst.metadata.namespace, name, source, pool_name)
            except ImageUnavailable as error:
                return str(error)
            return f"image {name} is complete: VirtualImage {name}"
        return "partial snapshot removed; request again"

    @cached_property
    def catalog(self) -> ImageCatalog:
        """The image catalog as this node sees it (agent/images.py)."""
        return ImageCatalog(self.core.api_client, self.hv.images, self.node)

    @cached_property
    def access(self) -> Access:
        """The apiserver's word on requesters (SubjectAccessReviews) and the Secret read."""
        return Access(self.core.api_client)

    async def op_set_password(self, inst: VirtualInstance) -> None:
        """The password goes from the Secret to libvirt and nowhere else: no log line, Event,
        status field or error message carries it, and no process is started with it."""
        action, namespace = inst.spec.action, inst.metadata.namespace
        ref = action.secretRef
        # the engine checked before it took the request; RBAC may have changed since
        allowed = (await self.access.allowed(action.requestedBy, action.requesterGroups,
                                             secret_check(namespace, ref.name)) if action.requestedBy else False)
        if not allowed:
            who = action.requestedBy or "an unknown requester"
            raise OperationError(f"not confirmed that {who} may get Secret {ref.name} "
                                 f"(SubjectAccessReview {'failed' if allowed is None else 'denied'}); "
                                 "SetPassword only uses a Secret its requester may read")
        try:
            password = await self.access.read_secret_key(namespace, ref.name, ref.key)
        except SecretError as error:
            raise OperationError(str(error)) from None
        try:
            await self._call(self.hv.set_password, inst.metadata.uid, action.user or "root", password)
        finally:
            del password

    # ---- migration (core/migration.py) --------------------------------------------------
    async def _define_here(self, inst: VirtualInstance) -> bool:
        """The instance's domain defined on this node, not started, as it is on record (a migration's
        or an evacuation's target): False while its image is still downloading here."""
        image = inst.status.image or ""
        state, message = await self.image_state(inst, image) if image else (PRESENT, "diskless")
        if state == DOWNLOADING:
            return False
        if state == UNAVAILABLE:
            raise OperationError(message)
        await self.op_plug_network(inst)
        await self.op_prepare_disks(inst)
        return True

    async def op_migrate_prepare_target(self, inst: VirtualInstance) -> dict[str, str] | str:
        """The target: the image here (NOT_YET while it downloads), the networks, the disks and
        the domain defined, not started; answers where the source's libvirtd sends the guest."""
        if not await self._define_here(inst):
            return NOT_YET
        return self.migration.for_instance(inst.metadata.uid)

    async def op_migrate(self, inst: VirtualInstance) -> None:
        m = inst.status.currentTask.migration
        await self._call(self.hv.migrate, inst.metadata.uid, m.targetURI, live=m.live, data_uri=m.dataURI,
                         disks_uri=m.disksURI, wait_s=self.migration.timeout_s)

    async def op_migrate_clean_source(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.remove_inactive, inst.metadata.uid, side="source")

    async def op_migrate_finish_target(self, inst: VirtualInstance) -> None:
        task = inst.status.currentTask
        await self._call(self.hv.finish_incoming, inst.metadata.uid, cold=not task.migration.live,
                         power_on=task.originVmState == VmState.ACTIVE)

    async def op_migrate_revert_source(self, inst: VirtualInstance) -> None:
        task = inst.status.currentTask
        await self._call(self.hv.revert_source, inst.metadata.uid, cold=not task.migration.live,
                         power_on=task.originVmState == VmState.ACTIVE, wait_s=self.stop_timeout)

    async def op_migrate_revert_target(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.remove_inactive, inst.metadata.uid, side="target")

    async def op_evacuate_rebuild(self, inst: VirtualInstance) -> str | None:
        """The target of an evacuation: the guest built afresh from its image (NOT_YET while the
        image downloads), booted unless it was stopped; safe to run again."""
        if not await self._define_here(inst):
            return NOT_YET
        if inst.status.currentTask.originVmState != VmState.STOPPED:
            await self.op_start(inst)
        return None

    async def local_uids(self) -> list[str]:
        """The instances this node holds anything of: domains carrying its name, instance directories."""
        domains = await self._query(self.hv.list_instances)
        return sorted({m.uid for m in domains if m.node == self.node} | set(self.hv.images.instance_uids()))

    async def remove_evacuated(self, inst: VirtualInstance) -> bool:
        """Destroy this node's stale copy of an instance evacuated from it, domain and disks;
        True when there was one (core/migration.evacuated_here decides when)."""
        if not (await self.facts(inst)).exists and not self.hv.images.instance_dir(inst.metadata.uid).exists():
            return False
        await self._call(self.hv.undefine_and_delete, inst.metadata.uid)
        return True

    async def remove_leftover(self, inst: VirtualInstance) -> bool:
        """Remove what a migration left on this node (it died mid-way, and the other side ended
        the task): a domain that does not run and the instance's files; never a running domain."""
        if not (await self.facts(inst)).exists and not self.hv.images.instance_dir(inst.metadata.uid).exists():
            return False
        await self._call(self.hv.remove_inactive, inst.metadata.uid, side="node")
        return True

    async def op_delete(self, inst: VirtualInstance) -> None:
        await self._call(self.hv.undefine_and_delete, inst.metadata.uid)

    # ---- orphans (the decision is core/reaping.py's; agent/orphans.py asks) ------------
    async def list_domains(self) -> list[InstanceMetadata]:
        """novalet metadata of every domain of this libvirtd, whatever node it names."""
        return await self._query(self.hv.list_instances)

    async def remove_domain(self, uid: str) -> None:
        await self._call(self.hv.undefine_and_delete, uid)
