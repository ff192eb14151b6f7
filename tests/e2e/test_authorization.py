"""Authorization the apiserver enforces, with no webhook running (issue 8, items 3 and 4).

Every user here is a real identity the apiserver authenticates (a ServiceAccount token), given
rights with real RBAC; the admission policies of crds/novalet.io_admission-policies.yaml are
installed with the CRD (the `crds` fixture), and no `novalet controller` runs, so what is
refused is refused by the apiserver itself. Each test asserts what a user sees: the apiserver's
answer, the instance's status (lastAction, history, lock), Events, and the agent's log.
"""
import asyncio
import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from novalet.controller.main import WEBHOOK_NAME

from .harness import Instances, events_until, status_of, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
POLICIES = Path(__file__).resolve().parents[2] / "crds" / "novalet.io_admission-policies.yaml"


@dataclass
class User:
    name: str  # the username the apiserver authenticates
    api: client.ApiClient
    instances: Instances


@pytest.fixture
async def users(control_plane, namespace, kube_api):
    """users(name, *clusterrole bindings): a ServiceAccount in the test's namespace with a real
    token, allowed to edit VirtualInstances there (get, list, patch, update, delete)."""
    made: list[User] = []
    cluster_objects: list[tuple[str, str]] = []
    editor = f"vinst-editor-{namespace}"
    control_plane.kubectl("create", "clusterrole", editor, "--verb=get,list,watch,patch,update,delete",
                          "--resource=virtualinstances.novalet.io")
    cluster_objects.append(("clusterrole", editor))

    async def make(name: str, cluster_admin: bool = False) -> User:
        username = f"system:serviceaccount:{namespace}:{name}"
        control_plane.kubectl("-n", namespace, "create", "serviceaccount", name)
        control_plane.kubectl("-n", namespace, "create", "rolebinding", f"{name}-edit", f"--clusterrole={editor}",
                              f"--serviceaccount={namespace}:{name}")
        if cluster_admin:  # a ClusterRoleBinding to cluster-admin: not in system:masters
            binding = f"{namespace}-{name}-cluster-admin"
            control_plane.kubectl("create", "clusterrolebinding", binding, "--clusterrole=cluster-admin",
                                  f"--serviceaccount={namespace}:{name}")
            cluster_objects.append(("clusterrolebinding", binding))
        await until_allowed(control_plane, username, "patch", "virtualinstances.novalet.io", namespace)
        if cluster_admin:
            await until_allowed(control_plane, username, "update", "virtualinstances.novalet.io/admin", namespace)
        token = control_plane.kubectl("-n", namespace, "create", "token", name).stdout.strip()
        cfg = client.Configuration(host=control_plane.server, api_key={"BearerToken": token},
                                   api_key_prefix={"BearerToken": "Bearer"})
        cfg.ssl_ca_cert = str(control_plane.ca_file)
        api = client.ApiClient(cfg)
        user = User(username, api, Instances(api, namespace))
        made.append(user)
        return user

    yield make
    for user in made:
        await user.api.close()
    for kind, name in cluster_objects:
        control_plane.kubectl("delete", kind, name, "--ignore-not-found", check=False)


async def until_allowed(control_plane, user: str, verb: str, resource: str, namespace: str,
                        name: str | None = None) -> None:
    """RBAC takes effect once the apiserver's informers see the binding."""
    args = ["auth", "can-i", verb, f"{resource}/{name}" if name else resource, "-n", namespace, f"--as={user}"]
    for _ in range(60):
        if control_plane.kubectl(*args, check=False).stdout.strip() == "yes":
            return
        await asyncio.sleep(0.25)
    pytest.fail(f"{user} never got {verb} {resource} in {namespace}")


async def refused(coro) -> str:
    """The apiserver's refusal: 403 from the admission policy (RBAC itself allowed the request)."""
    with pytest.raises(ApiException) as error:
        await coro
    body = json.loads(error.value.body)
    assert error.value.status == 403, body
    assert "ValidatingAdmissionPolicy 'novalet-requests'" in body["message"], body["message"]
    return body["message"]


async def no_webhook(kube_api) -> None:
    with pytest.raises(ApiException) as error:
        await client.AdmissionregistrationV1Api(kube_api).read_validating_webhook_configuration(WEBHOOK_NAME)
    assert error.value.status == 404, "this test runs with no webhook: nothing of novalet's but the policies"


async def built(instances: Instances, agents, *extra_args: str) -> str:
    node = unique_node()
    agents.start(node, extra_args=list(extra_args))
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    await instances.wait_idle("vm", "active", agents=agents)
    return node


def record(body: dict, request_id: str) -> dict:
    return next(r for r in status_of(body)["history"] if r["id"] == request_id)


