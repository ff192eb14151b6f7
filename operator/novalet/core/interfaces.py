"""An instance's network interfaces: the defaulted list, stable MACs, and status from leases.

Pure. The MAC is derived from the instance uid and the interface's index, so it never changes
across reboots, stops, rebuilds or agents (libvirt's network then hands out the same lease), with
QEMU's locally administered prefix 52:54:00 (what libvirt itself generates).
"""
import hashlib
from collections.abc import Iterable
from datetime import datetime

from ..api.models import Interface, InterfaceStatus, VirtualInstanceSpec, VirtualInstanceStatus
from .vocabulary import PowerState

DEFAULT_INTERFACES = (Interface(name="default", network="default"),)
MAC_PREFIX = "52:54:00"
ADDRESS_POLL_S = 2.0  # how often a guest's DHCP lease is looked for, for a while after its last action
ADDRESS_POLL_WINDOW_S = 180.0


def interfaces_of(spec: VirtualInstanceSpec) -> tuple[Interface, ...]:
    """Omitted: one interface `default` on the network `default`; an empty list: none."""
    return DEFAULT_INTERFACES if spec.interfaces is None else tuple(spec.interfaces)


def mac_address(uid: str, index: int) -> str:
    digest = hashlib.sha256(f"{uid}/{index}".encode()).digest()
    return ":".join([MAC_PREFIX, *(f"{b:02x}" for b in digest[:3])])


def interface_status(nics: Iterable[tuple[str, str]], addresses: dict[str, list[str]]) -> list[InterfaceStatus]:
    """status.interfaces: each (name, MAC) the domain was built with, and the addresses seen for
    that MAC."""
    return [InterfaceStatus(name=name, mac=mac, ipAddresses=sorted(addresses.get(mac, []))) for name, mac in nics]


def awaiting_address(status: VirtualInstanceStatus) -> bool:
    """A running guest with an interface that has no address yet (its DHCP client is at work)."""
    return (status.powerState == PowerState.RUNNING and status.interfaces is not None
            and any(not iface.ipAddresses for iface in status.interfaces))


def should_look(status: VirtualInstanceStatus) -> bool:
    """Whether a sync reads the interfaces from libvirt: never recorded yet, or an address missing."""
    return status.interfaces is None or awaiting_address(status)


def address_poll_after(status: VirtualInstanceStatus, now: datetime) -> float | None:
    """Seconds until the next look for a missing lease: soon while the last action is recent (a
    guest just booted asks DHCP), else the periodic resync's (None)."""
    if not awaiting_address(status):
        return None
    last = status.lastAction
    since = (now - last.finishedAt).total_seconds() if last and last.finishedAt else None
    return ADDRESS_POLL_S if since is not None and since < ADDRESS_POLL_WINDOW_S else None
