"""The agent's next-step decision: what one reconcile of one instance does, as data.

A pure function of the instance, who this agent is, the wait it may have started, and `now`.
The shell (agent/engine.py) carries the answer out, then looks again: one decision per look.
The order of the rules is the order of the table below; read it beside DESIGN.md section 2.

| the instance                                             | next step           |
|----------------------------------------------------------|---------------------|
| migrating, and this node is the actor of the step on record | Migrate (core/migration.py) |
| migrating, and the other side's node acts                | MigrationPeer: take over if that node is dead |
| migrating, and the scheduler acts (or not this node's)   | Ignore              |
| another node's, or unpinned and not placed yet           | Ignore              |
| pinned here, not claimed by this node yet                | Claim               |
| a task on record, and delete or reset-state asked        | Preempt             |
| a task on record this agent is waiting on the guest for  | LookAtWait          |
| a task on record nobody here carries out                 | Recover             |
| being deleted, finalizer already gone                    | Ignore              |
| no finalizer yet                                         | AddFinalizer        |
| a request (delete, spec.action, declarative step)        | Request             |
| nothing asked                                            | Sync (drift)        |
"""
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from .. import FINALIZER
from ..api.models import VirtualInstance
from . import migration
from .desire import Request, next_request, preempts_running_task


class Kind(Enum):
    IGNORE = "ignore"
    CLAIM = "claim"
    PREEMPT = "preempt"
    LOOK_AT_WAIT = "look_at_wait"
    RECOVER = "recover"
    ADD_FINALIZER = "add_finalizer"
    REQUEST = "request"
    SYNC = "sync"
    MIGRATE = "migrate"
    MIGRATION_PEER = "migration_peer"


@dataclass(frozen=True)
class Step:
    kind: Kind
    request: Request | None = None   # REQUEST: what to take (still to be vouched for and policed)
    preempted_by: str | None = None  # PREEMPT: what preempts the task on record


def is_mine(inst: VirtualInstance, node: str) -> bool:
    """Pinned here, placed here by the scheduler (core/placement.py), or migrating to or from
    here: an unpinned instance not placed yet is nobody's."""
    if migration.involves(inst.status.currentTask, node):
        return True
    if inst.spec.nodeName:
        return inst.spec.nodeName == node
    return inst.status.node == node


def next_step(inst: VirtualInstance, node: str, owner: str, waiting_task_id: str | None,
              now: datetime) -> Step:
    """What one reconcile does. `waiting_task_id`: the task whose guest this agent pressed a
    button for in its present tenure (none after a restart: recovery decides then)."""
    task = inst.status.currentTask
    if migration.is_migration(task):
        if migration.actor(task) == node:
            return Step(Kind.MIGRATE)
        return Step(Kind.MIGRATION_PEER if migration.survivor(task) == node else Kind.IGNORE)
    if not is_mine(inst, node):
        return Step(Kind.IGNORE)
    if inst.status.node != node:
        return Step(Kind.CLAIM)
    deleting = inst.metadata.deletionTimestamp is not None
    task = inst.status.currentTask
    if task is not None:
        preempted_by = preempts_running_task(inst.spec, inst.status, deleting)
        if preempted_by:
            return Step(Kind.PREEMPT, preempted_by=preempted_by)
        if waiting_task_id == task.id and task.owner == owner:
            return Step(Kind.LOOK_AT_WAIT)
        return Step(Kind.RECOVER)
    has_finalizer = FINALIZER in inst.metadata.finalizers
    if deleting and not has_finalizer:
        return Step(Kind.IGNORE)
    if not has_finalizer:
        return Step(Kind.ADD_FINALIZER)
    request = next_request(inst.spec, inst.status, inst.metadata.generation or 0, deleting, now)
    return Step(Kind.REQUEST, request=request) if request is not None else Step(Kind.SYNC)
