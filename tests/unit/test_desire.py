"""`next_request`: the one request the agent acts on next, from spec and status."""
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novalet.api.models import (
    ActionRecord,
    Backoff,
    CurrentTask,
    Flavor,
    ResizeOrigin,
    VirtualInstanceSpec,
    VirtualInstanceStatus,
)
from novalet.core import policy
from novalet.core.desire import Request, next_request
from novalet.core.plans import final_vm_state, plan_of
from novalet.core.vocabulary import Action, TaskState, VmState

A, T, V = Action, TaskState, VmState
NOW = datetime(2024, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(minutes=10)
SMALL = {"vcpus": 1, "memoryMiB": 128}
BIG = {"vcpus": 2, "memoryMiB": 256}


def spec(**kw) -> VirtualInstanceSpec:
    return VirtualInstanceSpec(**{"flavor": SMALL, **kw})


def status(vm=V.ACTIVE, **kw) -> VirtualInstanceStatus:
    return VirtualInstanceStatus(**{"vmState": vm, "flavor": SMALL, "image": "", **kw})


def record(id, result="Succeeded", name="Reboot") -> ActionRecord:
    return ActionRecord(name=name, id=id, result=result)


def task(id, state=T.REBOOT_STARTED) -> CurrentTask:
    return CurrentTask(name="Reboot", id=id, taskState=state, originVmState=V.ACTIVE,
                       owner="node-a", startedAt=NOW)


REBOOT = {"name": "Reboot", "id": "r1", "type": "Soft"}


# --- ordering: delete first, then a new one-shot action -----------------------------------------

def test_delete_comes_first():
    req = next_request(spec(action=REBOOT, powerState="Stopped"), status(), 4, deleting=True)
    assert req == Request(A.DELETE, "delete-g4", imperative=False)


def test_delete_even_while_building_or_in_error():
    for vm in (None, V.BUILDING, V.ERROR, V.DELETED):
        assert next_request(spec(), status(vm), 1, deleting=True).action == A.DELETE


@pytest.mark.parametrize("action, expected", [
    ({"name": "Reboot", "id": "x", "type": "Soft"}, A.REBOOT_SOFT),
    ({"name": "Reboot", "id": "x", "type": "Hard"}, A.REBOOT_HARD),
    ({"name": "Rebuild", "id": "x"}, A.REBUILD),
    ({"name": "Snapshot", "id": "x", "snapshotName": "snap-1"}, A.SNAPSHOT),
    ({"name": "SetPassword", "id": "x", "secretRef": {"name": "pw"}}, A.SET_PASSWORD),
    ({"name": "ConfirmResize", "id": "x"}, A.CONFIRM_RESIZE),
    ({"name": "RevertResize", "id": "x"}, A.REVERT_RESIZE),
    ({"name": "ResetState", "id": "x", "state": "active"}, A.RESET_STATE),
])
def test_new_action_id_is_taken(action, expected):
    req = next_request(spec(action=action), status(), 1, deleting=False)
    assert req == Request(expected, "x", imperative=True)


def test_new_action_id_comes_before_declarative_steps():
    req = next_request(spec(action=REBOOT, powerState="Stopped", flavor=BIG), status(), 1, False)
    assert req.action == A.REBOOT_SOFT


@pytest.mark.parametrize("seen", [
    {"history": [record("r1")]},
    {"lastAction": record("r1", "Rejected")},
    {"lastAction": record("r1", "Failed")},
    {"currentTask": task("r1")},
])
def test_seen_action_id_is_not_taken_again(seen):
    assert next_request(spec(action=REBOOT), status(**seen), 1, False) is None


def test_seen_action_id_falls_through_to_declarative():
    req = next_request(spec(action=REBOOT, powerState="Stopped"),
                       status(history=[record("r1")]), 7, False)
    assert req == Request(A.STOP, "spec-g7-stop", imperative=False)


def test_a_new_id_after_a_seen_one_is_taken():
    req = next_request(spec(action={**REBOOT, "id": "r2"}), status(lastAction=record("r1")), 1, False)
    assert req.id == "r2"


# --- declarative steps ---------------------------------------------------------------------------

def test_unbuilt_instance_is_created():
    assert next_request(spec(), VirtualInstanceStatus(), 1, False).action == A.CREATE
    assert next_request(spec(), status(V.BUILDING), 1, False).action == A.CREATE


@pytest.mark.parametrize("desired, vm, expected", [
    ("Running", V.ACTIVE, None),
    ("Running", V.STOPPED, A.START),
    ("Running", V.PAUSED, A.UNPAUSE),
    ("Running", V.SUSPENDED, A.RESUME),
    ("Stopped", V.STOPPED, None),
    ("Stopped", V.ACTIVE, A.STOP),
    ("Stopped", V.PAUSED, A.STOP),
    ("Stopped", V.SUSPENDED, A.STOP),
    ("Paused", V.PAUSED, None),
    ("Paused", V.ACTIVE, A.PAUSE),
    ("Paused", V.STOPPED, A.START),      # start first, then pause
    ("Paused", V.SUSPENDED, A.RESUME),
    ("Suspended", V.SUSPENDED, None),
    ("Suspended", V.ACTIVE, A.SUSPEND),
    ("Suspended", V.STOPPED, A.START),
    ("Suspended", V.PAUSED, A.UNPAUSE),
])
def test_power_steps_toward_spec_power_state(desired, vm, expected):
    req = next_request(spec(powerState=desired), status(vm), 3, False)
    if expected is None:
        assert req is None
    else:
        assert req == Request(expected, f"spec-g3-{expected.value.lower()}", imperative=False)
        assert policy.is_allowed(expected, vm, None)


def test_rescue_and_unrescue():
    assert next_request(spec(rescue=True), status(V.ACTIVE), 1, False).action == A.RESCUE
    assert next_request(spec(rescue=True), status(V.STOPPED), 1, False).action == A.RESCUE
    assert next_request(spec(rescue=True), status(V.PAUSED), 1, False).action == A.UNPAUSE
    assert next_request(spec(rescue=True), status(V.RESCUED), 1, False) is None
    assert next_request(spec(rescue=False), status(V.RESCUED), 1, False).action == A.UNRESCUE


@pytest.mark.parametrize("vm", [V.ACTIVE, V.STOPPED])
def test_resize_when_spec_flavor_differs_from_status_flavor(vm):
    req = next_request(spec(flavor=BIG, powerState="Stopped" if vm == V.STOPPED else "Running"),
                       status(vm), 2, False)
    assert req == Request(A.RESIZE, "spec-g2-resize", imperative=False)


def test_no_resize_back_to_a_reverted_flavor():
    st_ = status(revertedFlavor=Flavor(**BIG))
    assert next_request(spec(flavor=BIG), st_, 2, False) is None
    # a third flavor is a new desire
    assert next_request(spec(flavor={"vcpus": 4, "memoryMiB": 512}), st_, 3, False).action == A.RESIZE


def test_no_resize_while_resized_waiting_for_confirm():
    assert next_request(spec(flavor=BIG), status(V.RESIZED), 2, False) is None


def test_rebuild_when_image_changes():
    assert next_request(spec(image="debian-12"), status(), 1, False).action == A.REBUILD
    assert next_request(spec(image="debian-12"), status(image="debian-12"), 1, False) is None


def test_error_only_rebuilds_on_a_new_image():
    assert next_request(spec(powerState="Stopped"), status(V.ERROR), 1, False) is None
    assert next_request(spec(image="debian-12"), status(V.ERROR), 1, False).action == A.REBUILD


def test_rejected_declarative_step_is_not_retried_in_the_same_generation():
    st_ = status(V.ACTIVE, lastAction=record("spec-g5-stop", "Rejected", "Stop"))
    assert next_request(spec(powerState="Stopped"), st_, 5, False) is None
    assert next_request(spec(powerState="Stopped"), st_, 5, False, LATER) is None
    # a new generation is a new desire
    assert next_request(spec(powerState="Stopped"), st_, 6, False).id == "spec-g6-stop"


def test_failed_declarative_step_is_retried_once_its_backoff_passed():
    failed = status(V.ACTIVE, lastAction=record("spec-g5-stop", "Failed", "Stop"))
    st_ = failed.model_copy(update={"backoff": Backoff(request="spec-g5-stop", failures=1, lastError="boom",
                                                       nextRetryAt=NOW + timedelta(seconds=10))})
    assert next_request(spec(powerState="Stopped"), st_, 5, False, NOW) is None
    assert next_request(spec(powerState="Stopped"), st_, 5, False, LATER) == Request(
        A.STOP, "spec-g5-stop", imperative=False)
    # a spec change is a new request: tried at once, whatever the backoff of the old one
    assert next_request(spec(powerState="Stopped"), st_, 6, False, NOW).id == "spec-g6-stop"


def test_failing_delete_backs_off_too():
    st_ = status(V.ERROR, lastAction=record("delete-g3", "Failed", "Delete")).model_copy(update={"backoff": Backoff(
        request="delete-g3", failures=2, lastError="boom", nextRetryAt=NOW + timedelta(seconds=20))})
    assert next_request(spec(), st_, 3, True, NOW) is None
    assert next_request(spec(), st_, 3, True, LATER).action == A.DELETE


def test_succeeded_declarative_step_runs_again_after_drift():
    # started for generation 5, then the guest shut down from inside: start it again
    st_ = status(V.STOPPED, lastAction=record("spec-g5-start", "Succeeded", "Start"))
    assert next_request(spec(), st_, 5, False).id == "spec-g5-start"


# --- convergence: the declarative loop reaches the desire or says why not ------------------------

POWER_OF = {"Running": V.ACTIVE, "Stopped": V.STOPPED, "Paused": V.PAUSED, "Suspended": V.SUSPENDED}


def drive(sp: VirtualInstanceSpec, st_: VirtualInstanceStatus, generation: int = 1, limit: int = 12):
    """Run next_request to a fixed point, every step succeeding; a request the policy refuses is
    recorded as Rejected (what the agent writes). An unconfirmed resize is confirmed by the user."""
    for _ in range(limit):
        req = next_request(sp, st_, generation, deleting=False)
        if req is None:
            if st_.vmState == V.RESIZED:
                origin = st_.resizedFrom.vmState
                st_ = st_.model_copy(update={"vmState": origin, "resizedFrom": None})
                continue
            return st_
        vm = st_.vmState or V.BUILDING
        if not policy.is_allowed(req.action, vm, None):
            st_ = st_.model_copy(update={"lastAction": record(req.id, "Rejected", req.action.value)})
            continue
        update = {"vmState": final_vm_state(plan_of(req.action), vm, None, True),
                  "lastAction": record(req.id, "Succeeded", req.action.value)}
        if req.action == A.RESIZE:
            update |= {"flavor": sp.flavor, "resizedFrom": ResizeOrigin(flavor=st_.flavor, vmState=vm)}
        if req.action in (A.REBUILD, A.CREATE):
            update |= {"image": sp.image, "flavor": sp.flavor}
        st_ = st_.model_copy(update=update)
    raise AssertionError(f"no fixed point after {limit} steps: {st_}")


def met(sp: VirtualInstanceSpec, st_: VirtualInstanceStatus) -> bool:
    if sp.rescue:  # rescue wins; flavor and image apply after unrescue (Nova cannot resize rescued)
        return st_.vmState == V.RESCUED
    return st_.vmState == POWER_OF[sp.powerState] and st_.flavor == sp.flavor and (st_.image or "") == sp.image


@settings(max_examples=300, deadline=None)
@given(vm=st.sampled_from([None, V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED, V.RESCUED]),
       power=st.sampled_from(list(POWER_OF)), rescue=st.booleans(),
       new_flavor=st.booleans(), new_image=st.booleans())
def test_declarative_loop_never_stalls_silently(vm, power, rescue, new_flavor, new_image):
    sp = spec(powerState=power, rescue=rescue, flavor=BIG if new_flavor else SMALL,
              image="debian-12" if new_image else "")
    start = VirtualInstanceStatus() if vm is None else status(vm)
    end = drive(sp, start)
    told = end.lastAction is not None and end.lastAction.result == "Rejected"
    assert met(sp, end) or told, (
        f"spec {power} rescue={rescue} flavor={sp.flavor} image={sp.image!r} from {vm}: "
        f"stopped at {end.vmState} flavor={end.flavor} image={end.image!r} with no request "
        f"and no Rejected record")


@pytest.mark.parametrize("vm", [V.PAUSED, V.SUSPENDED])
@pytest.mark.parametrize("change", [{"flavor": BIG}, {"image": "debian-12"}])
def test_running_desire_with_a_new_flavor_or_image_is_reached_from_paused_or_suspended(vm, change):
    """A changed flavor/image while paused or suspended first steps toward powerState
    Running (Unpause/Resume), then resizes or rebuilds: the instance is never left paused."""
    end = drive(spec(powerState="Running", **change), status(vm))
    assert met(spec(powerState="Running", **change), end), (
        f"stuck in {end.vmState}: next_request returned None instead of stepping toward "
        f"powerState Running (Unpause/Resume) and then applying {change}")
