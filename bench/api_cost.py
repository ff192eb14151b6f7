"""Apiserver requests per action, counted by the apiserver itself.

One agent, one instance, one action at a time. Before and after each action the benchmark
reads `apiserver_request_total` from /metrics and subtracts its own requests (one spec patch
per action and one watch to wait on), so what remains is what the agent (kopf included) asked
for. The metrics do not say who asked, so the summary counts only what the agent touches per
action (VirtualInstances, Events). Lease renewals run on a timer (a GET and a PUT every 5 s);
the raw per-verb counts in the JSON also show the control plane's own background requests
(service accounts, discovery), which are not the agent's.
"""
import asyncio
import re
import time
from collections import Counter

from common import local_stack, write_result
from kubernetes_asyncio import client, config, watch

from novalet_dev.guest import MARKER, build_tiny_image, wait_for_marker

NS = "default"
WRITES = {"CREATE", "UPDATE", "PATCH", "DELETE", "APPLY"}
LINE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def request_counts(control_plane) -> Counter:
    counts: Counter = Counter()
    for line in control_plane.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        counts[(labels.get("verb", ""), resource)] += int(float(match["value"]))
    return counts


# (label, spec patch, vmState to wait for); ACPI presses before a boot's ready marker are lost,
# so each ACPI action waits for the boot before it (create, hard reboot, soft reboot).
NEEDS_BOOTS = {"Reboot (hard)": 1, "Reboot (soft)": 2, "Stop": 3}
ACTIONS = [
    ("Reboot (hard)", {"action": {"name": "Reboot", "type": "Hard", "id": "hard-1"}}, "active"),
    ("Reboot (soft)", {"action": {"name": "Reboot", "type": "Soft", "id": "soft-1"}}, "active"),
    ("Stop", {"powerState": "Stopped"}, "stopped"),
    ("Start", {"powerState": "Running"}, "active"),
    ("Pause", {"powerState": "Paused"}, "paused"),
    ("Unpause", {"powerState": "Running"}, "active"),
    ("Suspend", {"powerState": "Suspended"}, "suspended"),
    ("Resume", {"powerState": "Running"}, "active"),
    ("Rescue", {"rescue": True}, "rescued"),
    ("Unrescue", {"rescue": False}, "active"),
    ("Resize", {"flavor": {"vcpus": 2, "memoryMiB": 192}}, "resized"),
    ("ConfirmResize", {"action": {"name": "ConfirmResize", "id": "confirm-1"}}, "active"),
    ("Snapshot", {"action": {"name": "Snapshot", "id": "snap-1", "snapshotName": "bench-snap"}}, "active"),
    ("Rebuild", {"image": ""}, "active"),
]


async def wait_for(custom, name: str, predicate, timeout: float = 120) -> dict:
    """One watch request per wait (the benchmark's own reads stay countable)."""
    stream = watch.Watch()
    async with stream.stream(custom.list_namespaced_custom_object, "novalet.io", "v1alpha1", NS,
                             "virtualinstances", field_selector=f"metadata.name={name}",
                             timeout_seconds=int(timeout)) as events:
        async for event in events:
            if predicate(event["object"]):
                return event["object"]
    raise TimeoutError(name)


def idle(vm_state: str, done_id: str | None = None):
    def check(body: dict) -> bool:
        status = body.get("status") or {}
        return (status.get("vmState") == vm_state and status.get("taskState") is None
                and (done_id is None or (status.get("lastAction") or {}).get("id") == done_id))
    return check


def agent_requests(before: Counter, after: Counter, own: Counter) -> dict[str, int]:
    diff = {k: after[k] - before[k] - own[k] for k in after if after[k] - before[k] - own[k] > 0}
    return {f"{verb} {resource}": n for (verb, resource), n in sorted(diff.items())}


