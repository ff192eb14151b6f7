"""core/migration.py, the Migrate task's table (actors, steps, recovery by look), as tables and
properties; and where the rest of the core meets it: the scheduler's target (core/placement.py),
capacity on both nodes (core/capacity.py), which agent acts (core/next_step.py) and the label
the agents' watches select on (kube/instances.node_label)."""
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novalet import FINALIZER
from novalet.api.models import CurrentTask, Flavor, MigrationRecord, Resources, VirtualInstance
from novalet.api.policies import MIGRATING, UNPLACED
from novalet.core import capacity, migration, placement
from novalet.core.facts import MISSING, Facts
from novalet.core.migration import REVERTING, STATES, STEPS, Look, Role
from novalet.core.next_step import Kind, next_step
from novalet.core.vocabulary import Op, PowerState, TaskState, VmState
from novalet.kube.instances import node_label

T, V, P = TaskState, VmState, PowerState
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
SOURCE, TARGET, OTHER = "node-a", "node-b", "node-c"
FLAVOR = {"vcpus": 2, "memoryMiB": 512}

# The Migrate task's states; the table may hold other tasks' states too (an evacuation's), each
# with its own entry, which the properties below cover generically.
MIGRATE_STATES = frozenset(t for t in STATES if t.value.startswith("migrat"))

# Every kind of domain a look can find (the migration job's flag included).
DOMAINS = [Facts(power_state=p, migrating=m) for p in (P.RUNNING, P.PAUSED, P.SHUTOFF, P.SHUTDOWN, P.CRASHED)
           for m in (False, True)] + [MISSING]


def task(state: TaskState, origin: VmState = V.ACTIVE, live: bool = False, target: str | None = TARGET,
         **record) -> CurrentTask:
    return CurrentTask(name="Migrate", id="m1", taskState=state, originVmState=origin, owner=f"{SOURCE}/x/1/a",
                       startedAt=NOW, migration=MigrationRecord(sourceNode=SOURCE, targetNode=target, live=live,
                                                                **record))


def instance(current: CurrentTask | None, node: str | None = SOURCE, node_name: str | None = None,
             deleting: bool = False) -> VirtualInstance:
    metadata = {"name": "vm", "namespace": "ns", "uid": "u-1", "generation": 2, "finalizers": [FINALIZER]}
    if deleting:
        metadata["deletionTimestamp"] = NOW.isoformat()
    spec = {"flavor": FLAVOR, **({"nodeName": node_name} if node_name else {})}
    status = {"vmState": "active", "node": node, "flavor": FLAVOR, "image": ""}
    if current is not None:
        status |= {"currentTask": current.model_dump(mode="json", exclude_none=True),
                   "taskState": current.taskState.value}
    return VirtualInstance.model_validate({"metadata": metadata, "spec": spec, "status": status})


def body(current: CurrentTask | None, node: str | None = SOURCE) -> dict:
    """The raw object core/capacity.py reads."""
    return instance(current, node).model_dump(mode="json", exclude_none=True)


# --- the table ----------------------------------------------------------------------------------------

def test_the_table_covers_the_migration_states():
    assert set(STEPS) == STATES
    assert all(key == step.task_state for key, step in STEPS.items())
    assert REVERTING <= MIGRATE_STATES
    assert {t for t in TaskState if t.value.startswith("migrat")} == MIGRATE_STATES
    assert T.MIGRATING in MIGRATE_STATES and T.MIGRATE_SCHEDULING in MIGRATE_STATES


ACTORS = {
    T.MIGRATE_SCHEDULING: None,  # the scheduler's
    T.MIGRATE_PREPARING_TARGET: TARGET,
    T.MIGRATE_TARGET_READY: SOURCE,
    T.MIGRATE_POWERING_OFF: SOURCE,
    T.MIGRATING: SOURCE,
    T.MIGRATE_CLEANING_SOURCE: SOURCE,
    T.MIGRATE_FINISHING: TARGET,
    T.MIGRATE_REVERTING_SOURCE: SOURCE,
    T.MIGRATE_REVERTING_TARGET: TARGET,
}


