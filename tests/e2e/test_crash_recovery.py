"""The crash-point matrix: the agent is SIGKILLed at every named point of every action, then
restarted; nothing stays in a task state, libvirt agrees with status, nothing ran twice.

Each case: start the agent with NOVALET_CRASH_AT=<point>@<Action>:<task state>, bring an
instance to the action's starting state with it (the setup runs other actions, so it passes no
crash point of the case's), ask for the action, watch the agent die there, start it again and
check what a user (and libvirt) sees. Every point is taken in every step of a plan that calls the
hypervisor: `after_started` before each step's operation, `between_steps` (or `after_call` for
the last) after it, so a crash lands in every task state a plan writes. The table is printed in
the test session's summary (with or without pytest-xdist) and kept in docs/recovery.md.
"""
import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes_asyncio import client

from novalet.core.catalog import snapshot_pool_name
from novalet.core.plans import EXPECTED_POWER, PLANS
from novalet.core.vocabulary import Action, VmState
from novalet.virt.images import PARTIAL_MARK, ImagePool
from novalet_dev.guest import wait_for_marker

from . import libvirt_checks as lv
from .conftest import TINY
from .harness import status_of, unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
BIG = {"vcpus": 2, "memoryMiB": 160}
RECOVERY_BOUND_S = 60  # from the restart to an idle instance, for every case
# A diskless guest never answers the ACPI button: every graceful stop of one (stop, resize, a
# resize's revert) waits the agent's whole --stop-timeout before it destroys the guest. The crash
# cases with a diskless guest give the agent a short one; the real guests keep the harness's.
DISKLESS_STOP_TIMEOUT = 1.0
# A restarted agent keeps the deadline its predecessor recorded with reboot_started, so the
# guest's time to answer is what is left of it after the restart: generous, so that a tiny
# guest slowed by a loaded machine answers within it (the matrix counts one reboot).
TINY_SOFT_REBOOT_TIMEOUT = 20.0
# each case's row travels in its report's user_properties, so the table (tests/conftest.py)
# is printed with pytest-xdist too, where the cases run in worker processes
MATRIX_PROPERTY = "crash_matrix"  # (index, action, point, outcome)


@dataclass(frozen=True)
class Case:
    action: Action
    image: str = ""                         # "" diskless (boots at once), TINY a real guest
    setup: dict[str, Any] = field(default_factory=dict)     # spec patch giving the start state
    setup_state: str = "active"
    request: dict[str, Any] = field(default_factory=dict)   # spec patch that asks for the action
    final: str = "active"                   # vmState once recovered (declarative desires persist)
    counts_boots: bool = False              # exactly one (re)boot must reach libvirt
    unreachable: tuple[str, ...] = ()       # crash points this case's run never passes


def act(name: str, **extra: Any) -> dict[str, Any]:
    return {"action": {"name": name, "id": f"{name.lower()}-1", **extra}}


CASES = [
    Case(Action.CREATE),
    Case(Action.STOP, request={"powerState": "Stopped"}, final="stopped"),
    Case(Action.START, setup={"powerState": "Stopped"}, setup_state="stopped",
         request={"powerState": "Running"}),
    Case(Action.PAUSE, request={"powerState": "Paused"}, final="paused"),
    Case(Action.UNPAUSE, setup={"powerState": "Paused"}, setup_state="paused", request={"powerState": "Running"}),
    Case(Action.SUSPEND, request={"powerState": "Suspended"}, final="suspended"),
    Case(Action.RESUME, setup={"powerState": "Suspended"}, setup_state="suspended",
         request={"powerState": "Running"}),
    Case(Action.REBOOT_SOFT, image=TINY, request=act("Reboot", type="Soft"), counts_boots=True),
    Case(Action.REBOOT_HARD, request=act("Reboot", type="Hard"), counts_boots=True),
    Case(Action.RESCUE, request={"rescue": True}, final="rescued"),
    Case(Action.UNRESCUE, setup={"rescue": True}, setup_state="rescued", request={"rescue": False}),
    Case(Action.RESIZE, request={"flavor": BIG}, final="resized"),
    Case(Action.CONFIRM_RESIZE, setup={"flavor": BIG}, setup_state="resized", request=act("ConfirmResize")),
    Case(Action.REVERT_RESIZE, setup={"flavor": BIG}, setup_state="resized", request=act("RevertResize")),
    Case(Action.REBUILD, request={"image": TINY}),
    Case(Action.SNAPSHOT, image=TINY, request=act("Snapshot", snapshotName="crash-snap")),
    # the guests have no QEMU guest agent: the operation fails before `after_call`
    Case(Action.SET_PASSWORD, request=act("SetPassword", secretRef={"name": "pw"}), unreachable=("after_call",)),
    Case(Action.DELETE, final="deleted"),
]


def crash_points(action: Action) -> list[str]:
    """`after_claim`, then for every step with an operation `after_started` and `between_steps`
    (`after_call` after the last one). The first step's points keep their plain names (the
    first match is that step); a later step's name its task state: `point:task_state`."""
    ops = [s for s in PLANS[action].steps if s.op]
    points = ["after_claim"]
    for index, step in enumerate(ops):
        later = f":{step.task_state.value}" if index else ""
        points.append(f"after_started{later}")
        points.append("after_call" if index == len(ops) - 1 else f"between_steps{later}")
    return points


def crash_at(action: Action, point: str) -> str:
    """The agent's NOVALET_CRASH_AT for a point of crash_points(): `point@Action[:task_state]`."""
    name, _, task_state = point.partition(":")
    return f"{name}@{action.value}" + (f":{task_state}" if task_state else "")


