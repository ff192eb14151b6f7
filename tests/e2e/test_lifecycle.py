"""Every action end to end, driven like a user (patch spec, read status) and checked against
libvirt's own view of the domain. Real apiserver, real libvirtd, real QEMU guests."""
import asyncio
import base64

import pytest
from kubernetes_asyncio import client

from novalet.core.catalog import snapshot_pool_name
from novalet.virt.images import ImagePool
from novalet_dev.guest import count_markers, wait_for_marker

from . import libvirt_checks as lv
from .conftest import TINY
from .harness import status_of, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def serial(agents, node: str, uid: str):
    return ImagePool(agents.image_pool, agents.workdir / f"state-{node}").serial_log_path(uid)


async def build(instances, agents, name: str, image: str = TINY, expect: str = "active",
                **spec) -> tuple[str, dict]:
    node = unique_node()
    agents.start(node)
    await instances.create(name, {"flavor": FLAVOR, "image": image, "nodeName": node, **spec})
    body = await instances.wait_idle(name, expect, agents=agents)
    return node, body


async def test_create_then_every_power_action(instances, agents, libvirt_view):
    node, body = await build(instances, agents, "vm")
    uid = body["metadata"]["uid"]
    status = status_of(body)
    assert (status["powerState"], status["phase"], status["node"]) == ("running", "Running", node)
    assert status["domainUUID"] == uid and status["flavor"] == FLAVOR and status["image"] == TINY
    assert lv.power(libvirt_view, uid) == "running"
    assert body["metadata"]["finalizers"] == ["novalet.io/domain"]
    wait_for_marker(serial(agents, node, uid), timeout=60)  # ACPI presses before this are lost

    steps = [("Stopped", "stopped", "shutoff"), ("Running", "active", "running"),
             ("Paused", "paused", "paused"), ("Running", "active", "running"),
             ("Suspended", "suspended", "shutoff"), ("Running", "active", "running")]
    for desired, vm_state, libvirt_power in steps:
        await instances.patch_spec("vm", {"powerState": desired})
        body = await instances.wait_idle("vm", vm_state, agents=agents)
        assert lv.power(libvirt_view, uid) == libvirt_power, desired
        assert status_of(body)["powerState"] == libvirt_power
        if vm_state == "suspended":
            assert lv.domain(libvirt_view, uid).hasManagedSaveImage(0) == 1
        if desired == "Running":
            wait_for_marker(serial(agents, node, uid), occurrence=count_markers(serial(agents, node, uid)),
                            timeout=60)
    names = [r["name"] for r in status_of(body)["history"]]
    assert names == ["Create", "Stop", "Start", "Pause", "Unpause", "Suspend", "Resume"]
    assert all(r["result"] == "Succeeded" for r in status_of(body)["history"])


async def test_soft_reboot_of_a_guest_that_answers_acpi_stays_soft(instances, agents, libvirt_view):
    node, body = await build(instances, agents, "vm")
    uid = body["metadata"]["uid"]
    log = serial(agents, node, uid)
    wait_for_marker(log, timeout=60)
    counter = lv.BootCounter(libvirt_view, uid)
    try:
        await instances.request("vm", {"name": "Reboot", "type": "Soft", "id": "soft-1"})
        body = await instances.wait_idle("vm", "active", agents=agents, last_id="soft-1")
        last = status_of(body)["lastAction"]
        assert (last["name"], last["result"]) == ("RebootSoft", "Succeeded")
        assert "escalated" not in last["message"]
        wait_for_marker(log, occurrence=2, timeout=60)  # the guest booted again
        assert (counter.resets, counter.starts) == (1, 0)  # in place: no new QEMU process
    finally:
        counter.close()


async def test_soft_reboot_ignored_by_the_guest_escalates_to_hard(instances, agents, libvirt_view):
    _node, body = await build(instances, agents, "vm", image="")  # diskless: never answers ACPI
    uid = body["metadata"]["uid"]
    counter = lv.BootCounter(libvirt_view, uid)
    try:
        await instances.request("vm", {"name": "Reboot", "type": "Soft", "id": "soft-1"})
        body = await instances.wait_idle("vm", "active", agents=agents, last_id="soft-1", timeout=60)
        last = status_of(body)["lastAction"]
        assert last["result"] == "Succeeded" and "escalated to hard" in last["message"]
        assert counter.starts == 1  # the hard reboot: one new QEMU process
        assert lv.power(libvirt_view, uid) == "running"
    finally:
        counter.close()


