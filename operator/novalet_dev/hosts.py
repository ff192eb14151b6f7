"""Several hypervisor hosts on one machine: ``novalet dev up --hosts N``.

A host is a private libvirtd (novalet_dev.libvirtd) with everything of its own: state
directory, socket, libvirt host UUID, network namespace and, in it, the libvirt network
``default`` on a bridge and subnet no other host uses, and an image directory for its agent.
They are named ``host-1`` ... ``host-N``; all of them sit beside the one control plane.

``host-1`` is the stack's libvirtd of old, where it always was (``<state>/libvirt``, bridge
``virbr-nv0``, 192.168.177.0/24, agent pool ``<state>/images``), so a one-host stack is exactly the
stack as it was. ``host-K`` (K >= 2) lives in ``<state>/hosts/host-K/`` (``libvirt/``, ``images/``),
with bridge ``virbr-nv<K-1>`` and 192.168.<176+K>.0/24. ``<state>/hosts.json`` records how many hosts
the last ``dev up`` asked for (at least the ones still running), which ``dev status`` lists.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .libvirtd import DEFAULT_NETWORK, GuestNetwork, Libvirtd

__all__ = ["MAX_HOSTS", "Host", "Hosts", "host_index", "host_name", "host_network"]

PREFIX = "host-"
MAX_HOSTS = 32  # 192.168.177.0/24 ... 192.168.208.0/24
HOSTS_FILE = "hosts.json"
_NAME = re.compile(r"host-([1-9][0-9]*)")


def host_name(index: int) -> str:
    return f"{PREFIX}{index}"


def host_index(name: str) -> int:
    """``host-K`` -> K; anything else is a ValueError that says what a name looks like."""
    m = _NAME.fullmatch(name.strip())
    if not m or not 1 <= int(m.group(1)) <= MAX_HOSTS:
        raise ValueError(f"no host {name!r}: hosts are named host-1 ... host-{MAX_HOSTS}")
    return int(m.group(1))


def host_network(index: int) -> GuestNetwork:
    """Host K's network ``default``: host-1's is the stack's of old; the others take the next
    bridge and /24, so no two hosts' guests share a bridge name or an address."""
    if not 1 <= index <= MAX_HOSTS:
        raise ValueError(f"host index {index} out of 1..{MAX_HOSTS}")
    if index == 1:
        return DEFAULT_NETWORK
    return GuestNetwork(bridge=f"virbr-nv{index - 1}", prefix=f"192.168.{176 + index}")


@dataclass(frozen=True)
class Host:
    """One hypervisor host of the local stack."""

    index: int
    libvirtd: Libvirtd
    image_pool: Path  # the directory its agent's --image-pool is meant to be

    @property
    def name(self) -> str:
        return host_name(self.index)

    @property
    def uri(self) -> str:
        return self.libvirtd.uri

    @property
    def host_uuid(self) -> str | None:
        return self.libvirtd.host_uuid

    @property
    def network(self) -> GuestNetwork:
        return self.libvirtd.network

    def exists(self) -> bool:
        """Whether this host was ever started here (its libvirtd wrote its configuration)."""
        return self.libvirtd.config_file.exists()

    def status(self) -> dict:
        return {**self.libvirtd.status(), "host": self.name, "image_pool": str(self.image_pool)}


class Hosts:
    """The hosts of the stack whose state directory is ``state``."""

    def __init__(self, state: str | os.PathLike):
        self.state = Path(state).absolute()

    def host(self, which: int | str, *, libvirtd: Libvirtd | None = None) -> Host:
        """Host ``which`` (an index or a name); ``libvirtd`` an object already on its directory."""
        index = host_index(which) if isinstance(which, str) else which
        if index == 1:
            directory, pool = self.state / "libvirt", self.state / "images"
        else:
            base = self.state / "hosts" / host_name(index)
            directory, pool = base / "libvirt", base / "images"
        host_network(index)  # range check
        if libvirtd is None:
            libvirtd = Libvirtd(directory, network=host_network(index))
        elif libvirtd.state_dir != directory.absolute():
            raise ValueError(f"{host_name(index)}'s libvirtd lives in {directory}, not {libvirtd.state_dir}")
        return Host(index=index, libvirtd=libvirtd, image_pool=pool)

    # which hosts there are ----------------------------------------------------------------
    @property
    def record_file(self) -> Path:
        return self.state / HOSTS_FILE

    def recorded(self) -> int:
        """How many hosts the last ``dev up`` left (1 when never said)."""
        try:
            count = int(json.loads(self.record_file.read_text())["hosts"])
        except (OSError, ValueError, KeyError, TypeError):
            return 1
        return min(max(count, 1), MAX_HOSTS)

    def _record(self, count: int) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        tmp = self.record_file.with_name(f".{HOSTS_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps({"hosts": count}) + "\n")
        tmp.replace(self.record_file)

    def existing(self) -> list[Host]:
        """host-1 and every other host with a directory here, by index."""
        found = {1}
        base = self.state / "hosts"
        if base.is_dir():
            for entry in base.iterdir():
                try:
                    found.add(host_index(entry.name))
                except ValueError:
                    continue
        return [self.host(i) for i in sorted(found)]

    def listed(self) -> list[Host]:
        """The stack's hosts: host-1 ... host-<recorded>, and any other one still running."""
        indices = set(range(1, self.recorded() + 1))
        indices |= {h.index for h in self.existing() if h.libvirtd.is_running()}
        return [self.host(i) for i in sorted(indices)]

    # lifecycle ----------------------------------------------------------------------------
    def up(self, count: int, *, started: Callable[[Host, bool], None] | None = None) -> list[Host]:
        """Start host-1 ... host-``count`` (the ones not already up and answering); leaves any
        other running host alone. ``started(host, was_up)`` is told about each, in order."""
        if not 1 <= count <= MAX_HOSTS:
            raise ValueError(f"--hosts must be 1..{MAX_HOSTS}, not {count}")
        hosts = [self.host(i) for i in range(1, count + 1)]
        running = [h.index for h in self.existing() if h.libvirtd.is_running()]
        self._record(max([count, *running]))
        for h in hosts:
            was_up = h.libvirtd.is_running() and h.libvirtd.healthy()
            if not was_up:
                if h.index > 1:  # host-1's pool is the agent's business, as it always was
                    h.image_pool.mkdir(parents=True, exist_ok=True)
                h.libvirtd.start()
            if started is not None:
                started(h, was_up)
        return hosts

    def down(self, *, destroy_domains: bool = True) -> list[Host]:
        """Stop every host's libvirtd (the highest first); returns the ones that were running."""
        was = []
        for h in reversed(self.existing()):
            if h.libvirtd.is_running():
                was.append(h)
            h.libvirtd.stop(destroy_domains=destroy_domains)
        return was
