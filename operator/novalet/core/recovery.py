"""The recovery table (DESIGN.md section 2): what an agent does, when it starts, with an
instance it finds mid-task. A pure function of the recorded task and libvirt's live facts.

Every task state has a rule; none is left for an admin to reset. A migration's task states have
theirs in core/migration.py (two agents take part: each reads its own side).
"""
from dataclasses import dataclass
from typing import Literal

from ..api.models import CurrentTask
from .facts import Facts
from .plans import EXPECTED_POWER, task_owner
from .vocabulary import Action, Op, PowerState, TaskState, VmState

T, V, P, A = TaskState, VmState, PowerState, Action


Kind = Literal["redo", "finish", "abandon", "revert", "error"]


@dataclass(frozen=True)
class Recovery:
    kind: Kind
    action: Action
    from_step: int = 0            # redo: the plan step to continue from
    vm_state: VmState | None = None  # finish / abandon / error: where the instance rests
    message: str = ""
    hard: bool = False            # redo a soft reboot as a hard one
    cleanup: Op | None = None     # an operation that removes leftovers (partial snapshot)


# The operations whose recovery reads the journal (`issued`): only a soft reboot leaves no other
# trace (the same QEMU process, the same domain id). Journaling any other operation would only
# add a call that needs the domain's job lock, which a hung monitor holds (a delete must not
# wait on it).
JOURNALED_OPS = frozenset({Op.REBOOT_SOFT})


def _step_issued(task: CurrentTask, facts: Facts) -> bool:
    plan, index = task_owner(task.taskState)
    op = plan.steps[index].op
    return op is not None and facts.issued == f"{task.id}:{op}"


def _power_reached(target: VmState, facts: Facts, want_config: str = "normal") -> bool:
    return (facts.exists and facts.power_state in EXPECTED_POWER[target]
            and facts.config == want_config)


def _build(task: CurrentTask, facts: Facts) -> Recovery:
    _, index = task_owner(task.taskState)
    if task.taskState != T.SPAWNING:
        return Recovery("redo", A.CREATE, from_step=index)
    if facts.exists and facts.power_state == P.RUNNING:
        return Recovery("finish", A.CREATE, vm_state=V.ACTIVE)
    if facts.exists and facts.power_state in (P.SHUTOFF, P.SHUTDOWN, None, P.NOSTATE):
        return Recovery("redo", A.CREATE, from_step=index, message="started once more")
    if not facts.exists:
        return Recovery("redo", A.CREATE, from_step=index - 1, message="domain missing: build redone")
    return Recovery("error", A.CREATE, vm_state=V.ERROR,
                    message=f"spawn interrupted; domain is {facts.power_state}")


def _rebooted(task: CurrentTask, facts: Facts) -> bool:
    """Did the reboot on record already happen? A soft one journals itself in the live domain;
    a hard one starts a new QEMU process, so the domain id differs from the one recorded when
    the step began."""
    if task.taskState not in (T.REBOOT_STARTED, T.REBOOT_STARTED_HARD) or facts.power_state != P.RUNNING:
        return False
    if task.taskState == T.REBOOT_STARTED_HARD:
        return facts.domain_id is not None and facts.domain_id != task.domainId
    return _step_issued(task, facts)


def _reboot(task: CurrentTask, facts: Facts) -> Recovery:
    hard = task.taskState in (T.REBOOT_PENDING_HARD, T.REBOOT_STARTED_HARD, T.REBOOTING_HARD)
    action = A.REBOOT_HARD if hard or task.escalated else A.REBOOT_SOFT
    if _rebooted(task, facts):
        return Recovery("finish", action, vm_state=V.ACTIVE, message="the reboot had happened")
    guest_up = facts.exists and facts.power_state == P.RUNNING
    redo_hard = hard or not guest_up
    step = 1 if task.taskState in (T.REBOOT_STARTED, T.REBOOT_STARTED_HARD) else 0
    return Recovery("redo", A.REBOOT_HARD if redo_hard else A.REBOOT_SOFT, from_step=step,
                    hard=redo_hard and not hard)