def test_the_actors_row_by_row():
    assert set(ACTORS) == MIGRATE_STATES
    for state, node in ACTORS.items():
        assert migration.actor(task(state)) == node, state


@pytest.mark.parametrize("state", sorted(STATES))
def test_every_state_has_exactly_one_actor(state):
    """The scheduler, or one of the two agents: never both, never neither."""
    t = task(state)
    role = STEPS[state].role
    acting = [node for node in (SOURCE, TARGET, OTHER) if migration.actor(t) == node]
    if role == Role.SCHEDULER:
        assert acting == [] and migration.actor(t) is None
    else:
        assert acting == [SOURCE if role == Role.SOURCE else TARGET]
        assert STEPS[state].op is not None or state == T.MIGRATE_TARGET_READY  # an agent's step runs something


def test_each_operation_belongs_to_one_step_on_its_own_side():
    ops = [step.op for step in STEPS.values() if step.op]
    assert len(ops) == len(set(ops))
    assert {STEPS[t].op for t in MIGRATE_STATES} - {None} == {op for op in Op if op.value.startswith("migrate")}
    removes_source = [s for s in STEPS.values() if s.op == Op.MIGRATE_CLEAN_SOURCE]
    assert [s.task_state for s in removes_source] == [T.MIGRATE_CLEANING_SOURCE]
    assert STEPS[T.MIGRATE_CLEANING_SOURCE].role == Role.SOURCE


def edges(state: TaskState) -> set[TaskState | None]:
    """Where a step can lead: its done and failed rows, the hand-over's choice and a look at
    `migrating` on record (None: the task ends)."""
    step = STEPS[state]
    following = {step.on_success, step.on_failure}
    if state == T.MIGRATE_TARGET_READY:  # a hand-over: no operation, so no failure; the facts choose
        following = {migration.after_target_ready(task(state, live=live), facts)
                      for live in (False, True) for facts in DOMAINS}
    if state == T.MIGRATING:
        following |= {look.next_state for look in map(migration.look_at_migrating, DOMAINS) if look.kind == "goto"}
    return following


def paths(state: TaskState = T.MIGRATE_SCHEDULING, prefix: tuple = ()) -> list[tuple[TaskState, ...]]:
    """Every path from `state` to an end (a state on a path twice would be a loop)."""
    prefix = (*prefix, state)
    assert state in STATES, prefix
    assert len(prefix) <= len(STATES), f"a loop: {prefix}"
    found = []
    for following in edges(state):
        if following is None:
            found.append(prefix)
        else:
            assert following not in prefix, f"a loop: {prefix} -> {following}"
            found.extend(paths(following, prefix))
    return found


ALL_PATHS = paths()


def test_every_path_from_scheduling_ends_and_stays_in_the_table():
    assert ALL_PATHS
    reached = {state for path in ALL_PATHS for state in path}
    assert reached == MIGRATE_STATES  # and each of them is reached
    ends = {path[-1] for path in ALL_PATHS}
    assert ends == {T.MIGRATE_SCHEDULING, T.MIGRATE_FINISHING, T.MIGRATE_REVERTING_TARGET}


def test_another_tasks_steps_in_the_table_end_and_never_enter_a_migration():
    """States no path from migrate_scheduling reaches are another task's entries (an
    evacuation's): their paths end too, never through a Migrate step (nor its clean-up)."""
    for entry in STATES - MIGRATE_STATES:
        for path in paths(entry):
            assert not set(path) & MIGRATE_STATES, path


