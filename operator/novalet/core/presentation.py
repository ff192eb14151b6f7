"""What a human reads: the phase word and the kstatus conditions derived from the state."""
from datetime import datetime

from ..api.models import Condition, VirtualInstanceStatus
from .conditions import condition, set_conditions
from .vocabulary import TaskState, VmState

V, T = VmState, TaskState

PHASE_OF_TASK = {
    "reboot": "Rebooting", "pausing": "Pausing", "unpausing": "Unpausing", "suspending": "Suspending",
    "resuming": "Resuming", "powering_off": "Stopping", "powering_on": "Starting",
    "rescuing": "Rescuing", "unrescuing": "Unrescuing", "resize": "Resizing", "rebuild": "Rebuilding",
    "image_": "Snapshotting", "updating_password": "UpdatingPassword", "deleting": "Deleting",
    "migrating": "Migrating",
}
PHASE_OF_VM = {
    V.BUILDING: "Building", V.ACTIVE: "Running", V.PAUSED: "Paused", V.SUSPENDED: "Suspended",
    V.STOPPED: "Stopped", V.RESCUED: "Rescued", V.RESIZED: "Resized", V.ERROR: "Error",
    V.DELETED: "Deleted",
}


def phase(status: VirtualInstanceStatus) -> str:
    if status.taskState:
        for prefix, word in PHASE_OF_TASK.items():
            if status.taskState.value.startswith(prefix):
                return word
        return "Building"
    return PHASE_OF_VM.get(status.vmState, "Pending")


def _condition(status: VirtualInstanceStatus, now: datetime, type_: str, value: bool, reason: str,
               message: str = "") -> Condition:
    return condition(status, type_, value, reason, message, now)


def with_presentation(status: VirtualInstanceStatus, now: datetime) -> VirtualInstanceStatus:
    """Set phase and the Ready/Reconciling/Stalled conditions; keep other conditions."""
    busy = status.taskState is not None
    failed = status.vmState == V.ERROR
    last = status.lastAction
    refused = bool(last and last.result in ("Rejected", "Failed"))
    retry = status.backoff if not busy else None
    ready = not busy and not failed and retry is None and status.vmState not in (None, V.BUILDING)
    if retry is not None:
        stalled = _condition(status, now, "Stalled", True, "Backoff", (
            f"{retry.request} failed {retry.failures} time{'s' * (retry.failures > 1)}: {retry.lastError}; "
            f"next retry at {retry.nextRetryAt.isoformat()} (or at once when the spec changes)"))
    else:
        stalled = _condition(status, now, "Stalled", failed, "Error" if failed else "None",
                             last.message if failed and last else "")
    ours = {
        "Ready": _condition(status, now, "Ready", ready, phase(status)),
        "Reconciling": _condition(status, now, "Reconciling", busy,
                                  status.taskState.value if busy else "Idle"),
        "Stalled": stalled,
    }
    if refused and not busy and not failed:
        ours["Ready"] = ours["Ready"].model_copy(update={"message": f"last action {last.result}: {last.message}"})
    return set_conditions(status, *ours.values()).model_copy(update={"phase": phase(status)})
