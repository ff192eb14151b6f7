"""Migration (`spec.action: Migrate`, cold or live) between two nodes, as pure decisions.

The two agents never talk to each other: each step of a Migrate task has one actor, and the
actor of the task state on record carries it out and writes the next one with a
compare-and-swap. libvirt's own migration stream is the only thing between the two hosts.

| task state                 | actor     | operation              | done: next            | failed: next               |
|----------------------------|-----------|------------------------|-----------------------|----------------------------|
| `migrate_scheduling`       | scheduler | pick or check a target | `migrate_preparing_target` | the task ends: failed  |
| `migrate_preparing_target` | target    | image, disks, domain defined (not started) | `migrate_target_ready` | `migrate_reverting_target` |
| `migrate_target_ready`     | source    | (none: the hand-over)  | cold and running: `migrate_powering_off`, else `migrating` | |
| `migrate_powering_off`     | source    | ACPI stop, then forced | `migrating`           | `migrate_reverting_source` |
| `migrating`                | source    | libvirt peer-to-peer migration, the disk copied (NBD) | `migrate_cleaning_source` | `migrate_reverting_source` |
| `migrate_cleaning_source`  | source    | remove the source's instance files | `migrate_finishing` | `migrate_finishing` (noted) |
| `migrate_finishing`        | target    | cold: boot in the origin power state | the task ends: succeeded, on the target | ends in error, on the target |
| `migrate_reverting_source` | source    | the origin power state on the source | `migrate_reverting_target` | `migrate_reverting_target` (error) |
| `migrate_reverting_target` | target    | remove what preparing made | the task ends: failed, on the source | ends in error, on the source |
| `evacuate_rebuilding`      | target    | a new disk from the image, booted unless it was stopped | the task ends: on the target | ends in error, on the target |

Evacuate (admin-only) is for an instance whose node is dead: its agent's Lease expired more than
`--evacuate-after` seconds ago. The scheduler checks that and picks (or checks) the target and
writes the task straight in `evacuate_rebuilding`, with the dead node as its source; the target
rebuilds the guest from its image, so what was on the dead node's local disk is lost.
`status.evacuatedFrom` names the dead node: when its agent comes back, it destroys the stale
domain and its disks instead of starting them (Nova does the same when a compute restarts).

A cold migration of a running guest stops it first (Nova's migrate); its disk then moves over
the same libvirt stream, with QEMU started paused on the source so the guest runs no
instruction there, and the target boots it when the origin was running. A live one moves the
running (or paused) guest, which keeps running.

Recovery is the same table read again (`look`): an actor that finds its step on record, in a
new process or after a failed call, decides from what its libvirt shows. Every step but
`migrating` can simply run again. `migrating` is never called twice: found on record, the
source's domain decides (the seed's open question, answered): gone means libvirt moved it (the
guest runs on the target; clean up and finish there), still here means it did not move (roll
back: the origin state on the source, the target's preparations removed), and a migration job
still running means look again soon. libvirt's migration protocol never lets the guest run on
both sides, and the source's domain is undefined only once the target's runs.
"""
from dataclasses import dataclass
from enum import StrEnum

from ..api.models import CurrentTask
from .facts import Facts
from .vocabulary import Op, PowerState, TaskState, VmState

T, V = TaskState, VmState


class Role(StrEnum):
    SCHEDULER = "scheduler"
    SOURCE = "source"
    TARGET = "target"


@dataclass(frozen=True)
class MigrationStep:
    task_state: TaskState
    role: Role
    op: Op | None
    on_success: TaskState | None  # None: the task ends
    on_failure: TaskState | None


STEPS: dict[TaskState, MigrationStep] = {s.task_state: s for s in [
    MigrationStep(T.MIGRATE_SCHEDULING, Role.SCHEDULER, None, T.MIGRATE_PREPARING_TARGET, None),
    MigrationStep(T.MIGRATE_PREPARING_TARGET, Role.TARGET, Op.MIGRATE_PREPARE_TARGET, T.MIGRATE_TARGET_READY,
                  T.MIGRATE_REVERTING_TARGET),
    MigrationStep(T.MIGRATE_TARGET_READY, Role.SOURCE, None, T.MIGRATING, None),  # a hand-over: never fails
    MigrationStep(T.MIGRATE_POWERING_OFF, Role.SOURCE, Op.MIGRATE_POWER_OFF, T.MIGRATING, T.MIGRATE_REVERTING_SOURCE),
    MigrationStep(T.MIGRATING, Role.SOURCE, Op.MIGRATE, T.MIGRATE_CLEANING_SOURCE, T.MIGRATE_REVERTING_SOURCE),
    MigrationStep(T.MIGRATE_CLEANING_SOURCE, Role.SOURCE, Op.MIGRATE_CLEAN_SOURCE, T.MIGRATE_FINISHING,
                  T.MIGRATE_FINISHING),
    MigrationStep(T.MIGRATE_FINISHING, Role.TARGET, Op.MIGRATE_FINISH_TARGET, None, None),
    MigrationStep(T.MIGRATE_REVERTING_SOURCE, Role.SOURCE, Op.MIGRATE_REVERT_SOURCE, T.MIGRATE_REVERTING_TARGET,
                  T.MIGRATE_REVERTING_TARGET),
    MigrationStep(T.MIGRATE_REVERTING_TARGET, Role.TARGET, Op.MIGRATE_REVERT_TARGET, None, None),
    MigrationStep(T.EVACUATE_REBUILDING, Role.TARGET, Op.EVACUATE_REBUILD, None, None),
]}
STATES = frozenset(STEPS)
REVERTING = frozenset({T.MIGRATE_REVERTING_SOURCE, T.MIGRATE_REVERTING_TARGET})