def test_a_path_that_moves_the_guest_goes_migrating_cleaning_finishing():
    moved = [path for path in ALL_PATHS if path[-1] == T.MIGRATE_FINISHING]
    assert moved
    for path in moved:
        assert path[-3:] == (T.MIGRATING, T.MIGRATE_CLEANING_SOURCE, T.MIGRATE_FINISHING), path
        assert not set(path) & REVERTING, path
        assert path.index(T.MIGRATE_PREPARING_TARGET) < path.index(T.MIGRATE_TARGET_READY) < path.index(T.MIGRATING)


def test_the_source_is_cleaned_only_after_migrating():
    for path in ALL_PATHS:
        if T.MIGRATE_CLEANING_SOURCE in path:
            assert path[path.index(T.MIGRATE_CLEANING_SOURCE) - 1] == T.MIGRATING, path
    leading_to_clean = {state for state in STATES if T.MIGRATE_CLEANING_SOURCE in edges(state)}
    assert leading_to_clean == {T.MIGRATING}
    assert STEPS[T.MIGRATING].on_failure != T.MIGRATE_CLEANING_SOURCE
    assert T.MIGRATE_CLEANING_SOURCE not in {step.on_failure for step in STEPS.values()}


def test_a_rollback_runs_on_the_source_then_on_the_target():
    for path in ALL_PATHS:
        if T.MIGRATE_REVERTING_SOURCE in path:
            assert path[-2:] == (T.MIGRATE_REVERTING_SOURCE, T.MIGRATE_REVERTING_TARGET), path
    assert STEPS[T.MIGRATE_PREPARING_TARGET].on_failure == T.MIGRATE_REVERTING_TARGET  # nothing to undo on the source


# --- a walk: each step done, failed, or interrupted, with the guest followed --------------------------

@st.composite
def domains(draw) -> Facts:
    return draw(st.sampled_from(DOMAINS))


def walk(data, live: bool, origin: VmState) -> tuple[list[TaskState], bool, tuple[str, VmState]]:
    """A migration through the table as the agents run it (engine.py): each operation done or
    failed; `migrating` also interrupted (a crash, or a failed call), before or after libvirt moved
    the guest, then decided by look_at_migrating from what the source's libvirt shows.
    Returns the states passed, whether the guest moved and where the task left the instance."""
    state, moved, visited = T.MIGRATE_SCHEDULING, False, []
    t = task(state, origin, live)
    while True:
        visited.append(state)
        assert state in STATES and len(visited) < 40, visited  # a loop would run forever
        t = t.model_copy(update={"taskState": state})
        step = STEPS[state]
        if state == T.MIGRATE_CLEANING_SOURCE:
            assert moved, f"the source's domain removed while the guest is still there: {visited}"
        if state == T.MIGRATE_TARGET_READY:
            here = draw_source(data, origin)
            look = migration.look(t, here)
            assert look.kind == "goto"
            state = look.next_state
            continue
        if state == T.MIGRATING:
            how = data.draw(st.sampled_from(["done", "refused", "crash before", "crash after", "job runs"]))
            if how == "done":
                moved, state = True, step.on_success
                continue
            if how == "job runs":  # a look while libvirt's job runs: wait, then look again
                assert migration.look(t, Facts(migrating=True)).kind == "wait"
                continue
            moved = how == "crash after"  # libvirt undefines the source's domain once the target's runs
            source = MISSING if moved else Facts(power_state=data.draw(st.sampled_from([P.RUNNING, P.PAUSED,
                                                                                        P.SHUTOFF])))
            look = migration.look(t, source)
            assert look.kind == "goto"
            state = look.next_state
            continue
        assert migration.look(t, data.draw(domains())) == Look("run")  # every other step just runs (again)
        done = data.draw(st.booleans())
        following = step.on_success if done else step.on_failure
        if following is None:
            return visited, moved, migration.ending(t, done)
        state = following


def draw_source(data, origin: VmState) -> Facts:
    power = {V.ACTIVE: P.RUNNING, V.PAUSED: P.PAUSED, V.STOPPED: P.SHUTOFF}[origin]
    return Facts(power_state=power)