async def test_hard_reboot_same_id_twice_runs_once(instances, agents, libvirt_view):
    _node, body = await build(instances, agents, "vm", image="")
    uid = body["metadata"]["uid"]
    counter = lv.BootCounter(libvirt_view, uid)
    try:
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "hard-1"})
        await instances.wait_idle("vm", "active", agents=agents, last_id="hard-1")
        # GitOps re-applies the same manifest: same id, nothing new happens
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "hard-1"})
        await instances.patch_spec("vm", {"powerState": "Running"})  # a spec change to wake the agent
        # taking it out and putting it back is refused by the apiserver (the id was handled)
        await instances.patch_spec("vm", {"action": None})
        with pytest.raises(client.exceptions.ApiException) as refused:
            await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "hard-1"})
        assert refused.value.status == 422 and "already handled" in refused.value.body
        body = await instances.wait_idle("vm", "active", agents=agents, last_id="hard-1")
        await asyncio.sleep(3)  # room for a wrong second reboot to show up
        assert counter.starts == 1
        ids = [r["id"] for r in status_of(await instances.get("vm"))["history"]]
        assert ids.count("hard-1") == 1
    finally:
        counter.close()


async def test_refused_request_is_recorded_and_blocks_nothing(instances, agents, libvirt_view):
    _node, body = await build(instances, agents, "vm", image="", expect="stopped", powerState="Stopped")
    await instances.request("vm", {"name": "Reboot", "type": "Soft", "id": "soft-while-stopped"})
    body = await instances.wait("vm", lambda b: (status_of(b).get("lastAction") or {}).get("id")
                                == "soft-while-stopped", agents=agents, what="the refusal")
    last = status_of(body)["lastAction"]
    assert last["result"] == "Rejected"
    assert "cannot reboot (soft) while vm_state is stopped" in last["message"]
    assert status_of(body)["vmState"] == "stopped" and status_of(body).get("taskState") is None
    await instances.patch_spec("vm", {"powerState": "Running"})
    await instances.wait_idle("vm", "active", agents=agents)
    assert lv.power(libvirt_view, body["metadata"]["uid"]) == "running"


async def test_rescue_and_unrescue(instances, agents, libvirt_view):
    node, body = await build(instances, agents, "vm")
    uid = body["metadata"]["uid"]
    log = serial(agents, node, uid)
    assert "rescue=0" in wait_for_marker(log, timeout=60)
    await instances.patch_spec("vm", {"rescue": True})
    await instances.wait_idle("vm", "rescued", agents=agents)
    line = wait_for_marker(log, occurrence=2, timeout=60)  # the console log is appended to
    assert "rescue=1" in line and "vdb" in line  # rescue boot with the instance disk attached second
    assert lv.power(libvirt_view, uid) == "running"
    await instances.patch_spec("vm", {"rescue": False})
    await instances.wait_idle("vm", "active", agents=agents)
    assert "rescue=0" in wait_for_marker(log, occurrence=3, timeout=60)


async def test_resize_confirm_then_resize_revert(instances, agents, libvirt_view):
    _node, body = await build(instances, agents, "vm", image="")
    uid = body["metadata"]["uid"]
    await instances.patch_spec("vm", {"flavor": {"vcpus": 2, "memoryMiB": 192}})
    body = await instances.wait_idle("vm", "resized", agents=agents)
    assert lv.flavor(libvirt_view, uid) == (2, 192) and lv.power(libvirt_view, uid) == "running"
    await instances.request("vm", {"name": "ConfirmResize", "id": "confirm-1"})
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="confirm-1")
    assert status_of(body)["flavor"] == {"vcpus": 2, "memoryMiB": 192}

    await instances.patch_spec("vm", {"flavor": {"vcpus": 1, "memoryMiB": 256}})
    await instances.wait_idle("vm", "resized", agents=agents)
    assert lv.flavor(libvirt_view, uid) == (1, 256)
    await instances.request("vm", {"name": "RevertResize", "id": "revert-1"})
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="revert-1")
    assert lv.flavor(libvirt_view, uid) == (2, 192) and lv.power(libvirt_view, uid) == "running"
    status = status_of(body)
    assert status["flavor"] == {"vcpus": 2, "memoryMiB": 192}
    assert status["revertedFlavor"] == {"vcpus": 1, "memoryMiB": 256}  # not re-applied from spec


