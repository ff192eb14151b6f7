"""The node's Hypervisor resource: what this agent reports of its node (Nova's resource tracker).

While the agent holds the node's Lease it keeps `hypervisors/<node>` current: capacity (the
host's, as libvirt's node info says, or `--vcpus` / `--memory-mib`), allocation ratios,
allocatable, allocated (core/capacity.py, from the instances the agent keeps), free, the
domain type, its version and identity, the images in its pool and its networks. It writes when
a figure changed (looked at every `LOOK_EVERY_S`) and at least every `HEARTBEAT_S`; a standby
agent writes nothing (the fence refuses).
"""
import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from .. import GROUP, VERSION
from ..api.models import AllocationRatios, HypervisorStatus
from ..core import capacity
from ..kube import WriteGuard
from ..kube.instances import MERGE_PATCH
from ..virt.images import ImagePool

log = logging.getLogger(__name__)

PLURAL = "hypervisors"
LOOK_EVERY_S = 2.0
HEARTBEAT_S = 30.0


def agent_version() -> str:
    try:
        return version("novalet")
    except PackageNotFoundError:
        return "unknown"


def pool_images(pool: ImagePool) -> list[str]:
    """Preloaded names and catalog copies (`catalog/<name>`) in the node's pool."""
    names = list(pool.list())
    if pool.catalog_dir.is_dir():
        stems = {p.name.rsplit(".", 1)[0] for p in pool.catalog_dir.iterdir()
                 if p.suffix in (".qcow2", ".raw") and not p.name.startswith(".")}
        names += [f"catalog/{s}" for s in sorted(stems)]
    return names[:500]


class ResourceTracker:
    def __init__(self, api: client.ApiClient, node: str, identity: str, *, capacity_of: Callable,
                 bodies: Callable[[], Iterable[bytes]], pool: ImagePool, networks: Iterable[str],
                 domain_type: str, ratios: AllocationRatios, guard: WriteGuard) -> None:
        """`capacity_of()`: awaitable of the node's Resources; `bodies()`: the compact JSON of
        the instances the agent keeps."""
        self.custom = client.CustomObjectsApi(api)
        self.node, self.identity, self.guard = node, identity, guard
        self.capacity_of, self.bodies, self.pool = capacity_of, bodies, pool
        self.networks, self.domain_type, self.ratios = sorted(networks), domain_type, ratios
        self._written: dict[str, Any] | None = None
        self._written_at = 0.0

    async def status(self) -> HypervisorStatus:
        cap = await self.capacity_of()
        allocatable = capacity.allocatable(cap, self.ratios)
        allocated, count = capacity.allocated((json.loads(raw) for raw in self.bodies()), self.node)
        images = await asyncio.to_thread(pool_images, self.pool)
        return HypervisorStatus(
            capacity=cap, allocationRatios=self.ratios, allocatable=allocatable, allocated=allocated,
            free=capacity.free(allocatable, allocated), instances=count, domainType=self.domain_type,
            agentVersion=agent_version(), agentIdentity=self.identity, imagesCached=images,
            networks=self.networks)

    async def publish(self, now: float) -> bool:
        """Write the status if a figure changed or the heartbeat is due. True when it wrote."""
        status = await self.status()
        figures = status.model_dump(mode="json", exclude={"heartbeatTime"})
        if figures == self._written and now - self._written_at < HEARTBEAT_S:
            return False
        status.heartbeatTime = datetime.now(UTC).replace(microsecond=0)
        await self._write(status)
        self._written, self._written_at = figures, now
        return True

    async def _write(self, status: HypervisorStatus) -> None:
        body = {"status": status.model_dump(mode="json", exclude_none=True)}
        self.guard("write the Hypervisor status")
        try:
            await self.custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, self.node, body,
                                                                 _content_type=MERGE_PATCH)
        except ApiException as error:
            if error.status != 404:
                raise
            self.guard("create the Hypervisor")
            try:
                await self.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "Hypervisor", "metadata": {"name": self.node}})
            except ApiException as created:
                if created.status != 409:
                    raise
            await self.custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, self.node, body,
                                                                 _content_type=MERGE_PATCH)

    async def run(self, holding: Callable[[], bool], clock: Callable[[], float]) -> None:
        """Publish while the agent holds the node's Lease; a failure is logged and retried."""
        while True:
            await asyncio.sleep(LOOK_EVERY_S)
            if not holding():
                self._written = None  # a new tenure writes at once
                continue
            try:
                await self.publish(clock())
            except Exception as error:  # noqa: BLE001 - the next look tries again
                log.warning("Hypervisor %s not written: %s", self.node, error or type(error).__name__)
