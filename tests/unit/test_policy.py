"""Admission policy rows from DESIGN.md section 2 (Nova's check_instance_state)."""
import pytest

from novalet.core import policy
from novalet.core.policy import allowed_actions, is_allowed, refusal
from novalet.core.vocabulary import Action, TaskState, VmState

A, T, V = Action, TaskState, VmState
# Allowed in every state: delete, the admin reset-state, and Nova's lock/unlock (bookkeeping).
ALWAYS = {A.DELETE, A.RESET_STATE, A.LOCK, A.UNLOCK}

ALL_TASKS = [*TaskState]
HARD_REBOOT_VMS = {V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED, V.ERROR}
HARD_SUPERSEDES = {T.REBOOT_PENDING, T.REBOOT_STARTED, T.REBOOTING,
                   T.PAUSING, T.UNPAUSING, T.SUSPENDING, T.RESUMING}


def test_every_action_has_a_policy_row():
    assert set(policy.POLICY) == set(Action)


@pytest.mark.parametrize("vm", list(VmState))
def test_soft_reboot_only_when_active_and_idle(vm):
    assert is_allowed(A.REBOOT_SOFT, vm, None) == (vm == V.ACTIVE)
    for task in ALL_TASKS:
        assert not is_allowed(A.REBOOT_SOFT, vm, task), (vm, task)


@pytest.mark.parametrize("vm", list(VmState))
def test_hard_reboot_vm_states(vm):
    assert is_allowed(A.REBOOT_HARD, vm, None) == (vm in HARD_REBOOT_VMS)


@pytest.mark.parametrize("task", sorted(HARD_SUPERSEDES))
def test_hard_reboot_supersedes_soft_reboot_and_pause_suspend_tasks(task):
    # the vm state such a task runs in (its origin)
    origin = {T.UNPAUSING: V.PAUSED, T.RESUMING: V.SUSPENDED}.get(task, V.ACTIVE)
    assert is_allowed(A.REBOOT_HARD, origin, task)


@pytest.mark.parametrize("task", sorted(set(TaskState) - HARD_SUPERSEDES))
def test_hard_reboot_refused_during_other_tasks(task):
    # including a hard reboot already in flight: no queue of reboots builds up
    for vm in VmState:
        assert not is_allowed(A.REBOOT_HARD, vm, task), (vm, task)


def test_error_allows_only_delete_rebuild_hard_reboot_reset_state_and_evacuate():
    assert set(allowed_actions(V.ERROR, None)) == {A.DELETE, A.REBUILD, A.REBOOT_HARD, A.EVACUATE, *ALWAYS}


@pytest.mark.parametrize("vm", list(VmState))
@pytest.mark.parametrize("task", [None, *TaskState])
def test_delete_reset_state_and_lock_always_allowed(vm, task):
    for action in ALWAYS:
        assert is_allowed(action, vm, task)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_any_other_action_while_a_task_runs_is_rejected(task):
    for vm in VmState:
        allowed = set(allowed_actions(vm, task))
        expected = set(ALWAYS)
        if task in HARD_SUPERSEDES and vm in HARD_REBOOT_VMS:
            expected.add(A.REBOOT_HARD)
        if vm not in (V.DELETED, V.BUILDING):  # its node is dead: whatever task it was in
            expected.add(A.EVACUATE)
        assert allowed == expected, (vm, task)


@pytest.mark.parametrize("action, vm_states", [
    (A.CREATE, {V.BUILDING}),
    (A.START, {V.STOPPED}),
    (A.STOP, {V.ACTIVE, V.PAUSED, V.SUSPENDED, V.RESCUED}),
    (A.PAUSE, {V.ACTIVE}),
    (A.UNPAUSE, {V.PAUSED}),
    (A.SUSPEND, {V.ACTIVE}),
    (A.RESUME, {V.SUSPENDED}),
    (A.RESCUE, {V.ACTIVE, V.STOPPED}),
    (A.UNRESCUE, {V.RESCUED}),
    (A.RESIZE, {V.ACTIVE, V.STOPPED}),
    (A.CONFIRM_RESIZE, {V.RESIZED}),
    (A.REVERT_RESIZE, {V.RESIZED}),
    (A.REBUILD, {V.ACTIVE, V.STOPPED, V.ERROR}),
    (A.SNAPSHOT, {V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED}),
    (A.SET_PASSWORD, {V.ACTIVE}),
])
def test_idle_rows(action, vm_states):
    assert {vm for vm in VmState if is_allowed(action, vm, None)} == vm_states


def test_deleted_and_building_allow_nothing_but_delete():
    assert set(allowed_actions(V.DELETED, None)) == ALWAYS
    assert set(allowed_actions(V.BUILDING, None)) == {A.CREATE, *ALWAYS}


# --- refusal messages ------------------------------------------------------------------------

def test_refusal_none_when_allowed():
    assert refusal(A.REBOOT_SOFT, V.ACTIVE, None) is None
    assert refusal(A.DELETE, V.ERROR, T.RESIZE_MIGRATING) is None


def test_refusal_names_task_state_and_allowed_actions():
    msg = refusal(A.REBOOT_SOFT, V.ACTIVE, T.RESIZE_MIGRATING)
    assert msg == "cannot reboot (soft) while task_state is resize_migrating; allowed: Delete"


def test_refusal_lists_hard_reboot_when_it_supersedes():
    msg = refusal(A.REBOOT_SOFT, V.ACTIVE, T.REBOOT_STARTED)
    assert msg.startswith("cannot reboot (soft) while task_state is reboot_started; allowed: ")
    allowed = msg.split("allowed: ", 1)[1].split(", ")
    assert set(allowed) == {"reboot (hard)", "Delete"}


def test_refusal_without_task_names_vm_state():
    msg = refusal(A.START, V.ERROR, None)
    assert msg.startswith("cannot Start while vm_state is error; allowed: ")
    allowed = set(msg.split("allowed: ", 1)[1].split(", "))
    # the admin-only reset-state and the internal Create are not offered to users
    assert allowed == {"reboot (hard)", "Rebuild", "Delete"}


@pytest.mark.parametrize("vm", list(VmState))
@pytest.mark.parametrize("task", [None, *TaskState])
def test_refusal_is_consistent_with_is_allowed(vm, task):
    for action in Action:
        msg = refusal(action, vm, task)
        assert (msg is None) == is_allowed(action, vm, task)
        if msg is not None:
            assert (str(task) if task else str(vm)) in msg
            assert "Delete" in msg  # delete is always an option
