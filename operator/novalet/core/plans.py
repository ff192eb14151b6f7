"""Action plans: the task states an action passes through and the stable state it ends in.

Each step names the hypervisor operation the agent runs while the instance shows that task
state (None: bookkeeping only, e.g. the `*_pending` acknowledgement). The agent writes each
step's task state with a compare-and-swap before running its operation, so a crash always
leaves the last step that may have started on record for the recovery table.
"""
from dataclasses import dataclass

from .vocabulary import Action, Op, PowerState, TaskState, VmState

A, T, V = Action, TaskState, VmState


@dataclass(frozen=True)
class Step:
    task_state: TaskState
    op: Op | None = None


@dataclass(frozen=True)
class Plan:
    action: Action
    steps: tuple[Step, ...]
    on_success: VmState | None  # None: the origin vm state (the action leaves it as it was)
    on_failure: VmState | None  # None: revert to the origin vm state


# A resize ends in `resized` and remembers where it came from; confirm and revert end there.
PRE_RESIZE = None


def _plan(action: Action, steps: list[tuple[TaskState, Op | None]],
          on_success: VmState | None, on_failure: VmState | None = None) -> Plan:
    return Plan(action, tuple(Step(t, op) for t, op in steps), on_success, on_failure)


PLANS: dict[Action, Plan] = {p.action: p for p in [
    _plan(A.CREATE, [(T.SCHEDULING, None), (T.NETWORKING, Op.PLUG_NETWORK),
                     (T.BLOCK_DEVICE_MAPPING, Op.PREPARE_DISKS), (T.SPAWNING, Op.SPAWN)],
          V.ACTIVE, V.ERROR),
    _plan(A.START, [(T.POWERING_ON, Op.START)], V.ACTIVE),
    _plan(A.STOP, [(T.POWERING_OFF, Op.STOP)], V.STOPPED),
    _plan(A.PAUSE, [(T.PAUSING, Op.PAUSE)], V.PAUSED),
    _plan(A.UNPAUSE, [(T.UNPAUSING, Op.UNPAUSE)], V.ACTIVE),
    _plan(A.SUSPEND, [(T.SUSPENDING, Op.SUSPEND)], V.SUSPENDED),
    _plan(A.RESUME, [(T.RESUMING, Op.RESUME)], V.ACTIVE),
    _plan(A.REBOOT_SOFT, [(T.REBOOT_PENDING, None), (T.REBOOT_STARTED, Op.REBOOT_SOFT)], V.ACTIVE),
    _plan(A.REBOOT_HARD, [(T.REBOOT_PENDING_HARD, None), (T.REBOOT_STARTED_HARD, Op.REBOOT_HARD)],
          V.ACTIVE),
    _plan(A.RESCUE, [(T.RESCUING, Op.RESCUE)], V.RESCUED),
    _plan(A.UNRESCUE, [(T.UNRESCUING, Op.UNRESCUE)], V.ACTIVE),
    _plan(A.RESIZE, [(T.RESIZE_PREP, None), (T.RESIZE_MIGRATING, Op.RESIZE_POWER_OFF),
                     (T.RESIZE_MIGRATED, Op.RESIZE_APPLY_FLAVOR), (T.RESIZE_FINISH, Op.RESIZE_FINISH)],
          V.RESIZED),
    _plan(A.CONFIRM_RESIZE, [(T.RESIZE_CONFIRMING, Op.CONFIRM_RESIZE)], PRE_RESIZE),
    _plan(A.REVERT_RESIZE, [(T.RESIZE_REVERTING, Op.REVERT_RESIZE)], PRE_RESIZE),
    _plan(A.REBUILD, [(T.REBUILDING, Op.REBUILD_TEARDOWN),
                      (T.REBUILD_BLOCK_DEVICE_MAPPING, Op.REBUILD_DISKS),
                      (T.REBUILD_SPAWNING, Op.SPAWN)], V.ACTIVE, V.ERROR),
    _plan(A.SNAPSHOT, [(T.IMAGE_SNAPSHOT_PENDING, None), (T.IMAGE_SNAPSHOT, Op.SNAPSHOT)], None),
    _plan(A.SET_PASSWORD, [(T.UPDATING_PASSWORD, Op.SET_PASSWORD)], None),
    _plan(A.DELETE, [(T.DELETING, Op.DELETE)], V.DELETED, V.ERROR),
]}

# A soft reboot the guest ignores escalates to this step (Nova does the same).
ESCALATE_TO_HARD = Step(T.REBOOT_STARTED_HARD, Op.REBOOT_HARD)

# The power state libvirt shows when an instance rests in a vm state.
EXPECTED_POWER: dict[VmState, frozenset[PowerState]] = {
    V.ACTIVE: frozenset({PowerState.RUNNING}),
    V.RESCUED: frozenset({PowerState.RUNNING}),
    V.PAUSED: frozenset({PowerState.PAUSED}),
    V.STOPPED: frozenset({PowerState.SHUTOFF, PowerState.SHUTDOWN, PowerState.CRASHED}),
    V.SUSPENDED: frozenset({PowerState.SHUTOFF}),  # managed save: off, with a saved image
    # an unconfirmed resize keeps the power state the instance had before it
    V.RESIZED: frozenset({PowerState.RUNNING, PowerState.SHUTOFF, PowerState.SHUTDOWN, PowerState.CRASHED}),
}

STABLE_VM_STATES = frozenset(VmState) - {V.BUILDING}

# Actions that only record something in status: no plan, no task state, no hypervisor call.
BOOKKEEPING = frozenset({A.RESET_STATE, A.LOCK, A.UNLOCK})
# Actions carried out by two agents (and the scheduler) in turn: their steps and recovery are
# core/migration.py's table, not a plan one agent runs.
COORDINATED = frozenset({A.MIGRATE, A.EVACUATE})


def plan_of(action: Action) -> Plan:
    return PLANS[action]


def task_owner(task_state: TaskState) -> tuple[Plan, int]:
    """The plan and step index a task state belongs to. Nova's API-side states that no plan
    writes (rebooting, rebooting_hard, image_uploading) raise KeyError (the recovery table
    still has a rule for each), and so do a migration's (core/migration.py)."""
    for plan in PLANS.values():
        for index, step in enumerate(plan.steps):
            if step.task_state == task_state:
                return plan, index
    raise KeyError(task_state)


def final_vm_state(plan: Plan, origin: VmState, pre_resize: VmState | None, succeeded: bool) -> VmState:
    target = plan.on_success if succeeded else plan.on_failure
    if target is not None:
        return target
    if plan.action in (A.CONFIRM_RESIZE, A.REVERT_RESIZE) and succeeded:
        return pre_resize or V.ACTIVE
    return origin
