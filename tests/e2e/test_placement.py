"""Placement. The scheduler (in the controller, core/placement.py) places unpinned instances
within each node's capacity: twelve at once on two nodes that hold five each, exactly ten
placed, two Unschedulable saying why, and one placed as soon as another is deleted. Placement is
immutable: once an instance is placed, the apiserver itself (a CEL transition rule in the CRD,
no webhook) refuses a spec.nodeName naming another node, so no second copy of the guest can
start elsewhere. Moving is a migration. Real apiserver, controller, agents, libvirtd, QEMU."""
import asyncio
import json

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from . import libvirt_checks as lv
from .harness import status_of, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


async def refused(coro) -> str:
    with pytest.raises(ApiException) as error:
        await coro
    assert error.value.status == 422
    return json.loads(error.value.body)["message"]


async def test_a_placed_instance_cannot_be_moved_by_editing_node_name(instances, agents, libvirt_view):
    node, other = unique_node(), unique_node()
    agents.start(node)
    agents.start(other)
    agents.start_controller()  # the scheduler places the unpinned one
    await instances.create("pinned", {"flavor": FLAVOR, "image": "", "nodeName": node})
    await instances.create("unpinned", {"flavor": FLAVOR, "image": ""})
    pinned = await instances.wait_idle("pinned", "active", agents=agents)
    unpinned = await instances.wait_idle("unpinned", "active", agents=agents)
    placed_on = status_of(unpinned)["node"]
    elsewhere = other if placed_on == node else node

    message = await refused(instances.patch_spec("pinned", {"nodeName": other}))
    assert f"spec.nodeName cannot move an instance placed on node {node}" in message
    assert "migration" in message
    message = await refused(instances.patch_spec("unpinned", {"nodeName": elsewhere}))
    assert f"placed on node {placed_on}" in message
    await instances.patch_spec("unpinned", {"nodeName": placed_on})  # pinning where it runs is fine

    for name, body in (("pinned", pinned), ("unpinned", unpinned)):
        assert lv.domains_for(libvirt_view, body["metadata"]["uid"]) == 1
        assert status_of(await instances.get(name))["node"] == status_of(body)["node"]


def scheduled(body: dict) -> dict:
    return next((c for c in status_of(body).get("conditions", []) if c["type"] == "Scheduled"), {})


async def test_twelve_at_once_on_two_nodes_of_five(instances, agents):
    nodes = sorted([unique_node(), unique_node()])
    for node in nodes:  # five tiny instances each, by vCPUs
        agents.start(node, extra_args=["--vcpus", "5", "--memory-mib", "4096"])
    agents.start_controller()
    names = [f"vm-{i:02d}" for i in range(12)]
    await asyncio.gather(*(instances.create(n, {"flavor": FLAVOR, "image": ""}) for n in names))

    async def settled() -> dict[str, dict]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while True:
            bodies = {n: await instances.get(n) for n in names}
            placed = [b for b in bodies.values() if status_of(b).get("node")]
            waiting = [b for b in bodies.values() if scheduled(b).get("reason") == "Unschedulable"]
            # (Unschedulable at first too: the scheduler may run before the agents report capacity)
            if (len(placed) >= 10 and len(placed) + len(waiting) == len(names)) or loop.time() > deadline:
                return bodies
            await asyncio.sleep(0.5)

    bodies = await settled()
    per_node = {n: sorted(name for name, b in bodies.items() if status_of(b).get("node") == n) for n in nodes}
    assert [len(per_node[n]) for n in nodes] == [5, 5], per_node
    waiting = sorted(name for name, b in bodies.items() if not status_of(b).get("node"))
    assert len(waiting) == 2, waiting
    for name in waiting:
        body = bodies[name]
        condition = scheduled(body)
        # (the session's earlier tests left their nodes' Hypervisors: they are counted, not named)
        assert condition["status"] == "False" and " nodes can take it: " in condition["message"], condition
        assert f"{nodes[0]}, {nodes[1]}: not enough vCPUs (needs 1, 0 free)" in condition["message"], condition
        ready = next(c for c in status_of(body)["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "Unschedulable"), ready
    for name, body in bodies.items():
        if status_of(body).get("node"):
            assert scheduled(body)["status"] == "True", body
    for name in (n for node in nodes for n in per_node[node]):
        await instances.wait_idle(name, "active", agents=agents)

    # capacity frees up: one waiting instance is placed where it freed, and only one
    gone = per_node[nodes[0]][0]
    await instances.delete(gone)
    await instances.wait_gone(gone, agents=agents)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    now_placed: list[str] = []
    while not now_placed and loop.time() < deadline:
        await asyncio.sleep(0.5)
        now_placed = [n for n in waiting if status_of(await instances.get(n)).get("node")]
    assert len(now_placed) == 1, now_placed
    assert status_of(await instances.get(now_placed[0]))["node"] == nodes[0]
    await instances.wait_idle(now_placed[0], "active", agents=agents)
    still = [n for n in waiting if n not in now_placed]
    assert not status_of(await instances.get(still[0])).get("node")
