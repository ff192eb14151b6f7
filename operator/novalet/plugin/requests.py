"""The plugin's pure part: what each verb writes, when its request is over and how it ended.

A verb writes exactly what a GitOps user would commit: a declarative field of the spec
(`stop` is `spec.powerState: Stopped`) or a one-shot `spec.action` with a fresh id. It is over
when the agent's status says so: the action's record (by id) for a one-shot request; for a
declarative change, the spec's generation observed with no task in flight and either the field
met or a refusal recorded for that generation (DESIGN.md sections 1 and 2).
"""
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ..api.models import ActionRecord, Flavor, VirtualInstance, VirtualInstanceStatus
from ..core.desire import declarative_action, seen_ids
from ..core.presentation import readiness, stalled
from ..core.vocabulary import VmState

V = VmState

# declarative verbs: the spec field each one sets
POWER = {"start": "Running", "stop": "Stopped", "pause": "Paused", "unpause": "Running",
         "suspend": "Suspended", "resume": "Running"}
# Nova's preconditions, checked on what the spec asked for before: `resume` only undoes `suspend`
POWER_FROM = {"start": "Stopped", "unpause": "Paused", "resume": "Suspended"}
VM_OF_POWER = {"Running": V.ACTIVE, "Stopped": V.STOPPED, "Paused": V.PAUSED, "Suspended": V.SUSPENDED}
# one-shot verbs: the spec.action name each one writes
ONE_SHOT = {"reboot": "Reboot", "rebuild": "Rebuild", "snapshot": "Snapshot", "set-password": "SetPassword",
            "confirm-resize": "ConfirmResize", "revert-resize": "RevertResize", "lock": "Lock",
            "unlock": "Unlock", "reset-state": "ResetState", "migrate": "Migrate", "evacuate": "Evacuate"}

Result = Literal["Succeeded", "Failed", "Rejected"]


class Refused(Exception):
    """The request is not written: the message says why."""


@dataclass(frozen=True)
class Ask:
    """What a verb writes: fields merged into the spec, or a new spec.action (replaced whole)."""

    verb: str
    spec: dict[str, Any] | None = None
    action: dict[str, Any] | None = None


@dataclass(frozen=True)
class Ticket:
    """What the waiter waits for: the action's record, or the declarative change's generation."""

    verb: str
    generation: int
    action_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    result: Result
    message: str

    @property
    def ok(self) -> bool:
        return self.result == "Succeeded"


def new_action_id(verb: str, now: datetime, token: str) -> str:
    """A fresh id (spec.action.id: letters, digits, '.', '_', '-'; at most 63)."""
    return f"{verb}-{now:%Y%m%d-%H%M%S}-{token}"


def ask(verb: str, options: dict[str, Any], inst: VirtualInstance, action_id: str) -> Ask:
    """The write for `verb` on `inst` as it is now; Refused when it cannot be asked."""
    spec = inst.spec
    if verb in POWER:
        if verb in POWER_FROM and spec.powerState not in (POWER_FROM[verb], POWER[verb]):
            raise Refused(f"{verb} applies to a {POWER_FROM[verb].lower()} instance; "
                          f"spec.powerState is {spec.powerState}")
        return Ask(verb, spec={"powerState": POWER[verb]})
    if verb in ("rescue", "unrescue"):
        return Ask(verb, spec={"rescue": verb == "rescue"})
    if verb == "resize":
        flavor = Flavor(vcpus=options.get("vcpus") or spec.flavor.vcpus,
                        memoryMiB=options.get("memory_mib") or spec.flavor.memoryMiB)
        return Ask(verb, spec={"flavor": flavor.model_dump()})
    if verb == "rebuild" and options.get("image") is not None:
        return Ask(verb, spec={"image": options["image"]})  # a new image is a declarative rebuild
    if verb not in ONE_SHOT:
        raise Refused(f"unknown verb {verb!r}")
    waiting = pending_action(inst)
    if waiting is not None:
        raise Refused(f"{waiting.name} {waiting.id} is still waiting in spec.action; a new request would "
                      f"replace it: wait for it (kubectl novalet wait) first")
    return Ask(verb, action=_action(verb, options, action_id))


def _action(verb: str, options: dict[str, Any], action_id: str) -> dict[str, Any]:
    action: dict[str, Any] = {"name": ONE_SHOT[verb], "id": action_id}
    if verb == "reboot":
        action["type"] = "Hard" if options.get("hard") else "Soft"
    elif verb == "snapshot":
        action["snapshotName"] = options["snapshot_name"]
    elif verb == "set-password":
        action["secretRef"] = {"name": options["secret"], **({"key": options["key"]} if options.get("key") else {})}
        if options.get("user"):
            action["user"] = options["user"]
    elif verb == "lock" and options.get("reason"):
        action["reason"] = options["reason"]
    elif verb == "reset-state":
        action["state"] = options["state"]
    if verb == "migrate":
        action["live"] = bool(options.get("live"))
    if verb in ("migrate", "evacuate") and options.get("to"):
        action["targetNode"] = options["to"]
    return action


