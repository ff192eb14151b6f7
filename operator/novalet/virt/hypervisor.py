"""The node's hypervisor: blocking, idempotent operations on libvirt domains.

The agent calls these from asyncio through ``asyncio.to_thread``. One libvirt connection per
:class:`Hypervisor`, opened lazily and reopened when it dropped (e.g. a libvirtd restart); an
operation that failed because the connection died is retried once on the new connection (every
operation is idempotent). Every failure is raised as :class:`HypervisorError` carrying libvirt's
message.

Events: libvirt's default event loop implementation runs in one daemon thread per process
(:func:`ensure_event_loop`). ``subscribe(callback)`` delivers ``callback(uid, event, detail)`` for
novalet domains **on that thread**: an asyncio caller must hop with ``loop.call_soon_threadsafe``.
Events are re-registered on every new connection; events that happened while disconnected are
lost, so the agent's periodic sync (``facts``) stays the source of truth.

Power: ``stop(graceful=True)`` presses the ACPI power button
(``VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN``), waits, then destroys. ``press_reboot`` uses
``VIR_DOMAIN_REBOOT_ACPI_POWER_BTN``: libvirt's QEMU driver presses the power button and, when the
guest powers off, resets it instead of stopping it ("fake reboot"); the reset arrives as a
``VIR_DOMAIN_EVENT_ID_REBOOT`` event, counted by ``reboots`` (the agent waits for the count to
grow, with a deadline: core/waits.py). The guest agent is
deliberately not used for power (its absence would only add a timeout).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Self

import libvirt

from .cidata import CloudInit, write_iso
from .domain_xml import (
    DOMAIN_PREFIX,
    NS,
    Disk,
    Flavor,
    InstanceMetadata,
    KernelBoot,
    NetworkInterface,
    build_domain_xml,
    instance_domain_config,
    metadata_xml,
    read_metadata,
)
from .images import ImageError, ImagePool

log = logging.getLogger(__name__)
JOURNAL_NS = "https://novalet.io/xmlns/journal/v1"

# libvirt state -> Nova's power_state vocabulary (every libvirt state is mapped; BLOCKED is a
# running guest waiting on I/O, which Nova also reports as running)
POWER_STATES: dict[int, str] = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

LIFECYCLE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: ("DEFINED", ["ADDED", "UPDATED", "RENAMED", "FROM_SNAPSHOT"]),
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: ("UNDEFINED", ["REMOVED", "RENAMED"]),
    libvirt.VIR_DOMAIN_EVENT_STARTED: ("STARTED", ["BOOTED", "MIGRATED", "RESTORED", "FROM_SNAPSHOT", "WAKEUP"]),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: ("SUSPENDED", ["PAUSED", "MIGRATED", "IOERROR", "WATCHDOG", "RESTORED",
                                                       "FROM_SNAPSHOT", "API_ERROR", "POSTCOPY",
                                                       "POSTCOPY_FAILED"]),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: ("RESUMED", ["UNPAUSED", "MIGRATED", "FROM_SNAPSHOT", "POSTCOPY",
                                                   "POSTCOPY_FAILED"]),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: ("STOPPED", ["SHUTDOWN", "DESTROYED", "CRASHED", "MIGRATED", "SAVED",
                                                   "FAILED", "FROM_SNAPSHOT"]),
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: ("SHUTDOWN", ["FINISHED", "GUEST", "HOST"]),
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: ("PMSUSPENDED", ["MEMORY", "DISK"]),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: ("CRASHED", ["PANICKED", "CRASHLOADED"]),
}

EventCallback = Callable[[str, str, str], None]


class HypervisorError(Exception):
    """A hypervisor operation failed; ``str(e)`` carries libvirt's message."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class DomainNotFound(HypervisorError):
    pass


@dataclass(frozen=True)
class InstanceSpec:
    """What ``define`` needs: the Kubernetes object's identity plus flavor and image."""

    uid: str
    namespace: str
    name: str
    vcpus: int
    memory_mib: int
    image: str = ""  # "" = diskless
    node: str = ""
    interfaces: tuple[NetworkInterface, ...] = ()  # recorded at the first define, kept after
    cidata: CloudInit | None = None  # written at the first define and at each rebuild (with an image)


@dataclass(frozen=True)
class DomainFacts:
    exists: bool
    power_state: str = "nostate"  # running paused shutdown shutoff crashed pmsuspended nostate
    config: str | None = None  # "normal" | "rescue" | None (no domain / no novalet metadata)
    vcpus: int | None = None
    memory_mib: int | None = None
    image: str | None = None
    has_managed_save: bool = False  # shut off with a managed-save image: suspended
    old_flavor: Flavor | None = None  # recorded by an unconfirmed resize
    state_reason: int = 0  # libvirt's state reason code, for logs
    metadata: InstanceMetadata | None = None
    domain_id: int | None = None  # libvirt's runtime id: a new one each time the domain starts
    issued: str | None = None  # the journal: the last operation issued on the running domain

    @property
    def suspended(self) -> bool:
        return self.power_state == "shutoff" and self.has_managed_save