@settings(max_examples=500, deadline=None)
@given(st.data(), st.sampled_from([(False, V.ACTIVE), (False, V.STOPPED), (True, V.ACTIVE), (True, V.PAUSED)]))
def test_a_walk_ends_where_the_guest_is(data, kind):
    live, origin = kind
    visited, moved, (node, vm) = walk(data, live, origin)
    assert node == (TARGET if moved else SOURCE), visited  # the instance's record follows the guest
    if moved:
        assert visited[-3:] == [T.MIGRATING, T.MIGRATE_CLEANING_SOURCE, T.MIGRATE_FINISHING], visited
    else:
        assert T.MIGRATE_CLEANING_SOURCE not in visited and T.MIGRATE_FINISHING not in visited, visited
    assert vm in (origin, V.ERROR)
    if not live and origin == V.ACTIVE and T.MIGRATING in visited:
        assert T.MIGRATE_POWERING_OFF in visited  # a cold migration of a running guest stops it first
    if live:
        assert T.MIGRATE_POWERING_OFF not in visited


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(STATES)), domains(), st.booleans())
def test_only_a_missing_source_domain_at_migrating_skips_to_cleaning(state, facts, live):
    """Looks never go on to clean the source unless libvirt shows the source's domain gone while
    `migrating` is on record (the guest moved); a domain still there always rolls back."""
    look = migration.look(task(state, live=live), facts)
    if look.next_state == T.MIGRATE_CLEANING_SOURCE:
        assert state == T.MIGRATING and not facts.exists and not facts.migrating
    if state == T.MIGRATING and facts.exists:
        assert look.kind == "wait" if facts.migrating else look.next_state == T.MIGRATE_REVERTING_SOURCE
    if state not in (T.MIGRATING, T.MIGRATE_TARGET_READY):
        assert look == Look("run")


# --- the hand-over, and the migration found on record --------------------------------------------------

@pytest.mark.parametrize("live, facts, expected", [
    (False, Facts(power_state=P.RUNNING), T.MIGRATE_POWERING_OFF),
    (False, Facts(power_state=P.PAUSED), T.MIGRATE_POWERING_OFF),
    (False, Facts(power_state=P.SHUTOFF), T.MIGRATING),
    (False, MISSING, T.MIGRATING),
    (True, Facts(power_state=P.RUNNING), T.MIGRATING),
    (True, Facts(power_state=P.PAUSED), T.MIGRATING),
])
def test_after_target_ready(live, facts, expected):
    t = task(T.MIGRATE_TARGET_READY, live=live)
    assert migration.after_target_ready(t, facts) == expected
    assert migration.look(t, facts) == Look("goto", expected)


@pytest.mark.parametrize("facts, expected", [
    (Facts(migrating=True), Look("wait", None, "a migration job still runs on the source")),
    (MISSING, Look("goto", T.MIGRATE_CLEANING_SOURCE, "the guest had moved to the target")),
    (Facts(), Look("goto", T.MIGRATE_REVERTING_SOURCE, "interrupted before the guest moved: rolled back")),
    (Facts(power_state=P.PAUSED), Look("goto", T.MIGRATE_REVERTING_SOURCE,
                                       "interrupted before the guest moved: rolled back")),
    (Facts(power_state=P.SHUTOFF), Look("goto", T.MIGRATE_REVERTING_SOURCE,
                                        "interrupted before the guest moved: rolled back")),
])
def test_look_at_migrating(facts, expected):
    assert migration.look_at_migrating(facts) == expected


@pytest.mark.parametrize("origin, facts, finished", [
    (V.ACTIVE, Facts(power_state=P.RUNNING), True),
    (V.ACTIVE, Facts(power_state=P.PAUSED), False),
    (V.PAUSED, Facts(power_state=P.PAUSED), True),
    (V.PAUSED, Facts(power_state=P.RUNNING), False),
    (V.STOPPED, Facts(power_state=P.SHUTOFF), True),
    (V.STOPPED, Facts(power_state=P.RUNNING), False),
    (V.ACTIVE, MISSING, False),
    (V.STOPPED, MISSING, False),
])
def test_finished_on_target(origin, facts, finished):
    assert migration.finished_on_target(origin, facts) == finished