def pending_action(inst: VirtualInstance):
    """The spec.action no agent has taken yet, if any (replacing it would lose it)."""
    action = inst.spec.action
    return action if action is not None and action.id not in seen_ids(inst.status) else None


def outcome(inst: VirtualInstance | None, ticket: Ticket) -> Outcome | None:
    """How the request ended, or None while it is not over."""
    if inst is None:
        return Outcome("Failed", "the instance is gone")
    if ticket.action_id is not None:
        record = _record(inst.status, ticket.action_id)
        return Outcome(record.result, record.message or summary(inst.status)) if record else None
    if not _observed(inst, ticket.generation):
        return None
    refusal = _refusal(inst.status, ticket.generation)
    if refusal is not None:
        return refusal
    if ticket.verb == "wait":
        return _readiness(inst)
    if declarative_action(inst.spec, inst.status) is not None:
        return None  # the agent takes the next step toward the spec
    if _met(ticket.verb, inst):
        return Outcome("Succeeded", summary(inst.status))
    return Outcome("Failed", _unmet(inst))


def _record(status: VirtualInstanceStatus, action_id: str) -> ActionRecord | None:
    if status.lastAction and status.lastAction.id == action_id:
        return status.lastAction
    return next((r for r in status.history if r.id == action_id), None)


def _observed(inst: VirtualInstance, generation: int) -> bool:
    status = inst.status
    return (status.observedGeneration or 0) >= generation and status.taskState is None


def _spec_generation(request_id: str) -> int:
    """The generation in a declarative request id (spec-g<generation>-<action>); 0 for others."""
    found = re.match(r"spec-g(\d+)-", request_id)
    return int(found.group(1)) if found else 0


def _refusal(status: VirtualInstanceStatus, generation: int) -> Outcome | None:
    """A declarative step for this generation (or a later one) refused, failed, or backing off."""
    last = status.lastAction
    if last and last.result != "Succeeded" and _spec_generation(last.id) >= generation:
        return Outcome(last.result, last.message)
    retry = status.backoff
    if retry and _spec_generation(retry.request) >= generation:
        return Outcome("Failed", f"{retry.lastError} (failure {retry.failures}; novalet tries again at "
                                 f"{retry.nextRetryAt:%H:%M:%S} UTC)")
    if status.vmState == V.ERROR:
        return Outcome("Failed", f"the instance is in error: {last.message if last else ''}".rstrip(": "))
    return None


def _met(verb: str, inst: VirtualInstance) -> bool:
    spec, status = inst.spec, inst.status
    if verb in POWER:
        return not spec.rescue and status.vmState == VM_OF_POWER[spec.powerState]
    if verb == "rescue":
        return status.vmState == V.RESCUED
    if verb == "unrescue":
        return status.vmState != V.RESCUED
    if verb == "resize":
        return status.flavor == spec.flavor
    if verb == "rebuild":
        return (status.image or "") == spec.image
    return True


def _unmet(inst: VirtualInstance) -> str:
    _, reason, message = readiness(inst.status, inst.spec)
    why = f"{reason}: {message}" if message else reason
    return f"the spec is not met (vmState {inst.status.vmState}): {why}"


def _readiness(inst: VirtualInstance) -> Outcome | None:
    """`wait`: over when Ready, or when only a person can move it on: Stalled (kstatus's
    Failed), or a resize waiting for its confirmation."""
    ready, reason, message = readiness(inst.status, inst.spec)
    if ready:
        return Outcome("Succeeded", summary(inst.status))
    is_stalled, why, said = stalled(inst.status, inst.spec)
    if is_stalled:
        return Outcome("Failed", f"{why}: {said}" if said else why)
    if reason == "ResizeNotConfirmed":
        return Outcome("Failed", f"{reason}: {message}")
    return None


def summary(status: VirtualInstanceStatus) -> str:
    vm = status.vmState.value if status.vmState else "-"
    power = status.powerState.value if status.powerState else "-"
    line = f"vmState {vm}, powerState {power}"
    if status.vmState == V.RESIZED:
        line += "; confirm it (kubectl novalet confirm-resize) or revert it (kubectl novalet revert-resize)"
    return line


def progress(inst: VirtualInstance | None) -> str:
    """One line on where the instance is: states, the task in flight, who holds it."""
    if inst is None:
        return "gone"
    status = inst.status
    if status.node is None:
        scheduled = next((c for c in status.conditions if c.type == "Scheduled"), None)
        if scheduled is not None and scheduled.status == "False":
            return f"not placed: {scheduled.message}"
        return "waiting for the scheduler (or, pinned, its node's agent) to place it"
    task = status.currentTask
    parts = [f"vmState {status.vmState.value if status.vmState else '-'}"]
    if status.taskState:
        parts.append(f"task {task.name if task else ''} {status.taskState.value}".replace("  ", " "))
    parts.append(f"power {status.powerState.value if status.powerState else '-'}")
    agent = next((c for c in status.conditions if c.type == "HostAgentReady"), None)
    if agent is not None and agent.status == "False":
        parts.append(f"agent on {status.node} unavailable: {agent.message}")
    return ", ".join(parts)
