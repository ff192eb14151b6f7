"""What a human reads: the phase word and the kstatus conditions derived from the state."""
from datetime import datetime

from ..api.models import Condition, VirtualInstanceSpec, VirtualInstanceStatus
from .conditions import condition, find, set_conditions
from .desire import declarative_action
from .plans import EXPECTED_POWER
from .vocabulary import PowerState, TaskState, VmState

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
               message: str = "", generation: int | None = None) -> Condition:
    return condition(status, type_, value, reason, message, now).model_copy(
        update={"observedGeneration": generation})


def readiness(status: VirtualInstanceStatus, spec: VirtualInstanceSpec | None = None) -> tuple[bool, str, str]:
    """Ready, its reason and message (kstatus: True only when the spec is met and nothing is
    in flight). The first rule that holds decides; `spec` None leaves out the spec-met check
    (the writes that do not know the spec: the agent's own writes add it)."""
    last, vm, power = status.lastAction, status.vmState, status.powerState
    agent = find(status, "HostAgentReady")
    wanted = declarative_action(spec, status) if spec is not None else None
    refused = bool(last and last.result in ("Rejected", "Failed"))
    if status.taskState:
        return False, phase(status), f"{status.currentTask.name} in {status.taskState.value}" if status.currentTask else ""
    if vm == V.ERROR:
        return False, "Error", last.message if last else ""
    if status.backoff is not None:
        return False, "Backoff", f"{status.backoff.request} failed: {status.backoff.lastError}"
    if vm in (None, V.BUILDING, V.DELETED):
        return False, phase(status), ""
    if agent is not None and agent.status == "False":
        return False, "HostAgentUnavailable", agent.message
    if vm == V.RESIZED:
        return False, "ResizeNotConfirmed", "resized: confirm it (ConfirmResize) or revert it (RevertResize)"
    if power is not None and vm in EXPECTED_POWER and power not in EXPECTED_POWER[vm]:
        if power == PowerState.NOSTATE:
            return False, "DomainMissing", "libvirt has no domain for this instance"
        return False, "PowerStateMismatch", f"libvirt reports {power.value}, {vm.value} expects otherwise"
    if wanted is not None:
        said = f": last action {last.result}: {last.message}" if refused and last.id.startswith("spec-g") else ""
        return False, "SpecNotMet", f"the spec asks for {wanted.value}{said}"
    return True, phase(status), f"last action {last.result}: {last.message}" if refused else ""


def with_presentation(status: VirtualInstanceStatus, now: datetime, spec: VirtualInstanceSpec | None = None,
                      generation: int | None = None) -> VirtualInstanceStatus:
    """Set phase and the Ready/Reconciling/Stalled conditions (with the generation they speak
    of, when given); keep other conditions."""
    busy = status.taskState is not None
    failed = status.vmState == V.ERROR
    last = status.lastAction
    retry = status.backoff if not busy else None
    if retry is not None:
        stalled = _condition(status, now, "Stalled", True, "Backoff", (
            f"{retry.request} failed {retry.failures} time{'s' * (retry.failures > 1)}: {retry.lastError}; "
            f"next retry at {retry.nextRetryAt.isoformat()} (or at once when the spec changes)"), generation)
    else:
        stalled = _condition(status, now, "Stalled", failed, "Error" if failed else "None",
                             last.message if failed and last else "", generation)
    ready, reason, message = readiness(status, spec)
    ours = {
        "Ready": _condition(status, now, "Ready", ready, reason, message, generation),
        "Reconciling": _condition(status, now, "Reconciling", busy,
                                  status.taskState.value if busy else "Idle", "", generation),
        "Stalled": stalled,
    }
    return set_conditions(status, *ours.values()).model_copy(update={"phase": phase(status)})