# Nova: live migration of an active or paused instance; cold migration of an active or stopped one
LIVE_FROM = frozenset({V.ACTIVE, V.PAUSED})
COLD_FROM = frozenset({V.ACTIVE, V.STOPPED})
LOOK_AGAIN_S = 1.0  # a migration job still running on the source, an image still downloading
PEER_LOOK_S = 10.0  # how often the other side looks whether the acting node still lives
NOT_YET = "not yet"  # what an operation answers when it cannot be done yet (an image downloading)


def is_migration(task: CurrentTask | None) -> bool:
    return task is not None and task.migration is not None and task.taskState in STATES


def actor(task: CurrentTask) -> str | None:
    """The node whose agent carries out the step on record (None: the scheduler's)."""
    role = STEPS[task.taskState].role
    if role == Role.SCHEDULER:
        return None
    return task.migration.sourceNode if role == Role.SOURCE else task.migration.targetNode


def involves(task: CurrentTask | None, node: str) -> bool:
    return is_migration(task) and node in (task.migration.sourceNode, task.migration.targetNode)


def target_holds(task: CurrentTask | None) -> str | None:
    """The target node while it holds the instance's flavor (from the scheduler's pick until the
    task ends; not once a rollback has begun), for capacity (core/capacity.py)."""
    if not is_migration(task) or task.taskState in REVERTING or task.taskState == T.MIGRATE_SCHEDULING:
        return None
    return task.migration.targetNode


def refusal(vm_state: VmState, live: bool, pinned: str | None, node: str | None, target: str | None) -> str | None:
    """Why a Migrate request is refused before it begins (None: it may begin)."""
    if pinned:
        return (f"the instance is pinned to node {pinned} by spec.nodeName: remove spec.nodeName to let it move "
                "(the scheduler then keeps it where it is until a migration)")
    if not node:
        return "the instance is not placed on a node yet"
    if target == node:
        return f"the instance is on node {node} already"
    allowed = LIVE_FROM if live else COLD_FROM
    if vm_state not in allowed:
        kind = "live" if live else "cold"
        other = "" if vm_state not in (LIVE_FROM | COLD_FROM) else f" (a {'cold' if live else 'live'} one can)"
        return (f"cannot migrate {kind} while vm_state is {vm_state}{other}; "
                f"a {kind} migration moves an instance that is {' or '.join(sorted(allowed))}")
    return None


def evacuation_refusal(pinned: str | None, node: str | None, dead_for_s: float | None, after_s: float,
                       task: CurrentTask | None) -> str | None:
    """Why an Evacuate request is refused (None: it may begin). `dead_for_s`: how long ago the
    node's agent Lease expired (None: it is current)."""
    if pinned:
        return (f"the instance is pinned to node {pinned} by spec.nodeName: remove spec.nodeName to let it be "
                "rebuilt elsewhere")
    if not node:
        return "the instance is not placed on a node yet"
    if is_migration(task):
        return f"a {task.name} task is under way ({task.taskState.value}): it ends first"
    if dead_for_s is None:
        return f"node {node} is alive (its agent holds its Lease): use Migrate to move the instance"
    if dead_for_s < after_s:
        return (f"node {node}'s agent has been gone for {dead_for_s:.0f} s only; Evacuate waits {after_s:g} s "
                "(--evacuate-after), so that a slow node is not taken for a dead one: ask again later")
    return None


def evacuated_here(evacuated_from: str | None, placed_on: str | None, task: CurrentTask | None, node: str) -> bool:
    """Is a domain of this instance on `node` a stale copy the node's agent must destroy? Only
    when the instance was evacuated from `node` and lives elsewhere now, outside any migration
    that involves `node`."""
    return evacuated_from == node and placed_on != node and not involves(task, node)


