"""Placement: which node an unpinned instance goes to (Nova's filter scheduler). Pure.

The scheduler (controller/scheduler.py, one active per cluster through a Lease) takes the
instances without `spec.nodeName` and not placed yet, oldest first, and for each:

| step    | rule                                                                              |
|---------|-----------------------------------------------------------------------------------|
| filter  | the node's agent is alive (its Lease is current)                                  |
| filter  | `spec.nodeSelector` matches the Hypervisor's labels                               |
| filter  | the node provides every network the instance's interfaces name                   |
| filter  | the image can be had there (a snapshot lives on its node; a preloaded image on    |
|         | the nodes that have it; a catalog image over http anywhere)                       |
| filter  | the flavor fits what is free: allocatable (capacity x ratio) minus what every     |
|         | instance on the node holds (core/capacity.py), pinned ones and this round's too   |
| weigh   | spread (most free memory, then most free vCPUs; the default) or pack (least)     |
| tie     | the node's name                                                                   |

None fits: the instance stays pending with `Scheduled=False`, reason `Unschedulable`, and why
each node was filtered out; it is looked at again every round, so it is placed as soon as
capacity frees up. One scheduler decides in sequence and counts its own placements at once, so
however many instances arrive together no node is given more than it can hold. A pinned
instance (`spec.nodeName`) skips the filters, like Nova's forced host, but its flavor counts.
"""
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..api.models import Flavor, Resources
from .capacity import fits, free

Policy = Literal["spread", "pack"]


@dataclass(frozen=True)
class Host:
    name: str
    allocatable: Resources
    alive: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    networks: frozenset[str] = frozenset()
    images: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Demand:
    """What an instance asks of its node."""

    flavor: Flavor
    node_selector: Mapping[str, str] = field(default_factory=dict)
    networks: frozenset[str] = frozenset()
    image: str = ""
    image_nodes: frozenset[str] | None = None  # None: any node can get the image


def refusal(host: Host, demand: Demand, used: Resources) -> str | None:
    """Why `host` cannot take the instance (the first filter that says no), or None."""
    if not host.alive:
        return "its agent is not running (Lease expired)"
    missing = {k: v for k, v in demand.node_selector.items() if host.labels.get(k) != v}
    if missing:
        return "labels do not match nodeSelector " + ", ".join(f"{k}={v}" for k, v in sorted(missing.items()))
    networks = demand.networks - host.networks
    if networks:
        return f"no network {', '.join(sorted(networks))}"
    if demand.image_nodes is not None and host.name not in demand.image_nodes:
        return f"image {demand.image} is not there"
    room = free(host.allocatable, used)
    if not fits(room, demand.flavor):
        short = [f"{what} (needs {need}, {have} free)" for what, need, have in (
            ("vCPUs", demand.flavor.vcpus, room.vcpus), ("memory MiB", demand.flavor.memoryMiB, room.memoryMiB))
            if need > have]
        return "not enough " + " and ".join(short)
    return None


def _reasons(refused: Mapping[str, str | None], named: int = 3) -> str:
    """Each reason once, with its nodes (named when few, counted when more: a cluster keeps the
    Hypervisors of nodes long gone)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in refused.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names) if len(names) <= named else f'{len(names)} nodes'}: {reason}"
                     for reason, names in by_reason.items())


def _room(host: Host, used: Resources) -> tuple[int, int]:
    room = free(host.allocatable, used)
    return room.memoryMiB, room.vcpus


def choose(demand: Demand, hosts: Iterable[Host], used: Mapping[str, Resources],
           policy: Policy = "spread") -> tuple[str | None, str]:
    """The node for one instance and a message: where it was placed, or why nowhere."""
    hosts = sorted(hosts, key=lambda h: h.name)
    nothing = Resources(vcpus=0, memoryMiB=0)
    refused = {h.name: refusal(h, demand, used.get(h.name, nothing)) for h in hosts}
    fit = [h for h in hosts if refused[h.name] is None]
    if not fit:
        return None, f"0/{len(hosts)} nodes can take it: {_reasons(refused) or 'no node has an agent'}"
    sign = -1 if policy == "spread" else 1
    best = min(fit, key=lambda h: (sign * _room(h, used.get(h.name, nothing))[0],
                                   sign * _room(h, used.get(h.name, nothing))[1], h.name))
    return best.name, f"placed on node {best.name} ({policy})"


def choose_target(demand: Demand, hosts: Iterable[Host], used: Mapping[str, Resources], source: str,
                  asked: str | None, policy: Policy = "spread") -> tuple[str | None, str]:
    """A migration's target: never its source; the node asked for when it passes the filters
    (Nova checks a requested host the same way), else the best of the others."""
    hosts = [h for h in hosts if h.name != source]
    if asked is not None:
        hosts = [h for h in hosts if h.name == asked]
        if not hosts:
            return None, f"node {asked} has no Hypervisor with capacity (or is the source)"
    node, message = choose(demand, hosts, used, policy)
    return node, message.replace("placed on", "migrating to") if node else message


def schedule(pending: Iterable[tuple[str, Demand]], hosts: Iterable[Host], used: Mapping[str, Resources],
             policy: Policy = "spread") -> list[tuple[str, str | None, str]]:
    """Place `pending` (key, demand) in order; each placement counts for the next."""
    hosts = list(hosts)
    used = dict(used)
    decisions = []
    for key, demand in pending:
        node, message = choose(demand, hosts, used, policy)
        if node is not None:
            before = used.get(node, Resources(vcpus=0, memoryMiB=0))
            used[node] = Resources(vcpus=before.vcpus + demand.flavor.vcpus,
                                   memoryMiB=before.memoryMiB + demand.flavor.memoryMiB)
        decisions.append((key, node, message))
    return decisions