# ------------------------------------------------------------------------------------------------
# the process-wide libvirt event loop

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event loop impl and run it in a daemon thread (once per process).

    Must happen before a connection is opened for that connection to deliver events and keepalives.
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None and _loop_thread.is_alive():
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt's default error handler prints every error to stderr, also the expected ones
        # (lookups of undefined domains); errors reach us as exceptions anyway
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:
                    log.exception("libvirt event loop iteration failed")
                    time.sleep(0.1)

        _loop_thread = threading.Thread(target=run, name="libvirt-event-loop", daemon=True)
        _loop_thread.start()


def _err(e: libvirt.libvirtError, what: str = "") -> HypervisorError:
    msg = e.get_error_message() or str(e)
    code = e.get_error_code()
    cls = DomainNotFound if code == libvirt.VIR_ERR_NO_DOMAIN else HypervisorError
    return cls(f"{what}: {msg}" if what else msg, code=code)


def _is_connection_error(e: libvirt.libvirtError) -> bool:
    return e.get_error_code() in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT,
                                  libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_INVALID_CONN)


# ------------------------------------------------------------------------------------------------


class _Guarded:
    """A libvirt connection or domain whose every method call first runs `guard` (the agent's
    fence: it raises once this process may no longer act on the node). Domains it returns are
    guarded too, so no libvirt operation is issued without the check right before it."""

    __slots__ = ("_guard", "_target")

    def __init__(self, target, guard: Callable[[], None]) -> None:
        self._target, self._guard = target, guard

    def __getattr__(self, name: str):
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._guard()
            result = attr(*args, **kwargs)
            return _Guarded(result, self._guard) if isinstance(result, libvirt.virDomain) else result

        return call


def _no_guard() -> None:
    return None


