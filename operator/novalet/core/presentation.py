"""What a human reads: the phase word and the kstatus conditions derived from the state."""
from datetime import datetime

from ..api.models import Condition, VirtualInstanceSpec, VirtualInstanceStatus
from .catalog import downloading
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
    if downloading(status):
        return False, "WaitingForImage", downloading(status)
    scheduled = find(status, "Scheduled")
    if status.node is None and scheduled is not None and scheduled.status == "False":
        return False, scheduled.reason, scheduled.message
    if vm == V.ERROR:
        return False, "Error", last.message if last else ""
    if power == PowerState.NOSTATE and vm in EXPECTED_POWER:  # before a backoff: retrying will not bring it back
        return False, "DomainMissing", "libvirt has no domain for this instance"
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


# Ready=False reasons the agent cannot resolve by itself: kstatus reads them as Stalled (Failed)
NEEDS_A_PERSON = {"DomainMissing": "the domain vanished out of band: rebuild, reset-state or delete the instance"}


def stalled(status: VirtualInstanceStatus, spec: VirtualInstanceSpec | None) -> tuple[bool, str, str]:
    """Stalled (kstatus: no progress without someone's intervention), its reason and message:
    an error, a failing step's backoff, a spec change refused for good, a vanished domain."""
    if status.taskState is not None:
        return False, "None", ""
    last, retry = status.lastAction, status.backoff
    _, reason, message = readiness(status, spec)
    if reason in NEEDS_A_PERSON:  # whatever a step's backoff says: only a person brings the domain back
        return True, reason, f"{message}: {NEEDS_A_PERSON[reason]}"
    if retry is not None:
        return True, "Backoff", (
            f"{retry.request} failed {retry.failures} time{'s' * (retry.failures > 1)}: {retry.lastError}; "
            f"next retry at {retry.nextRetryAt.isoformat()} (or at once when the spec changes)")
    if status.vmState == V.ERROR:
        return True, "Error", last.message if last else ""
    if reason == "SpecNotMet" and last and last.result == "Rejected" and last.id.startswith("spec-g"):
        return True, "SpecRejected", f"{message}; change the spec to ask for something else"
    return False, "None", ""


def with_presentation(status: VirtualInstanceStatus, now: datetime, spec: VirtualInstanceSpec | None = None,
                      generation: int | None = None) -> VirtualInstanceStatus:
    """Set phase and the Ready/Reconciling/Stalled conditions (with the generation they speak
    of, when given); keep other conditions."""
    busy = status.taskState is not None
    fetching = downloading(status)
    is_stalled, stalled_reason, stalled_message = stalled(status, spec)
    ready, reason, message = readiness(status, spec)
    task = status.currentTask
    ours = {
        "Ready": _condition(status, now, "Ready", ready, reason, message, generation),
        "Reconciling": _condition(status, now, "Reconciling", busy or bool(fetching),
                                  status.taskState.value if busy else "WaitingForImage" if fetching else "Idle",
                                  f"{task.name} in {status.taskState.value}" if busy and task else fetching or "",
                                  generation),
        "Stalled": _condition(status, now, "Stalled", is_stalled, stalled_reason, stalled_message, generation),
    }
    return set_conditions(status, *ours.values()).model_copy(update={"phase": phase(status)})