# --- refusal, ending, what the target holds ------------------------------------------------------------

@pytest.mark.parametrize("vm, live, pinned, node, target, words", [
    (V.ACTIVE, False, SOURCE, SOURCE, TARGET, "pinned to node node-a"),
    (V.ACTIVE, True, SOURCE, SOURCE, None, "remove spec.nodeName"),
    (V.ACTIVE, False, None, None, TARGET, "not placed on a node yet"),
    (V.ACTIVE, True, None, SOURCE, SOURCE, "on node node-a already"),
    (V.STOPPED, True, None, SOURCE, TARGET, "cannot migrate live while vm_state is stopped (a cold one can)"),
    (V.PAUSED, False, None, SOURCE, TARGET, "cannot migrate cold while vm_state is paused (a live one can)"),
    (V.SUSPENDED, True, None, SOURCE, None, "cannot migrate live while vm_state is suspended;"),
    (V.ERROR, False, None, SOURCE, None, "a cold migration moves an instance that is active or stopped"),
    (V.RESIZED, True, None, SOURCE, None, "a live migration moves an instance that is active or paused"),
])
def test_refusals(vm, live, pinned, node, target, words):
    why = migration.refusal(vm, live, pinned, node, target)
    assert why is not None and words in why, why


@pytest.mark.parametrize("vm, live, target", [
    (V.ACTIVE, False, None), (V.ACTIVE, False, TARGET), (V.STOPPED, False, TARGET),
    (V.ACTIVE, True, None), (V.PAUSED, True, TARGET),
])
def test_allowed(vm, live, target):
    assert migration.refusal(vm, live, None, SOURCE, target) is None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(VmState)), st.booleans(), st.sampled_from([None, SOURCE, TARGET]),
       st.sampled_from([None, SOURCE]), st.sampled_from([None, SOURCE, TARGET]))
def test_refusal_allows_exactly_nova_s_cases(vm, live, pinned, node, target):
    allowed = (not pinned and node is not None and target != node
               and vm in ({V.ACTIVE, V.PAUSED} if live else {V.ACTIVE, V.STOPPED}))
    assert (migration.refusal(vm, live, pinned, node, target) is None) == allowed


@pytest.mark.parametrize("state, succeeded, origin, expected", [
    (T.MIGRATE_FINISHING, True, V.ACTIVE, (TARGET, V.ACTIVE)),
    (T.MIGRATE_FINISHING, True, V.STOPPED, (TARGET, V.STOPPED)),
    (T.MIGRATE_FINISHING, True, V.PAUSED, (TARGET, V.PAUSED)),
    (T.MIGRATE_FINISHING, False, V.ACTIVE, (TARGET, V.ERROR)),   # moved, not booted: in error there
    (T.MIGRATE_REVERTING_TARGET, True, V.ACTIVE, (SOURCE, V.ACTIVE)),
    (T.MIGRATE_REVERTING_TARGET, True, V.PAUSED, (SOURCE, V.PAUSED)),
    (T.MIGRATE_REVERTING_TARGET, False, V.STOPPED, (SOURCE, V.ERROR)),
    (T.MIGRATE_SCHEDULING, False, V.ACTIVE, (SOURCE, V.ACTIVE)),  # no target: it never left
    (T.MIGRATE_SCHEDULING, False, V.STOPPED, (SOURCE, V.STOPPED)),
])
def test_ending(state, succeeded, origin, expected):
    assert migration.ending(task(state, origin), succeeded) == expected


