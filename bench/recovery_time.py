"""Agent start to the last recovered instance: instances left in mixed task states (100 by default).

Guests: libvirt's test driver (`test:///<file>`), its domains described in a file written
here with novalet's own domain XML, each in the power state its task state implies. Real QEMU
guests would need about 100 x 200 MB under TCG; the test driver exercises the same agent code
(kopf watch, lease, recovery table, compare-and-swap writes, hypervisor calls) without them.
The Kubernetes side is the real local control plane.

The benchmark follows the namespace with one watch (bench/storms.py Tracker); the figure is the
moment the last task ended, once no instance has had a task for 3 s after it (deleted ones are
gone; a follow-up action the spec asks for, such as Unpause after a recovered `pausing`, counts). `--count` sets the instances (the 100
of the default keep the earlier figures comparable); a count other than 100 writes
`results/recovery_time_<count>.json`. Every run has a timeout (--timeout).
"""
import argparse
import asyncio
import statistics
import time
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import UTC, datetime

from common import host_details, local_stack, stop_process, write_result
from kubernetes_asyncio import client, config

from novalet.virt.domain_xml import (
    Flavor,
    InstanceMetadata,
    build_domain_xml,
    instance_domain_config,
)

COUNT = 100
QUIET_S = 3.0  # no task anywhere for this long: recovered, follow-ups included
RUNS = 3  # each in its own namespace, node and test-driver file; the median is quoted
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
RUNNING, PAUSED, SHUTOFF = 1, 3, 5
# task state -> (origin vmState, libvirt run state of the domain as the crash left it)
MIX = [
    ("spawning", "building", RUNNING), ("scheduling", "building", None),
    ("reboot_pending_hard", "active", RUNNING), ("reboot_started_hard", "active", RUNNING),
    ("powering_off", "active", SHUTOFF), ("powering_on", "stopped", SHUTOFF),
    ("pausing", "active", RUNNING), ("unpausing", "paused", PAUSED),
    ("suspending", "active", RUNNING), ("image_snapshot", "active", RUNNING),
    ("updating_password", "active", RUNNING), ("resize_prep", "active", RUNNING),
    ("deleting", "active", RUNNING),
]
TASK_NAMES = {"spawning": "Create", "scheduling": "Create", "reboot_pending_hard": "RebootHard",
              "reboot_started_hard": "RebootHard", "powering_off": "Stop", "powering_on": "Start",
              "pausing": "Pause", "unpausing": "Unpause", "suspending": "Suspend",
              "image_snapshot": "Snapshot", "updating_password": "SetPassword", "resize_prep": "Resize",
              "deleting": "Delete"}

# An instance without `spec.interfaces` gets one interface on the libvirt network `default`, and
# its create checks that network is active (as a user's does): the node file provides one (the
# test driver keeps it in memory; no bridge is made).
DEFAULT_NETWORK = ("<network><name>default</name><bridge name='virbr0'/><forward/>"
                   "<ip address='192.168.122.1' netmask='255.255.255.0'><dhcp>"
                   "<range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>")


def node_xml(domains: list[str]) -> str:
    ET.register_namespace("test", TEST_NS)
    node = ET.Element("node")
    cpu = ET.SubElement(node, "cpu")
    for tag, value in (("mhz", "3000"), ("model", "bench"), ("active", "2"), ("total", "2"),
                       ("nodes", "1"), ("sockets", "1"), ("cores", "2"), ("threads", "1")):
        ET.SubElement(cpu, tag).text = value
    ET.SubElement(node, "memory").text = str(64 * 1024 * 1024)
    for xml in domains:
        node.append(ET.fromstring(xml))
    node.append(ET.fromstring(DEFAULT_NETWORK))
    return ET.tostring(node, encoding="unicode")


def domain_for(uid: str, name: str, run_state: int, workdir, ns: str, node: str) -> str:
    meta = InstanceMetadata(namespace=ns, name=name, uid=uid, node=node, config="normal", image="",
                            flavor=Flavor(1, 128))
    xml = build_domain_xml(instance_domain_config(meta, domain_type="qemu",
                                                  serial_log=str(workdir / f"{uid}.log"), disk=None, kernel=None))
    root = ET.fromstring(xml)
    ET.SubElement(root, f"{{{TEST_NS}}}runstate").text = str(run_state)
    return ET.tostring(root, encoding="unicode")


