"""Migration between two real hosts (core/migration.py): two private libvirtds, each with its own
agent, image pool and state directory (no shared file system is used: the disk moves over
libvirt's migration stream), the controller's scheduler picking or checking the target.

A live migration moves the running guest without a restart: its uptime, read inside the guest
by its agent, keeps growing across the move. A cold one stops it, moves the disk and boots it on
the target. Either way the guest ends on the target only, status and both Hypervisor resources
agree with libvirt on both hosts, and nothing of it is left on the source."""
import asyncio
import base64
import json
import time
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from novalet_dev.guest import build_tiny_image, wait_for_marker

from . import libvirt_checks as lv
from .conftest import TINY, domain_uuids, remove_domains
from .harness import status_of, unique_node
from .test_plugin import novalet, ok

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def guest_uptime(uri: str, uid: str, timeout: float = 60.0) -> float:
    """/proc/uptime inside the guest, read through its qemu-ga (guest-file-open/read)."""
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(uid)
        deadline = time.monotonic() + timeout
        while True:
            try:
                handle = json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(
                    {"execute": "guest-file-open", "arguments": {"path": "/proc/uptime"}}), 10, 0))["return"]
                read = json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(
                    {"execute": "guest-file-read", "arguments": {"handle": handle, "count": 64}}), 10, 0))["return"]
                libvirt_qemu.qemuAgentCommand(dom, json.dumps(
                    {"execute": "guest-file-close", "arguments": {"handle": handle}}), 10, 0)
                return float(base64.b64decode(read["buf-b64"]).split()[0])
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        conn.close()


class Side:
    """One host of the test: its libvirtd, its agent's node name, pool and state directory."""

    def __init__(self, host, node: str, pool: Path, state: Path):
        self.host, self.node, self.pool, self.state = host, node, pool, state

    def conn(self) -> libvirt.virConnect:
        return libvirt.open(self.host.uri)

    def power(self, uid: str) -> str | None:
        conn = self.conn()
        try:
            return lv.power(conn, uid)
        finally:
            conn.close()

    def domain_node(self, uid: str) -> str | None:
        """The node the domain's novalet metadata names (what the reaper and the agent read)."""
        from novalet.virt.domain_xml import read_metadata
        conn = self.conn()
        try:
            dom = lv.domain(conn, uid)
            return None if dom is None else read_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).node
        finally:
            conn.close()

    def files(self, uid: str) -> bool:
        return (self.state / "instances" / uid).exists()

    def serial_log(self, uid: str) -> Path:
        return self.state / "instances" / uid / "serial.log"


@pytest.fixture
def two_hosts(libvirt_hosts, agents, image_pool, tmp_path):
    """Two hosts with an agent each (their own pools: `tiny` preloaded in both) and the controller."""
    a, b = libvirt_hosts(2)
    pool_b = tmp_path / "pool-b"
    build_tiny_image(pool_b, TINY)
    before_b = domain_uuids(b.uri)
    sides = []
    for host, pool in ((a, image_pool), (b, pool_b)):
        node = unique_node()
        agents.start(node, extra_args=["--libvirt-uri", host.uri, "--image-pool", str(pool),
                                       "--migration-socket-dir", f"/run/novalet/{node}"])
        sides.append(Side(host, node, pool, agents.workdir / f"state-{node}"))
    agents.start_controller()
    yield sides
    remove_domains(b.uri, domain_uuids(b.uri) - before_b)  # host-1's go with the agents fixture


async def wait_hypervisors(kube_api, *nodes: str, timeout: float = 30.0) -> None:
    """Until each node's agent has published its Hypervisor (the scheduler places only there)."""
    from kubernetes_asyncio import client
    custom = client.CustomObjectsApi(kube_api)
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            try:
                body = await custom.get_cluster_custom_object("novalet.io", "v1alpha1", "hypervisors", node)
                if (body.get("status") or {}).get("allocatable"):
                    break
            except client.exceptions.ApiException as error:
                if error.status != 404:
                    raise
            assert time.monotonic() < deadline, f"no Hypervisor {node} published"
            await asyncio.sleep(0.5)


async def hypervisor_allocated(kube_api, node: str) -> int:
    from kubernetes_asyncio import client
    body = await client.CustomObjectsApi(kube_api).get_cluster_custom_object("novalet.io", "v1alpha1",
                                                                            "hypervisors", node)
    return (body.get("status") or {}).get("allocated", {}).get("memoryMiB", 0)


async def wait_allocated(kube_api, node: str, mib: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await hypervisor_allocated(kube_api, node)) != mib:
        assert time.monotonic() < deadline, f"Hypervisor {node}: allocated {got} MiB, want {mib}"
        await asyncio.sleep(0.5)