@pytest.mark.parametrize("state", sorted(STATES))
def test_the_target_holds_the_flavor_until_a_rollback(state):
    # from the scheduler's pick: while it picks, the instance does not count against its own target
    expected = None if state in REVERTING or state == T.MIGRATE_SCHEDULING else TARGET
    assert migration.target_holds(task(state)) == expected
    assert migration.target_holds(task(state, target=None)) is None


def test_no_target_outside_a_migration():
    assert migration.target_holds(None) is None
    reboot = CurrentTask(name="RebootSoft", id="r", taskState=T.REBOOT_STARTED, originVmState=V.ACTIVE,
                         owner="n", startedAt=NOW)
    assert migration.target_holds(reboot) is None
    assert not migration.is_migration(reboot) and not migration.involves(reboot, SOURCE)
    # a migration record left on a task in another state is not a migration
    stale = task(T.MIGRATE_FINISHING).model_copy(update={"taskState": T.REBOOT_STARTED})
    assert not migration.is_migration(stale) and migration.target_holds(stale) is None


def test_involves_the_two_sides_only():
    t = task(T.MIGRATING)
    assert migration.involves(t, SOURCE) and migration.involves(t, TARGET)
    assert not migration.involves(t, OTHER)


# --- the scheduler's target (core/placement.choose_target) ---------------------------------------------

def host(name: str, vcpus: int = 4, mem: int = 1024, **kw) -> placement.Host:
    return placement.Host(name=name, allocatable=Resources(vcpus=vcpus, memoryMiB=mem), **kw)


DEMAND = placement.Demand(flavor=Flavor(**FLAVOR))


def test_choose_target_rows():
    hosts = [host(SOURCE, 64, 65536), host(TARGET), host(OTHER, alive=False)]
    assert placement.choose_target(DEMAND, hosts, {}, SOURCE, None)[0] == TARGET  # the emptiest is the source
    assert placement.choose_target(DEMAND, hosts, {}, SOURCE, TARGET) == (TARGET, "migrating to node node-b (spread)")
    node, why = placement.choose_target(DEMAND, hosts, {}, SOURCE, OTHER)
    assert node is None and "not running" in why  # asked for, but filtered out: not taken anyway
    node, why = placement.choose_target(DEMAND, hosts, {}, SOURCE, SOURCE)
    assert node is None and "is the source" in why
    node, why = placement.choose_target(DEMAND, [host(SOURCE)], {}, SOURCE, None)
    assert node is None
    full = {TARGET: Resources(vcpus=3, memoryMiB=0)}
    node, why = placement.choose_target(DEMAND, hosts, full, SOURCE, TARGET)
    assert node is None and "not enough vCPUs" in why


NAMES = [f"n{i}" for i in range(4)]


@settings(max_examples=400, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2048), st.booleans(), st.booleans()),
                      min_size=4, max_size=4),
       source=st.sampled_from(NAMES), asked=st.sampled_from([None, *NAMES, "gone"]),
       policy=st.sampled_from(["spread", "pack"]))
def test_choose_target_never_the_source_and_an_asked_node_only_through_the_filters(sizes, source, asked, policy):
    hosts = [host(n, v, m, alive=alive, labels={"ssd": "yes"} if ssd else {})
             for n, (v, m, alive, ssd) in zip(NAMES, sizes, strict=True)]
    demand = placement.Demand(flavor=Flavor(vcpus=1, memoryMiB=256), node_selector={"ssd": "yes"})
    used = {n: Resources(vcpus=1, memoryMiB=512) for n in NAMES[::2]}
    node, message = placement.choose_target(demand, hosts, used, source, asked, policy)
    nothing = Resources(vcpus=0, memoryMiB=0)
    passing = {h.name for h in hosts if placement.refusal(h, demand, used.get(h.name, nothing)) is None}
    assert node != source
    if asked is not None:
        assert node == (asked if asked in passing and asked != source else None), message
    else:
        others = [h for h in hosts if h.name != source]
        assert node == placement.choose(demand, others, used, policy)[0]
        assert (node is None) == (not passing - {source})
    if node is not None:
        assert node in passing and message.startswith(f"migrating to node {node}")


