"""Action plans: the task states each action passes through and where it ends."""
from collections import Counter

import pytest

from novalet.core import migration, plans, policy
from novalet.core.plans import (
    BOOKKEEPING,
    COORDINATED,
    PLANS,
    STABLE_VM_STATES,
    final_vm_state,
    plan_of,
    task_owner,
)
from novalet.core.vocabulary import Action, PowerState, TaskState, VmState

A, T, V = Action, TaskState, VmState

# Nova task-state names no novalet plan writes (vocabulary kept for Nova compatibility); the
# recovery table still has a rule for each (see test_recovery.py).
NOVA_ONLY = {T.REBOOTING, T.REBOOTING_HARD, T.IMAGE_UPLOADING}
# A migration's task states are core/migration.py's table (two agents in turn), not a plan's.
NOT_WRITTEN_BY_ANY_PLAN = NOVA_ONLY | migration.STATES


def test_every_action_but_bookkeeping_and_migrate_has_a_plan():
    assert A.MIGRATE in COORDINATED
    assert not BOOKKEEPING & COORDINATED
    assert set(PLANS) == set(Action) - BOOKKEEPING - COORDINATED
    for action, plan in PLANS.items():
        assert plan.action == action
        assert plan.steps, action
    for action in {A.RESET_STATE} | COORDINATED:
        with pytest.raises(KeyError):
            plan_of(action)


def test_migration_states_belong_to_no_plan():
    """Nova's `migrating` is now the migration table's, as are novalet's migrate_* states."""
    assert T.MIGRATING in migration.STATES
    assert {t for t in TaskState if t.value.startswith("migrat")} <= migration.STATES
    planned = {step.task_state for plan in PLANS.values() for step in plan.steps}
    assert not planned & migration.STATES


def test_each_task_state_belongs_to_at_most_one_plan_step():
    counts = Counter(step.task_state for plan in PLANS.values() for step in plan.steps)
    duplicated = {t for t, n in counts.items() if n > 1}
    assert not duplicated
    assert set(TaskState) - set(counts) == NOT_WRITTEN_BY_ANY_PLAN


@pytest.mark.parametrize("task", sorted(set(TaskState) - NOT_WRITTEN_BY_ANY_PLAN))
def test_task_owner_points_back_at_the_step(task):
    plan, index = task_owner(task)
    assert plan.steps[index].task_state == task
    assert PLANS[plan.action] is plan


@pytest.mark.parametrize("task", sorted(NOT_WRITTEN_BY_ANY_PLAN))
def test_task_owner_raises_for_states_no_plan_writes(task):
    with pytest.raises(KeyError):
        task_owner(task)


def test_escalation_step_is_the_hard_reboot_step():
    plan, index = task_owner(plans.ESCALATE_TO_HARD.task_state)
    assert plan.action == A.REBOOT_HARD
    assert plan.steps[index] == plans.ESCALATE_TO_HARD


def test_soft_reboot_passes_pending_then_started():
    steps = plan_of(A.REBOOT_SOFT).steps
    assert [s.task_state for s in steps] == [T.REBOOT_PENDING, T.REBOOT_STARTED]
    assert steps[0].op is None  # the acknowledgement is bookkeeping only
    assert steps[1].op == "reboot_soft"


def test_hard_reboot_passes_pending_then_started():
    steps = plan_of(A.REBOOT_HARD).steps
    assert [s.task_state for s in steps] == [T.REBOOT_PENDING_HARD, T.REBOOT_STARTED_HARD]
    assert [s.op for s in steps] == [None, "reboot_hard"]


def test_create_walks_the_build_steps_in_order():
    assert [s.task_state for s in plan_of(A.CREATE).steps] == [
        T.SCHEDULING, T.NETWORKING, T.BLOCK_DEVICE_MAPPING, T.SPAWNING]


def test_resize_walks_prep_migrating_migrated_finish():
    assert [s.task_state for s in plan_of(A.RESIZE).steps] == [
        T.RESIZE_PREP, T.RESIZE_MIGRATING, T.RESIZE_MIGRATED, T.RESIZE_FINISH]


@pytest.mark.parametrize("action", sorted(PLANS))
@pytest.mark.parametrize("succeeded", [True, False])
def test_every_plan_ends_in_a_stable_state_from_every_allowed_origin(action, succeeded):
    plan = plan_of(action)
    for origin in policy.POLICY[action].vm_states:
        for pre_resize in (None, V.ACTIVE, V.STOPPED):
            end = final_vm_state(plan, origin, pre_resize, succeeded)
            assert end in STABLE_VM_STATES, (action, origin, pre_resize, succeeded, end)


