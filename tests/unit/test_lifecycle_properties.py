"""Property tests over the policy, plan and recovery tables together.

A small pure simulator applies random requests: an allowed action walks its plan's task
states and ends in its success or failure state; a refused one leaves the instance unchanged.
A hard reboot or a delete may arrive while a plan runs and supersede it, as the policy allows.
"""
from collections import deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from novalet.api.models import CurrentTask
from novalet.core import migration, plans, policy
from novalet.core.facts import Facts
from novalet.core.plans import PLANS, STABLE_VM_STATES, final_vm_state, plan_of, task_owner
from novalet.core.recovery import Recovery, recover
from novalet.core.vocabulary import Action, PowerState, TaskState, VmState

A, T, V, P = Action, TaskState, VmState, PowerState
NOW = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Sim:
    vm: VmState = V.BUILDING
    task: TaskState | None = None
    pre_resize: VmState | None = None  # origin of an unconfirmed resize


def defined_pairs() -> set[tuple[VmState, TaskState | None]]:
    """The (vmState, taskState) pairs the tables define: an idle instance in any vm state, or
    a task state of a plan while the vm state is one its action may start from."""
    pairs: set[tuple[VmState, TaskState | None]] = {(vm, None) for vm in VmState}
    for action, plan in PLANS.items():
        for vm in policy.POLICY[action].vm_states:
            pairs |= {(vm, step.task_state) for step in plan.steps}
    for vm in policy.POLICY[A.MIGRATE].vm_states:
        pairs |= {(vm, state) for state in migration.STATES - {T.EVACUATE_REBUILDING}}
    for vm in policy.POLICY[A.EVACUATE].vm_states:
        pairs.add((vm, T.EVACUATE_REBUILDING))
    return pairs


DEFINED = defined_pairs()


def walk(sim: Sim, action: Action, succeed: bool, interrupt_at: int | None, interrupt: Action | None,
         data, trace: list) -> Sim:
    """Run `action`'s plan from `sim` (already admitted). Returns the idle end state."""
    origin = sim.vm
    plan = plan_of(action)
    for index, step in enumerate(plan.steps):
        sim = replace(sim, task=step.task_state)
        trace.append((sim.vm, sim.task))
        assert (sim.vm, sim.task) in DEFINED, trace
        # a request arriving mid-plan: if the policy admits it, it supersedes the running task
        # (starting from the same vm state); if not, nothing changes and the plan continues
        # (lock/unlock are recorded beside the running task and supersede nothing)
        if index == interrupt_at and interrupt not in (None, A.LOCK, A.UNLOCK) and policy.is_allowed(
                interrupt, sim.vm, sim.task):
            trace.append(("supersedes", interrupt))
            if interrupt == A.RESET_STATE:
                return Sim(data.draw(st.sampled_from([V.ACTIVE, V.ERROR])), None, None)
            if interrupt in plans.COORDINATED:  # an evacuation: the dead node's task is left behind
                return migrate(replace(sim, task=None), data, trace, interrupt)
            return walk(sim, interrupt, data.draw(st.booleans()), None, None, data, trace)
    end = final_vm_state(plan, origin, sim.pre_resize, succeed)
    pre = sim.pre_resize
    if action == A.RESIZE and succeed:
        pre = origin
    elif action in (A.CONFIRM_RESIZE, A.REVERT_RESIZE) and succeed:
        pre = None
    return Sim(end, None, pre)