# --- capacity on both nodes ----------------------------------------------------------------------------

@pytest.mark.parametrize("state", sorted(STATES - {T.MIGRATE_SCHEDULING}))
def test_a_migration_holds_its_flavor_on_both_nodes_until_a_rollback(state):
    moving = body(task(state))
    for node, holds in ((SOURCE, True), (TARGET, state not in REVERTING), (OTHER, False)):
        used, count = capacity.allocated([moving], node)
        assert (used.vcpus, used.memoryMiB, count) == ((2, 512, 1) if holds else (0, 0, 0)), (state, node)
    assert capacity.migration_target(moving) == migration.target_holds(task(state))


def test_a_migration_not_yet_targeted_holds_only_its_source():
    waiting = body(task(T.MIGRATE_SCHEDULING, target=None))
    assert capacity.allocated([waiting], SOURCE)[1] == 1
    assert capacity.allocated([waiting], TARGET)[1] == 0 and capacity.migration_target(waiting) is None


def test_after_the_migration_only_the_node_it_rests_on_holds_it():
    moved, rolled_back = body(None, node=TARGET), body(None, node=SOURCE)
    assert [capacity.allocated([moved], n)[1] for n in (SOURCE, TARGET)] == [0, 1]
    assert [capacity.allocated([rolled_back], n)[1] for n in (SOURCE, TARGET)] == [1, 0]


def test_a_migration_counts_beside_the_nodes_other_instances():
    others = [body(None, node=TARGET), body(None, node=OTHER)]
    used, count = capacity.allocated([*others, body(task(T.MIGRATING))], TARGET)
    assert (used.vcpus, used.memoryMiB, count) == (4, 1024, 2)


def test_an_asked_target_with_just_enough_room_is_taken():
    """The scheduler's round (controller/scheduler.py): what each node holds, then the target."""
    waiting = body(task(T.MIGRATE_SCHEDULING, target=TARGET))  # asked for node-b
    hosts = [host(SOURCE, 2, 512), host(TARGET, 2, 512)]
    used = {h.name: capacity.allocated([waiting], h.name)[0] for h in hosts}
    assert placement.choose_target(DEMAND, hosts, used, SOURCE, TARGET)[0] == TARGET


# --- which agent acts, and the label its watch selects on --------------------------------------------

@pytest.mark.parametrize("state", sorted(STATES))
def test_only_the_actor_migrates_the_other_side_watches_its_peer_and_others_ignore(state):
    inst = instance(task(state))
    kinds = {node: next_step(inst, node, f"{node}/x/1/a", None, NOW).kind for node in (SOURCE, TARGET, OTHER)}
    actor = migration.actor(task(state))
    assert actor == ACTORS.get(state, actor)
    survivor = migration.survivor(task(state))
    assert kinds == {node: Kind.MIGRATE if node == actor else Kind.MIGRATION_PEER if node == survivor
                     else Kind.IGNORE for node in kinds}, kinds


@settings(max_examples=200, deadline=None)
@given(state=st.sampled_from(sorted(STATES)), waiting=st.sampled_from([None, "m1"]), deleting=st.booleans(),
       node=st.sampled_from([SOURCE, TARGET, OTHER]))
def test_a_migration_on_record_is_only_ever_migrated_watched_or_ignored(state, waiting, deleting, node):
    kind = next_step(instance(task(state), deleting=deleting), node, f"{node}/x/1/a", waiting, NOW).kind
    expected = (Kind.MIGRATE if migration.actor(task(state)) == node else
                Kind.MIGRATION_PEER if migration.survivor(task(state)) == node else Kind.IGNORE)
    assert kind == expected


