"""Admission policy: which actions each (vmState, taskState) allows.

Nova's `check_instance_state` (nova/compute/api.py) as a table. Delete and the admin
reset-state are always allowed. A task in flight refuses every other action, except that a
hard reboot supersedes a pending or running soft reboot, pause/unpause or suspend/resume:
no queue of operations builds up behind a task.
"""
from dataclasses import dataclass

from .vocabulary import Action, TaskState, VmState

V, T, A = VmState, TaskState, Action

ANY_VM = frozenset(VmState)
ANY_TASK = frozenset(TaskState) | {None}
NO_TASK: frozenset[TaskState | None] = frozenset({None})

# Task states a hard reboot may supersede (Nova's task_states.ALLOW_REBOOT).
HARD_REBOOT_SUPERSEDES: frozenset[TaskState | None] = frozenset({
    None, T.REBOOT_PENDING, T.REBOOT_STARTED, T.REBOOTING,
    T.PAUSING, T.UNPAUSING, T.SUSPENDING, T.RESUMING,
})


@dataclass(frozen=True)
class Allowed:
    vm_states: frozenset[VmState]
    task_states: frozenset[TaskState | None] = NO_TASK


def _vm(*states: VmState) -> frozenset[VmState]:
    return frozenset(states)


POLICY: dict[Action, Allowed] = {
    A.CREATE: Allowed(_vm(V.BUILDING)),
    A.START: Allowed(_vm(V.STOPPED)),
    A.STOP: Allowed(_vm(V.ACTIVE, V.PAUSED, V.SUSPENDED, V.RESCUED)),
    A.PAUSE: Allowed(_vm(V.ACTIVE)),
    A.UNPAUSE: Allowed(_vm(V.PAUSED)),
    A.SUSPEND: Allowed(_vm(V.ACTIVE)),
    A.RESUME: Allowed(_vm(V.SUSPENDED)),
    A.REBOOT_SOFT: Allowed(_vm(V.ACTIVE)),
    A.REBOOT_HARD: Allowed(_vm(V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED, V.ERROR), HARD_REBOOT_SUPERSEDES),
    A.RESCUE: Allowed(_vm(V.ACTIVE, V.STOPPED)),
    A.UNRESCUE: Allowed(_vm(V.RESCUED)),
    A.RESIZE: Allowed(_vm(V.ACTIVE, V.STOPPED)),
    A.CONFIRM_RESIZE: Allowed(_vm(V.RESIZED)),
    A.REVERT_RESIZE: Allowed(_vm(V.RESIZED)),
    A.REBUILD: Allowed(_vm(V.ACTIVE, V.STOPPED, V.ERROR)),
    A.SNAPSHOT: Allowed(_vm(V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED)),
    A.SET_PASSWORD: Allowed(_vm(V.ACTIVE)),
    # live: active or paused; cold: active or stopped (core/migration.py refuses the other kind)
    A.MIGRATE: Allowed(_vm(V.ACTIVE, V.PAUSED, V.STOPPED)),
    # its host is dead: whatever task it was in stays there (core/migration.py checks the host)
    A.EVACUATE: Allowed(ANY_VM - {V.DELETED, V.BUILDING}, ANY_TASK),
    A.DELETE: Allowed(ANY_VM, ANY_TASK),
    A.RESET_STATE: Allowed(ANY_VM, ANY_TASK),
    # Nova's lock/unlock: bookkeeping only, allowed in any state (who may is checked at admission)
    A.LOCK: Allowed(ANY_VM, ANY_TASK),
    A.UNLOCK: Allowed(ANY_VM, ANY_TASK),
}


def is_allowed(action: Action, vm_state: VmState, task_state: TaskState | None) -> bool:
    rule = POLICY[action]
    return vm_state in rule.vm_states and task_state in rule.task_states


def allowed_actions(vm_state: VmState, task_state: TaskState | None) -> list[Action]:
    return [a for a in Action if is_allowed(a, vm_state, task_state)]


def _describe(action: Action) -> str:
    return {A.REBOOT_SOFT: "reboot (soft)", A.REBOOT_HARD: "reboot (hard)"}.get(
        action, action.value)


def refusal(action: Action, vm_state: VmState, task_state: TaskState | None) -> str | None:
    """None when allowed, else a message a user can act on."""
    if is_allowed(action, vm_state, task_state):
        return None
    where = f"task_state is {task_state}" if task_state else f"vm_state is {vm_state}"
    options = ", ".join(_describe(a) for a in allowed_actions(vm_state, task_state)
                        if a not in (A.RESET_STATE, A.CREATE, A.LOCK, A.UNLOCK, A.MIGRATE, A.EVACUATE))
    return f"cannot {_describe(action)} while {where}; allowed: {options}"