@pytest.mark.parametrize("action, origin, succeeded, expected", [
    (A.CREATE, V.BUILDING, True, V.ACTIVE),
    (A.CREATE, V.BUILDING, False, V.ERROR),
    (A.STOP, V.ACTIVE, True, V.STOPPED),
    (A.STOP, V.PAUSED, False, V.PAUSED),  # failure: back to the origin
    (A.START, V.STOPPED, True, V.ACTIVE),
    (A.PAUSE, V.ACTIVE, True, V.PAUSED),
    (A.SUSPEND, V.ACTIVE, True, V.SUSPENDED),
    (A.RESUME, V.SUSPENDED, True, V.ACTIVE),
    (A.REBOOT_SOFT, V.ACTIVE, False, V.ACTIVE),
    (A.REBOOT_HARD, V.STOPPED, True, V.ACTIVE),
    (A.REBOOT_HARD, V.ERROR, False, V.ERROR),
    (A.RESCUE, V.STOPPED, True, V.RESCUED),
    (A.UNRESCUE, V.RESCUED, True, V.ACTIVE),
    (A.RESIZE, V.STOPPED, True, V.RESIZED),
    (A.RESIZE, V.STOPPED, False, V.STOPPED),
    (A.REBUILD, V.STOPPED, True, V.ACTIVE),
    (A.REBUILD, V.ACTIVE, False, V.ERROR),
    (A.SNAPSHOT, V.PAUSED, True, V.PAUSED),  # a snapshot leaves the instance as it was
    (A.SNAPSHOT, V.SUSPENDED, False, V.SUSPENDED),
    (A.SET_PASSWORD, V.ACTIVE, True, V.ACTIVE),
    (A.DELETE, V.ACTIVE, True, V.DELETED),
    (A.DELETE, V.ACTIVE, False, V.ERROR),
])
def test_final_vm_state_rows(action, origin, succeeded, expected):
    assert final_vm_state(plan_of(action), origin, None, succeeded) == expected


@pytest.mark.parametrize("action", [A.CONFIRM_RESIZE, A.REVERT_RESIZE])
def test_confirm_and_revert_return_to_the_pre_resize_state(action):
    plan = plan_of(action)
    assert final_vm_state(plan, V.RESIZED, V.STOPPED, True) == V.STOPPED
    assert final_vm_state(plan, V.RESIZED, V.ACTIVE, True) == V.ACTIVE
    assert final_vm_state(plan, V.RESIZED, None, True) == V.ACTIVE
    assert final_vm_state(plan, V.RESIZED, V.STOPPED, False) == V.RESIZED


def test_pending_steps_are_bookkeeping_and_others_run_an_operation():
    for plan in PLANS.values():
        for step in plan.steps:
            if step.op is None:
                assert step.task_state.value.endswith("_pending") or step.task_state in (
                    T.SCHEDULING, T.RESIZE_PREP, T.REBOOT_PENDING_HARD), step
    assert plan_of(A.REBUILD).steps[-1].op == "spawn"


def test_expected_power_covers_the_resting_states_a_domain_runs_in():
    for vm in (V.ACTIVE, V.RESCUED, V.PAUSED, V.STOPPED, V.SUSPENDED):
        assert plans.EXPECTED_POWER[vm]
    assert V.BUILDING not in STABLE_VM_STATES


def test_a_waiting_operation_is_the_last_operation_of_its_plan():
    """The agent ends the task when the wait ends: no step may follow a wait."""
    from novalet.core.waits import WAITING_OPS

    for plan in PLANS.values():
        ops = [step.op for step in plan.steps if step.op]
        assert all(op not in WAITING_OPS for op in ops[:-1]), plan.action
    assert WAITING_OPS <= {step.op for plan in PLANS.values() for step in plan.steps}


def test_every_operation_the_plans_and_recovery_name_is_one_the_agent_runs():
    """An Op is an enum member the agent maps to a handler, not a string looked up by name."""
    from novalet.agent.operations import MigrationEndpoint, Operations
    from novalet.core.recovery import RULES
    from novalet.core.vocabulary import Op
    from novalet.core.waits import WAITING_OPS

    endpoint = MigrationEndpoint("test:///default")
    handled = set(Operations(object(), object(), "n", 1.0, migration=endpoint).handlers())
    named = {step.op for plan in PLANS.values() for step in plan.steps if step.op}
    migrating = {step.op for step in migration.STEPS.values() if step.op}
    assert migrating, "the migration table names its operations"
    assert named | migrating <= handled | WAITING_OPS
    assert not migrating & WAITING_OPS  # a migration step's actor runs its operation: no press and wait
    assert recovery_cleanups(RULES) <= handled
    assert handled | WAITING_OPS == set(Op)  # no handler without a name, no name without a handler
    assert not handled & WAITING_OPS  # a wait is pressed, never run in a thread


def recovery_cleanups(rules) -> set:
    """The cleanup operations the recovery table names, from each rule's answer to a few facts."""
    from datetime import UTC, datetime

    from novalet.api.models import CurrentTask
    from novalet.core.facts import MISSING, Facts

    now = datetime(2024, 1, 1, tzinfo=UTC)
    found = set()
    for state, rule in rules.items():
        for origin in (V.ACTIVE, V.STOPPED, V.RESIZED):
            task = CurrentTask(name="x", id="t", taskState=state, originVmState=origin, owner="n",
                               startedAt=now)
            for facts in (Facts(), Facts(power_state=PowerState.SHUTOFF), MISSING):
                cleanup = rule(task, facts).cleanup
                if cleanup is not None:
                    found.add(cleanup)
    assert found, "the snapshot rules name a cleanup"
    return found
