"""When an agent is down: the seed scenario (a hard reboot asked while the node's agent is
gone), visibility through HostAgentReady, deletes that complete when it returns, orphans."""
import asyncio
import signal
import time

import pytest

from . import libvirt_checks as lv
from .harness import status_of, unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def condition(body: dict, kind: str) -> dict:
    return next((c for c in status_of(body).get("conditions", []) if c["type"] == kind), {})


async def test_seed_scenario_reboot_while_the_agent_is_down(instances, agents, libvirt_view):
    """The thread's scenario: the agent is down, a user asks for a hard reboot, then asks again.
    Nothing refuses the second request, status says why nothing happens, and once the agent is
    back exactly one reboot runs, without re-submitting."""
    agents.start_controller()
    node = unique_node()
    agent = agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    counter = lv.BootCounter(libvirt_view, body["metadata"]["uid"])
    try:
        agent.kill(signal.SIGKILL)
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "first-try"})
        body = await instances.wait("vm", lambda b: condition(b, "HostAgentReady").get("status") == "False",
                                    timeout=60, what="HostAgentReady=False", agents=agents)
        ready = condition(body, "HostAgentReady")
        assert ready["reason"] == "AgentUnavailable"
        assert f"agent of node {node} last renewed its lease at" in ready["message"]
        assert "request first-try waits for it" in ready["message"]
        assert status_of(body).get("taskState") is None  # nobody acknowledged it: not stuck

        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "second-try"})  # not refused
        await asyncio.sleep(2)
        assert counter.starts == 0

        agents.start(node)
        body = await instances.wait_idle("vm", "active", agents=agents, last_id="second-try")
        await asyncio.sleep(2)
        assert counter.starts == 1
        assert condition(body, "HostAgentReady")["status"] == "True"
        assert [r["id"] for r in status_of(body)["history"]] == ["spec-g1-create", "second-try"]
    finally:
        counter.close()


async def test_instance_of_a_node_without_an_agent_says_so(instances, agents):
    agents.start_controller()
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": unique_node()})
    body = await instances.wait("vm", lambda b: condition(b, "HostAgentReady").get("status") == "False",
                                timeout=30, what="HostAgentReady=False", agents=agents)
    assert condition(body, "HostAgentReady")["reason"] == "AgentUnavailable"
    assert "last renewed its lease at never" in condition(body, "HostAgentReady")["message"]


async def test_delete_while_the_agent_is_down_completes_when_it_returns(instances, agents, libvirt_view):
    node = unique_node()
    agent = agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    uid = body["metadata"]["uid"]
    agent.kill(signal.SIGKILL)
    await instances.delete("vm")
    await asyncio.sleep(2)
    assert await instances.get("vm") is not None  # the finalizer holds it: the domain still exists
    assert lv.power(libvirt_view, uid) == "running"
    agents.start(node)
    await instances.wait_gone("vm", agents=agents)
    assert lv.domain(libvirt_view, uid) is None


async def test_orphan_domain_is_reaped_at_start(instances, agents, libvirt_view):
    node = unique_node()
    agent = agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    uid = body["metadata"]["uid"]
    agent.kill(signal.SIGKILL)
    # the object disappears without the agent (finalizer removed by hand, as a careless admin might)
    await instances.custom.patch_namespaced_custom_object(
        "novalet.io", "v1alpha1", instances.namespace, "virtualinstances", "vm",
        {"metadata": {"finalizers": None}}, _content_type="application/merge-patch+json")
    await instances.delete("vm")
    await instances.wait_gone("vm")
    assert lv.power(libvirt_view, uid) == "running"  # an orphan now
    grace = 3.0  # confirmed gone at every look for this long (default 300 s)
    started = time.monotonic()
    agents.start(node, extra_args=["--orphan-grace-seconds", str(grace)])
    for _ in range(120):
        if lv.domain(libvirt_view, uid) is None:
            break
        await asyncio.sleep(0.25)
    assert lv.domain(libvirt_view, uid) is None
    assert time.monotonic() - started >= grace  # not at first sight: the grace period ran first
    assert not (agents.workdir / f"state-{node}" / "instances" / uid).exists()