def ends_on(target: Side, source: Side, uid: str, power: str) -> None:
    """The guest is on the target only, as libvirt sees it; nothing of it is left on the source."""
    assert target.power(uid) == power
    assert target.domain_node(uid) == target.node
    assert source.power(uid) is None, "a domain is left on the source"
    assert not source.files(uid), "the source's instance files are left"
    assert not list(Path("/run/novalet", target.node).glob(f"{uid}*")), "a migration socket is left"


async def test_live_then_cold_migration_of_a_running_guest(two_hosts, instances, agents, kube_api, control_plane):
    first, second = two_hosts
    await wait_hypervisors(kube_api, first.node, second.node)
    await instances.create("vm", {"flavor": FLAVOR, "image": TINY})
    body = await instances.wait_idle("vm", "active", agents=agents, timeout=120)
    uid = body["metadata"]["uid"]
    source, target = (first, second) if status_of(body)["node"] == first.node else (second, first)
    wait_for_marker(source.serial_log(uid), timeout=120)
    before = guest_uptime(source.host.uri, uid)

    await instances.request("vm", {"name": "Migrate", "id": "live-1", "live": True})
    record = await instances.wait_done("vm", "live-1", agents=agents, timeout=120)
    assert record["result"] == "Succeeded", record
    body = await instances.get("vm")
    status = status_of(body)
    assert (status["node"], status["vmState"], status.get("taskState")) == (target.node, "active", None)
    await instances.wait("vm", lambda b: b["metadata"]["labels"]["novalet.io/node"] == target.node, 10,
                         "the node label", agents)
    ends_on(target, source, uid, "running")
    after = guest_uptime(target.host.uri, uid)
    assert after > before, f"the guest restarted: uptime {before:.1f} s before the move, {after:.1f} s after"
    await wait_allocated(kube_api, target.node, FLAVOR["memoryMiB"])
    await wait_allocated(kube_api, source.node, 0)

    # back, cold: stopped there, the disk moved, booted here (a fresh boot: a new uptime)
    # (through the kubectl plugin, which waits for the outcome and records the request's id)
    done = json.loads(ok(await novalet(control_plane, "migrate", "vm", "--to", source.node, "-n",
                                       instances.namespace, "-o", "json", timeout=240)).stdout)
    assert done["result"] == "Succeeded", done
    record = await instances.wait_done("vm", done["actionId"], agents=agents)
    assert record["result"] == "Succeeded" and "moved from node" in record["message"], record
    status = status_of(await instances.get("vm"))
    assert (status["node"], status["vmState"]) == (source.node, "active")
    ends_on(source, target, uid, "running")
    wait_for_marker(source.serial_log(uid), timeout=120)
    assert guest_uptime(source.host.uri, uid) < after + 60  # booted afresh on the source
    await wait_allocated(kube_api, source.node, FLAVOR["memoryMiB"])
    await wait_allocated(kube_api, target.node, 0)


async def test_a_stopped_instance_moves_cold_and_stays_stopped(two_hosts, instances, agents, kube_api):
    first, second = two_hosts
    await wait_hypervisors(kube_api, first.node, second.node)
    await instances.create("vm", {"flavor": FLAVOR, "image": TINY, "powerState": "Stopped"})
    body = await instances.wait_idle("vm", "stopped", agents=agents, timeout=120)
    uid = body["metadata"]["uid"]
    source, target = (first, second) if status_of(body)["node"] == first.node else (second, first)

    await instances.request("vm", {"name": "Migrate", "id": "live-1", "live": True})
    record = await instances.wait_done("vm", "live-1", agents=agents)
    assert record["result"] == "Rejected" and "cannot migrate live while vm_state is stopped" in record["message"]

    await instances.request("vm", {"name": "Migrate", "id": "cold-1"})
    record = await instances.wait_done("vm", "cold-1", agents=agents, timeout=120)
    assert record["result"] == "Succeeded", record
    status = status_of(await instances.get("vm"))
    assert (status["node"], status["vmState"], status["powerState"]) == (target.node, "stopped", "shutoff")
    ends_on(target, source, uid, "shutoff")


async def test_no_target_that_fits_leaves_the_guest_where_it_is(two_hosts, instances, agents):
    first, second = two_hosts
    await instances.create("vm", {"flavor": FLAVOR, "image": TINY})
    body = await instances.wait_idle("vm", "active", agents=agents, timeout=120)
    uid = body["metadata"]["uid"]
    source = first if status_of(body)["node"] == first.node else second
    await instances.request("vm", {"name": "Migrate", "id": "m-1", "live": True, "targetNode": "node-nowhere"})
    record = await instances.wait_done("vm", "m-1", agents=agents)
    assert record["result"] == "Failed" and "no target" in record["message"] and "node-nowhere" in record["message"]
    status = status_of(await instances.get("vm"))
    assert (status["node"], status["vmState"]) == (source.node, "active")
    assert source.power(uid) == "running"
