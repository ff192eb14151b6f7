"""The other parts restart while actions run: libvirtd, then the whole control plane (etcd and
kube-apiserver). The agent reconnects and leaves nothing stuck."""
import asyncio

import pytest

from . import libvirt_checks as lv
from .harness import status_of, unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


async def _fleet(instances, agents, count: int) -> tuple[str, list[str]]:
    node = unique_node()
    agents.start(node)
    names = [f"vm{i}" for i in range(count)]
    for name in names:
        await instances.create(name, {"flavor": FLAVOR, "image": "", "nodeName": node})
    for name in names:
        await instances.wait_idle(name, "active", agents=agents)
    return node, names


async def _settled(instances, agents, names: list[str], vm_state: str, last_id: str) -> None:
    for name in names:
        body = await instances.wait_idle(name, vm_state, timeout=120, agents=agents, last_id=last_id)
        assert status_of(body)["lastAction"]["result"] == "Succeeded", status_of(body)["lastAction"]


async def test_libvirtd_restart_while_actions_run(instances, agents, libvirtd, libvirt_uri):
    _node, names = await _fleet(instances, agents, 4)
    for name in names:
        await instances.request(name, {"name": "Reboot", "type": "Hard", "id": "during-libvirtd-restart"})
    libvirtd.restart()
    await _settled(instances, agents, names, "active", "during-libvirtd-restart")
    import libvirt
    conn = libvirt.open(libvirt_uri)  # libvirt's view after the restart agrees with status
    try:
        for name in names:
            assert lv.power(conn, (await instances.get(name))["metadata"]["uid"]) == "running"
    finally:
        conn.close()
    # and the agent still acts afterwards (its connection was reopened)
    await instances.patch_spec(names[0], {"powerState": "Stopped"})
    await instances.wait_idle(names[0], "stopped", agents=agents)


async def test_control_plane_restart_while_actions_run(instances, agents, control_plane, kube_api):
    _node, names = await _fleet(instances, agents, 4)
    for name in names:
        await instances.request(name, {"name": "Reboot", "type": "Hard", "id": "during-apiserver-restart"})
    control_plane.stop()
    await asyncio.sleep(3)  # actions in flight fail their writes; the agent keeps retrying
    control_plane.start()
    await _settled(instances, agents, names, "active", "during-apiserver-restart")
    await instances.patch_spec(names[0], {"powerState": "Paused"})  # the watch came back too
    await instances.wait_idle(names[0], "paused", agents=agents)