POWER_TARGETS = {
    T.PAUSING: (A.PAUSE, V.PAUSED), T.UNPAUSING: (A.UNPAUSE, V.ACTIVE),
    T.SUSPENDING: (A.SUSPEND, V.SUSPENDED), T.RESUMING: (A.RESUME, V.ACTIVE),
    T.POWERING_OFF: (A.STOP, V.STOPPED), T.POWERING_ON: (A.START, V.ACTIVE),
}


def _power(task: CurrentTask, facts: Facts) -> Recovery:
    action, target = POWER_TARGETS[task.taskState]
    if _power_reached(target, facts, "normal") and (target != V.SUSPENDED or facts.has_managed_save):
        return Recovery("finish", action, vm_state=target)
    return Recovery("redo", action)


def _rescue(task: CurrentTask, facts: Facts) -> Recovery:
    rescuing = task.taskState == T.RESCUING
    action, target, config = ((A.RESCUE, V.RESCUED, "rescue") if rescuing
                              else (A.UNRESCUE, V.ACTIVE, "normal"))
    if _power_reached(target, facts, config):
        return Recovery("finish", action, vm_state=target)
    return Recovery("redo", action)


def _resize(task: CurrentTask, facts: Facts) -> Recovery:
    if task.taskState == T.RESIZE_PREP:
        return Recovery("abandon", A.RESIZE, vm_state=task.originVmState,
                        message="interrupted before any change; the resize is retried from spec")
    return Recovery("revert", A.RESIZE, vm_state=task.originVmState,
                    message="interrupted mid-resize: reverted to the origin flavor")


RULES = {
    **{t: _build for t in (T.SCHEDULING, T.NETWORKING, T.BLOCK_DEVICE_MAPPING, T.SPAWNING)},
    **{t: _reboot for t in (T.REBOOT_PENDING, T.REBOOT_STARTED, T.REBOOTING, T.REBOOT_PENDING_HARD,
                            T.REBOOT_STARTED_HARD, T.REBOOTING_HARD)},
    **{t: _power for t in POWER_TARGETS},
    T.RESCUING: _rescue, T.UNRESCUING: _rescue,
    **{t: _resize for t in (T.RESIZE_PREP, T.RESIZE_MIGRATING, T.RESIZE_MIGRATED, T.RESIZE_FINISH)},
    T.RESIZE_CONFIRMING: lambda task, facts: Recovery("redo", A.CONFIRM_RESIZE),
    T.RESIZE_REVERTING: lambda task, facts: Recovery("redo", A.REVERT_RESIZE),
    **{t: (lambda task, facts: Recovery("redo", A.REBUILD))
       for t in (T.REBUILDING, T.REBUILD_BLOCK_DEVICE_MAPPING, T.REBUILD_SPAWNING)},
    **{t: (lambda task, facts: Recovery(
        "abandon", A.SNAPSHOT, vm_state=task.originVmState, message="interrupted",
        cleanup=Op.REMOVE_PARTIAL_SNAPSHOT))
       for t in (T.IMAGE_SNAPSHOT_PENDING, T.IMAGE_SNAPSHOT, T.IMAGE_UPLOADING)},
    T.UPDATING_PASSWORD: lambda task, facts: Recovery(
        "abandon", A.SET_PASSWORD, vm_state=task.originVmState, message="interrupted; request again"),
    T.DELETING: lambda task, facts: Recovery("redo", A.DELETE),
}


# A task recovered this many times (each agent restart mid-task counts) goes to error instead
# of looping: a spawn that crashes the agent every time must not retry forever.
MAX_ATTEMPTS = 5


def recover(task: CurrentTask, facts: Facts) -> Recovery:
    rule = RULES[task.taskState](task, facts)
    if rule.kind == "redo" and task.attempt >= MAX_ATTEMPTS:
        return Recovery("error", rule.action, vm_state=V.ERROR,
                        message=f"gave up after {task.attempt} attempts at {task.taskState.value}")
    return rule


