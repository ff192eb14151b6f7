"""Ready tells the truth (core/presentation.py `readiness`, kstatus): True only when the spec is
met and nothing is in flight. Table-driven, one row per reason, and a property over random
statuses."""
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novalet.api.models import (
    ActionRecord,
    Backoff,
    CurrentTask,
    Flavor,
    VirtualInstanceSpec,
    VirtualInstanceStatus,
)
from novalet.core.conditions import find, set_condition
from novalet.core.desire import declarative_action
from novalet.core.presentation import readiness, stalled, with_presentation
from novalet.core.vocabulary import PowerState, TaskState, VmState

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
SMALL = Flavor(vcpus=1, memoryMiB=128)


def spec(**changes) -> VirtualInstanceSpec:
    return VirtualInstanceSpec(flavor=SMALL, **changes)


def status(vm=VmState.ACTIVE, power=PowerState.RUNNING, **changes) -> VirtualInstanceStatus:
    return VirtualInstanceStatus(vmState=vm, powerState=power, flavor=SMALL, image="", **changes)


def record(id_: str, result: str, name: str = "Pause", message: str = "not allowed") -> ActionRecord:
    return ActionRecord(name=name, id=id_, result=result, message=message)


def task(state: TaskState = TaskState.PAUSING) -> CurrentTask:
    return CurrentTask(name="Pause", id="spec-g2-pause", taskState=state, originVmState=VmState.ACTIVE,
                       owner="n1/host/1/abc", startedAt=T0)


agent_gone = set_condition(status(), "HostAgentReady", False, "AgentUnavailable", "node n1's agent last renewed "
                           "its lease at 12:00", T0)

ROWS = [
    # (what, status, spec, ready, reason, in the message)
    ("idle and as asked", status(), spec(), True, "Running", ""),
    ("a task runs", status(taskState=TaskState.PAUSING, currentTask=task()), spec(powerState="Paused"),
     False, "Pausing", "Pause in pausing"),
    ("in error", status(vm=VmState.ERROR, lastAction=record("spec-g1-create", "Failed", "Create", "no image")),
     spec(), False, "Error", "no image"),
    ("backing off", status(backoff=Backoff(request="spec-g2-rebuild", failures=2, lastError="image gone",
                                           nextRetryAt=T0)), spec(), False, "Backoff", "image gone"),
    ("being built", status(vm=VmState.BUILDING, power=None), spec(), False, "Building", ""),
    ("the node's agent is gone", agent_gone, spec(), False, "HostAgentUnavailable", "last renewed"),
    ("a resize awaits confirmation", status(vm=VmState.RESIZED), spec(), False, "ResizeNotConfirmed",
     "ConfirmResize"),
    ("the domain vanished out of band", status(power=PowerState.NOSTATE), spec(), False, "DomainMissing",
     "no domain"),
    # seen stopped on its way out (destroy, then undefine): the Start the spec asks for keeps failing,
    # yet what a person must know is that the domain is gone
    ("the domain vanished after it was seen stopped", status(
        vm=VmState.STOPPED, power=PowerState.NOSTATE, backoff=Backoff(
            request="spec-g1-start", failures=3, lastError="start: no domain", nextRetryAt=T0)),
     spec(), False, "DomainMissing", "no domain"),
    ("a declarative change was rejected", status(lastAction=record("spec-g2-pause", "Rejected")),
     spec(powerState="Paused"), False, "SpecNotMet", "Pause: last action Rejected: not allowed"),
    ("a declarative change failed", status(lastAction=record("spec-g3-stop", "Failed", "Stop", "libvirt error")),
     spec(powerState="Stopped"), False, "SpecNotMet", "libvirt error"),
    ("a declarative change not yet taken", status(), spec(powerState="Suspended"), False, "SpecNotMet",
     "the spec asks for Suspend"),
    ("an imperative action was refused, the spec is met", status(lastAction=record("reboot-1", "Rejected", "RebootSoft")),
     spec(), True, "Running", "last action Rejected"),
    ("without the spec, the spec is not judged", status(), None, True, "Running", ""),
]


@pytest.mark.parametrize("what,current,wanted,ready,reason,said", ROWS, ids=[r[0] for r in ROWS])
def test_ready_says_why(what, current, wanted, ready, reason, said):
    got_ready, got_reason, message = readiness(current, wanted)
    assert (got_ready, got_reason) == (ready, reason), what
    assert said in message


def test_the_conditions_carry_the_generation_they_judged():
    written = with_presentation(status(), T0, spec(powerState="Paused"), generation=7)
    ready = find(written, "Ready")
    assert (ready.status, ready.reason, ready.observedGeneration) == ("False", "SpecNotMet", 7)
    assert {c.observedGeneration for c in written.conditions} == {7}


statuses = st.builds(
    status,
    vm=st.sampled_from([*VmState]),
    power=st.none() | st.sampled_from([*PowerState]),
    taskState=st.none() | st.just(TaskState.PAUSING),
)
specs = st.builds(spec, powerState=st.sampled_from(["Running", "Stopped", "Paused", "Suspended"]),
                  rescue=st.booleans())


@given(statuses, specs)
def test_ready_only_when_idle_settled_and_the_spec_is_met(current, wanted):
    if current.taskState:
        current = current.model_copy(update={"currentTask": task()})
    ready, _, _ = readiness(current, wanted)
    if ready:
        assert current.taskState is None and current.vmState not in (
            None, VmState.BUILDING, VmState.ERROR, VmState.RESIZED, VmState.DELETED)
        assert declarative_action(wanted, current) is None


@pytest.mark.parametrize("case,state,reason", [
    ("in flight", status(taskState=TaskState.PAUSING, currentTask=task()), None),
    ("error", status(vm=VmState.ERROR, lastAction=record("x", "Failed")), "Error"),
    ("backoff", status(backoff=Backoff(request="spec-g2-pause", failures=2, lastError="boom",
                                       nextRetryAt=T0)), "Backoff"),
    ("domain vanished", status(power=PowerState.NOSTATE), "DomainMissing"),
    ("domain vanished, a step backing off", status(vm=VmState.STOPPED, power=PowerState.NOSTATE, backoff=Backoff(
        request="spec-g1-start", failures=3, lastError="start: no domain", nextRetryAt=T0)), "DomainMissing"),
    ("spec change refused", status(vm=VmState.SUSPENDED, power=PowerState.SHUTOFF,
                                   lastAction=record("spec-g3-resize", "Rejected", "Resize")), "SpecRejected"),
    ("one-shot refused: the spec is met", status(lastAction=record("r-1", "Rejected", "Rebuild")), None),
    ("resize awaiting a person's word is no failure", status(vm=VmState.RESIZED), None),
    ("agent unavailable: it may come back", set_condition(status(), "HostAgentReady", False, "LeaseExpired", "", T0),
     None),
])
def test_stalled_only_when_no_progress_comes_without_someone(case, state, reason):
    wanted = VirtualInstanceSpec(flavor=Flavor(vcpus=2, memoryMiB=128), powerState="Suspended") \
        if case == "spec change refused" else spec()
    is_stalled, why, _message = stalled(state, wanted)
    assert (why if is_stalled else None) == reason, case
    written = find(with_presentation(state, T0, wanted), "Stalled")
    assert written.status == ("True" if reason else "False") and (not reason or written.message)