def summarize(requests: dict[str, int]) -> dict[str, int]:
    instance = {k: v for k, v in requests.items() if "virtualinstances" in k}
    return {
        "instance_writes": sum(v for k, v in instance.items() if k.split()[0] in WRITES),
        "instance_reads": sum(v for k, v in instance.items() if k.split()[0] not in WRITES),
        "events": sum(v for k, v in requests.items() if k.endswith(" events")),
    }


async def measure(stack, pool) -> list[dict]:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(stack.control_plane.kubeconfig), client_configuration=cfg)
    agent = stack.agent("bench", pool)
    rows = []
    try:
        async with client.ApiClient(cfg) as api:
            custom = client.CustomObjectsApi(api)
            await asyncio.sleep(3)  # agent up, lease held
            before = request_counts(stack.control_plane)
            await custom.create_namespaced_custom_object("novalet.io", "v1alpha1", NS, "virtualinstances", {
                "apiVersion": "novalet.io/v1alpha1", "kind": "VirtualInstance", "metadata": {"name": "vm"},
                "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}, "image": "tiny", "nodeName": "bench"}})
            started = time.monotonic()
            body = await wait_for(custom, "vm", idle("active"))
            rows.append(row("Create", before, stack, Counter({("CREATE", "virtualinstances"): 1,
                                                               ("WATCH", "virtualinstances"): 1}),
                            time.monotonic() - started))
            serial = stack.workdir / "bench" / "instances" / body["metadata"]["uid"] / "serial.log"
            for label, patch, vm_state in ACTIONS:
                if label in NEEDS_BOOTS:
                    wait_for_marker(serial, MARKER, timeout=60, occurrence=NEEDS_BOOTS[label])
                done_id = patch.get("action", {}).get("id")
                before = request_counts(stack.control_plane)
                started = time.monotonic()
                body, kind = (([{"op": "add", "path": "/spec/action", "value": patch["action"]}],
                               "application/json-patch+json") if "action" in patch
                              else ({"spec": patch}, "application/merge-patch+json"))
                await custom.patch_namespaced_custom_object("novalet.io", "v1alpha1", NS, "virtualinstances", "vm",
                                                            body, _content_type=kind)
                await wait_for(custom, "vm", idle(vm_state, done_id))
                elapsed = time.monotonic() - started
                await asyncio.sleep(0.5)  # let trailing event posts land in the counters
                rows.append(row(label, before, stack, Counter({("PATCH", "virtualinstances"): 1,
                                                               ("WATCH", "virtualinstances"): 1}), elapsed))
            before = request_counts(stack.control_plane)
            started = time.monotonic()
            await custom.delete_namespaced_custom_object("novalet.io", "v1alpha1", NS, "virtualinstances", "vm")
            while True:
                try:
                    await custom.get_namespaced_custom_object("novalet.io", "v1alpha1", NS, "virtualinstances", "vm")
                    await asyncio.sleep(0.2)
                except client.exceptions.ApiException:
                    break
            own = Counter({("DELETE", "virtualinstances"): 1})
            rows.append(row("Delete", before, stack, own, time.monotonic() - started, polled_gets=True))
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    return rows


def row(label: str, before: Counter, stack, own: Counter, seconds: float, polled_gets: bool = False) -> dict:
    requests = agent_requests(before, request_counts(stack.control_plane), own)
    if polled_gets:  # the delete wait polls with GET: count none of those as the agent's
        requests.pop("GET virtualinstances", None)
    return {"action": label, "seconds": round(seconds, 2), **summarize(requests), "requests": requests}


def main() -> None:
    with local_stack() as stack:
        pool = stack.workdir / "pool"
        pool.mkdir()
        build_tiny_image(pool, "tiny")
        rows = asyncio.run(measure(stack, pool))
    print(f"{'action':<16}{'VI writes':>10}{'VI reads':>10}{'events':>8}{'seconds':>9}")
    for r in rows:
        print(f"{r['action']:<16}{r['instance_writes']:>10}{r['instance_reads']:>10}{r['events']:>8}"
              f"{r['seconds']:>9}")
    print(f"written to {write_result('api_cost', {'rows': rows})}")


if __name__ == "__main__":
    main()