async def seed(custom, ns: str, node: str, count: int = COUNT) -> list[tuple[str, str, int | None]]:
    """Create the objects, then give each the status a crashed agent left behind (16 at a time)."""
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    dead_owner = f"{node}/gone-host/1/dead00"
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> tuple[str, str, int | None]:
        async with gate:
            return await seed_one(custom, ns, node, i, now, dead_owner)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def seed_one(custom, ns: str, node: str, i: int, now: str, dead_owner: str) -> tuple[str, str, int | None]:
    task_state, origin, run_state = MIX[i % len(MIX)]
    name = f"vm-{i:03d}"
    body = await custom.create_namespaced_custom_object("novalet.io", "v1alpha1", ns, "virtualinstances", {
        "apiVersion": "novalet.io/v1alpha1", "kind": "VirtualInstance",
        "metadata": {"name": name, "finalizers": ["novalet.io/domain"]},
        "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}, "image": "", "nodeName": node,
                 **({"action": {"name": "Snapshot", "id": f"s{i}", "snapshotName": f"snap-{i}"}}
                    if task_state == "image_snapshot" else {}),
                 **({"action": {"name": "SetPassword", "id": f"p{i}", "secretRef": {"name": "pw"}}}
                    if task_state == "updating_password" else {}),
                 **({"flavor": {"vcpus": 2, "memoryMiB": 128}} if task_state == "resize_prep" else {})}})
    uid = body["metadata"]["uid"]
    status = {"vmState": origin, "taskState": task_state, "node": node, "domainUUID": uid,
              "flavor": {"vcpus": 1, "memoryMiB": 128}, "image": "",
              "currentTask": {"name": TASK_NAMES[task_state], "id": f"task-{i}", "taskState": task_state,
                              "originVmState": origin, "owner": dead_owner, "startedAt": now,
                              "targetFlavor": {"vcpus": 1, "memoryMiB": 128}, "targetImage": "",
                              "domainId": 1 if run_state == RUNNING else None}}
    await custom.patch_namespaced_custom_object_status(
        "novalet.io", "v1alpha1", ns, "virtualinstances", name, {"status": status},
        _content_type="application/merge-patch+json")
    if task_state == "deleting":
        await custom.delete_namespaced_custom_object("novalet.io", "v1alpha1", ns, "virtualinstances", name)
    return uid, name, run_state