def migrate(sim: Sim, data, trace: list, action: Action = A.MIGRATE) -> Sim:
    """A migration's walk through core/migration.py's table, each step done or failed: it ends
    where it began (moved, or rolled back), or in error when its last step fails. An evacuation
    is one step on the target: the guest rebuilt (active, or stopped if it was), or in error."""
    if action == A.EVACUATE:
        trace.append((sim.vm, T.EVACUATE_REBUILDING))
        assert (sim.vm, T.EVACUATE_REBUILDING) in DEFINED, trace
        if not data.draw(st.booleans()):
            return Sim(V.ERROR, None, None)
        return Sim(V.STOPPED if sim.vm == V.STOPPED else V.ACTIVE, None, None)
    state = T.MIGRATE_SCHEDULING
    while True:
        trace.append((sim.vm, state))
        assert (sim.vm, state) in DEFINED, trace
        step = migration.STEPS[state]
        done = data.draw(st.booleans())
        if state == T.MIGRATE_TARGET_READY:
            state = data.draw(st.sampled_from([T.MIGRATE_POWERING_OFF, T.MIGRATING]))
            continue
        following = step.on_success if done else step.on_failure
        if following is None:
            errs = not done and state in (T.MIGRATE_FINISHING, T.MIGRATE_REVERTING_TARGET)
            return Sim(V.ERROR if errs else sim.vm, None, None)
        state = following


def apply(sim: Sim, action: Action, data, trace: list) -> Sim:
    if not policy.is_allowed(action, sim.vm, sim.task):
        trace.append(("rejected", action))
        return sim
    if action == A.RESET_STATE:
        return Sim(data.draw(st.sampled_from([V.ACTIVE, V.ERROR])), None, None)
    if action in plans.BOOKKEEPING:
        return sim
    if action in plans.COORDINATED:
        return migrate(sim, data, trace, action)
    plan = plan_of(action)
    succeed = data.draw(st.booleans())
    interrupt_at = data.draw(st.none() | st.integers(0, len(plan.steps) - 1))
    interrupt = data.draw(st.sampled_from(list(Action))) if interrupt_at is not None else None
    return walk(sim, action, succeed, interrupt_at, interrupt, data, trace)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), actions=st.lists(st.sampled_from(list(Action)), max_size=25))
def test_random_request_sequences_stay_inside_the_tables(data, actions):
    sim, trace = Sim(), []
    for action in actions:
        before = sim
        sim = apply(sim, action, data, trace)
        trace.append((action, sim))
        assert sim.task is None, trace
        # admitted: ends in a stable state; refused: nothing changed
        assert sim.vm in STABLE_VM_STATES or sim == before, trace
        if sim.vm == V.RESIZED:
            assert sim.pre_resize in (V.ACTIVE, V.STOPPED), trace


def reachable() -> set[Sim]:
    """Every idle state reachable from an unbuilt instance, each action succeeding or failing,
    without the admin's reset-state."""
    seen, todo = {Sim()}, deque([Sim()])
    while todo:
        sim = todo.popleft()
        for action in PLANS:
            if not policy.is_allowed(action, sim.vm, None):
                continue
            for succeed in (True, False):
                end = final_vm_state(plan_of(action), sim.vm, sim.pre_resize, succeed)
                pre = sim.vm if action == A.RESIZE and succeed else (
                    None if action in (A.CONFIRM_RESIZE, A.REVERT_RESIZE) and succeed else sim.pre_resize)
                nxt = Sim(end, None, pre if end == V.RESIZED else None)
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    return seen


REACHABLE = reachable()


def test_every_vm_state_is_reachable_without_reset_state():
    assert {sim.vm for sim in REACHABLE} == set(VmState)


def test_every_allowed_action_from_every_reachable_state_ends_in_a_stable_state():
    for sim in REACHABLE:
        for action in PLANS:
            if not policy.is_allowed(action, sim.vm, None):
                continue
            for step in plan_of(action).steps:
                assert (sim.vm, step.task_state) in DEFINED
            for succeed in (True, False):
                end = final_vm_state(plan_of(action), sim.vm, sim.pre_resize, succeed)
                assert end in STABLE_VM_STATES, (sim, action, succeed, end)


def test_active_is_reachable_from_every_state_but_deleted():
    """No dead end: an admin's reset-state is never the only way back."""
    for origin in REACHABLE:
        if origin.vm == V.DELETED:
            continue
        seen, todo = {origin}, deque([origin])
        while todo and not any(s.vm == V.ACTIVE for s in seen):
            sim = todo.popleft()
            for action in PLANS:
                if action != A.DELETE and policy.is_allowed(action, sim.vm, None):
                    end = final_vm_state(plan_of(action), sim.vm, sim.pre_resize or V.ACTIVE, True)
                    nxt = Sim(end, None, sim.vm if end == V.RESIZED else None)
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
        assert any(s.vm == V.ACTIVE for s in seen), origin


