"""Status transitions: pure functions from one status to the next.

The agent computes each new status here and writes it with a compare-and-swap; nothing in
this module talks to Kubernetes or libvirt.
"""
from datetime import datetime, timedelta

from ..api.models import (
    ActionRecord,
    CurrentTask,
    Flavor,
    HandledAction,
    MigrationRecord,
    ResizeOrigin,
    VirtualInstanceStatus,
)
from . import backoff
from .backoff import BackoffPolicy
from .plans import EXPECTED_POWER, Plan, Step, final_vm_state
from .presentation import with_presentation
from .vocabulary import Action, PowerState, TaskState, VmState

A, V = Action, VmState
HISTORY_LIMIT = 20
DEFAULT_BACKOFF = BackoffPolicy()


def _copy(status: VirtualInstanceStatus, **changes) -> VirtualInstanceStatus:
    return status.model_copy(deep=True, update=changes)


def _record(status: VirtualInstanceStatus, record: ActionRecord) -> dict:
    history = [*status.history, record][-HISTORY_LIMIT:]
    return {"lastAction": record, "history": history}


def _handled(status: VirtualInstanceStatus, handled: bool, name: str, request_id: str, now: datetime) -> dict:
    """A spec.action request, once taken or refused, is recorded for good (never evicted)."""
    return {"handledAction": HandledAction(id=request_id, name=name, handledAt=now)} if handled else {}


def begin(status: VirtualInstanceStatus, plan: Plan, request_id: str, owner: str, now: datetime,
          power: PowerState | None, target_flavor: Flavor | None = None,
          target_image: str | None = None, *, handled: bool = False,
          requested_by: str | None = None) -> VirtualInstanceStatus:
    """Acknowledge a request: the first task state of its plan, with what undoing needs.
    `handled`: a spec.action request, recorded in handledAction from this first write on."""
    task = CurrentTask(
        name=plan.action.value, id=request_id, taskState=plan.steps[0].task_state,
        originVmState=status.vmState or V.BUILDING, originPowerState=power,
        originFlavor=status.flavor, originImage=status.image,
        targetFlavor=target_flavor, targetImage=target_image, requestedBy=requested_by, owner=owner,
        startedAt=now)
    vm = status.vmState or V.BUILDING
    return with_presentation(_copy(status, vmState=vm, taskState=task.taskState, currentTask=task,
                                   **_handled(status, handled, plan.action.value, request_id, now)), now)


def begin_migration(status: VirtualInstanceStatus, request_id: str, owner: str, now: datetime,
                    power: PowerState | None, record: MigrationRecord, first: TaskState, *,
                    requested_by: str | None = None, action: Action = Action.MIGRATE) -> VirtualInstanceStatus:
    """Acknowledge a Migrate (or Evacuate) request (core/migration.py): from this first write the
    task records both sides and the origin vm and power state a rollback returns to. A task the
    dead node left on record (Evacuate) goes into the history as failed first."""
    if status.currentTask is not None:
        left = status.currentTask
        status = _copy(status, **_record(status, ActionRecord(
            name=left.name, id=left.id, result="Failed", startedAt=left.startedAt, finishedAt=now,
            requestedBy=left.requestedBy, message=f"interrupted in {left.taskState.value}: node "
                                                  f"{record.sourceNode} died; superseded by {action.value}")))
    task = CurrentTask(name=action.value, id=request_id, taskState=first,
                       originVmState=status.vmState or V.BUILDING, originPowerState=power,
                       originFlavor=status.flavor, originImage=status.image, requestedBy=requested_by,
                       owner=owner, startedAt=now, migration=record)
    return with_presentation(_copy(status, taskState=first, currentTask=task,
                                   **_handled(status, True, action.value, request_id, now)), now)


def migration_step(status: VirtualInstanceStatus, task_state: TaskState, owner: str, now: datetime,
                   **record: object) -> VirtualInstanceStatus:
    """A Migrate task's next step, written by the actor of the last one; `record`: what the
    MigrationRecord gains (the target's URIs, a note of what went wrong)."""
    task = status.currentTask
    task = task.model_copy(update={"taskState": task_state, "owner": owner,
                                   "migration": task.migration.model_copy(update=record)})
    return with_presentation(_copy(status, taskState=task_state, currentTask=task), now)


def advance(status: VirtualInstanceStatus, step: Step, now: datetime, domain_id: int | None = None,
            escalated: bool | None = None, wait_s: float | None = None) -> VirtualInstanceStatus:
    """The task's next step. `wait_s`: the step's operation waits on the guest that long at most;
    its deadline is recorded with the step, so a restarted agent keeps it."""
    task = status.currentTask.model_copy(update={
        "taskState": step.task_state, "domainId": domain_id,
        "deadline": now + timedelta(seconds=wait_s) if wait_s is not None else None,
        **({"escalated": escalated} if escalated is not None else {})})
    return with_presentation(_copy(status, taskState=step.task_state, currentTask=task), now)


