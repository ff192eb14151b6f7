"""The orphan reaper cannot destroy a node by mistake: an agent that sees none of its node's
instances (pointed at the wrong cluster, or an empty view) refuses the mass reap and says so
loudly; `--reap-orphans=false` keeps an orphan. Counted at libvirt and on disk."""
import asyncio
import signal
import time

import libvirt
import pytest
from kubernetes_asyncio import client

from novalet import GROUP, PLURAL, VERSION

from . import libvirt_checks as lv
from .harness import unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
MERGE = "application/merge-patch+json"


async def build(instances, agents, node: str, names: list[str], images: dict[str, str] | None = None) -> dict:
    """Instances on `node`, built and active; their uids by name."""
    for name in names:
        await instances.create(name, {"flavor": FLAVOR, "image": (images or {}).get(name, ""), "nodeName": node})
    uids = {}
    for name in names:
        body = await instances.wait_idle(name, "active", agents=agents, timeout=120)
        uids[name] = body["metadata"]["uid"]
    return uids


async def vanish(instances, names: list[str]) -> None:
    """The objects disappear without the agent (finalizers removed by hand, then deleted): from
    the agent's side exactly what a cluster that never had them looks like."""
    for name in names:
        await instances.custom.patch_namespaced_custom_object(
            GROUP, VERSION, instances.namespace, PLURAL, name, {"metadata": {"finalizers": None}},
            _content_type=MERGE)
        await instances.delete(name)
    for name in names:
        await instances.wait_gone(name)


def destroy(conn: libvirt.virConnect, uids) -> None:
    for uid in uids:
        dom = lv.domain(conn, uid)
        if dom is None:
            continue
        if dom.isActive():
            dom.destroy()
        dom.undefine()


async def lease_events(kube_api, node: str, reason: str) -> list:
    events = client.EventsV1Api(kube_api)
    listed = await events.list_namespaced_event("kube-node-lease")
    return [e for e in listed.items if e.reason == reason and e.regarding.kind == "Lease"
            and e.regarding.name == f"novalet-agent-{node}"]


async def test_a_mass_reap_is_refused(instances, agents, libvirt_view, kube_api):
    node = unique_node()
    names = ["a", "b", "c", "d"]
    agent = agents.start(node)
    uids = await build(instances, agents, node, names, images={"a": "tiny"})
    disk_dir = agents.workdir / f"state-{node}" / "instances"
    disk = disk_dir / uids["a"]
    assert disk.is_dir() and any(disk.iterdir())
    try:
        agent.kill(signal.SIGKILL)
        await vanish(instances, names)
        grace = 1.0
        restarted = agents.start(node, extra_args=["--orphan-grace-seconds", str(grace)])
        deadline = time.monotonic() + 60
        while not (found := await lease_events(kube_api, node, "OrphanReapRefused")):
            assert time.monotonic() < deadline, restarted.tail()
            await asyncio.sleep(0.5)
        event = found[0]
        assert event.type == "Warning"
        assert "refusing to reap 4 domains at once" in event.note
        assert "all of the node's 4 domains" in event.note and "Nothing was destroyed" in event.note
        assert "right cluster" in event.note
        await asyncio.sleep(grace + 4)  # past the grace: still nothing reaped
        for name, uid in uids.items():
            assert lv.domain(libvirt_view, uid) is not None, f"domain of {name} was reaped"
            assert (disk_dir / uid).is_dir(), f"disks of {name} were removed"
        assert any(file.suffix == ".qcow2" for file in disk.iterdir())
        log = restarted.log.read_text()
        assert "ERROR" in log and "refusing to reap 4 domains at once" in log
        assert "reaping orphan domain" not in log
        assert len(await lease_events(kube_api, node, "OrphanReapRefused")) == 1  # once, not every look
    finally:
        agents.stop_all()
        destroy(libvirt_view, uids.values())


async def test_reap_orphans_false_keeps_an_orphan(instances, agents, libvirt_view):
    node = unique_node()
    agent = agents.start(node)
    uids = await build(instances, agents, node, ["vm"])
    uid = uids["vm"]
    try:
        agent.kill(signal.SIGKILL)
        await vanish(instances, ["vm"])
        restarted = agents.start(node, extra_args=["--reap-orphans=false", "--orphan-grace-seconds", "0"])
        deadline = time.monotonic() + 60
        while "orphan reaping is off" not in restarted.log.read_text():
            assert time.monotonic() < deadline, restarted.tail()
            await asyncio.sleep(0.25)
        await asyncio.sleep(2)
        assert lv.power(libvirt_view, uid) == "running"
        assert (agents.workdir / f"state-{node}" / "instances" / uid).is_dir()
        assert "reaping orphan domain" not in restarted.log.read_text()
    finally:
        agents.stop_all()
        destroy(libvirt_view, uids.values())
