"""One object this agent cannot read (written under a newer CRD: a spec field it does not know,
a status value it has no word for) never stops the node's recovery sweep: it is reported on
the object with a Warning Event and left alone; every other instance is still recovered."""
import asyncio
import time

import pytest
from kubernetes_asyncio import client

from novalet import GROUP, PLURAL, VERSION

from . import libvirt_checks as lv
from .crd_changes import newer_crd, until_kept
from .harness import status_of, unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
MERGE = "application/merge-patch+json"
VM_STATES = ["building", "active", "paused", "suspended", "stopped", "rescued", "resized", "error", "deleted"]


async def events_about(kube_api, namespace: str, name: str, reason: str) -> list:
    listed = await client.EventsV1Api(kube_api).list_namespaced_event(namespace)
    return [e for e in listed.items if e.regarding.name == name and e.reason == reason]


async def test_an_unreadable_object_does_not_stop_the_sweep(instances, agents, control_plane, kube_api,
                                                            libvirt_view):
    node = unique_node()
    agent = agents.start(node, crash_at="after_claim@RebootHard")
    for name in ("ok", "shelved"):
        await instances.create(name, {"flavor": FLAVOR, "image": "", "nodeName": node})
    uids = {}
    for name in ("ok", "shelved"):
        uids[name] = (await instances.wait_idle(name, "active", agents=agents))["metadata"]["uid"]
    counter = lv.BootCounter(libvirt_view, uids["ok"])
    await instances.request("ok", {"name": "Reboot", "type": "Hard", "id": "r1"})
    deadline = time.monotonic() + 60
    while agent.process.poll() is None:  # died with the reboot acknowledged, not issued
        assert time.monotonic() < deadline, agent.tail()
        await asyncio.sleep(0.1)
    assert status_of(await instances.get("ok"))["currentTask"]["id"] == "r1"

    newer = [{"op": "add", "path": "/properties/spec/properties/newerField", "value": {"type": "string"}},
             {"op": "replace", "path": "/properties/status/properties/vmState/enum",
              "value": [*VM_STATES, "shelved"]}]
    try:
        with newer_crd(control_plane, newer):
            async def shelve():  # as a newer agent would: a vmState this version has no word for
                await instances.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, instances.namespace, PLURAL, "shelved", {"status": {"vmState": "shelved"}},
                    _content_type=MERGE)

            async def shelved():
                body = await instances.get("shelved")
                return body if status_of(body).get("vmState") == "shelved" else None

            await until_kept(shelve, shelved)

            async def create_newer():
                if await instances.get("newer-spec") is None:
                    await instances.create("newer-spec", {"flavor": FLAVOR, "image": "", "nodeName": node,
                                                          "newerField": "from a newer CRD"})

            async def kept_newer():
                body = await instances.get("newer-spec")
                if body is not None and "newerField" not in body["spec"]:
                    await instances.delete("newer-spec")  # pruned by the old schema: again
                    await instances.wait_gone("newer-spec")
                    return None
                return body

            await until_kept(create_newer, kept_newer)
            versions = {n: (await instances.get(n))["metadata"]["resourceVersion"] for n in ("shelved", "newer-spec")}

            restarted = agents.start(node)
            record = await instances.wait_done("ok", "r1", agents=agents)  # recovered despite the others
            assert record["result"] == "Succeeded"
            assert counter.starts == 1  # the hard reboot ran once, at libvirt
            for name, field in (("shelved", "status.vmState"), ("newer-spec", "spec.newerField")):
                deadline = time.monotonic() + 30
                while not (found := await events_about(kube_api, instances.namespace, name, "Unreadable")):
                    assert time.monotonic() < deadline, restarted.tail()
                    await asyncio.sleep(0.25)
                assert found[0].type == "Warning" and field in found[0].note, found[0].note
            assert "shelved" in (await events_about(kube_api, instances.namespace, "shelved", "Unreadable"))[0].note
            await asyncio.sleep(3)  # left alone: no write, one Event each, not one per look
            for name, version in versions.items():
                assert (await instances.get(name))["metadata"]["resourceVersion"] == version
                assert len(await events_about(kube_api, instances.namespace, name, "Unreadable")) == 1
            assert lv.power(libvirt_view, uids["shelved"]) == "running"  # never reaped: it exists
            log = restarted.log.read_text()
            assert "recovery sweep failed" not in log and "Traceback" not in log
            assert "recovery sweep done" in log
    finally:
        counter.close()
        agents.stop_all()
        for name in ("ok", "shelved", "newer-spec"):
            try:
                await instances.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, instances.namespace, PLURAL, name, {"metadata": {"finalizers": None}},
                    _content_type=MERGE)
                await instances.delete(name)
            except client.exceptions.ApiException:
                pass
        for uid in uids.values():
            dom = lv.domain(libvirt_view, uid)
            if dom is not None:
                dom.destroy() if dom.isActive() else None
                dom.undefine()
