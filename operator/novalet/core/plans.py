"""Action plans: the task states an action passes through and the stable state it ends in.

Each step names the hypervisor operation the agent runs while the instance shows that task
state (None: bookkeeping only, e.g. the `*_pending` acknowledgement). The agent writes each
step's task state with a compare-and-swap before running its operation, so a crash always
leaves the last step that may have started on record for the recovery table.
"""
from dataclasses import dataclass

from .vocabulary import Action, PowerState, TaskState, VmState

A, T, V = Action, TaskState, VmState


@dataclass(frozen=True)
class Step:
    task_state: TaskState
    op: str | None = None


@dataclass(frozen=True)
class Plan:
    action: Action
    steps: tuple[Step, ...]
    on_success: VmState | None  # None: the origin vm state (the action leaves it as it was)
    on_failure: VmState | None  # None: revert to the origin vm state


# A resize ends in `resized` and remembers where it came from; confirm and revert end there.
PRE_RESIZE = None


def _plan(action: Action, steps: list[tuple[TaskState, str | None]],
          on_success: VmState | None, on_failure: VmState | None = None) -> Plan:
    return Plan(action, tuple(Step(t, op) for t, op in steps), on_success, on_failure)


PLANS: dict[Action, Plan] = {p.action: p for p in [
    _plan(A.CREATE, [(T.SCHEDULING, None), (T.NETWORKING, "plug_network"),
                     (T.BLOCK_DEVICE_MAPPING, "prepare_disks"), (T.SPAWNING, "spawn")],
          V.ACTIVE, V.ERROR),
    _plan(A.START, [(T.POWERING_ON, "start")], V.ACTIVE),
    _plan(A.STOP, [(T.POWERING_OFF, "stop")], V.STOPPED),
    _plan(A.PAUSE, [(T.PAUSING, "pause")], V.PAUSED),
    _plan(A.UNPAUSE, [(T.UNPAUSING, "unpause")], V.ACTIVE),
    _plan(A.SUSPEND, [(T.SUSPENDING, "suspend")], V.SUSPENDED),
    _plan(A.RESUME, [(T.RESUMING, "resume")], V.ACTIVE),
    _plan(A.REBOOT_SOFT, [(T.REBOOT_PENDING, None), (T.REBOOT_STARTED, "reboot_soft")], V.ACTIVE),
    _plan(A.REBOOT_HARD, [(T.REBOOT_PENDING_HARD, None), (T.REBOOT_STARTED_HARD, "reboot_hard")],
          V.ACTIVE),
    _plan(A.RESCUE, [(T.RESCUING, "rescue")], V.RESCUED),
    _plan(A.UNRESCUE, [(T.UNRESCUING, "unrescue")], V.ACTIVE),
    _plan(A.RESIZE, [(T.RESIZE_PREP, None), (T.RESIZE_MIGRATING, "resize_power_off"),
                     (T.RESIZE_MIGRATED, "resize_apply_flavor"), (T.RESIZE_FINISH, "resize_finish")],
          V.RESIZED),
    _plan(A.CONFIRM_RESIZE, [(T.RESIZE_CONFIRMING, "confirm_resize")], PRE_RESIZE),
    _plan(A.REVERT_RESIZE, [(T.RESIZE_REVERTING, "revert_resize")], PRE_RESIZE),
    _plan(A.REBUILD, [(T.REBUILDING, "rebuild_teardown"),
                      (T.REBUILD_BLOCK_DEVICE_MAPPING, "rebuild_disks"),
                      (T.REBUILD_SPAWNING, "spawn")], V.ACTIVE, V.ERROR),
    _plan(A.SNAPSHOT, [(T.IMAGE_SNAPSHOT_PENDING, None), (T.IMAGE_SNAPSHOT, "snapshot")], None),
    _plan(A.SET_PASSWORD, [(T.UPDATING_PASSWORD, "set_password")], None),
    _plan(A.DELETE, [(T.DELETING, "delete")], V.DELETED, V.ERROR),
]}

# A soft reboot the guest ignores escalates to this step (Nova does the same).
ESCALATE_TO_HARD = Step(T.REBOOT_STARTED_HARD, "reboot_hard")

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


def plan_of(action: Action) -> Plan:
    return PLANS[action]


def task_owner(task_state: TaskState) -> tuple[Plan, int]:
    """The plan and step index a task state belongs to. Nova's API-side states that no plan
    writes (rebooting, rebooting_hard, image_uploading, migrating) raise KeyError; the
    recovery table still has a rule for each."""
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
