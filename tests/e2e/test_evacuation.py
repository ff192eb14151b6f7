"""Evacuation of a dead host (core/migration.py): a host's agent and libvirtd stop (its guests with
them, as in a power cut); once its agent's Lease has been expired for longer than the
controller's --evacuate-after, an administrator's Evacuate rebuilds the instance on another host
from its image. When the dead host comes back, its agent destroys the stale domain and disks,
and never starts them. Three real libvirtds (host-3 dies, so the session's host-1 never stops)."""
import asyncio
import os
import signal
import time

import libvirt
import pytest

from novalet.virt.hypervisor import ensure_event_loop
from novalet_dev.guest import build_tiny_image, wait_for_marker

from . import libvirt_checks as lv
from .conftest import TINY
from .harness import status_of, unique_node
from .test_migration import Side, wait_hypervisors

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
LEASE = ["--lease-duration", "4", "--renew-deadline", "2", "--lease-retry-period", "1"]
EVACUATE_AFTER_S = 3


async def test_evacuate_a_dead_host_and_destroy_its_stale_guest_when_it_returns(
        libvirt_hosts, agents, image_pool, instances, kube_api, tmp_path):
    hosts = libvirt_hosts(3)
    alive_host, dying_host = hosts[0], hosts[2]
    pool = tmp_path / "pool-3"
    build_tiny_image(pool, TINY)
    alive = Side(alive_host, unique_node(), image_pool, None)
    dying = Side(dying_host, unique_node(), pool, None)
    for side in (alive, dying):
        side.state = agents.workdir / f"state-{side.node}"

    def start_dying():
        return agents.start(dying.node, extra_args=["--libvirt-uri", dying_host.uri, "--image-pool", str(pool),
                                                    *LEASE])

    agents.start(alive.node, extra_args=LEASE)
    doomed = start_dying()
    agents.start_controller(extra_args=["--evacuate-after", str(EVACUATE_AFTER_S)])
    await wait_hypervisors(kube_api, alive.node, dying.node)
    await instances.create("vm", {"flavor": FLAVOR, "image": TINY, "nodeName": dying.node})
    body = await instances.wait_idle("vm", "active", agents=agents, timeout=120)
    uid = body["metadata"]["uid"]
    await instances.patch_spec("vm", {"nodeName": None})  # a pinned instance stays where it is pinned
    wait_for_marker(dying.serial_log(uid), timeout=120)

    # its node is alive: refused, by that node's own agent
    await instances.request("vm", {"name": "Evacuate", "id": "evac-0"})
    record = await instances.wait_done("vm", "evac-0", agents=agents)
    assert record["result"] == "Rejected" and f"node {dying.node} is alive" in record["message"], record

    # the host dies: its agent, its guests (their QEMU killed, as in a power cut), its libvirtd
    doomed.kill()
    os.kill(dying_host.libvirtd.qemu_pid(f"novalet-{uid}"), signal.SIGKILL)
    conn = libvirt.open(dying_host.uri)
    try:
        for _ in range(40):
            if lv.power(conn, uid) == "shutoff":
                break
            await asyncio.sleep(0.25)
        assert lv.power(conn, uid) == "shutoff"
    finally:
        conn.close()
    dying_host.libvirtd.stop()
    deadline = time.monotonic() + 4 + EVACUATE_AFTER_S + 2  # the Lease runs out, then the threshold
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)

    await instances.request("vm", {"name": "Evacuate", "id": "evac-1"})
    record = await instances.wait_done("vm", "evac-1", agents=agents, timeout=120)
    assert record["result"] == "Succeeded", record
    assert "rebuilt on node" in record["message"] and "is lost" in record["message"]
    body = await instances.wait_idle("vm", "active", agents=agents)
    status = status_of(body)
    assert (status["node"], status["evacuatedFrom"], status["powerState"]) == (alive.node, dying.node, "running")
    assert alive.power(uid) == "running"
    wait_for_marker(alive.serial_log(uid), timeout=120)  # booted afresh from the image
    await instances.wait("vm", lambda b: b["metadata"]["labels"]["novalet.io/node"] == alive.node, 10,
                         "the node label", agents)

    # the dead host returns: the stale domain is there, defined; its agent destroys it unstarted
    dying_host.libvirtd.start()
    ensure_event_loop()  # the boot counter's libvirt events
    conn = libvirt.open(dying_host.uri)
    try:
        assert lv.power(conn, uid) == "shutoff"
        boots = lv.BootCounter(conn, uid)
        start_dying()
        deadline = time.monotonic() + 60
        while lv.domain(conn, uid) is not None or dying.files(uid):
            assert time.monotonic() < deadline, "the stale domain (or its files) is still on the returned host"
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)
        assert boots.starts == 0, "the returned host started the evacuated guest"
        boots.close()
    finally:
        conn.close()
    assert alive.power(uid) == "running"  # the evacuated guest is untouched
    assert status_of(await instances.get("vm"))["node"] == alive.node