async def run(stack, index: int, count: int = COUNT, timeout_s: float = 600.0) -> dict:
    from api_cost import request_counts
    from storms import Tracker, agent_writes  # storms imports this module's node_xml

    ns, node = f"bench-{index}", f"bench-{index}"
    stack.control_plane.kubectl("create", "namespace", ns)
    (stack.workdir / "pool").mkdir(exist_ok=True)
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(stack.control_plane.kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    async with client.ApiClient(cfg) as api:
        custom = client.CustomObjectsApi(api)
        made = await seed(custom, ns, node, count)
        domains = [domain_for(uid, name, run_state, stack.workdir, ns, node)
                   for uid, name, run_state in made if run_state is not None]
        driver_file = stack.workdir / f"test-driver-{index}.xml"
        driver_file.write_text(node_xml(domains))
        tracker = Tracker(custom, ns)
        await tracker.relist()
        started = 0.0
        seen_done: dict[str, float] = {}
        idle_since: list[float | None] = [None]  # when the last task ended, while none is in a task

        def check(_typ: str, name: str, obj: dict) -> None:
            if (obj.get("status") or {}).get("taskState") is None:
                seen_done.setdefault(name, time.monotonic() - started)
            busy = any((o.get("status") or {}).get("taskState") for o in tracker.objects.values())
            if busy:
                idle_since[0] = None
            elif idle_since[0] is None:
                idle_since[0] = time.monotonic()

        watching = asyncio.create_task(tracker.run())
        before = await asyncio.to_thread(request_counts, stack.control_plane)
        started = time.monotonic()
        agent = stack.agent(node, stack.workdir / "pool", "--libvirt-uri", f"test://{driver_file}")
        tracker.check = check
        try:
            # done: no instance in a task for QUIET_S in a row (a recovered instance whose spec asks
            # for more, e.g. Running after `pausing`, starts its follow-up action meanwhile)
            while idle_since[0] is None or time.monotonic() - idle_since[0] < QUIET_S:
                if time.monotonic() - started > timeout_s:
                    left = sum(1 for o in tracker.objects.values() if (o.get("status") or {}).get("taskState"))
                    raise TimeoutError(f"{left} still in a task after {timeout_s:g} s")
                await asyncio.sleep(0.1)
            elapsed = idle_since[0] - started
            writes = agent_writes(before, await asyncio.to_thread(request_counts, stack.control_plane), Counter())
            items = list(tracker.objects.values())
            outcomes = Counter(f"{(i['status'].get('lastAction') or {}).get('name')} "
                               f"{(i['status'].get('lastAction') or {}).get('result')} -> {i['status']['vmState']}"
                               for i in items)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            stop_process(agent)
    times = sorted(seen_done.values())
    return {"instances": count, "guests": "libvirt test driver", "seconds_to_last": round(elapsed, 2),
            "median_seconds_per_instance_done": round(statistics.median(times), 2) if times else None,
            "deleted": count - len(items), "outcomes": dict(outcomes),
            "agent_writes": {k: v for k, v in writes.items() if k != "requests"},
            "agent_writes_per_s": round(sum(writes[k] for k in ("status_writes", "object_writes", "event_writes"))
                                        / elapsed, 1)}


async def measure(stack, count: int = COUNT, runs: int = RUNS, timeout_s: float = 600.0, first_index: int = 0) -> dict:
    """`runs` recoveries of `count` instances, each in its own namespace (bench/run_all.py calls this)."""
    results = [await run(stack, first_index + i, count, timeout_s) for i in range(runs)]
    seconds = [r["seconds_to_last"] for r in results]
    return {"instances": count, "guests": "libvirt test driver", "task_states": [m[0] for m in MIX],
            "measured_with": "one watch on the namespace", "runs_seconds_to_last": seconds,
            "median_seconds_to_last": statistics.median(seconds),
            "median_seconds_per_instance_done_first_run": results[0]["median_seconds_per_instance_done"],
            "outcomes_first_run": results[0]["outcomes"], "deleted_first_run": results[0]["deleted"],
            "agent_writes_first_run": results[0]["agent_writes"],
            "agent_writes_per_s_first_run": results[0]["agent_writes_per_s"]}


def report(result: dict) -> None:
    print(f"{result['instances']} instances in {len(MIX)} task states ({result['guests']}), "
          f"{len(result['runs_seconds_to_last'])} runs: agent start -> last instance without a task: "
          f"{result['runs_seconds_to_last']} s, median {result['median_seconds_to_last']} s")
    for outcome, n in sorted(result["outcomes_first_run"].items()):
        print(f"  {n:4d}  {outcome}")
    print(f"  {result['deleted_first_run']:4d}  deleted")
    writes = result["agent_writes_first_run"]
    print(f"  the agent's writes (apiserver_request_total): {writes['status_writes']} status, "
          f"{writes['object_writes']} object, {writes['event_writes']} Events; "
          f"{result['agent_writes_per_s_first_run']} writes/s")


def result_name(count: int) -> str:
    return "recovery_time" if count == COUNT else f"recovery_time_{count}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=COUNT, help="instances left in a task")
    parser.add_argument("--runs", type=int, default=RUNS, help="runs, each in its own namespace")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = parser.parse_args()
    details = host_details()
    with local_stack() as stack:
        result = asyncio.run(measure(stack, args.count, args.runs, args.timeout))
    report(result)
    print(f"written to {write_result(result_name(args.count), {'host': details, **result})}")


if __name__ == "__main__":
    main()
