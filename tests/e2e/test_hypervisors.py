"""The node's Hypervisor resource (issue 11's first brick): the agent reports its capacity (as
declared, or the host's), allocation ratios, what the instances placed there hold, what is free,
its images and networks; `kubectl get hypervisors` reads like `openstack hypervisor list`.
Real apiserver, libvirtd and agent."""
import asyncio

import pytest
from kubernetes_asyncio import client

from .conftest import TINY
from .harness import unique_node

pytestmark = pytest.mark.stack


async def hypervisor_when(kube_api, node: str, predicate, timeout: float = 30.0) -> dict:
    custom = client.CustomObjectsApi(kube_api)
    loop = asyncio.get_running_loop()
    deadline, body = loop.time() + timeout, None
    while loop.time() < deadline:
        try:
            body = await custom.get_cluster_custom_object("novalet.io", "v1alpha1", "hypervisors", node)
        except client.exceptions.ApiException as error:
            if error.status != 404:
                raise
        if body is not None and predicate(body.get("status") or {}):
            return body
        await asyncio.sleep(0.25)
    raise AssertionError(f"Hypervisor {node}: not as expected within {timeout}s: {body and body.get('status')}")


def figures(status: dict, key: str) -> tuple[int, int]:
    return status[key]["vcpus"], status[key]["memoryMiB"]


async def test_the_agent_reports_capacity_allocation_and_images(instances, agents, kube_api, control_plane):
    node = unique_node()
    agents.start(node, extra_args=["--vcpus", "4", "--memory-mib", "1024", "--cpu-allocation-ratio", "2"])
    try:
        body = await hypervisor_when(kube_api, node, lambda s: s.get("instances") == 0)
        status = body["status"]
        assert figures(status, "capacity") == (4, 1024) and figures(status, "allocatable") == (8, 1024)
        assert status["allocationRatios"] == {"cpu": 2.0, "memory": 1.0}
        assert (status["domainType"], status["networks"]) == ("qemu", ["default"])
        assert TINY in status["imagesCached"] and status["agentIdentity"].startswith(f"{node}/")

        await instances.create("small", {"flavor": {"vcpus": 1, "memoryMiB": 128}, "image": "", "nodeName": node})
        await instances.create("large", {"flavor": {"vcpus": 2, "memoryMiB": 256}, "image": "", "nodeName": node})
        await instances.wait_idle("large", "active", agents=agents)
        body = await hypervisor_when(kube_api, node, lambda s: s.get("instances") == 2)
        assert figures(body["status"], "allocated") == (3, 384) and figures(body["status"], "free") == (5, 640)

        # a stopped instance keeps its place; a deleted one frees it
        await instances.patch_spec("small", {"powerState": "Stopped"})
        await instances.wait_idle("small", "stopped", agents=agents)
        await instances.delete("large")
        await instances.wait_gone("large", agents=agents)
        body = await hypervisor_when(kube_api, node, lambda s: s.get("instances") == 1)
        assert figures(body["status"], "allocated") == (1, 128) and figures(body["status"], "free") == (7, 896)

        out = control_plane.kubectl("get", "hypervisors", node).stdout
        header, row = out.splitlines()
        assert header.split()[:6] == ["NAME", "TYPE", "VCPUS", "VCPUS", "USED", "MEMORY"], header
        assert row.split()[:7] == [node, "qemu", "8", "1", "1024", "128", "1"], row
    finally:
        agents.stop_all()  # first: a running agent would write its Hypervisor again
        await client.CustomObjectsApi(kube_api).delete_cluster_custom_object(
            "novalet.io", "v1alpha1", "hypervisors", node)
