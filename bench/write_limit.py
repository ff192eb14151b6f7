"""The physical limit: conditional status writes per second that the local kube-apiserver accepts.

Each write is what the agent sends (kube/instances.py InstanceStore.write_status): a JSON merge
patch of a VirtualInstance's `/status` subresource carrying `metadata.resourceVersion` and the
whole status (model_dump of VirtualInstanceStatus), through kubernetes_asyncio. Each write
changes the status (a no-op patch would not reach etcd). W writer coroutines share N objects,
each writer owning N/W of them and going round them, as one agent serializes the writes to one
instance; a writer that gets a 409 re-reads the object and writes again. After a short warm-up
a fixed count of accepted writes is timed, for a few writer counts; the limit is the best rate.

The writers run in one Python process on the same machine as the apiserver and etcd (as the
agent does), so the figure is what such a client can get accepted here, not the apiserver's
rate with a client that costs nothing.

`measure(kubeconfig)` is what bench/storms.py calls first in its own stack, so its ratios hold.
"""
import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from common import host_details, local_stack, percentile, write_result
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from novalet import GROUP, PLURAL, VERSION
from novalet.api.models import VirtualInstanceStatus

MERGE_PATCH = "application/merge-patch+json"
NAMESPACE = "write-limit"


def status_template(node: str) -> VirtualInstanceStatus:
    """A status the size and shape of an instance's in the middle of a hard reboot."""
    now = datetime.now(UTC).replace(microsecond=0)
    record = {"name": "Create", "id": "spec-g1-create", "result": "Succeeded", "message": "",
              "startedAt": now, "finishedAt": now}
    conditions = [{"type": t, "status": s, "reason": r, "message": m, "lastTransitionTime": now}
                  for t, s, r, m in (("Ready", "False", "TaskInProgress", "reboot_pending_hard"),
                                     ("Reconciling", "True", "RebootHard", "reboot_pending_hard"),
                                     ("Stalled", "False", "NotStalled", ""),
                                     ("HostAgentReady", "True", "AgentAlive",
                                      f"agent on node {node} is handling this instance"))]
    return VirtualInstanceStatus.model_validate({
        "vmState": "active", "taskState": "reboot_pending_hard", "powerState": "running",
        "phase": "Rebooting", "node": node, "domainUUID": "00000000-0000-0000-0000-000000000000",
        "observedGeneration": 2, "flavor": {"vcpus": 1, "memoryMiB": 128}, "image": "",
        "currentTask": {"name": "RebootHard", "id": "hard-0", "taskState": "reboot_pending_hard",
                        "originVmState": "active", "originPowerState": "running", "domainId": 1,
                        "owner": f"{node}/bench/1/abcdef", "startedAt": now, "attempt": 1},
        "handledAction": {"id": "hard-0", "name": "Reboot", "handledAt": now},
        "lastAction": record, "history": [record], "conditions": conditions})


async def _api(kubeconfig: Path, pool: int) -> client.ApiClient:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = pool
    return client.ApiClient(cfg)


async def _ensure_namespace(api: client.ApiClient, name: str) -> None:
    try:
        await client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    except ApiException as error:
        if error.status != 409:
            raise


async def _run_phase(custom, bodies: list[dict], writers: int, total: int, template: VirtualInstanceStatus,
                     serial: list[int]) -> dict:
    """`total` accepted writes by `writers` coroutines; writer w owns bodies[w::writers]."""
    tickets = iter(range(total))
    latencies: list[float] = []
    conflicts = 0

    async def writer(w: int) -> None:
        nonlocal conflicts
        mine = list(range(w, len(bodies), writers))
        turn = 0
        for _ in tickets:
            i = mine[turn % len(mine)]
            turn += 1
            while True:
                body = bodies[i]
                serial[0] += 1
                status = template.model_copy(update={"domainUUID": body["metadata"]["uid"],
                                                     "observedGeneration": serial[0]})
                patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                         "status": status.model_dump(mode="json")}
                started = time.perf_counter()
                try:
                    bodies[i] = await custom.patch_namespaced_custom_object_status(
                        GROUP, VERSION, NAMESPACE, PLURAL, body["metadata"]["name"], patch,
                        _content_type=MERGE_PATCH)
                except ApiException as error:
                    if error.status != 409:
                        raise
                    conflicts += 1
                    bodies[i] = await custom.get_namespaced_custom_object(
                        GROUP, VERSION, NAMESPACE, PLURAL, body["metadata"]["name"])
                    continue
                latencies.append(time.perf_counter() - started)
                break

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    elapsed = time.perf_counter() - started
    return {"writers": writers, "writes": len(latencies), "seconds": round(elapsed, 3),
            "writes_per_s": round(len(latencies) / elapsed, 1), "conflicts": conflicts,
            "latency_ms_p50": round(1000 * statistics.median(latencies), 1),
            "latency_ms_p99": round(1000 * percentile(latencies, 0.99), 1)}


async def measure(kubeconfig: Path, writers: tuple[int, ...] = (16, 32, 64), objects: int = 64,
                  warmup: int = 300, count: int = 3000) -> dict:
    """The best accepted-write rate over the writer counts; the objects are deleted afterwards."""
    if objects < max(writers):
        raise ValueError("every writer needs an object of its own: objects >= max(writers)")
    async with await _api(kubeconfig, max(writers) + 8) as api:
        custom = client.CustomObjectsApi(api)
        await _ensure_namespace(api, NAMESPACE)
        names = [f"limit-{i:03d}" for i in range(objects)]
        template = status_template("write-limit-nobody")
        gate = asyncio.Semaphore(16)

        async def create(name: str) -> dict:
            async with gate:
                return await custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, {
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance", "metadata": {"name": name},
                    # pinned to a node no agent serves: nobody else writes these objects
                    "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}, "image": "",
                             "nodeName": "write-limit-nobody"}})

        bodies = list(await asyncio.gather(*(create(n) for n in names)))
        serial = [0]
        levels = []
        try:
            for w in writers:
                await _run_phase(custom, bodies, w, warmup, template, serial)
                levels.append(await _run_phase(custom, bodies, w, count, template, serial))
        finally:
            await asyncio.gather(*(custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, n)
                                   for n in names), return_exceptions=True)
    best = max(levels, key=lambda r: r["writes_per_s"])
    return {"writes_per_s": best["writes_per_s"], "latency_ms_p50": best["latency_ms_p50"],
            "latency_ms_p99": best["latency_ms_p99"], "writers": best["writers"], "objects": objects,
            "warmup_writes": warmup, "timed_writes": count, "levels": levels,
            "write": "JSON merge patch of /status with metadata.resourceVersion and the whole status "
                     "(as InstanceStore.write_status), kubernetes_asyncio, one process"}


def print_limit(result: dict) -> None:
    for level in result["levels"]:
        print(f"  {level['writers']:3d} writers: {level['writes_per_s']:7.1f} writes/s  "
              f"p50 {level['latency_ms_p50']:6.1f} ms  p99 {level['latency_ms_p99']:6.1f} ms  "
              f"({level['writes']} writes in {level['seconds']} s, {level['conflicts']} conflicts)")
    print(f"limit: {result['writes_per_s']} conditional status writes/s ({result['writers']} writers, "
          f"{result['objects']} objects)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--count", type=int, default=3000)
    args = parser.parse_args()
    details = host_details()
    with local_stack() as stack:
        result = asyncio.run(measure(stack.control_plane.kubeconfig, tuple(args.writers), args.objects,
                                     args.warmup, args.count))
    print_limit(result)
    print(f"written to {write_result('write_limit', {'host': details, **result})}")


if __name__ == "__main__":
    main()