async def test_reset_state_needs_rbac_not_a_group_name(instances, agents, users, kube_api):
    """A namespace editor's ResetState is refused by the apiserver itself; a user bound to
    cluster-admin (not in system:masters) may, and is recorded as the requester."""
    await no_webhook(kube_api)
    await built(instances, agents)
    dev, boss = await users("dev"), await users("boss", cluster_admin=True)

    message = await refused(dev.instances.request("vm", {"name": "ResetState", "id": "reset-1", "state": "error"}))
    assert (f"ResetState is for administrators: RBAC does not allow {dev.name} to update "
            f"virtualinstances/admin (novalet.io) in namespace {instances.namespace}") in message
    assert "action" not in (await instances.get("vm"))["spec"]  # nothing was stored
    for name, extra in (("Migrate", {"live": True}), ("Evacuate", {})):  # the other administrators' actions
        message = await refused(dev.instances.request("vm", {"name": name, "id": f"{name.lower()}-1", **extra}))
        assert f"{name} is for administrators: RBAC does not allow {dev.name} to update" in message
    assert "action" not in (await instances.get("vm"))["spec"]

    await dev.instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "dev-reboot"})  # the rest is fine
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="dev-reboot")
    assert record(body, "dev-reboot")["requestedBy"] == dev.name

    await boss.instances.request("vm", {"name": "ResetState", "id": "reset-2", "state": "error"})
    body = await instances.wait_idle("vm", "error", agents=agents, last_id="reset-2")
    last = status_of(body)["lastAction"]
    assert (last["result"], last["requestedBy"]) == ("Succeeded", boss.name)
    assert record(body, "reset-2")["requestedBy"] == boss.name
    assert "reset to error by an administrator" in last["message"]
    assert body["spec"]["action"]["requestedBy"] == boss.name  # stamped by the apiserver


async def test_the_requester_cannot_be_forged(instances, agents, users, kube_api):
    await no_webhook(kube_api)
    await built(instances, agents)
    dev, boss = await users("dev"), await users("boss", cluster_admin=True)

    message = await refused(dev.instances.request(
        "vm", {"name": "ResetState", "id": "forged-1", "state": "active", "requestedBy": boss.name}))
    assert f"spec.action.requestedBy is {boss.name} but you are {dev.name}" in message
    message = await refused(dev.instances.request(
        "vm", {"name": "Reboot", "type": "Hard", "id": "forged-2", "requestedBy": boss.name}))
    assert "leave requestedBy out" in message

    # claimed groups are replaced by the real ones: no way to borrow system:masters
    await dev.instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "own-1",
                                       "requestedBy": dev.name, "requesterGroups": ["system:masters"]})
    action = (await instances.get("vm"))["spec"]["action"]
    assert action["requestedBy"] == dev.name and "system:masters" not in action["requesterGroups"]
    assert f"system:serviceaccounts:{instances.namespace}" in action["requesterGroups"]

    # who changed the spec last is the apiserver's to say, too
    await dev.instances.patch_spec("vm", {"powerState": "Stopped"})
    body = await instances.wait_idle("vm", "stopped", agents=agents)
    assert body["metadata"]["annotations"]["novalet.io/requested-by"] == dev.name
    stop = next(r for r in status_of(body)["history"] if r["name"] == "Stop")
    assert stop["requestedBy"] == dev.name  # a declarative step records who asked for it
    message = await refused(dev.instances.custom.patch_namespaced_custom_object(
        "novalet.io", "v1alpha1", instances.namespace, "virtualinstances", "vm",
        {"metadata": {"annotations": {"novalet.io/requested-by": boss.name}}},
        _content_type="application/merge-patch+json"))
    assert "cannot be set or changed by hand" in message


