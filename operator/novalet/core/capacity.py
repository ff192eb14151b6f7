"""A node's capacity and what is placed on it (Nova's resource tracker). Pure.

| figure      | is                                                                        |
|-------------|---------------------------------------------------------------------------|
| capacity    | the host's vCPUs and memory, or less when the agent is told so            |
| allocatable | capacity x allocation ratio (Nova's cpu/ram_allocation_ratio; 1.0 default)|
| allocated   | the flavors of every instance placed (or pinned) there, whatever its state|
| free        | allocatable - allocated, never below 0                                    |

An instance holds its flavor from its placement until its object is gone: a stopped, shelved
or errored instance keeps its place (as in Nova), and during a resize it holds the larger of
its old and new flavor, so a revert always fits. A migration holds its flavor on both nodes from
the scheduler's pick until it ends (or begins to roll back).
"""
import math
from collections.abc import Iterable
from typing import Any

from ..api.models import AllocationRatios, CurrentTask, Flavor, Resources
from .migration import target_holds


def allocatable(capacity: Resources, ratios: AllocationRatios) -> Resources:
    return Resources(vcpus=math.floor(capacity.vcpus * ratios.cpu + 1e-9),
                     memoryMiB=math.floor(capacity.memoryMiB * ratios.memory + 1e-9))


def held(body: dict[str, Any]) -> Resources:
    """What one instance holds on its node (module doc)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    task = status.get("currentTask") or {}
    flavors = [Flavor.model_validate(f) for f in (status.get("flavor") or spec.get("flavor"),
                                                   task.get("targetFlavor"),
                                                   (status.get("resizedFrom") or {}).get("flavor")) if f]
    return Resources(vcpus=max(f.vcpus for f in flavors), memoryMiB=max(f.memoryMiB for f in flavors))


def node_of(body: dict[str, Any]) -> str | None:
    """The node an instance holds its flavor on: where it is placed, else where it is pinned."""
    return (body.get("status") or {}).get("node") or (body.get("spec") or {}).get("nodeName")


def migration_target(body: dict[str, Any]) -> str | None:
    """The target of a migration under way (picked, not rolling back): it holds the flavor there
    too, so the guest always fits where it is going, and back where it came from."""
    task = (body.get("status") or {}).get("currentTask") or {}
    return target_holds(CurrentTask.model_validate(task)) if task.get("migration") else None


def allocated(bodies: Iterable[dict[str, Any]], node: str) -> tuple[Resources, int]:
    """The sum of what the instances placed (or pinned) on `node`, or migrating to it, hold, and
    how many they are."""
    vcpus = memory = count = 0
    for body in bodies:
        if node not in (node_of(body), migration_target(body)):
            continue
        one = held(body)
        vcpus, memory, count = vcpus + one.vcpus, memory + one.memoryMiB, count + 1
    return Resources(vcpus=vcpus, memoryMiB=memory), count


def free(allocatable_: Resources, allocated_: Resources) -> Resources:
    return Resources(vcpus=max(0, allocatable_.vcpus - allocated_.vcpus),
                     memoryMiB=max(0, allocatable_.memoryMiB - allocated_.memoryMiB))


def fits(free_: Resources, flavor: Flavor) -> bool:
    return flavor.vcpus <= free_.vcpus and flavor.memoryMiB <= free_.memoryMiB
