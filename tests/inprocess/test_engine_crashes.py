"""The crash matrix in-process: the engine against the real apiserver and libvirt's test driver.

The same cases as the kill -9 matrix (tests/e2e/test_crash_recovery.py), checked in seconds: an
engine runs the action and is stopped dead at a crash point (the point raises instead of
SIGKILLing the process, so nothing after it runs: no write, no libvirt call); a second engine, a
new agent with another identity, then looks at the instance until it rests. What a user and
libvirt see must agree: no task left, the vm state the action (or its recovery) ends in, the
power state libvirt reports, one domain (none after a delete), the interrupted request recorded
once. The kill -9 matrix keeps the real crash of a real process against real QEMU guests.
"""
import asyncio
import uuid
from pathlib import Path
from typing import Any

import libvirt
import pytest
from kubernetes_asyncio import client

from novalet import GROUP, PLURAL, VERSION
from novalet.agent import engine as engine_module
from novalet.agent.engine import Engine
from novalet.agent.operations import Operations
from novalet.core.plans import EXPECTED_POWER, PLANS
from novalet.core.vocabulary import Action, VmState
from novalet.kube.events import EventRecorder
from novalet.kube.instances import InstanceStore
from novalet.virt.hypervisor import POWER_STATES, Hypervisor
from novalet_dev.testing import TINY

pytestmark = pytest.mark.stack
NODE = "inproc"
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
BIG = {"vcpus": 2, "memoryMiB": 160}


class SimulatedCrash(BaseException):
    """Stops the engine dead where the agent would SIGKILL itself (BaseException: no handler
    of the engine's catches it, as none survives a kill)."""


def act(name: str, **extra: Any) -> dict[str, Any]:
    return {"action": {"name": name, "id": f"{name.lower()}-1", **extra}}


# (action, image, setup patch, state after setup, request patch, final vm state)
CASES = [
    (Action.CREATE, "", {}, "active", {}, "active"),
    (Action.STOP, "", {}, "active", {"powerState": "Stopped"}, "stopped"),
    (Action.START, "", {"powerState": "Stopped"}, "stopped", {"powerState": "Running"}, "active"),
    (Action.PAUSE, "", {}, "active", {"powerState": "Paused"}, "paused"),
    (Action.UNPAUSE, "", {"powerState": "Paused"}, "paused", {"powerState": "Running"}, "active"),
    (Action.SUSPEND, "", {}, "active", {"powerState": "Suspended"}, "suspended"),
    (Action.RESUME, "", {"powerState": "Suspended"}, "suspended", {"powerState": "Running"}, "active"),
    (Action.REBOOT_SOFT, "", {}, "active", act("Reboot", type="Soft"), "active"),
    (Action.REBOOT_HARD, "", {}, "active", act("Reboot", type="Hard"), "active"),
    (Action.RESCUE, "", {}, "active", {"rescue": True}, "rescued"),
    (Action.UNRESCUE, "", {"rescue": True}, "rescued", {"rescue": False}, "active"),
    (Action.RESIZE, "", {}, "active", {"flavor": BIG}, "resized"),
    (Action.CONFIRM_RESIZE, "", {"flavor": BIG}, "resized", act("ConfirmResize"), "active"),
    (Action.REVERT_RESIZE, "", {"flavor": BIG}, "resized", act("RevertResize"), "active"),
    (Action.REBUILD, "", {}, "active", {"image": TINY}, "active"),
    (Action.SNAPSHOT, TINY, {}, "active", act("Snapshot", snapshotName="inproc-snap"), "active"),
    (Action.DELETE, "", {}, "active", {}, "deleted"),
]


def crash_points(action: Action) -> list[tuple[str, str | None]]:
    """Every point the engine passes in the action's plan, with the task state on record there
    (it tells a later step's point from the first's, as in the kill -9 matrix)."""
    ops = [s for s in PLANS[action].steps if s.op]
    points: list[tuple[str, str | None]] = [("after_claim", None)]
    for index, step in enumerate(ops):
        last = index == len(ops) - 1
        points.append(("after_started", step.task_state.value))
        points.append(("after_call", None) if last else ("between_steps", step.task_state.value))
    return points


MATRIX = [pytest.param(case, point, state, id=f"{case[0].value}-{point}-{state or ''}".rstrip("-"))
          for case in CASES for point, state in crash_points(case[0])]


