"""What the user wants next: the one request the agent should act on now.

Order: delete, then a new one-shot `spec.action`, then the build, then the declarative
fields (rescue, flavor, image, powerState), one step at a time toward the latest desire.
Nothing is queued: each call looks at the spec as it is now.
"""
from dataclasses import dataclass
from datetime import datetime

from ..api.models import VirtualInstanceSpec, VirtualInstanceStatus
from . import backoff
from .vocabulary import Action, VmState

A, V = Action, VmState


@dataclass(frozen=True)
class Request:
    action: Action
    id: str
    imperative: bool  # a one-shot spec.action (refusals recorded by id) vs a declarative step
    requested_by: str | None = None  # the apiserver-vouched requester of a spec.action


IMPERATIVE = {
    "Rebuild": A.REBUILD, "Snapshot": A.SNAPSHOT, "SetPassword": A.SET_PASSWORD,
    "ConfirmResize": A.CONFIRM_RESIZE, "RevertResize": A.REVERT_RESIZE, "ResetState": A.RESET_STATE,
    "Lock": A.LOCK, "Unlock": A.UNLOCK, "Migrate": A.MIGRATE, "Evacuate": A.EVACUATE,
}

# (desired powerState, vmState) -> the next step toward it.
POWER_STEPS: dict[tuple[str, VmState], Action] = {
    ("Running", V.STOPPED): A.START, ("Running", V.PAUSED): A.UNPAUSE,
    ("Running", V.SUSPENDED): A.RESUME,
    ("Stopped", V.ACTIVE): A.STOP, ("Stopped", V.PAUSED): A.STOP, ("Stopped", V.SUSPENDED): A.STOP,
    ("Paused", V.ACTIVE): A.PAUSE, ("Paused", V.STOPPED): A.START, ("Paused", V.SUSPENDED): A.RESUME,
    ("Suspended", V.ACTIVE): A.SUSPEND, ("Suspended", V.STOPPED): A.START,
    ("Suspended", V.PAUSED): A.UNPAUSE,
}


def imperative_action(spec: VirtualInstanceSpec) -> Action | None:
    if spec.action is None:
        return None
    if spec.action.name == "Reboot":
        return A.REBOOT_HARD if spec.action.type == "Hard" else A.REBOOT_SOFT
    return IMPERATIVE[spec.action.name]


def seen_ids(status: VirtualInstanceStatus) -> set[str]:
    """Ids of requests already taken. `handledAction` is never evicted, so the request in the
    spec stays done however many actions follow; the history covers objects written before it."""
    ids = {record.id for record in status.history}
    if status.handledAction:
        ids.add(status.handledAction.id)
    if status.lastAction:
        ids.add(status.lastAction.id)
    if status.currentTask:
        ids.add(status.currentTask.id)
    return ids


def declarative_action(spec: VirtualInstanceSpec, status: VirtualInstanceStatus) -> Action | None:
    vm = status.vmState
    if vm in (None, V.BUILDING):
        return A.CREATE
    if vm == V.RESCUED:
        return None if spec.rescue else A.UNRESCUE
    if vm in (V.ERROR, V.RESIZED, V.DELETED):
        return A.REBUILD if vm == V.ERROR and spec.image != (status.image or "") else None
    if spec.rescue:
        return A.RESCUE if vm in (V.ACTIVE, V.STOPPED) else POWER_STEPS.get(("Running", vm))
    power_step = POWER_STEPS.get((spec.powerState, vm))
    for wanted, action in ((_wants_resize(spec, status), A.RESIZE), (_wants_rebuild(spec, status), A.REBUILD)):
        if wanted:
            # From paused/suspended, step toward the power desire first; if that leads
            # nowhere, return the action anyway so the policy's refusal is recorded.
            return action if vm in (V.ACTIVE, V.STOPPED) or power_step is None else power_step
    return power_step


def _wants_resize(spec: VirtualInstanceSpec, status: VirtualInstanceStatus) -> bool:
    return bool(status.flavor) and spec.flavor != status.flavor and spec.flavor != status.revertedFlavor


def _wants_rebuild(spec: VirtualInstanceSpec, status: VirtualInstanceStatus) -> bool:
    return spec.image != (status.image or "")


def next_request(spec: VirtualInstanceSpec, status: VirtualInstanceStatus, generation: int,
                 deleting: bool, now: datetime | None = None) -> Request | None:
    """A declarative step refused for this generation waits for a spec change; one that
    failed is tried again once its backoff (core/backoff.py) has passed at `now` (never, when
    no `now` is given)."""
    def waits(request_id: str) -> bool:
        return now is None or backoff.waiting(status, request_id, now) is not None

    if deleting:
        request = Request(A.DELETE, f"delete-g{generation}", imperative=False)
        last = status.lastAction
        failed = last and last.id == request.id and last.result == "Failed"
        return None if failed and waits(request.id) else request
    action = imperative_action(spec)
    if action is not None and spec.action.id not in seen_ids(status):
        return Request(action, spec.action.id, imperative=True, requested_by=spec.action.requestedBy)
    action = declarative_action(spec, status)
    if action is None:
        return None
    request_id = f"spec-g{generation}-{action.value.lower()}"
    last = status.lastAction
    if last and last.id == request_id and (last.result == "Rejected" or
                                           (last.result == "Failed" and waits(request_id))):
        return None
    return Request(action, request_id, imperative=False)


def supersedes_running_task(spec: VirtualInstanceSpec, status: VirtualInstanceStatus) -> str | None:
    """The id of a new hard reboot that supersedes the soft reboot now running, if any."""
    task = status.currentTask
    if task is None or task.name != A.REBOOT_SOFT.value or task.escalated:
        return None
    if imperative_action(spec) == A.REBOOT_HARD and spec.action.id not in seen_ids(status):
        return spec.action.id
    return None


def preempts_running_task(spec: VirtualInstanceSpec, status: VirtualInstanceStatus, deleting: bool) -> str | None:
    """Delete and the admin reset-state never wait behind the task on record (Nova allows both
    in every task state): a hung hypervisor call must not hold them. Returns what preempts."""
    task = status.currentTask
    if task is None or task.name == A.MIGRATE.value:
        # a migration is two agents' steps in turn, each bounded: ending it midway could leave a
        # guest on both hosts, or none; delete and reset-state wait for its end (core/migration.py)
        return None
    if deleting:
        return None if task.name == A.DELETE.value else "delete"
    if imperative_action(spec) == A.RESET_STATE and spec.action.id not in seen_ids(status):
        return f"reset-state {spec.action.id}"
    return None
