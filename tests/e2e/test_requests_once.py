"""A request runs once, however long it stays in the spec.

GitOps leaves `spec.action` committed for months while other changes come and go. Each kind
of request is left in the spec of its own instance while 30 other actions run on it and the
agent resyncs twice; nothing replays. Counted at libvirt (domain id, the disk file's identity)
and in the apiserver's Events, not from novalet's own status.
"""
import asyncio
import base64
import json
import os

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import libvirt_checks as lv
from .conftest import TINY
from .harness import status_of, unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
RESYNC_S = 3.0


def disk_identity(agents, node: str, uid: str) -> tuple[int, int, int]:
    stat = os.stat(agents.workdir / f"state-{node}" / "instances" / uid / "disk.qcow2")
    return stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns


# Each time a request is handled, exactly one of these Events opens the story (a run starts, a
# refusal, a reset); a replay would post another.
FIRST_EVENTS = ("Started", "Rejected", "StateReset")


async def events_about(kube_api, namespace: str, request_id: str) -> list[str]:
    """The notes of every Event that names a request (the agent posts one per step)."""
    events = await client.EventsV1Api(kube_api).list_namespaced_event(namespace)
    return [f"{e.reason}: {e.note}" for e in events.items if request_id in (e.note or "")]


async def times_handled(kube_api, namespace: str, request_id: str) -> int:
    return sum(1 for note in await events_about(kube_api, namespace, request_id) if note.startswith(FIRST_EVENTS))


async def thirty_unrelated_actions(instances, agents, name: str) -> None:
    for i in range(15):  # pause + unpause: 30 declarative actions, each recorded
        for desired, vm in (("Paused", "paused"), ("Running", "active")):
            await instances.patch_spec(name, {"powerState": desired})
            await instances.wait_idle(name, vm, agents=agents, timeout=60)
    body = await instances.get(name)
    assert len(status_of(body)["history"]) == 20  # the first request left the bounded history long ago


async def test_requests_left_in_the_spec_never_run_again(instances, agents, libvirt_view, kube_api, namespace):
    node = unique_node()
    agents.start(node, extra_args=["--resync-seconds", str(RESYNC_S)])
    secret = client.V1Secret(metadata=client.V1ObjectMeta(name="pw"),
                             data={"password": base64.b64encode(b"not-logged").decode()})
    await client.CoreV1Api(kube_api).create_namespaced_secret(namespace, secret)
    requests = {
        "rebuilt": {"name": "Rebuild", "id": "rebuild-1"},
        "rebooted": {"name": "Reboot", "type": "Hard", "id": "reboot-1"},
        "password": {"name": "SetPassword", "id": "password-1", "secretRef": {"name": "pw"}},
        "reset": {"name": "ResetState", "id": "reset-1", "state": "active"},
    }
    for name in requests:
        await instances.create(name, {"flavor": FLAVOR, "image": TINY if name == "rebuilt" else "",
                                      "nodeName": node})
    uids = {}
    for name, action in requests.items():
        body = await instances.wait_idle(name, "active", agents=agents)
        uids[name] = body["metadata"]["uid"]
        await instances.request(name, action)
        record = await instances.wait_done(name, action["id"], agents=agents)
        # SetPassword ends Failed here (the guest has no qemu-guest-agent); without the admission
        # policies installed, the identity-dependent ones are Rejected: either way, handled
        assert record["result"] in ("Succeeded", "Failed", "Rejected"), record
        await instances.wait_idle(name, "active", agents=agents)
        assert await times_handled(kube_api, namespace, action["id"]) == 1
    disk = disk_identity(agents, node, uids["rebuilt"])
    domain_ids = {name: lv.domain(libvirt_view, uid).ID() for name, uid in uids.items()}
    counters = {name: lv.DomainEvents(libvirt_view, uid) for name, uid in uids.items()}
    try:
        await asyncio.gather(*(thirty_unrelated_actions(instances, agents, name) for name in requests))
        await asyncio.sleep(2 * RESYNC_S + 1)  # two resyncs of the whole node
        for name, action in requests.items():
            body = await instances.get(name)
            assert body["spec"]["action"]["id"] == action["id"]  # still in the spec, as GitOps leaves it
            assert status_of(body)["handledAction"]["id"] == action["id"]
            assert lv.domain(libvirt_view, uids[name]).ID() == domain_ids[name], f"{name}: domain restarted"
            assert counters[name].starts == 0, f"{name}: libvirt started the domain again"
            assert await times_handled(kube_api, namespace, action["id"]) == 1, (
                f"{name} ran again: {await events_about(kube_api, namespace, action['id'])}")
        assert disk_identity(agents, node, uids["rebuilt"]) == disk, "the disk was re-imaged"
    finally:
        for counter in counters.values():
            counter.close()


async def test_a_failing_declarative_step_does_not_replay_the_request(instances, agents, libvirt_view, kube_api,
                                                                       namespace):
    """The review's case: a resize that fails (a flavor the host cannot start) wrote its
    Failed record over the rebuild's; the unchanged Rebuild then ran again."""
    node = unique_node()
    agents.start(node, extra_args=["--resync-seconds", str(RESYNC_S), "--backoff-base", "1"])
    await instances.create("vm", {"flavor": FLAVOR, "image": TINY, "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    uid = body["metadata"]["uid"]
    await instances.request("vm", {"name": "Rebuild", "id": "rebuild-1"})
    await instances.wait_idle("vm", "active", agents=agents, last_id="rebuild-1")
    disk = disk_identity(agents, node, uid)
    await instances.patch_spec("vm", {"flavor": {"vcpus": 64, "memoryMiB": 1048576}})  # cannot start
    await instances.wait("vm", lambda b: (status_of(b).get("lastAction") or {}).get("result") == "Failed",
                         what="the resize to fail", agents=agents)
    await asyncio.sleep(2 * RESYNC_S + 1)
    assert disk_identity(agents, node, uid) == disk, "the rebuild ran again"
    assert [n for n in await events_about(kube_api, namespace, "rebuild-1") if n.startswith("Started")] == [
        "Started: Rebuild rebuild-1: rebuilding"]


async def test_the_apiserver_refuses_a_handled_id_without_any_webhook(instances, agents):
    node = unique_node()
    agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    await instances.wait_idle("vm", "active", agents=agents)
    await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "once"})
    await instances.wait_idle("vm", "active", agents=agents, last_id="once")
    await instances.patch_spec("vm", {"action": None})
    with pytest.raises(ApiException) as refused:
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "once"})
    assert refused.value.status == 422
    assert "action id once was already handled; commit a new id" in json.loads(refused.value.body)["message"]
    await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "twice"})  # a new id is fine
    await instances.wait_idle("vm", "active", agents=agents, last_id="twice")