class Node:
    """One in-process agent's parts on a shared test-driver hypervisor."""

    def __init__(self, api: client.ApiClient, hv: Hypervisor, owner: str):
        ops = Operations(hv, api, NODE, soft_reboot_timeout=1.0, stop_timeout=1.0)
        self.engine = Engine(InstanceStore(api), EventRecorder(api, "novalet.io/agent", owner), ops, NODE, owner)

    async def settle(self, namespace: str, name: str, looks: int = 60) -> None:
        """Look at the instance until the engine has nothing more to do (waits included).
        No watch runs in-process: the first look reads the object afresh, as the agent does
        when its watch delivers a change made by someone else."""
        self.engine.store.forget(namespace, name)
        for _ in range(looks):
            again = await self.engine.reconcile(namespace, name)
            if again is None:
                return
            await asyncio.sleep(min(again, 1.2))
        raise AssertionError(f"{name} still had work after {looks} looks")


@pytest.fixture
def hypervisor(tmp_path: Path, image_pool: Path):
    uri = "test:///default"
    keep = libvirt.open(uri)  # the test driver's state lives as long as a connection does
    hv = Hypervisor(uri, image_pool, tmp_path / "state", "qemu")
    try:
        yield hv, keep
    finally:
        for dom in keep.listAllDomains():
            if dom.name().startswith("novalet-"):
                try:
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                except libvirt.libvirtError:
                    pass
        hv.close()
        keep.close()


async def body_of(api, namespace: str, name: str) -> dict | None:
    try:
        return await client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


async def patch_spec(api, namespace: str, name: str, spec: dict) -> None:
    if "action" in spec:  # replace the action whole (a JSON patch), as users are told to
        await client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, [{"op": "add", "path": "/spec/action", "value": spec["action"]}],
            _content_type="application/json-patch+json")
        spec = {k: v for k, v in spec.items() if k != "action"}
    if spec:
        await client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}, _content_type="application/merge-patch+json")


@pytest.mark.parametrize("case,point,task_state", MATRIX)
async def test_a_new_agent_recovers_whatever_the_crash_point(case, point, task_state, kube_api, crds, namespace,
                                                             hypervisor, monkeypatch):
    action, image, setup, setup_state, request, final = case
    hv, conn = hypervisor
    healthy = Node(kube_api, hv, f"{NODE}/healthy/{uuid.uuid4().hex[:6]}")
    name = "vm"
    await client.CustomObjectsApi(kube_api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance", "metadata": {"name": name},
        "spec": {"flavor": FLAVOR, "image": image, "nodeName": NODE}})

    # 1. the start state, with a healthy engine (a create is itself the action under test)
    if action != Action.CREATE:
        await healthy.settle(namespace, name)
        if setup:
            await patch_spec(kube_api, namespace, name, setup)
            await healthy.settle(namespace, name)
        started = (await body_of(kube_api, namespace, name))["status"]
        assert started["vmState"] == setup_state, started.get("lastAction")

    # 2. the request; the engine stops dead at the point
    def crash_if(at: str, act_name: str = "", state: str = "") -> None:
        if at == point and act_name == action.value and (task_state is None or state == task_state):
            raise SimulatedCrash(f"{at}@{act_name}:{state}")

    monkeypatch.setattr(engine_module, "crash_if", crash_if)
    if action == Action.DELETE:
        await client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    elif request:
        await patch_spec(kube_api, namespace, name, request)
    doomed = Node(kube_api, hv, f"{NODE}/doomed/{uuid.uuid4().hex[:6]}")
    with pytest.raises(SimulatedCrash):
        await doomed.settle(namespace, name)
    monkeypatch.undo()
    crashed = (await body_of(kube_api, namespace, name))["status"]
    interrupted = crashed["currentTask"]["id"]

    # 3. a new agent brings it to rest, in agreement with libvirt
    survivor = Node(kube_api, hv, f"{NODE}/survivor/{uuid.uuid4().hex[:6]}")
    await survivor.settle(namespace, name)
    body = await body_of(kube_api, namespace, name)
    domains = [d for d in conn.listAllDomains() if d.name() == f"novalet-{crashed['domainUUID']}"]
    if final == "deleted":
        assert body is None and domains == []
        return
    status = body["status"]
    assert status.get("taskState") is None and status.get("currentTask") is None, status
    assert status["vmState"] == final, (crashed["taskState"], status["lastAction"])
    assert len(domains) == 1
    power = POWER_STATES[domains[0].state()[0]]
    assert power in {p.value for p in EXPECTED_POWER[VmState(final)]} and status["powerState"] == power
    # the interrupted request ended once; a declarative one the spec still asks for may run again
    records = [r for r in status["history"] if r["id"] == interrupted]
    assert records and records[0]["result"] in ("Succeeded", "Failed"), records
    assert len(records) == 1 or "action" not in request, records