def test_the_target_sees_the_instance_as_its_own_during_a_migration():
    from novalet.core.next_step import is_mine

    inst = instance(task(T.MIGRATE_PREPARING_TARGET))
    assert is_mine(inst, SOURCE) and is_mine(inst, TARGET) and not is_mine(inst, OTHER)
    assert not is_mine(instance(None), TARGET)


@pytest.mark.parametrize("state", sorted(STATES))
def test_the_label_is_migrating_during_a_migration(state):
    assert node_label(instance(task(state))) == MIGRATING
    assert node_label(instance(task(state), node=TARGET)) == MIGRATING


def test_the_label_outside_a_migration():
    assert node_label(instance(None, node=TARGET)) == TARGET
    assert node_label(instance(None, node=None)) == UNPLACED
    assert node_label(instance(None, node=None, node_name=OTHER)) == OTHER
    reboot = CurrentTask(name="RebootSoft", id="r", taskState=T.REBOOT_STARTED, originVmState=V.ACTIVE,
                         owner="n", startedAt=NOW)
    assert node_label(instance(reboot)) == SOURCE


# --- the other side takes over when the acting node is dead (core/migration.takeover) -----------

MIGRATE_ONLY = sorted(STATES - {T.EVACUATE_REBUILDING, T.MIGRATE_SCHEDULING})


@pytest.mark.parametrize("state", MIGRATE_ONLY)
def test_the_survivor_is_the_side_that_does_not_act(state):
    acting = migration.actor(task(state))
    assert {acting, migration.survivor(task(state))} == {SOURCE, TARGET}


def test_no_survivor_for_the_schedulers_step_or_an_evacuation():
    assert migration.survivor(task(T.MIGRATE_SCHEDULING)) is None
    assert migration.survivor(task(T.EVACUATE_REBUILDING)) is None


@pytest.mark.parametrize("state", MIGRATE_ONLY)
@pytest.mark.parametrize("here", [*DOMAINS, MISSING])
def test_a_takeover_never_leaves_the_guest_twice_or_nowhere(state, here):
    """The survivor's decision moves the task only to a step it acts on itself, or ends it where
    the guest is: on the target only when it ran there (or was about to finish there)."""
    t = task(state)
    look = migration.takeover(t, here)
    survivor = migration.survivor(t)
    if look.kind == "goto":
        assert migration.actor(task(look.next_state)) == survivor, (state, look)
        if look.next_state == T.MIGRATE_FINISHING:  # the survivor is the target, and the guest moved
            assert survivor == TARGET
            assert state == T.MIGRATE_CLEANING_SOURCE or (here.exists and not here.migrating)
    elif look.kind == "end_on_target":
        assert state == T.MIGRATE_FINISHING and survivor == SOURCE
    elif look.kind == "end_on_source":
        assert state in (T.MIGRATE_PREPARING_TARGET, T.MIGRATE_REVERTING_TARGET) and survivor == SOURCE
    else:
        assert look.kind == "wait" and state == T.MIGRATING and here.migrating


@pytest.mark.parametrize("here,then", [
    (Facts(power_state=P.RUNNING), T.MIGRATE_FINISHING),
    (Facts(power_state=P.PAUSED), T.MIGRATE_FINISHING),       # a cold arrival
    (Facts(power_state=P.SHUTOFF), T.MIGRATE_REVERTING_TARGET),  # only prepared: it never came
    (MISSING, T.MIGRATE_REVERTING_TARGET),
])
def test_the_source_died_mid_call_and_the_targets_domain_decides(here, then):
    assert migration.takeover(task(T.MIGRATING), here).next_state == then


def test_next_step_sends_the_survivor_to_look_at_its_peer():
    inst = instance(task(T.MIGRATE_PREPARING_TARGET))  # the target acts
    assert next_step(inst, SOURCE, "me", None, NOW).kind == Kind.MIGRATION_PEER
    assert next_step(inst, TARGET, "me", None, NOW).kind == Kind.MIGRATE
    assert next_step(inst, OTHER, "me", None, NOW).kind == Kind.IGNORE
