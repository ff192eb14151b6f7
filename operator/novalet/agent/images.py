"""The image catalog on one node: which image an instance's name means, its copy in the node's
pool (fetched on first use, in the background), each node's state in the image's status, and
the snapshots a namespace keeps (as VirtualImages, within its quota).

The rules are core/catalog.py's; this is the I/O around them: reads of VirtualImages and
ClusterVirtualImages, downloads (virt/fetch.py, on a pool of their own so a slow server never
takes a thread libvirt calls need), and status writes carrying a resourceVersion.

An instance never waits inside a task for a download: the engine asks `prepare` before it
begins a create or rebuild and, while the copy is not here, records why and looks again in
core/catalog.LOOK_AGAIN_S (the ImageReady condition says why). A fetch that failed is reported to the next look,
whose step then fails with the reason (and so consumes it): the declarative step backs off and tries again
(and with it the download), never a crash loop.
"""
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from .. import GROUP, VERSION
from ..api.models import (
    ClusterVirtualImageSpec,
    NodeImageStatus,
    SnapshotSource,
    VirtualImageSpec,
    VirtualImageStatus,
)
from ..core import catalog
from ..core.catalog import Resolved, SnapshotQuota
from ..kube import WriteGuard, no_guard
from ..kube.instances import MERGE_PATCH
from ..virt.fetch import FetchError, fetch_boot_files, fetch_image, verify_image
from ..virt.images import ImageError, ImagePool

log = logging.getLogger(__name__)

PLURALS = {"VirtualImage": "virtualimages", "ClusterVirtualImage": "clustervirtualimages"}
REPORT_EVERY_S = 1.0  # download progress written to the image's status at most this often
SNAPSHOT_LABEL = "novalet.io/snapshot-of"


