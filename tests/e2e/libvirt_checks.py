"""What libvirt itself says about a domain: the ground truth e2e tests compare status with."""
import threading
import time
from typing import ClassVar

import libvirt

STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff", libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_BLOCKED: "running", libvirt.VIR_DOMAIN_NOSTATE: "nostate",
}


def domain(conn: libvirt.virConnect, uid: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByUUIDString(uid)
    except libvirt.libvirtError:
        return None


def power(conn: libvirt.virConnect, uid: str) -> str | None:
    dom = domain(conn, uid)
    return None if dom is None else STATE_NAMES[dom.state()[0]]


def flavor(conn: libvirt.virConnect, uid: str) -> tuple[int, int]:
    """(vcpus, memory MiB) of the persistent definition."""
    info = domain(conn, uid).info()
    return info[3], info[1] // 1024


def domains_for(conn: libvirt.virConnect, uid: str) -> int:
    return sum(1 for d in conn.listAllDomains(0) if d.UUIDString() == uid)


class BootCounter:
    """Counts guest (re)boots from libvirt's events: every start of a QEMU process (a hard
    reboot is destroy + start) and every in-place reset (a soft reboot). Not from the
    operator's logs. One guest reset shows as a burst of REBOOT events (QEMU resets twice
    within milliseconds for one ACPI reboot here), so resets within a second count once."""

    BURST_S = 1.0

    def __init__(self, conn: libvirt.virConnect, uid: str):
        self.conn, self.dom = conn, conn.lookupByUUIDString(uid)
        self.starts = 0
        self.resets = 0
        self.last_reset = float("-inf")
        self.lock = threading.Lock()
        self.ids = [
            conn.domainEventRegisterAny(self.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None),
            conn.domainEventRegisterAny(self.dom, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._reboot, None),
        ]

    def _lifecycle(self, conn, dom, event, detail, opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            with self.lock:
                self.starts += 1

    def _reboot(self, conn, dom, opaque):
        with self.lock:
            now = time.monotonic()
            if now - self.last_reset > self.BURST_S:
                self.resets += 1
            self.last_reset = now

    @property
    def reboots(self) -> int:
        with self.lock:
            return self.starts + self.resets

    def close(self) -> None:
        for callback_id in self.ids:
            self.conn.domainEventDeregisterAny(callback_id)


class _ConnectionEvents:
    """One connection-wide lifecycle and reboot callback (libvirt refuses a second one for the
    same event on a connection), fanned out to the DomainEvents that listen."""

    registries: ClassVar[dict[int, "_ConnectionEvents"]] = {}

    def __init__(self, conn: libvirt.virConnect):
        self.conn, self.listeners = conn, []
        self.ids = [
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._reboot, None),
        ]

    @classmethod
    def of(cls, conn: libvirt.virConnect) -> "_ConnectionEvents":
        if id(conn) not in cls.registries:
            cls.registries[id(conn)] = cls(conn)
        return cls.registries[id(conn)]

    def _lifecycle(self, conn, dom, event, detail, opaque):
        self._note(dom, f"lifecycle-{event}-{detail}")

    def _reboot(self, conn, dom, opaque):
        self._note(dom, "reboot")

    def _note(self, dom, what: str) -> None:
        uid = dom.UUIDString().lower()
        for listener in list(self.listeners):
            listener.note(uid, what)

    def leave(self, listener) -> None:
        self.listeners.remove(listener)
        if not self.listeners:
            for callback_id in self.ids:
                self.conn.domainEventDeregisterAny(callback_id)
            self.registries.pop(id(self.conn), None)


class DomainEvents:
    """Every lifecycle and reboot event libvirt reports for one instance's domain, also before
    the domain exists (a connection-wide callback filtered by uuid): what happened at libvirt,
    whoever caused it."""

    def __init__(self, conn: libvirt.virConnect, uid: str):
        self.uid = uid.lower()
        self.log: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.source = _ConnectionEvents.of(conn)
        self.source.listeners.append(self)

    def note(self, uid: str, what: str) -> None:
        if uid == self.uid:
            with self.lock:
                self.log.append((time.monotonic(), what))

    def since(self, moment: float) -> list[str]:
        with self.lock:
            return [what for when, what in self.log if when >= moment]

    @property
    def starts(self) -> int:
        with self.lock:
            return sum(1 for _, what in self.log if what.startswith(f"lifecycle-{libvirt.VIR_DOMAIN_EVENT_STARTED}-"))

    def close(self) -> None:
        self.source.leave(self)