class Hypervisor:
    def __init__(self, uri: str, image_pool: Path, state_dir: Path, domain_type: str = "qemu", *,
                 poll_interval: float = 0.2, guard: Callable[[], None] = _no_guard) -> None:
        """`guard` runs right before every libvirt call and disk change; it raises to refuse
        (the agent passes its fence check)."""
        if domain_type not in ("qemu", "kvm"):
            raise ValueError(f"domain_type must be 'qemu' or 'kvm', got {domain_type!r}")
        self.uri = uri
        self.domain_type = domain_type
        self.images = ImagePool(Path(image_pool), Path(state_dir))
        self.poll_interval = poll_interval
        self._guard = guard
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._subscribers: dict[int, EventCallback] = {}
        self._next_token = 1
        self._reboots: dict[str, int] = {}  # uid -> guest resets libvirt reported (REBOOT events)
        ensure_event_loop()

    # ------------------------------------------------------------------ connection
    def _connection(self) -> libvirt.virConnect:
        with self._lock:
            conn = self._conn
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass
                self._drop_connection()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise _err(e, f"cannot connect to libvirt at {self.uri}") from None
            try:
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError:
                pass
            self._conn = conn
            self._register_events(conn)
            return conn

    def _drop_connection(self) -> None:
        """Forget the connection now; deregister and close it on a helper thread. Closing a
        broken connection can block on libvirt's event loop, and the caller holds self._lock."""
        conn, self._conn = self._conn, None
        ids, self._callback_ids = self._callback_ids, []
        if conn is not None:
            threading.Thread(target=self._close_quietly, args=(conn, ids), daemon=True,
                             name="libvirt-close").start()

    @staticmethod
    def _close_quietly(conn: libvirt.virConnect, ids: list[int]) -> None:
        for cid in ids:
            try:
                conn.domainEventDeregisterAny(cid)
            except libvirt.libvirtError:
                pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    def close(self) -> None:
        """Close the connection (domains keep running; they belong to libvirtd, not to us)."""
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[libvirt.virConnect], object]):
        """Run fn(conn); on a dropped connection reconnect and retry once (ops are idempotent)."""
        for attempt in (1, 2):
            self._guard()
            conn = self._connection()
            try:
                return fn(_Guarded(conn, self._guard))
            except libvirt.libvirtError as e:
                alive = False
                try:
                    alive = bool(conn.isAlive())
                except libvirt.libvirtError:
                    pass
                if attempt == 1 and not alive and _is_connection_error(e):
                    log.warning("libvirt connection lost during %s (%s); reconnecting", what, e)
                    with self._lock:
                        if self._conn is conn:
                            self._drop_connection()
                    continue
                raise _err(e, what) from None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ events
    def _register_events(self, conn: libvirt.virConnect) -> None:
        def lifecycle(_conn, dom, event, detail, _opaque):
            name, details = LIFECYCLE_EVENTS.get(event, (f"EVENT_{event}", []))
            dname = details[detail] if 0 <= detail < len(details) else str(detail)
            self._dispatch(dom, name, dname)

        def reboot(_conn, dom, _opaque):
            try:
                uid = dom.UUIDString()
            except libvirt.libvirtError:
                return
            self._reboots[uid] = self._reboots.get(uid, 0) + 1
            self._dispatch(dom, "REBOOTED", "")

        try:
            self._callback_ids = [
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None),
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, reboot, None),
            ]
        except libvirt.libvirtError as e:
            log.warning("cannot register libvirt event callbacks: %s", e)

    def _dispatch(self, dom, event: str, detail: str) -> None:
        try:
            name, uid = dom.name(), dom.UUIDString()
        except libvirt.libvirtError:
            return
        if name != DOMAIN_PREFIX + uid:  # not an instance (e.g. the KVM probe)
            return
        for cb in list(self._subscribers.values()):
            try:
                cb(uid, event, detail)
            except Exception:
                log.exception("lifecycle event subscriber failed")

    def subscribe(self, callback: EventCallback) -> int:
        """Deliver ``callback(uid, event, detail)`` for novalet domains (on the event-loop thread).

        event is a libvirt lifecycle event name (DEFINED UNDEFINED STARTED SUSPENDED RESUMED STOPPED
        SHUTDOWN PMSUSPENDED CRASHED) or REBOOTED; detail its libvirt detail (e.g. STOPPED/SHUTDOWN).
        Returns a token for :meth:`unsubscribe`. Opens the connection if needed.
        """
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._subscribers[token] = callback
        self._connection()
        return token

    def unsubscribe(self, token: int) -> None:
        with self._lock:
            self._subscribers.pop(token, None)

    # ------------------------------------------------------------------ helpers
    def _lookup(self, conn: libvirt.virConnect, uid: str) -> libvirt.virDomain:
        return conn.lookupByUUIDString(str(uuidlib.UUID(uid)))

    def _find(self, conn, uid: str) -> libvirt.virDomain | None:
        try:
            return self._lookup(conn, uid)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _require(self, conn, uid: str, what: str) -> libvirt.virDomain:
        dom = self._find(conn, uid)
        if dom is None:
            raise DomainNotFound(f"{what}: no domain for instance {uid} (not defined on this node)",
                                 code=libvirt.VIR_ERR_NO_DOMAIN)
        return dom

    @staticmethod
    def _meta(dom: libvirt.virDomain, flags: int = libvirt.VIR_DOMAIN_AFFECT_CURRENT) -> InstanceMetadata | None:
        try:
            return read_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, flags))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise

    @staticmethod
    def _journal(dom: libvirt.virDomain) -> str | None:
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, JOURNAL_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise
        return ET.fromstring(xml).get("issued")

    def mark_issued(self, uid: str, marker: str) -> None:
        """Journal `marker` (`<task id>:<op>`) in the running domain's live metadata, right
        before the operation. It lives as long as the QEMU process (a soft reboot keeps it; a
        hard reboot starts a new process with a new domain id), so recovery can tell an issued
        reboot from one that never was. A domain that is off has nothing to journal."""
        element = ET.Element("journal", {"issued": marker})
        xml = ET.tostring(element, encoding="unicode")

        def fn(conn):
            dom = self._find(conn, uid)
            if dom is not None and dom.isActive():
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, "novaletj", JOURNAL_NS,
                                libvirt.VIR_DOMAIN_AFFECT_LIVE)

        self._call(f"journal {uid}", fn)

    def _require_meta(self, dom, what: str) -> InstanceMetadata:
        meta = self._meta(dom, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if meta is None or meta.flavor is None:
            raise HypervisorError(f"{what}: domain {dom.name()} carries no novalet metadata")
        return meta

    @staticmethod
    def _state(dom) -> int:
        return dom.state()[0]

    def _wait_state(self, dom, states: set[int], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._state(dom) in states:
                    return True
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return libvirt.VIR_DOMAIN_SHUTOFF in states
                raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_interval)

    def _press_power_button(self, dom, uid: str) -> bool:
        """Press the ACPI power button of a running domain: True if the guest now has to
        answer; False if it was destroyed instead (a paused guest cannot see the button; a
        press libvirt refuses is not retried)."""
        if self._state(dom) == libvirt.VIR_DOMAIN_PAUSED:
            self._destroy(dom)
            return False
        try:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_INVALID_ARG:  # libvirt's test driver: no ACPI flag
                dom.shutdown()
                return bool(dom.isActive())
            if dom.isActive():
                log.info("ACPI shutdown of %s failed (%s); destroying", uid, e)
                self._destroy(dom)
            return False
        return True

    @staticmethod
    def _destroy(dom) -> None:
        if not dom.isActive():
            return
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or dom.isActive():
                raise

    # instance directory: kernel/initrd/cmdline are copied there at define/rebuild, so a defined
    # instance does not depend on the pool image staying (rescue needs the image itself)
    def _boot_files(self, uid: str) -> KernelBoot | None:
        d = self.images.instance_dir(uid)
        kernel, initrd, cmdline = d / "kernel", d / "initrd", d / "cmdline"
        if not kernel.exists():
            return None
        return KernelBoot(str(kernel), str(initrd) if initrd.exists() else None,
                          cmdline.read_text().strip() if cmdline.exists() else "")

    def _install_boot_files(self, uid: str, image_name: str) -> None:
        d = self.images.ensure_instance_dir(uid)
        for f in ("kernel", "initrd", "cmdline"):
            (d / f).unlink(missing_ok=True)
        if not image_name:
            return
        img = self.images.get(image_name)
        for src, f in ((img.kernel, "kernel"), (img.initrd, "initrd")):
            if src is not None:
                try:
                    os.link(src, d / f)
                except OSError:
                    shutil.copyfile(src, d / f)
        if img.kernel is not None and img.cmdline is not None:
            (d / "cmdline").write_text(img.cmdline + "\n")

    def _domain_xml(self, meta: InstanceMetadata) -> str:
        uid = meta.uid
        disk = rescue = None
        if meta.image:
            disk = Disk(str(self.images.disk_path(uid)))
            if meta.config == "rescue":
                rescue = Disk(str(self.images.rescue_disk_path(uid)))
        cidata = self.images.cidata_path(uid)
        cfg = instance_domain_config(
            meta, domain_type=self.domain_type, serial_log=str(self.images.serial_log_path(uid)),
            disk=disk, kernel=self._boot_files(uid), rescue_disk=rescue,
            cidata=str(cidata) if meta.image and cidata.exists() else None,
        )
        return build_domain_xml(cfg)

    def _define_meta(self, conn, meta: InstanceMetadata) -> libvirt.virDomain:
        self.images.ensure_instance_dir(meta.uid)
        return conn.defineXML(self._domain_xml(meta))

    def _start_fresh(self, dom) -> None:
        """Boot afresh, never from a managed-save image (FORCE_BOOT).

        A driver that refuses the flag (libvirt's test driver answers VIR_ERR_INVALID_ARG,
        "unsupported flags (0x8)") gets a plain create(), which is the same boot as long as the
        domain has no managed-save image; with one, the refusal stands (a plain create() would
        restore the saved guest instead of booting it)."""
        if dom.isActive():
            return
        try:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_FORCE_BOOT)
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                raise
            if dom.hasManagedSaveImage(0):
                raise
            dom.create()

    # ------------------------------------------------------------------ queries
    def facts(self, uid: str) -> DomainFacts:
        def fn(conn):
            dom = self._find(conn, uid)
            if dom is None:
                return DomainFacts(exists=False)
            state, reason = dom.state()
            info = dom.info()
            meta = self._meta(dom)
            managed = bool(dom.hasManagedSaveImage(0)) if state == libvirt.VIR_DOMAIN_SHUTOFF else False
            active = dom.ID() != -1  # the id the lookup returned (-1: not running), no round trip
            return DomainFacts(
                exists=True, power_state=POWER_STATES.get(state, "nostate"),
                config=meta.config if meta else None, vcpus=info[3], memory_mib=info[1] // 1024,
                image=meta.image if meta else None, has_managed_save=managed,
                old_flavor=meta.old_flavor if meta else None, state_reason=reason, metadata=meta,
                domain_id=dom.ID() if active else None,
                issued=self._journal(dom) if active else None,
            )

        try:
            return self._call(f"facts {uid}", fn)
        except DomainNotFound:  # undefined between the lookup and a read (a migration moved it away)
            return DomainFacts(exists=False)

    def host_resources(self) -> tuple[int, int]:
        """The host's CPUs and memory in MiB, as libvirt sees them (virNodeGetInfo)."""
        info = self._call("node info", lambda conn: conn.getInfo())
        return int(info[2]), int(info[1])

    def defined(self, uid: str) -> bool:
        """Does libvirt have a domain for the instance? (one lookup)"""
        return self._call(f"lookup {uid}", lambda conn: self._find(conn, uid) is not None)

    def list_instances(self) -> list[InstanceMetadata]:
        """Metadata of every domain carrying novalet metadata (defined or transient), for orphan reaping."""

        def fn(conn):
            out = []
            for dom in conn.listAllDomains(0):
                try:
                    meta = self._meta(dom)
                except libvirt.libvirtError:
                    continue  # vanished meanwhile
                if meta is not None:
                    out.append(meta)
            return out

        return self._call("list instances", fn)

    def serial_log(self, uid: str) -> Path:
        return self.images.serial_log_path(uid)

    # ------------------------------------------------------------------ lifecycle
    def define(self, spec: InstanceSpec) -> DomainFacts:
        """Create disks as needed and define the domain (normal config); idempotent.

        An existing domain is left as it is (its flavor, image and config change only through
        resize, rebuild and rescue); missing disk / boot files are recreated.
        """
        flavor = Flavor(spec.vcpus, spec.memory_mib)
        uid = str(uuidlib.UUID(spec.uid))

        def fn(conn):
            dom = self._find(conn, uid)
            meta = self._meta(dom, libvirt.VIR_DOMAIN_AFFECT_CONFIG) if dom is not None else None
            if meta is None:
                meta = InstanceMetadata(namespace=spec.namespace, name=spec.name, uid=uid, node=spec.node,
                                        config="normal", image=spec.image, flavor=flavor,
                                        interfaces=spec.interfaces)
            self._guard()  # disks are changed without libvirt: the fence is checked here too
            try:
                self.images.ensure_instance_dir(uid)
                if meta.image:
                    self.images.create_instance_disk(uid, meta.image)
                    if not (self.images.instance_dir(uid) / "kernel").exists():
                        self._install_boot_files(uid, meta.image)
                    if meta.config == "rescue" and not self.images.rescue_disk_path(uid).exists():
                        self.images.create_rescue_disk(uid, meta.image)
                    if dom is None:
                        self._write_cidata(uid, spec.cidata)
            except ImageError as e:
                raise HypervisorError(f"define {uid}: {e}") from None
            if dom is None:
                self._define_meta(conn, meta)

        self._call(f"define {uid}", fn)
        return self.facts(uid)

    def start(self, uid: str) -> None:
        """Power on; idempotent. A domain with a managed-save image is restored from it."""

        def fn(conn):
            dom = self._require(conn, uid, "start")
            if not dom.isActive():
                dom.create()

        self._call(f"start {uid}", fn)

    def stop(self, uid: str, graceful: bool = True, timeout_s: float = 60.0) -> bool:
        """Power off: ACPI power button, wait up to timeout_s, else destroy. Idempotent.

        Returns True if the guest shut down by itself (graceful), False if it had to be destroyed
        (or was already off). A paused guest cannot see the button and is destroyed at once.
        """

        def fn(conn):
            dom = self._find(conn, uid)
            if dom is None or not dom.isActive():
                return False
            if graceful and self._press_power_button(dom, uid):
                if self._wait_state(dom, {libvirt.VIR_DOMAIN_SHUTOFF}, timeout_s):
                    return True
                log.info("guest %s ignored ACPI shutdown for %.0fs; destroying", uid, timeout_s)
            self._destroy(dom)
            return False

        return self._call(f"stop {uid}", fn)

    def destroy(self, uid: str) -> None:
        """Hard power off; idempotent (no domain or off: nothing to do)."""

        def fn(conn):
            dom = self._find(conn, uid)
            if dom is not None:
                self._destroy(dom)

        self._call(f"destroy {uid}", fn)

    def pause(self, uid: str) -> None:
        def fn(conn):
            dom = self._require(conn, uid, "pause")
            state = self._state(dom)
            if state == libvirt.VIR_DOMAIN_PAUSED:
                return
            if not dom.isActive():
                raise HypervisorError(f"pause {uid}: the domain is not running ({POWER_STATES[state]})")
            dom.suspend()

        self._call(f"pause {uid}", fn)

    def unpause(self, uid: str) -> None:
        def fn(conn):
            dom = self._require(conn, uid, "unpause")
            state = self._state(dom)
            if state == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            elif not dom.isActive():
                raise HypervisorError(f"unpause {uid}: the domain is not running ({POWER_STATES[state]})")

        self._call(f"unpause {uid}", fn)

    def suspend(self, uid: str) -> None:
        """Save the guest's memory to a managed-save image and stop it (Nova suspend); idempotent."""

        def fn(conn):
            dom = self._require(conn, uid, "suspend")
            if not dom.isActive():
                if dom.hasManagedSaveImage(0):
                    return
                raise HypervisorError(f"suspend {uid}: the domain is not running")
            dom.managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING)

        self._call(f"suspend {uid}", fn)

    def resume(self, uid: str) -> None:
        """Start from the managed-save image (Nova resume); idempotent (running: nothing to do)."""

        def fn(conn):
            dom = self._require(conn, uid, "resume")
            if dom.isActive():
                if self._state(dom) == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()
                return
            if not dom.hasManagedSaveImage(0):
                raise HypervisorError(f"resume {uid}: the domain is shut off and has no saved state")
            dom.create()

        self._call(f"resume {uid}", fn)

    def reboots(self, uid: str) -> int:
        """How many guest resets libvirt has reported for `uid` since this process connected."""
        return self._reboots.get(str(uuidlib.UUID(uid)), 0)

    def press_reboot(self, uid: str) -> int | None:
        """Press the ACPI reboot button and return at once: the count of resets before the press
        (the reset shows as `reboots(uid)` growing past it), or None if the guest is not running
        (nothing to press: the caller reboots hard)."""
        uid = str(uuidlib.UUID(uid))

        def fn(conn):
            dom = self._require(conn, uid, "soft reboot")
            if self._state(dom) not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
                return None
            before = self._reboots.get(uid, 0)
            dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
            return before

        return self._call(f"soft reboot {uid}", fn)

    def press_power_button(self, uid: str) -> bool:
        """Ask the guest to shut down (ACPI power button) and return at once. True if it now has
        to answer; False if there is nothing to wait for: already off, or paused (a paused guest
        cannot see the button) and so destroyed at once."""

        def fn(conn):
            dom = self._find(conn, uid)
            return dom is not None and dom.isActive() and self._press_power_button(dom, uid)

        return self._call(f"stop {uid}", fn)

    def reboot_hard(self, uid: str) -> None:
        """Nova-style hard reboot: destroy, regenerate the definition from the metadata, boot afresh.

        Works from any power state (a managed-save image is discarded).
        """

        def fn(conn):
            dom = self._require(conn, uid, "hard reboot")
            meta = self._require_meta(dom, "hard reboot")
            self._destroy(dom)
            dom = self._define_meta(conn, meta)
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
            self._start_fresh(dom)

        self._call(f"hard reboot {uid}", fn)

    def rescue(self, uid: str) -> None:
        """Redefine with the rescue config and boot it; idempotent."""
        self._switch_config(uid, "rescue")

    def unrescue(self, uid: str) -> None:
        """Redefine with the normal config and boot it; drops the rescue disk; idempotent."""
        self._switch_config(uid, "normal")

    def _switch_config(self, uid: str, config: str) -> None:
        def fn(conn):
            dom = self._require(conn, uid, config)
            meta = self._require_meta(dom, config)
            live = self._meta(dom)
            if meta.config == config and live is not None and live.config == config and dom.isActive():
                return
            self._destroy(dom)
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
            if config == "rescue" and meta.image:
                self._guard()
                try:
                    self.images.create_rescue_disk(uid, meta.image)
                except ImageError as e:
                    raise HypervisorError(f"rescue {uid}: {e}") from None
            dom = self._define_meta(conn, replace(meta, config=config))
            if config == "normal":
                self.images.delete_rescue_disk(uid)
            self._start_fresh(dom)

        self._call(f"{'rescue' if config == 'rescue' else 'unrescue'} {uid}", fn)

    def resize(self, uid: str, vcpus: int, memory_mib: int, *, power_on: bool | None = None,
               stop_timeout_s: float = 60.0) -> None:
        """Offline resize: stop (gracefully, then destroy), redefine with the new flavor, restore power.

        The flavor before the resize is recorded as ``oldFlavor`` in the metadata until
        :meth:`confirm_resize` (drops it) or :meth:`revert_resize` (restores it). Idempotent: a redo
        with the same target keeps the original ``oldFlavor``. power_on: None = as it was before.
        """
        self._set_flavor(uid, Flavor(vcpus, memory_mib), power_on=power_on, stop_timeout_s=stop_timeout_s,
                         record_old=True)

    def revert_resize(self, uid: str, *, power_on: bool | None = None, stop_timeout_s: float = 60.0) -> None:
        """Restore the flavor recorded by resize; idempotent (nothing recorded: nothing to do)."""
        facts = self.facts(uid)
        if not facts.exists:
            raise DomainNotFound(f"revert resize: no domain for instance {uid}")
        if facts.old_flavor is None:
            return
        self._set_flavor(uid, facts.old_flavor, power_on=power_on, stop_timeout_s=stop_timeout_s,
                         record_old=False)

    def confirm_resize(self, uid: str) -> None:
        """Forget the flavor recorded by resize; idempotent."""

        def fn(conn):
            dom = self._require(conn, uid, "confirm resize")
            meta = self._require_meta(dom, "confirm resize")
            if meta.old_flavor is None:
                return
            new = replace(meta, old_flavor=None)
            self._define_meta(conn, new)  # persistent config
            if dom.isActive():
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata_xml(new), "novalet", NS,
                                libvirt.VIR_DOMAIN_AFFECT_LIVE)

        self._call(f"confirm resize {uid}", fn)

    def _set_flavor(self, uid: str, flavor: Flavor, *, power_on: bool | None, stop_timeout_s: float,
                    record_old: bool) -> None:
        def fn(conn):
            dom = self._require(conn, uid, "resize")
            meta = self._require_meta(dom, "resize")
            was_running = dom.isActive() and self._state(dom) != libvirt.VIR_DOMAIN_PAUSED
            info = dom.info()
            live_flavor = Flavor(info[3], info[1] // 1024)
            if meta.flavor == flavor and (not dom.isActive() or live_flavor == flavor):
                if power_on and not dom.isActive():
                    dom.create()
                return
            if record_old:
                old = meta.old_flavor or meta.flavor
                new = replace(meta, flavor=flavor, old_flavor=None if old == flavor else old)
            else:
                new = replace(meta, flavor=flavor, old_flavor=None)
            return was_running, new

        res = self._call(f"resize {uid}", fn)
        if res is None:
            return
        was_running, new = res
        self.stop(uid, graceful=True, timeout_s=stop_timeout_s)

        def fn2(conn):
            dom = self._require(conn, uid, "resize")
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)  # a saved memory image does not fit the new flavor
            dom = self._define_meta(conn, new)
            if power_on if power_on is not None else was_running:
                self._start_fresh(dom)

        self._call(f"resize {uid}", fn2)

    def _write_cidata(self, uid: str, data: CloudInit | None) -> None:
        path = self.images.cidata_path(uid)
        if data is None:
            path.unlink(missing_ok=True)
            return
        try:
            write_iso(path, data)
        except (OSError, ValueError) as e:  # pycdlib raises its own ValueError subclasses
            raise ImageError(f"cannot write the cidata disk: {e}") from None

    def rebuild(self, uid: str, image: str, *, power_on: bool = True, cidata: CloudInit | None = None) -> None:
        """Destroy, recreate the disk from ``image`` ("" = diskless) and the cidata disk from the
        spec as it is now, redefine, start."""

        def fn(conn):
            dom = self._require(conn, uid, "rebuild")
            meta = self._require_meta(dom, "rebuild")
            self._destroy(dom)
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
            self._guard()
            try:
                self.images.delete_rescue_disk(uid)
                if image:
                    self.images.create_instance_disk(uid, image, replace=True)
                else:
                    self.images.disk_path(uid).unlink(missing_ok=True)
                self._install_boot_files(uid, image)
                self._write_cidata(uid, cidata if image else None)
            except ImageError as e:
                raise HypervisorError(f"rebuild {uid}: {e}") from None
            dom = self._define_meta(conn, replace(meta, image=image, config="normal"))
            if power_on:
                self._start_fresh(dom)

        self._call(f"rebuild {uid}", fn)

    def snapshot(self, uid: str, name: str) -> Path:
        """Flatten the instance disk into the pool as image ``name`` (with its kernel sidecars).

        A running guest is paused during the copy (QEMU flushes its disk on pause), then resumed.
        Returns the new image's path.
        """

        def fn(conn):
            dom = self._require(conn, uid, "snapshot")
            meta = self._require_meta(dom, "snapshot")
            if not meta.image:
                raise HypervisorError(f"snapshot {uid}: a diskless instance has no disk to snapshot")
            paused_here = False
            mark = self._snapshot_pause_mark(uid)
            if self._state(dom) in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
                mark.write_text(name + "\n")  # so that abort_snapshot unpauses after a crash
                dom.suspend()
                paused_here = True
            self._guard()
            try:
                img = self.images.snapshot(self.images.disk_path(uid), name, source_image=meta.image,
                                           force_share=dom.isActive())
            except ImageError as e:
                raise HypervisorError(f"snapshot {uid}: {e}") from None
            finally:
                if paused_here and self._state(dom) == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()
                mark.unlink(missing_ok=True)
            return img.path

        return self._call(f"snapshot {uid}", fn)

    def _snapshot_pause_mark(self, uid: str) -> Path:
        return self.images.instance_dir(uid) / "snapshot-paused"

    def abort_snapshot(self, uid: str, name: str | None = None) -> list[Path]:
        """Recovery of an interrupted snapshot (taskState image_*): remove the partial files and, if
        the snapshot had paused the guest for the copy, unpause it. Idempotent. Returns what was removed.
        """
        removed = self.images.cleanup_partial_snapshots(name)
        mark = self._snapshot_pause_mark(uid)
        if mark.exists():
            def fn(conn):
                dom = self._find(conn, uid)
                if dom is not None and self._state(dom) == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()

            self._call(f"abort snapshot {uid}", fn)
            mark.unlink(missing_ok=True)
        return removed

    def interfaces(self, uid: str) -> tuple[tuple[NetworkInterface, ...], dict[str, list[str]]]:
        """The domain's NICs (as recorded at its creation) and, while it runs, its addresses by
        MAC: its networks' DHCP leases, then the guest agent's word for the NICs no lease covers
        (a bridge's)."""

        def fn(conn):
            dom = self._find(conn, uid)
            meta = self._meta(dom, libvirt.VIR_DOMAIN_AFFECT_CONFIG) if dom is not None else None
            if meta is None or not meta.interfaces:
                return (), {}
            found: dict[str, set[str]] = {}
            for source in (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
                           libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT):
                if dom.ID() == -1 or all(nic.mac in found for nic in meta.interfaces):
                    break
                try:
                    reported = dom.interfaceAddresses(source, 0)
                except libvirt.libvirtError:
                    continue  # no guest agent answering, or a driver without leases
                for info in reported.values():
                    mac = (info.get("hwaddr") or "").lower()
                    for addr in info.get("addrs") or []:
                        ip = addr.get("addr") or ""
                        if mac and ip and not ip.startswith(("127.", "fe80:")) and ip != "::1":
                            found.setdefault(mac, set()).add(ip)
            return meta.interfaces, {mac: sorted(ips) for mac, ips in found.items()}

        return self._call(f"interfaces {uid}", fn)

    def network_active(self, name: str) -> bool:
        """Is the libvirt network `name` defined and running?"""

        def fn(conn):
            try:
                return bool(conn.networkLookupByName(name).isActive())
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                    return False
                raise

        return self._call(f"network {name}", fn)

    def set_password(self, uid: str, user: str, password: str) -> None:
        """Set a guest user's password through the QEMU guest agent."""

        def fn(conn):
            dom = self._require(conn, uid, "set password")
            if not dom.isActive():
                raise HypervisorError(f"set password {uid}: the guest is not running")
            try:
                dom.setUserPassword(user, password, 0)
            except libvirt.libvirtError as e:
                code = e.get_error_code()
                if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED,
                            libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                    raise HypervisorError(
                        f"set password {uid}: the QEMU guest agent is not running in the guest, so the "
                        f"password cannot be set; install and start qemu-guest-agent in the image "
                        f"(libvirt: {e.get_error_message()})", code=code) from None
                raise

        self._call(f"set password {uid}", fn)

    # ------------------------------------------------------------------ migration (core/migration.py)
    def migration_in_progress(self, uid: str) -> bool:
        """Does a migration job run on the domain (one that goes on in libvirtd after the agent
        that asked for it died)?"""
        uid = str(uuidlib.UUID(uid))

        def fn(conn):
            dom = self._find(conn, uid)
            if dom is None:
                return False
            try:
                kind = dom.jobInfo()[0]
            except libvirt.libvirtError:
                return False
            return kind in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)

        return self._call(f"job of {uid}", fn)

    @staticmethod
    def _target_xml(target_uri: str, uid: str) -> str:
        """The domain the target prepared (its own paths and metadata), as the target defined it:
        the same builder on both sides gives the same guest ABI, which libvirt checks."""
        conn = libvirt.open(target_uri)
        try:
            return conn.lookupByUUIDString(uid).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        finally:
            conn.close()

    @staticmethod
    def _writable_disks(xml: str) -> list[str]:
        root = ET.fromstring(xml)
        return [d.find("target").get("dev") for d in root.findall("devices/disk")
                if d.get("device", "disk") == "disk" and d.find("readonly") is None and d.find("target") is not None]

    def migrate(self, uid: str, target_uri: str, *, live: bool, data_uri: str, disks_uri: str) -> None:
        """Move the domain to the target's libvirtd (peer to peer), its writable disks copied
        over NBD on top of the image the target has (incremental: the target prepared the same
        overlay); the source's definition is removed once the guest runs there. Cold: QEMU is
        started paused here first, so the guest runs no instruction on the source; it arrives
        paused and the target boots it (finish_incoming)."""
        uid = str(uuidlib.UUID(uid))

        def fn(conn):
            dom = self._require(conn, uid, "migrate")
            xml = self._target_xml(target_uri, uid)
            if not live and not dom.isActive():
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            disks = self._writable_disks(xml)
            params = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml, libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml,
                      libvirt.VIR_MIGRATE_PARAM_URI: data_uri}
            flags = (libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                     | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                     # a busy guest's memory may never converge: QEMU slows its vCPUs until it does
                     | (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_AUTO_CONVERGE if live
                        else libvirt.VIR_MIGRATE_PAUSED))
            if disks:
                params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = disks
                params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = disks_uri
                flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
            dom.migrateToURI3(target_uri, params, flags)

        self._call(f"migrate {uid}", fn)

    def finish_incoming(self, uid: str, *, cold: bool, power_on: bool) -> None:
        """The target's last step, safe to run again: a cold arrival (paused, never run) is
        powered off, then booted when the origin was running; a live one runs already."""
        uid = str(uuidlib.UUID(uid))

        def fn(conn):
            dom = self._require(conn, uid, "finish the migration of")
            if cold and self._state(dom) == libvirt.VIR_DOMAIN_PAUSED:
                self._destroy(dom)
            if power_on and not dom.isActive():
                self._start_fresh(dom)

        self._call(f"finish incoming {uid}", fn)

    def revert_source(self, uid: str, *, cold: bool, power_on: bool) -> None:
        """Back to the origin power state on the source, safe to run again: a cold migration's
        paused QEMU is powered off (and the guest booted when it was running); a live one that
        libvirt left paused is resumed."""
        uid = str(uuidlib.UUID(uid))

        def fn(conn):
            dom = self._require(conn, uid, "roll back")
            paused = dom.isActive() and self._state(dom) == libvirt.VIR_DOMAIN_PAUSED
            if cold and paused:
                self._destroy(dom)
            elif paused and power_on:
                dom.resume()
            if power_on and not dom.isActive():
                self._start_fresh(dom)

        self._call(f"revert {uid}", fn)

    def remove_inactive(self, uid: str, *, side: str) -> None:
        """Remove the domain's definition and files from this host (a migration's side that lost:
        the source once the guest moved, the target when it rolled back); refused while the
        domain runs here, so no running guest is ever removed."""
        uid = str(uuidlib.UUID(uid))

        def fn(conn):
            dom = self._find(conn, uid)
            if dom is None:
                return
            if dom.isActive():
                raise HypervisorError(f"the guest still runs on this {side}: its domain and disks are kept")
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

        self._call(f"remove {uid}", fn)
        self._guard()
        self.images.delete_instance(uid)

    def undefine_and_delete(self, uid: str) -> None:
        """Destroy, undefine (with managed save and snapshot metadata) and remove the disks; idempotent.

        novalet domains have no NVRAM (no UEFI) and no checkpoints, so those flags are not passed
        (drivers that lack them, such as the test driver, would refuse the call)."""
        uid = str(uuidlib.UUID(uid))

        def fn(conn):
            dom = self._find(conn, uid)
            if dom is None:
                return
            self._destroy(dom)
            if dom.isPersistent():
                flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                try:
                    dom.undefineFlags(flags)
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise

        self._call(f"undefine {uid}", fn)
        self._guard()
        self.images.delete_instance(uid)