def after_target_ready(task: CurrentTask, source: Facts) -> TaskState:
    """The source's hand-over: a cold migration of a guest that runs stops it first."""
    running = source.exists and source.power_state in (PowerState.RUNNING, PowerState.PAUSED)
    return T.MIGRATE_POWERING_OFF if not task.migration.live and running else T.MIGRATING


@dataclass(frozen=True)
class Look:
    """What an actor does about the step on record: run its operation, wait, or go on to
    `next_state` without running it (a fact already settled it)."""

    kind: str                       # "run" | "wait" | "goto" | "end_on_source" | "end_on_target"
    next_state: TaskState | None = None
    message: str = ""


def look_at_migrating(source: Facts) -> Look:
    """`migrating` found on record (never called twice): the source's domain decides."""
    if source.migrating:
        return Look("wait", message="a migration job still runs on the source")
    if not source.exists:
        return Look("goto", T.MIGRATE_CLEANING_SOURCE, "the guest had moved to the target")
    return Look("goto", T.MIGRATE_REVERTING_SOURCE, "interrupted before the guest moved: rolled back")


# The side that is not the actor, when the actor's node has been dead (its agent's Lease expired)
# longer than --migration-peer-dead-after: what it does so that the task ends (the guest stays
# where it is; a dead node's leftovers are removed by its agent when it comes back).
def takeover(task: CurrentTask, here: Facts) -> Look:
    """The survivor's decision, from its own libvirt's facts (`here`)."""
    state, target = task.taskState, task.migration.targetNode
    if state == T.MIGRATING:  # the source died mid-call: the target's domain says whether it moved
        if here.migrating:
            return Look("wait", message="an incoming migration job still runs on the target")
        if here.exists and here.power_state in (PowerState.RUNNING, PowerState.PAUSED):
            return Look("goto", T.MIGRATE_FINISHING, "the guest had moved; the source's node died")
        return Look("goto", T.MIGRATE_REVERTING_TARGET, "the source's node died before the guest moved")
    if state == T.MIGRATE_CLEANING_SOURCE:
        return Look("goto", T.MIGRATE_FINISHING, "the source's node died after the guest moved")
    if state in (T.MIGRATE_TARGET_READY, T.MIGRATE_POWERING_OFF, T.MIGRATE_REVERTING_SOURCE):
        return Look("goto", T.MIGRATE_REVERTING_TARGET, "the source's node died before the guest moved")
    if state == T.MIGRATE_FINISHING:
        return Look("end_on_target", message=f"the guest moved to node {target}, which died before the "
                                             "migration finished: Evacuate it")
    return Look("end_on_source", message=f"the target node {target} died before the guest moved")


def look(task: CurrentTask, here: Facts) -> Look:
    """The actor's decision about the step on record, from its own libvirt's facts."""
    if task.taskState == T.MIGRATING:
        return look_at_migrating(here)
    if task.taskState == T.MIGRATE_TARGET_READY:
        return Look("goto", after_target_ready(task, here))
    return Look("run")


def finished_on_target(origin: VmState, target: Facts) -> bool:
    """Does the target's domain rest in the origin state (the end of `migrate_finishing`)?"""
    if not target.exists:
        return False
    want = {V.ACTIVE: {PowerState.RUNNING}, V.PAUSED: {PowerState.PAUSED},
            V.STOPPED: {PowerState.SHUTOFF, PowerState.SHUTDOWN, PowerState.CRASHED}}.get(origin, set())
    return target.power_state in want


def survivor(task: CurrentTask) -> str | None:
    """The side that is not the actor of the step on record (None: the scheduler's step, or an
    evacuation, whose source is dead already)."""
    acting = actor(task)
    if acting is None or task.taskState == T.EVACUATE_REBUILDING:
        return None
    m = task.migration
    return m.targetNode if acting == m.sourceNode else m.sourceNode


def ending(task: CurrentTask, succeeded: bool) -> tuple[str, VmState]:
    """Where the instance rests when the task ends: (its node, its vm state). A failed finish on
    the target leaves it there in error; a failed revert leaves it on the source in error. An
    evacuated guest is booted afresh, unless it was stopped (Nova's evacuate)."""
    m = task.migration
    if task.taskState == T.EVACUATE_REBUILDING:
        return m.targetNode, (V.STOPPED if task.originVmState == V.STOPPED else V.ACTIVE) if succeeded else V.ERROR
    if task.taskState == T.MIGRATE_FINISHING:
        return m.targetNode, task.originVmState if succeeded else V.ERROR
    if task.taskState == T.MIGRATE_REVERTING_TARGET and not succeeded:
        return m.sourceNode, V.ERROR
    return m.sourceNode, task.originVmState
