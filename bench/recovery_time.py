"""Agent start to the last recovered instance: 100 instances left in mixed task states.

Guests: libvirt's test driver (`test:///<file>`), its domains described in a file written
here with novalet's own domain XML, each in the power state its task state implies. Real QEMU
guests would need about 100 x 200 MB under TCG; the test driver exercises the same agent code
(kopf watch, lease, recovery table, compare-and-swap writes, hypervisor calls) without them.
The Kubernetes side is the real local control plane.
"""
import asyncio
import statistics
import time
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import UTC, datetime

from common import local_stack, write_result
from kubernetes_asyncio import client, config

from novalet.virt.domain_xml import (
    Flavor,
    InstanceMetadata,
    build_domain_xml,
    instance_domain_config,
)

COUNT = 100
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
    return ET.tostring(node, encoding="unicode")


def domain_for(uid: str, name: str, run_state: int, workdir, ns: str, node: str) -> str:
    meta = InstanceMetadata(namespace=ns, name=name, uid=uid, node=node, config="normal", image="",
                            flavor=Flavor(1, 128))
    xml = build_domain_xml(instance_domain_config(meta, domain_type="qemu",
                                                  serial_log=str(workdir / f"{uid}.log"), disk=None, kernel=None))
    root = ET.fromstring(xml)
    ET.SubElement(root, f"{{{TEST_NS}}}runstate").text = str(run_state)
    return ET.tostring(root, encoding="unicode")


async def seed(custom, ns: str, node: str) -> list[tuple[str, str, int | None]]:
    """Create the objects, then give each the status a crashed agent left behind."""
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    dead_owner = f"{node}/gone-host/1/dead00"
    made = []
    for i in range(COUNT):
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
        made.append((uid, name, run_state))
    return made


async def run(stack, index: int) -> dict:
    ns, node = f"bench-{index}", f"bench-{index}"
    stack.control_plane.kubectl("create", "namespace", ns)
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(stack.control_plane.kubeconfig), client_configuration=cfg)
    async with client.ApiClient(cfg) as api:
        custom = client.CustomObjectsApi(api)
        made = await seed(custom, ns, node)
        domains = [domain_for(uid, name, run_state, stack.workdir, ns, node)
                   for uid, name, run_state in made if run_state is not None]
        driver_file = stack.workdir / f"test-driver-{index}.xml"
        driver_file.write_text(node_xml(domains))
        started = time.monotonic()
        agent = stack.agent(node, stack.workdir / "pool", "--libvirt-uri", f"test://{driver_file}")
        try:
            seen_done: dict[str, float] = {}
            while True:
                items = (await custom.list_namespaced_custom_object(
                    "novalet.io", "v1alpha1", ns, "virtualinstances"))["items"]
                now = time.monotonic() - started
                for item in items:
                    if (item.get("status") or {}).get("taskState") is None:
                        seen_done.setdefault(item["metadata"]["name"], now)
                remaining = [i for i in items if (i.get("status") or {}).get("taskState")]
                gone = COUNT - len(items)
                if not remaining:
                    break
                if now > 600:
                    raise TimeoutError(f"{len(remaining)} still in a task after 600 s")
                await asyncio.sleep(0.1)
            elapsed = time.monotonic() - started
            outcomes = Counter(f"{(i['status'].get('lastAction') or {}).get('name')} "
                               f"{(i['status'].get('lastAction') or {}).get('result')} -> {i['status']['vmState']}"
                               for i in items)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
    times = sorted(seen_done.values())
    return {"instances": COUNT, "guests": "libvirt test driver", "seconds_to_last": round(elapsed, 2),
            "median_seconds_per_instance_done": round(statistics.median(times), 2) if times else None,
            "deleted": gone, "outcomes": dict(outcomes)}


def main() -> None:
    with local_stack() as stack:
        (stack.workdir / "pool").mkdir()
        runs = [asyncio.run(run(stack, i)) for i in range(RUNS)]
    seconds = [r["seconds_to_last"] for r in runs]
    result = {"instances": COUNT, "guests": "libvirt test driver", "task_states": [m[0] for m in MIX],
              "runs_seconds_to_last": seconds, "median_seconds_to_last": statistics.median(seconds),
              "outcomes_first_run": runs[0]["outcomes"], "deleted_first_run": runs[0]["deleted"]}
    print(f"{COUNT} instances in {len(MIX)} task states ({result['guests']}), {RUNS} runs: agent start -> "
          f"last instance without a task: {seconds} s, median {result['median_seconds_to_last']} s")
    for outcome, n in sorted(runs[0]["outcomes"].items()):
        print(f"  {n:3d}  {outcome}")
    print(f"  {runs[0]['deleted']:3d}  deleted")
    print(f"written to {write_result('recovery_time', result)}")


if __name__ == "__main__":
    main()