MATRIX_CASES = [pytest.param(case, point, id=f"{case.action.value}-{point.replace(':', '-')}")
                for case in CASES for point in crash_points(case.action) if point not in case.unreachable]


async def wait_dead(agent, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while agent.process.poll() is None:
        assert time.monotonic() < deadline, f"agent never reached its crash point\n{agent.tail()}"
        await asyncio.sleep(0.1)
    assert agent.crashed(), f"agent ended with {agent.process.returncode}, not SIGKILL\n{agent.tail()}"


@pytest.mark.parametrize("case,point", MATRIX_CASES)
async def test_crash_point(case: Case, point: str, instances, agents, libvirt_view, kube_api, namespace,
                           request):
    node = unique_node()
    timings = ({"soft_reboot_timeout": TINY_SOFT_REBOOT_TIMEOUT} if case.image
               else {"stop_timeout": DISKLESS_STOP_TIMEOUT})

    def matrix_row(outcome: str) -> None:
        index = next(i for i, p in enumerate(MATRIX_CASES) if p.values == (case, point))
        request.node.user_properties.append((MATRIX_PROPERTY, (index, case.action.value, point, outcome)))

    state_dir = agents.workdir / f"state-{node}"
    pool = ImagePool(agents.image_pool, state_dir)
    spec = {"flavor": FLAVOR, "image": case.image, "nodeName": node}
    if case.action == Action.SET_PASSWORD:
        await client.CoreV1Api(kube_api).create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name="pw"), data={"password": base64.b64encode(b"x").decode()}))

    # 1. the starting state, reached by the agent that is to crash (no crash point of the
    # case's action is on the way: the setup runs other actions)
    doomed = agents.start(node, crash_at=crash_at(case.action, point), **timings)
    await instances.create("vm", spec)
    if case.action != Action.CREATE:
        await instances.wait_idle("vm", "active", agents=agents)
        if case.setup:
            await instances.patch_spec("vm", case.setup)
            await instances.wait_idle("vm", case.setup_state, agents=agents)
        if case.image == TINY:  # ACPI requests before the guest is ready are lost
            uid = (await instances.get("vm"))["metadata"]["uid"]
            await asyncio.to_thread(wait_for_marker, pool.serial_log_path(uid), timeout=60)
        assert doomed.process.poll() is None, f"the agent died during the setup\n{doomed.tail()}"
    body = await instances.wait("vm", lambda b: b["metadata"].get("uid") is not None, what="the object")
    uid = body["metadata"]["uid"]
    counter = lv.BootCounter(libvirt_view, uid) if case.counts_boots else None

    # 2. the request; the agent dies at the crash point
    try:
        if case.action == Action.DELETE:
            await instances.delete("vm")
        elif case.request:
            await instances.patch_spec("vm", case.request)
        await wait_dead(doomed)
        crashed = status_of(await instances.get("vm") or {})
        crashed_in = crashed.get("taskState")
        crashed_id = (crashed.get("currentTask") or {}).get("id")

        # 3. restart; within the bound the instance is idle and agrees with libvirt
        agents.start(node, **timings)
        if case.final == "deleted":
            await instances.wait_gone("vm", timeout=RECOVERY_BOUND_S, agents=agents)
            assert lv.domain(libvirt_view, uid) is None
            assert not (state_dir / "instances" / uid).exists()
            matrix_row(f"{crashed_in} -> deleted")
            return
        body = await instances.wait_idle("vm", case.final, timeout=RECOVERY_BOUND_S, agents=agents)
        status = status_of(body)
        power = lv.power(libvirt_view, uid)
        assert power in {p.value for p in EXPECTED_POWER[VmState(case.final)]}, (case.final, power)
        assert status["powerState"] == power
        assert lv.domains_for(libvirt_view, uid) == 1
        instance_files = {p.name for p in (state_dir / "instances" / uid).iterdir()}
        assert ("disk.qcow2" in instance_files) == bool(status.get("image")), instance_files
        rescue_disk = case.final == "rescued" and bool(status.get("image"))  # diskless: none
        assert ("rescue.qcow2" in instance_files) == rescue_disk, instance_files
        assert not [p for p in agents.image_pool.rglob("*") if PARTIAL_MARK in p.name]  # catalog/ too
        if counter:
            await asyncio.sleep(2)  # room for a second reboot to show up
            assert counter.reboots == 1, f"{counter.reboots} reboots at libvirt ({counter.starts} starts, " \
                                         f"{counter.resets} resets)"
        last = status["lastAction"]
        assert last["result"] in ("Succeeded", "Failed"), last
        # what became of the interrupted request (a declarative one may have run again since)
        record = next((r for r in status["history"] if r["id"] == crashed_id), last)
        assert record["result"] in ("Succeeded", "Failed"), record
        matrix_row(
            f"{crashed_in} -> {record['name']} {record['result']}"
            + (f": {record['message']}" if record["message"] else "")
            + (f"; then {last['name']} {last['result']}" if record is not last else "")
            + f"; now {status['vmState']}")

        # 4. it takes new work (a hard reboot is allowed from every state but rescued/resized)
        if case.final not in ("rescued", "resized"):
            await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "after-recovery"})
            # the declarative powerState may move it on right after, so look in the history
            record = await instances.wait_done("vm", "after-recovery", RECOVERY_BOUND_S, agents)
            assert record["result"] == "Succeeded", record
    finally:
        if counter:
            counter.close()
        if case.action == Action.SNAPSHOT:  # the snapshot's copy in the pool's catalog (docs/images.md)
            pool.remove(snapshot_pool_name(namespace, uid, case.request["action"]["id"]))