def _success_changes(status: VirtualInstanceStatus, task: CurrentTask) -> dict:
    action = Action(task.name)
    if action == A.CREATE:
        return {"flavor": task.targetFlavor, "image": task.targetImage or ""}
    if action == A.REBUILD:
        return {"image": task.targetImage or ""}
    if action == A.RESIZE:
        return {"flavor": task.targetFlavor, "revertedFlavor": None, "resizedFrom": ResizeOrigin(
            flavor=task.originFlavor, vmState=task.originVmState, powerState=task.originPowerState)}
    if action == A.CONFIRM_RESIZE:
        return {"resizedFrom": None}
    if action == A.REVERT_RESIZE:
        return {"flavor": status.resizedFrom.flavor, "revertedFlavor": status.flavor,
                "resizedFrom": None}
    return {}


def finish(status: VirtualInstanceStatus, plan: Plan | None, succeeded: bool, message: str, now: datetime,
           power: PowerState | None, vm_state: VmState | None = None,
           backoff_policy: BackoffPolicy = DEFAULT_BACKOFF) -> VirtualInstanceStatus:
    """End the current task: a stable vm state (the plan's, unless recovery names one; a task
    without a plan, a migration, always names one), the
    record in lastAction and history. A failed declarative step (not the spec.action request,
    which is answered once) backs off before it is tried again; a success ends the backoff."""
    task = status.currentTask
    one_shot = status.handledAction is not None and status.handledAction.id == task.id
    if not succeeded and not one_shot:
        retry = {"backoff": backoff.after_failure(status, task.id, message, now, backoff_policy)}
    elif succeeded and status.backoff:  # converged: an older failing step is not tried again
        retry = {"backoff": None}
    else:
        retry = {}
    pre_resize = status.resizedFrom.vmState if status.resizedFrom else None
    vm = vm_state or final_vm_state(plan, task.originVmState, pre_resize, succeeded)
    record = ActionRecord(name=task.name, id=task.id, message=message, startedAt=task.startedAt,
                          finishedAt=now, result="Succeeded" if succeeded else "Failed",
                          requestedBy=task.requestedBy)
    changes = _success_changes(status, task) if succeeded else {}
    return with_presentation(_copy(status, vmState=vm, taskState=None, currentTask=None,
                                   powerState=power, **changes, **retry, **_record(status, record)), now)


def settle(status: VirtualInstanceStatus, vm_state: VmState, name: str, request_id: str,
           result: str, message: str, now: datetime, power: PowerState | None,
           started: datetime | None = None, *, handled: bool = False, requested_by: str | None = None,
           **changes) -> VirtualInstanceStatus:
    """Record an outcome without a plan run: a reset-state, a lock, a recovered task.
    `changes`: other status fields the outcome sets (e.g. the lock)."""
    record = ActionRecord(name=name, id=request_id, result=result, message=message,
                          startedAt=started or now, finishedAt=now, requestedBy=requested_by)
    return with_presentation(_copy(status, vmState=vm_state, taskState=None, currentTask=None,
                                   powerState=power, **changes, **_record(status, record),
                                   **_handled(status, handled, name, request_id, now)), now)


def reject(status: VirtualInstanceStatus, name: str, request_id: str, message: str,
           now: datetime, *, handled: bool = False, requested_by: str | None = None) -> VirtualInstanceStatus:
    """A refused request is recorded and changes nothing else: it never blocks later ones."""
    record = ActionRecord(name=name, id=request_id, result="Rejected", message=message,
                          startedAt=now, finishedAt=now, requestedBy=requested_by)
    return with_presentation(_copy(status, **_record(status, record),
                                   **_handled(status, handled, name, request_id, now)), now)


def observe_power(status: VirtualInstanceStatus, power: PowerState | None, exists: bool,
                  now: datetime) -> VirtualInstanceStatus:
    """Drift: the guest changed power state on its own (never called while a task runs)."""
    vm = status.vmState
    if vm in EXPECTED_POWER and exists and power not in EXPECTED_POWER[vm]:
        if power == PowerState.RUNNING and vm == V.STOPPED:
            vm = V.ACTIVE
        elif power in EXPECTED_POWER[V.STOPPED] and vm in (V.ACTIVE, V.PAUSED, V.RESCUED):
            vm = V.STOPPED
        elif power == PowerState.PAUSED and vm == V.ACTIVE:
            vm = V.PAUSED
    return with_presentation(_copy(status, vmState=vm, powerState=power if exists else PowerState.NOSTATE), now)
