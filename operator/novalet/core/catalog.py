"""The image catalog's rules: which image a name means, and where its bytes live on a node. Pure.

An instance's `spec.image` names, in this order (the first that exists decides):

| looked up                                    | means                                      |
|----------------------------------------------|--------------------------------------------|
| a VirtualImage of the instance's namespace   | the tenant's own image (or its snapshot)   |
| a ClusterVirtualImage                        | an image the admins published              |
| an image preloaded in the node's pool        | placed there by hand (`--image-pool`)      |
| none of these                                | "image X not found" (the step fails)       |

A catalog image's copy on a node is named by what defines its bytes, never by its user-facing
name: `catalog/i-<digest of the checksums and cmdline>` for an http image, so two images with the
same bytes share a copy and a re-published name with other bytes never meets the old copy;
`catalog/s-<digest of namespace, instance uid, action id>` for a snapshot, so a VirtualImage of
another namespace naming the same snapshot computes another name and finds nothing. A user's
image name has no `/`, so no spec.image reaches a `catalog/` copy but through these rules.
"""
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from ..api.models import SnapshotSource, VirtualImageSpec, VirtualInstanceStatus
from .conditions import find, set_condition

IMAGE_READY = "ImageReady"  # the instance's condition: its image is on its node (or downloading)
PRESENT, DOWNLOADING, UNAVAILABLE = "Present", "Downloading", "Unavailable"
LOOK_AGAIN_S = 2.0  # how often an instance waiting for a download looks again

Scope = Literal["VirtualImage", "ClusterVirtualImage", "preloaded"]
CATALOG = "catalog"  # the pool's subdirectory of catalog copies (virt/images.py checks the same prefix)


@dataclass(frozen=True)
class Resolved:
    """What an image name means for one instance."""

    scope: Scope
    name: str
    namespace: str | None  # the VirtualImage's; None for the other scopes
    spec: VirtualImageSpec | None  # None: a preloaded image
    pool_name: str  # the name the node's pool knows it by

    @property
    def title(self) -> str:
        where = f" in namespace {self.namespace}" if self.namespace else ""
        return f"{self.scope} {self.name}{where}" if self.scope != "preloaded" else f"preloaded image {self.name}"


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:60]


def pool_name(spec: VirtualImageSpec, namespace: str | None) -> str:
    """The name of an image's copy in a node's pool (module doc)."""
    if spec.source.snapshot is not None:
        snap = spec.source.snapshot
        return f"{CATALOG}/s-{_digest('snapshot', namespace, snap.instanceUID, snap.actionId)}"
    boot = spec.kernelBoot
    return f"{CATALOG}/i-" + _digest(
        "http", spec.source.http.sha256, boot and boot.kernel.sha256, boot and boot.initrd and boot.initrd.sha256,
        boot and boot.cmdline)


def snapshot_pool_name(namespace: str, instance_uid: str, action_id: str) -> str:
    """Where the Snapshot action `action_id` of an instance writes its image."""
    source = SnapshotSource(instanceName="x", instanceUID=instance_uid, actionId=action_id, node="x")
    return pool_name(VirtualImageSpec.model_validate({"source": {"snapshot": source.model_dump()}}), namespace)


def resolve(name: str, namespace: str, namespaced: VirtualImageSpec | None, cluster: VirtualImageSpec | None,
            preloaded: bool) -> Resolved | None:
    """The image `name` means for an instance of `namespace` (module doc's table), or None."""
    if namespaced is not None:
        return Resolved("VirtualImage", name, namespace, namespaced, pool_name(namespaced, namespace))
    if cluster is not None:
        return Resolved("ClusterVirtualImage", name, None, cluster, pool_name(cluster, None))
    if preloaded:
        return Resolved("preloaded", name, None, None, name)
    return None


def not_found(name: str, namespace: str, node: str) -> str:
    return (f"image {name} not found: no VirtualImage {name} in namespace {namespace}, no ClusterVirtualImage "
            f"{name}, and node {node} has no preloaded image {name} (kubectl get vimg,cvimg)")


def elsewhere(resolved: Resolved, node: str) -> str | None:
    """A snapshot lives on the node that took it: why this node cannot use it, if it cannot."""
    snap = resolved.spec.source.snapshot if resolved.spec else None
    if snap is not None and snap.node != node:
        return (f"{resolved.title} is a snapshot kept on node {snap.node}; this instance runs on node {node} "
                "(pin it with spec.nodeName: " + snap.node + ")")
    return None


def progress(done: int, total: int | None) -> str | None:
    """`45%` of a download whose size is known."""
    return f"{min(100, done * 100 // total)}%" if total else None


@dataclass(frozen=True)
class SnapshotQuota:
    """How many snapshots (VirtualImages with a snapshot source) a namespace may hold, and bytes."""

    count: int = 10
    bytes: int = 50 * 2**30

    def refusal(self, namespace: str, count: int, used_bytes: int, new_bytes: int = 0) -> str | None:
        if count + 1 > self.count:
            return (f"snapshot quota of namespace {namespace}: {count} snapshots, the limit is {self.count}; "
                    "delete a snapshot's VirtualImage first")
        if used_bytes + new_bytes > self.bytes:
            return (f"snapshot quota of namespace {namespace}: {used_bytes + new_bytes} bytes with this one, the "
                    f"limit is {self.bytes}; delete a snapshot's VirtualImage first")
        return None


def image_condition(status: VirtualInstanceStatus, image: str | None, state: str, message: str,
                    now) -> VirtualInstanceStatus:
    """The instance's ImageReady condition: `Present` (a create or rebuild begins with it),
    `Downloading` (no task begun: nothing to recover), or `Unavailable` (the step fails, says why)."""
    if not image:
        return status
    return set_condition(status, IMAGE_READY, state == PRESENT, state, message, now)


def downloading(status: VirtualInstanceStatus) -> str | None:
    """What the instance waits for, while no task runs and its image downloads."""
    cond = find(status, IMAGE_READY)
    if status.taskState is None and cond is not None and cond.status == "False" and cond.reason == DOWNLOADING:
        return cond.message
    return None