async def test_a_lock_holds_against_everyone_but_its_locker_and_admins(instances, agents, users, kube_api):
    await no_webhook(kube_api)
    await built(instances, agents)
    alice, bob, boss = await users("alice"), await users("bob"), await users("boss", cluster_admin=True)

    await alice.instances.request("vm", {"name": "Lock", "id": "lock-1", "reason": "kernel upgrade"})
    body = await instances.wait("vm", lambda b: (status_of(b).get("lock") or {}).get("lockedBy") == alice.name,
                                what="the lock", agents=agents)
    assert status_of(body)["lock"]["reason"] == "kernel upgrade"
    assert status_of(body)["lastAction"]["requestedBy"] == alice.name

    lock_text = f"instance {instances.namespace}/vm is locked by {alice.name} (reason: kernel upgrade)"
    for attempt, expected in (
            (bob.instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "bob-1"}), "change its spec"),
            (bob.instances.patch_spec("vm", {"powerState": "Stopped"}), "change its spec"),
            (bob.instances.delete("vm"), "delete it"),
            (bob.instances.request("vm", {"name": "Unlock", "id": "bob-unlock"}), "unlock it")):
        message = await refused(attempt)
        assert lock_text in message and f"only {alice.name} or an administrator may {expected}" in message
    assert (await instances.get("vm"))["metadata"].get("deletionTimestamp") is None

    await alice.instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "alice-1"})
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="alice-1")
    assert (status_of(body)["lastAction"]["result"], status_of(body)["lastAction"]["requestedBy"]) == (
        "Succeeded", alice.name)
    await boss.instances.patch_spec("vm", {"powerState": "Stopped"})  # an administrator may
    body = await instances.wait_idle("vm", "stopped", agents=agents)
    assert body["metadata"]["annotations"]["novalet.io/requested-by"] == boss.name

    await alice.instances.request("vm", {"name": "Unlock", "id": "unlock-1"})
    body = await instances.wait("vm", lambda b: status_of(b).get("lastAction", {}).get("id") == "unlock-1",
                                what="the unlock", agents=agents)
    assert status_of(body).get("lock") is None
    assert f"unlocked (was locked by {alice.name})" in status_of(body)["lastAction"]["message"]
    await bob.instances.patch_spec("vm", {"powerState": "Running"})  # unlocked: anyone who may edit
    await instances.wait_idle("vm", "active", agents=agents)
    events = await events_until(kube_api, instances.namespace,
                                lambda items: {"Locked", "Unlocked"} <= {e.reason for e in items})
    assert {"Locked", "Unlocked"} <= {e.reason for e in events}

    # an administrator may unlock someone else's lock, and delete a locked instance
    await alice.instances.request("vm", {"name": "Lock", "id": "lock-2"})
    await instances.wait("vm", lambda b: status_of(b).get("lock") is not None, what="the lock", agents=agents)
    await boss.instances.delete("vm")
    await instances.wait_gone("vm", agents=agents)


async def test_set_password_uses_only_a_secret_the_requester_may_read(
        instances, agents, users, kube_api, control_plane, namespace):
    await no_webhook(kube_api)
    node = await built(instances, agents, "--verbose")
    alice = await users("alice")
    password = "Zebra-Quartz-4417-pass"
    encoded = base64.b64encode(password.encode()).decode()
    core = client.CoreV1Api(kube_api)
    for name, data in (("pw", password.encode()), ("other", b"not-for-alice"), ("bin", b"\xff\xfe\x00pw")):
        await core.create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name=name), data={"password": base64.b64encode(data).decode()}))
    control_plane.kubectl("-n", namespace, "create", "role", "read-pw", "--verb=get", "--resource=secrets",
                          "--resource-name=pw", "--resource-name=bin")
    control_plane.kubectl("-n", namespace, "create", "rolebinding", "alice-read-pw", "--role=read-pw",
                          f"--serviceaccount={namespace}:alice")
    await until_allowed(control_plane, alice.name, "get", "secret", namespace, "pw")

    message = await refused(alice.instances.request(
        "vm", {"name": "SetPassword", "id": "pw-other", "secretRef": {"name": "other"}}))
    assert (f"{alice.name} may not get Secret other in namespace {namespace}: SetPassword only uses a Secret "
            "its requester may read") in message

    seen_in_ps: list[str] = []
    watcher = asyncio.ensure_future(watch_process_list(password, seen_in_ps))
    try:
        await alice.instances.request("vm", {"name": "SetPassword", "id": "pw-1", "secretRef": {"name": "pw"}})
        body = await instances.wait_idle("vm", "active", agents=agents, last_id="pw-1")
    finally:
        watcher.cancel()
    last = status_of(body)["lastAction"]
    assert (last["result"], last["requestedBy"]) == ("Failed", alice.name)  # it reached libvirt
    assert "guest agent" in last["message"].lower()  # the diskless guest runs no qemu-guest-agent

    await alice.instances.request("vm", {"name": "SetPassword", "id": "pw-bin", "secretRef": {"name": "bin"}})
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="pw-bin")
    last = status_of(body)["lastAction"]
    assert last["result"] == "Failed"
    assert last["message"] == ("Secret bin key password is not UTF-8 text: a password must be UTF-8 "
                               "(kubectl create secret generic NAME --from-literal=password=...)")

    # the password is nowhere a user, an operator or another tenant can look
    (agent,) = [a for a in agents.started if a.node == node]
    log = agent.log.read_text(errors="replace")
    assert " DEBUG " in log  # --verbose really logs at debug
    assert "response body" in log  # ... including kubernetes_asyncio's API responses
    events = await events_until(kube_api, namespace, lambda items: any("pw-bin" in (e.note or "") for e in items))
    notes = " ".join(f"{e.note} {e.reason}" for e in events)
    assert "pw-1" in notes and "pw-bin" in notes
    status = json.dumps(status_of(await instances.get("vm")))
    for where, text in (("agent log", log), ("Events", notes), ("status", status), ("process list",
                                                                                  " ".join(seen_in_ps))):
        assert password not in text and encoded not in text, f"the password is in the {where}"