# --- recovery ------------------------------------------------------------------------------------

KINDS = {"redo", "finish", "abandon", "revert", "error"}


RECOVERED_STATES = [t for t in TaskState if t not in migration.STATES]  # a migration's: core/migration.py


def origins_for(state: TaskState) -> list[VmState]:
    try:
        plan, _ = task_owner(state)
    except KeyError:  # a Nova name no plan writes: any resting state
        return sorted(STABLE_VM_STATES - {V.DELETED})
    return sorted(policy.POLICY[plan.action].vm_states)


@st.composite
def tasks(draw) -> CurrentTask:
    state = draw(st.sampled_from(RECOVERED_STATES))
    return CurrentTask(
        name="x", id=draw(st.sampled_from(["a", "b"])), taskState=state,
        originVmState=draw(st.sampled_from(origins_for(state))),
        originPowerState=draw(st.none() | st.sampled_from(list(PowerState))),
        escalated=draw(st.booleans()), owner="node-a", startedAt=NOW)


@st.composite
def facts(draw) -> Facts:
    exists = draw(st.booleans())
    ops = sorted({s.op for p in PLANS.values() for s in p.steps if s.op})
    return Facts(
        exists=exists,
        power_state=draw(st.sampled_from(list(PowerState))) if exists else draw(st.none() | st.just(P.NOSTATE)),
        config=draw(st.sampled_from(["normal", "rescue", None])) if exists else None,
        issued=draw(st.none() | st.builds(lambda i, op: f"{i}:{op}", st.sampled_from(["a", "b"]),
                                          st.sampled_from(ops))),
        has_managed_save=draw(st.booleans()))


@settings(max_examples=1500, deadline=None)
@given(task=tasks(), facts=facts())
def test_recover_always_answers_within_the_table(task, facts):
    result = recover(task, facts)
    assert isinstance(result, Recovery)
    assert result.kind in KINDS
    if result.vm_state is not None:
        assert result.vm_state in STABLE_VM_STATES
    if result.kind in ("finish", "abandon", "revert", "error"):
        assert result.vm_state is not None, result  # the instance must rest somewhere
    if result.kind == "redo":
        assert result.action in PLANS, result
        assert 0 <= result.from_step < len(PLANS[result.action].steps), result
    if result.kind == "error":
        assert result.vm_state == V.ERROR
    if result.hard:
        assert result.action == A.REBOOT_HARD


def all_facts(task_id: str, state: TaskState):
    try:
        plan, index = task_owner(state)
        ops = [None, f"{task_id}:{plan.steps[index].op}", "other:op"]
    except KeyError:
        ops = [None, "other:op"]
    yield Facts(False, None, None, None, False)
    for power in PowerState:
        for config in ("normal", "rescue"):
            for issued in ops:
                for save in (False, True):
                    yield Facts(True, power, config, issued, save)


def test_recover_finishes_only_when_libvirt_shows_the_target():
    """Exhaustive over task states, origins and a grid of facts: `finish` never claims a
    resting state the domain is not in."""
    from novalet.core.plans import EXPECTED_POWER

    wrong = []
    for state in RECOVERED_STATES:
        for origin in origins_for(state):
            task = CurrentTask(name="x", id="a", taskState=state, originVmState=origin,
                               owner="node-a", startedAt=NOW)
            for f in all_facts("a", state):
                result = recover(task, f)
                if result.kind == "finish" and result.vm_state in EXPECTED_POWER and not (
                        f.exists and f.power_state in EXPECTED_POWER[result.vm_state]):
                    wrong.append((state.value, origin.value, f.power_state, result.vm_state.value))
    assert not wrong, f"finish over a domain in another state (task, origin, power, vm): {sorted(set(wrong))}"
