"""Placement is immutable: once an agent has placed an instance on its node, the apiserver
itself (a CEL transition rule in the CRD, no webhook) refuses a spec.nodeName naming another
node, so no second copy of the guest can start elsewhere. Moving is a migration."""
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