async def watch_process_list(password: str, seen: list[str]) -> None:
    """Every process's command line while the SetPassword runs (a password passed to a tool
    would show here)."""
    while True:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if password in cmdline:
                    seen.append(cmdline)
        await asyncio.sleep(0.1)


async def test_identity_actions_refused_without_the_policies(instances, agents, control_plane, kube_api):
    """With the policies gone, nothing vouches for a requester: the agent refuses what needs one
    (in status, Rejected), and everything else still works."""
    await built(instances, agents)
    try:
        control_plane.kubectl("delete", "validatingadmissionpolicybinding", "novalet-requests")
        await instances.request("vm", {"name": "ResetState", "id": "reset-1", "state": "error"})
        body = await instances.wait("vm", lambda b: status_of(b).get("lastAction", {}).get("id") == "reset-1",
                                    what="the refusal", agents=agents)
        last = status_of(body)["lastAction"]
        assert last["result"] == "Rejected" and status_of(body)["vmState"] == "active"
        assert "the apiserver does not vouch for spec.action.requestedBy" in last["message"]
        assert last.get("requestedBy") is None  # a claim is not recorded as who asked

        control_plane.kubectl("delete", "mutatingadmissionpolicybinding", "novalet-requester")
        await until_unstamped(instances)
        await instances.request("vm", {"name": "Lock", "id": "lock-1", "reason": "x"})
        body = await instances.wait("vm", lambda b: status_of(b).get("lastAction", {}).get("id") == "lock-1",
                                    what="the refusal", agents=agents)
        last = status_of(body)["lastAction"]
        assert last["result"] == "Rejected" and status_of(body).get("lock") is None
        assert "Lock needs to know who asked, and spec.action.requestedBy is empty" in last["message"]
        assert "crds/novalet.io_admission-policies.yaml" in last["message"]

        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "reboot-1"})  # needs nobody
        body = await instances.wait_idle("vm", "active", agents=agents, last_id="reboot-1")
        assert status_of(body)["lastAction"]["result"] == "Succeeded"
    finally:
        control_plane.apply_crds(POLICIES.parent)


async def until_unstamped(instances: Instances) -> None:
    """The apiserver drops a deleted policy binding from its cache shortly after: probe with a
    server-side dry run (admission runs, nothing is stored)."""
    probe = {"apiVersion": "novalet.io/v1alpha1", "kind": "VirtualInstance", "metadata": {"name": "probe"},
             "spec": {"flavor": FLAVOR, "action": {"name": "Rebuild", "id": "probe"}}}
    for _ in range(60):
        answer = await instances.custom.create_namespaced_custom_object(
            "novalet.io", "v1alpha1", instances.namespace, "virtualinstances", probe, dry_run="All")
        if "requestedBy" not in answer["spec"]["action"]:
            return
        await asyncio.sleep(0.25)
    pytest.fail("the requester is still stamped after its policy binding was deleted")


async def test_user_data_comes_only_from_a_secret_its_author_may_read(crds, instances, users, kube_api, control_plane,
                                                                    namespace):
    """The policy checks the author of spec.userDataSecretRef with every group they have; the agent
    reads the Secret only while that policy is in force (tests/e2e/test_guest_network.py)."""
    await no_webhook(kube_api)
    await instances.create("vm", {"flavor": FLAVOR, "image": ""})
    alice = await users("alice")
    for name in ("mine", "other"):
        await client.CoreV1Api(kube_api).create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name=name), data={"userdata": base64.b64encode(b"#!/bin/sh\n").decode()}))
    control_plane.kubectl("-n", namespace, "create", "role", "read-mine", "--verb=get", "--resource=secrets",
                          "--resource-name=mine")
    control_plane.kubectl("-n", namespace, "create", "rolebinding", "alice-read-mine", "--role=read-mine",
                          f"--serviceaccount={namespace}:alice")
    await until_allowed(control_plane, alice.name, "get", "secret", namespace, "mine")

    message = await refused(alice.instances.patch_spec("vm", {"userDataSecretRef": {"name": "other"}}))
    assert (f"{alice.name} may not get Secret other in namespace {namespace}: spec.userDataSecretRef only names "
            "a Secret its author may read") in message
    await alice.instances.patch_spec("vm", {"userDataSecretRef": {"name": "mine"}})
    assert (await instances.get("vm"))["spec"]["userDataSecretRef"] == {"name": "mine"}
