"""Serialization: two agents for one node never execute one request twice; a conflicting
write between an agent's read and its write is retried, not lost."""
import asyncio
import os
import re
import signal

import pytest
from kubernetes_asyncio import client

from . import libvirt_checks as lv
from .harness import status_of, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def conflicts_seen(control_plane) -> int:
    """409 answers the apiserver gave for VirtualInstance writes (its own request metrics)."""
    metrics = control_plane.kubectl("get", "--raw", "/metrics").stdout
    total = 0
    for line in metrics.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="virtualinstances"' in line \
                and 'code="409"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def lease_holder_pid(kube_api, node: str) -> int:
    lease = await client.CoordinationV1Api(kube_api).read_namespaced_lease(
        f"novalet-agent-{node}", "kube-node-lease")
    return int(lease.spec.holder_identity.split("/")[2])


async def test_two_agents_fifty_hard_reboots_each_exactly_once(instances, agents, libvirt_view, kube_api):
    node = unique_node()
    first, second = agents.start(node), agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    counter = lv.BootCounter(libvirt_view, body["metadata"]["uid"])
    killed = None
    try:
        for i in range(50):
            await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": f"r{i}"})
            if i == 25:  # the agent holding the node dies mid-request: the other one takes over
                killed = await lease_holder_pid(kube_api, node)
                os.kill(killed, signal.SIGKILL)
            body = await instances.wait_idle("vm", "active", agents=agents, last_id=f"r{i}", timeout=60)
            assert status_of(body)["lastAction"]["result"] == "Succeeded", status_of(body)["lastAction"]
        await asyncio.sleep(2)  # room for a duplicate to show up
        assert counter.starts == 50, f"libvirt saw {counter.starts} starts for 50 hard reboots"
        assert {first.process.pid, second.process.pid} - {killed}, "one agent must have survived"
    finally:
        counter.close()


async def test_a_conflicting_write_between_read_and_write_is_retried_not_lost(
        instances, agents, libvirt_view, control_plane):
    node = unique_node()
    agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    counter = lv.BootCounter(libvirt_view, body["metadata"]["uid"])
    before = conflicts_seen(control_plane)
    stop = asyncio.Event()
    writes = 0

    async def other_writer() -> None:  # someone else keeps changing the object
        nonlocal writes
        while not stop.is_set():
            writes += 1
            await instances.custom.patch_namespaced_custom_object(
                "novalet.io", "v1alpha1", instances.namespace, "virtualinstances", "vm",
                {"metadata": {"annotations": {"example.com/touched": str(writes)}}},
                _content_type="application/merge-patch+json")
            await asyncio.sleep(0.01)

    writer = asyncio.create_task(other_writer())
    try:
        for i in range(10):
            await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": f"c{i}"})
            await instances.wait_idle("vm", "active", agents=agents, last_id=f"c{i}", timeout=60)
    finally:
        stop.set()
        await writer
        counter.close()
    body = await instances.get("vm")
    assert body["metadata"]["annotations"]["example.com/touched"] == str(writes)  # theirs kept
    assert counter.starts == 10  # ours done, each once
    assert conflicts_seen(control_plane) > before, "the test never made the agent's write conflict"
    assert not re.search(r"Traceback", "".join(a.tail(400) for a in agents.started))