class ImageUnavailable(Exception):
    """The image cannot be used here: not found, a fetch that failed, a snapshot of another node.
    The message is what the user reads."""


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class ImageCatalog:
    def __init__(self, api: client.ApiClient, pool: ImagePool, node: str, *, guard: WriteGuard = no_guard,
                 quota: SnapshotQuota | None = None, downloads: int = 2) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.pool, self.node, self.guard = pool, node, guard
        self.quota = quota or SnapshotQuota()
        self._downloads = ThreadPoolExecutor(downloads, thread_name_prefix="image-fetch")
        self._fetches: dict[str, asyncio.Task] = {}  # pool name -> its download
        self._progress: dict[str, tuple[int, int | None]] = {}
        self._failed: dict[str, str] = {}  # pool name -> why its last download failed (told once)

    # ---- reading the catalog -----------------------------------------------------------
    async def _get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            if namespace is None:
                return await self.custom.get_cluster_custom_object(GROUP, VERSION, PLURALS[kind], name)
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise ImageUnavailable(f"cannot read {kind} {name}: the apiserver answered {error.status} "
                                   f"{error.reason}") from None

    async def resolve(self, namespace: str, name: str) -> Resolved:
        """What `name` means for an instance of `namespace` (core/catalog.py's table)."""
        namespaced = await self._get("VirtualImage", namespace, name)
        cluster = None if namespaced else await self._get("ClusterVirtualImage", None, name)
        resolved = catalog.resolve(
            name, namespace,
            VirtualImageSpec.model_validate(namespaced["spec"]) if namespaced else None,
            ClusterVirtualImageSpec.model_validate(cluster["spec"]) if cluster else None,
            preloaded=not (namespaced or cluster) and self.pool.exists(name))
        if resolved is None:
            raise ImageUnavailable(catalog.not_found(name, namespace, self.node))
        why = catalog.elsewhere(resolved, self.node)
        if why:
            raise ImageUnavailable(why)
        return resolved

    # ---- the node's copy ---------------------------------------------------------------
    def prepare(self, resolved: Resolved, *, consume: bool = True) -> str | None:
        """None when the node has the image; else what an instance waits for, its download
        started if none runs. Raises ImageUnavailable for a snapshot whose file this node does
        not have, and for a download that failed: until a `consume` call (the step that fails
        with it) has reported it; the call after that downloads again."""
        key = resolved.pool_name
        if self.pool.exists(key):
            return None
        if resolved.spec is None or resolved.spec.source.snapshot is not None:
            raise ImageUnavailable(f"{resolved.title}: node {self.node} has no copy of it (its snapshot did not "
                                   "complete or was removed)")
        failed = self._failed.pop(key, None) if consume else self._failed.get(key)
        if failed is not None:
            raise ImageUnavailable(failed)
        if key not in self._fetches:
            self._progress[key] = (0, None)
            self._fetches[key] = asyncio.create_task(self._fetch(resolved), name=f"fetch {key}")
        done, total = self._progress.get(key, (0, None))
        share = catalog.progress(done, total)  # no byte count: the message changes a hundred times at most
        return (f"waiting for {resolved.title}: downloading to node {self.node}" + (f", {share}" if share else "")
                + f" (progress: kubectl get {PLURALS[resolved.scope]} {resolved.name})")

    async def _fetch(self, resolved: Resolved) -> None:
        key = resolved.pool_name
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def progress(done: int, total: int | None) -> None:
            self._progress[key] = (done, total)

        try:
            await self._report(resolved, "Downloading", bytesDone=0)
            job = loop.run_in_executor(self._downloads, self._download, resolved, progress)
            while True:
                finished, _ = await asyncio.wait([job], timeout=REPORT_EVERY_S)
                if finished:
                    break
                done, total = self._progress[key]
                await self._report(resolved, "Downloading", bytesDone=done, bytesTotal=total,
                                   progress=catalog.progress(done, total))
            fmt, size, virtual_size = job.result()
            log.info("%s: fetched to %s in %.1f s", resolved.title, key, time.monotonic() - started)
            await self._report(resolved, "Ready", format=fmt, sizeBytes=size, virtualSizeBytes=virtual_size,
                               bytesDone=size, bytesTotal=size, progress="100%")
        except (FetchError, ImageError) as error:
            self._failed[key] = f"{resolved.title}: {error}"
            log.warning("%s", self._failed[key])
            await self._report(resolved, "Failed", message=str(error))
        except Exception as error:  # an unexpected bug must not leave waiters waiting forever
            self._failed[key] = f"{resolved.title}: download failed: {error}"
            log.exception("%s", self._failed[key])
        finally:
            self._fetches.pop(key, None)
            self._progress.pop(key, None)

    def _download(self, resolved: Resolved, progress) -> tuple[str, int, int]:
        """Blocking (a download thread): the boot files, then the disk; a refusal leaves nothing."""
        spec, stem = resolved.spec, resolved.pool_name.split("/", 1)[1]
        cache = self.pool.catalog_dir
        boot = spec.kernelBoot
        try:
            if boot is not None:
                initrd = (boot.initrd.url, boot.initrd.sha256) if boot.initrd else None
                fetch_boot_files(cache, stem, (boot.kernel.url, boot.kernel.sha256), initrd)
                if boot.cmdline:
                    (cache / f"{stem}.cmdline").write_text(boot.cmdline + "\n")
            image = fetch_image(spec.source.http.url, spec.source.http.sha256, cache, stem, progress=progress)
        except BaseException:
            if not self.pool.exists(resolved.pool_name):  # the kernel without its disk is no image
                for suffix in ("kernel", "kernel.sha256", "initrd", "initrd.sha256", "cmdline"):
                    (cache / f"{stem}.{suffix}").unlink(missing_ok=True)
            raise
        return image.format, image.bytes, image.virtual_size

    # ---- image status: one entry per node ----------------------------------------------
    async def _report(self, resolved: Resolved, phase: str, **fields: Any) -> None:
        """This node's entry in the image's status.nodes, written with the resourceVersion read
        (other nodes write theirs beside it; a conflict re-reads)."""
        if resolved.scope == "preloaded":
            return
        entry = NodeImageStatus(node=self.node, phase=phase, lastUpdateTime=_now(), **fields)
        await self.write_node_status(resolved.scope, resolved.namespace, resolved.name, entry)

    async def write_node_status(self, kind: str, namespace: str | None, name: str, entry: NodeImageStatus) -> None:
        plural = PLURALS[kind]
        for _ in range(5):
            body = await self._get(kind, namespace, name)
            if body is None:
                return
            status = VirtualImageStatus.model_validate(body.get("status") or {})
            nodes = [n for n in status.nodes if n.node != self.node] + [entry]
            patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                     "status": {"nodes": [n.model_dump(mode="json", exclude_none=True)
                                          for n in sorted(nodes, key=lambda n: n.node)]}}
            self.guard(f"write {kind} status")
            try:
                if namespace is None:
                    await self.custom.patch_cluster_custom_object_status(GROUP, VERSION, plural, name, patch,
                                                                         _content_type=MERGE_PATCH)
                else:
                    await self.custom.patch_namespaced_custom_object_status(
                        GROUP, VERSION, namespace, plural, name, patch, _content_type=MERGE_PATCH)
                return
            except ApiException as error:
                if error.status == 404:
                    return
                if error.status != 409:
                    log.warning("%s %s: status not written: %s %s", kind, name, error.status, error.reason)
                    return

    # ---- snapshots -----------------------------------------------------------------------
    async def _snapshots(self, namespace: str) -> list[dict[str, Any]]:
        listed = await self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS["VirtualImage"])
        return [i for i in listed["items"] if (i.get("spec", {}).get("source") or {}).get("snapshot")]

    @staticmethod
    def _bytes(item: dict[str, Any]) -> int:
        nodes = VirtualImageStatus.model_validate(item.get("status") or {}).nodes
        return sum(n.sizeBytes or 0 for n in nodes)

    async def check_snapshot(self, namespace: str, name: str, source: SnapshotSource, new_bytes: int = 0) -> None:
        """Before (and, with its size, after) a snapshot is written: the name is free or already
        this snapshot's, and the namespace's quota holds. Raises ImageUnavailable."""
        existing = await self._get("VirtualImage", namespace, name)
        if existing is not None:
            if (existing["spec"].get("source") or {}).get("snapshot") == source.model_dump():
                return  # this very snapshot, recorded before a crash
            raise ImageUnavailable(f"VirtualImage {name} already exists in namespace {namespace}: choose another "
                                   "snapshotName")
        others = await self._snapshots(namespace)
        refusal = self.quota.refusal(namespace, len(others), sum(map(self._bytes, others)), new_bytes)
        if refusal:
            raise ImageUnavailable(refusal)

    async def record_snapshot(self, namespace: str, name: str, source: SnapshotSource, pool_name: str) -> None:
        """The VirtualImage a snapshot lands as (idempotent), and this node's copy in its status."""
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualImage",
                "metadata": {"name": name, "namespace": namespace, "labels": {SNAPSHOT_LABEL: source.instanceName}},
                "spec": {"source": {"snapshot": source.model_dump()}}}
        self.guard("create VirtualImage")
        try:
            await self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS["VirtualImage"],
                                                              body)
        except ApiException as error:
            if error.status != 409:
                raise ImageUnavailable(f"the snapshot is written but its VirtualImage {name} could not be "
                                       f"created: {error.status} {error.reason}") from None
        image = self.pool.get(pool_name)
        fmt, virtual_size = await asyncio.to_thread(verify_image, image.path)
        await self.write_node_status("VirtualImage", namespace, name, NodeImageStatus(
            node=self.node, phase="Ready", format=fmt, sizeBytes=image.path.stat().st_size,
            virtualSizeBytes=virtual_size, lastUpdateTime=_now()))

    async def close(self) -> None:
        for task in list(self._fetches.values()):
            task.cancel()
        self._downloads.shutdown(wait=False, cancel_futures=True)