async def test_rebuild_to_another_image(instances, agents, libvirt_view):
    node, body = await build(instances, agents, "vm", image="")
    uid = body["metadata"]["uid"]
    await instances.patch_spec("vm", {"image": TINY})
    body = await instances.wait_idle("vm", "active", agents=agents,
                                     last_id="spec-g2-rebuild")
    assert status_of(body)["image"] == TINY
    wait_for_marker(serial(agents, node, uid), timeout=60)  # the tiny guest now boots from the image


async def test_snapshot_lands_as_a_virtual_image_of_the_namespace(instances, agents, libvirt_view, kube_api,
                                                                 namespace):
    node, body = await build(instances, agents, "vm")
    uid = body["metadata"]["uid"]
    await instances.request("vm", {"name": "Snapshot", "id": "snap-1", "snapshotName": "vm-snap"})
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="snap-1")
    assert status_of(body)["lastAction"]["result"] == "Succeeded"
    image = await client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        "novalet.io", "v1alpha1", namespace, "virtualimages", "vm-snap")
    assert image["spec"]["source"]["snapshot"] == {"instanceName": "vm", "instanceUID": uid, "actionId": "snap-1",
                                                   "node": node}
    (copy,) = image["status"]["nodes"]
    assert (copy["node"], copy["phase"], copy["format"]) == (node, "Ready", "qcow2") and copy["sizeBytes"] > 0
    pool_file = agents.image_pool / f"{snapshot_pool_name(namespace, uid, 'snap-1')}.qcow2"
    assert pool_file.stat().st_size == copy["sizeBytes"]
    assert not (agents.image_pool / "vm-snap.qcow2").exists()  # never under the user's name
    assert lv.power(libvirt_view, uid) == "running"
    pool_file.unlink()


async def test_set_password_without_guest_agent_fails_clearly(instances, agents, kube_api, namespace):
    # diskless: no guest, so no guest agent ever answers (the tiny guest runs qemu-ga once booted)
    _node, body = await build(instances, agents, "vm", image="")
    secret = client.V1Secret(metadata=client.V1ObjectMeta(name="pw"),
                             data={"password": base64.b64encode(b"s3cret").decode()})
    await client.CoreV1Api(kube_api).create_namespaced_secret(namespace, secret)
    await instances.request("vm", {"name": "SetPassword", "id": "pw-1", "secretRef": {"name": "pw"}})
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="pw-1")
    last = status_of(body)["lastAction"]
    assert last["result"] == "Failed", last
    assert ("the QEMU guest agent is not running in the guest, so the password cannot be set; "
            "install and start qemu-guest-agent in the image") in last["message"], last
    assert "s3cret" not in last["message"]


async def test_delete_removes_domain_and_disks_before_the_object(instances, agents, libvirt_view):
    node, body = await build(instances, agents, "vm")
    uid = body["metadata"]["uid"]
    instance_dir = agents.workdir / f"state-{node}" / "instances" / uid
    assert instance_dir.exists()
    await instances.delete("vm")
    await instances.wait_gone("vm", agents=agents)
    assert lv.domain(libvirt_view, uid) is None
    assert not instance_dir.exists()


async def test_hard_reboot_supersedes_a_running_soft_reboot(instances, agents, libvirt_view):
    node = unique_node()
    agents.start(node, soft_reboot_timeout=45)  # a diskless guest would make the soft one wait 45 s
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    body = await instances.wait_idle("vm", "active", agents=agents)
    counter = lv.BootCounter(libvirt_view, body["metadata"]["uid"])
    try:
        await instances.request("vm", {"name": "Reboot", "type": "Soft", "id": "soft-1"})
        await instances.wait("vm", lambda b: status_of(b).get("taskState") == "reboot_started",
                             what="the soft reboot to start", agents=agents)
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "hard-1"})
        body = await instances.wait_idle("vm", "active", agents=agents, last_id="hard-1", timeout=30)
        soft, hard = status_of(body)["history"][-2:]
        assert (soft["id"], soft["result"], soft["message"]) == ("soft-1", "Failed", "superseded by hard reboot hard-1")
        assert (hard["id"], hard["result"]) == ("hard-1", "Succeeded")
        assert counter.starts == 1
    finally:
        counter.close()
