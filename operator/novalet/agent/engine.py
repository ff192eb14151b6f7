"""The engine: per instance, decide with the core, act through libvirt, record through CAS.

`reconcile` makes one decision about one instance and returns when to look at it again; the
agent's work queue (agent/workqueue.py) never runs two reconciles of one instance at once, and
the compare-and-swap status writes serialize processes. A 409 means someone else wrote: the
next look reads afresh and decides again. A task's steps run within one decision, except a
wait on the guest (a soft reboot, an ACPI stop): that is a deadline in `currentTask`, and the
instance is looked at again when libvirt reports the guest's answer or the deadline comes.
"""
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import FINALIZER
from ..api.models import (
    CurrentTask,
    InstanceLock,
    InterfaceStatus,
    MigrationRecord,
    VirtualInstance,
    VirtualInstanceStatus,
)
from ..api.policies import REQUESTED_BY
from ..core import (
    authorization,
    backoff,
    catalog,
    conditions,
    interfaces,
    migration,
    policy,
    presentation,
    recovery,
    transitions,
    waits,
)
from ..core.backoff import BackoffPolicy
from ..core.desire import Request, preempts_running_task, supersedes_running_task
from ..core.next_step import Kind, is_mine, next_step
from ..core.plans import BOOKKEEPING, ESCALATE_TO_HARD, Plan, plan_of
from ..core.transitions import DEFAULT_BACKOFF
from ..core.vocabulary import Action, Op, PowerState, TaskState, VmState
from ..kube.events import EventRecorder
from ..kube.instances import Conflict, Gone, InstanceStore, parse
from .crashpoints import crash_if
from .metrics import AgentMetrics
from .operations import OperationError, Operations

log = logging.getLogger(__name__)
A = Action
# A guest has answered an ACPI stop once its QEMU process is gone: `shutdown` (being shut down)
# is not off yet, and a stop that ended there would record a power state about to change.
POWERED_OFF = frozenset({PowerState.SHUTOFF, PowerState.CRASHED})


class LostTask(Exception):
    """Another writer took or ended the task this agent was carrying out."""


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Wait:
    """A guest this process asked to act (the button pressed in this tenure), and until when."""

    task_id: str
    op: Op
    baseline: int        # soft reboot: the guest's resets libvirt had reported before the press
    deadline: datetime
    message: str         # what the task's record says so far (e.g. "redone after an agent restart")


def _key(body: dict[str, Any]) -> tuple[str, str]:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def _with_interfaces(status: VirtualInstanceStatus, seen: list[InterfaceStatus] | None) -> VirtualInstanceStatus:
    """status.interfaces as libvirt last showed them (None: not looked at this time)."""
    return status if seen is None else status.model_copy(update={"interfaces": seen})


def _with_agent_ready(status: VirtualInstanceStatus, node: str) -> VirtualInstanceStatus:
    if (old := conditions.find(status, "HostAgentReady")) and old.status == "True":
        return status
    return conditions.set_condition(status, "HostAgentReady", True, "AgentAlive",
                                    f"agent on node {node} is handling this instance", now())


class Engine:
    def __init__(self, store: InstanceStore, events: EventRecorder, ops: Operations, node: str,
                 owner: str, backoff_policy: BackoffPolicy = DEFAULT_BACKOFF, metrics: AgentMetrics | None = None,
                 peer_dead_for: Callable[[str], Awaitable[float | None]] | None = None,
                 peer_dead_after_s: float = 60.0):
        self.store, self.events, self.ops = store, events, ops
        self.backoff_policy = backoff_policy
        self.metrics = metrics or AgentMetrics()
        self._began: dict[str, float] = {}  # task id -> monotonic start, for tasks begun here
        self.node, self.owner = node, owner
        self._waits: dict[str, Wait] = {}  # uid -> the wait this tenure started
        # a migration's other node: seconds since its agent's Lease ran out (None: alive)
        self.peer_dead_for = peer_dead_for or _never_dead
        self.peer_dead_after_s = peer_dead_after_s

    # ---- placement -------------------------------------------------------------------
    def is_mine(self, inst: VirtualInstance) -> bool:
        return is_mine(inst, self.node)

    def preempts(self, inst: VirtualInstance) -> bool:
        """A watch event asks for something that must not wait behind the running task."""
        return self.is_mine(inst) and preempts_running_task(
            inst.spec, inst.status, inst.metadata.deletionTimestamp is not None) is not None

    # ---- one decision ------------------------------------------------------------------
    async def reconcile(self, namespace: str, name: str) -> float | None:
        """Make one decision about one instance. Returns the seconds after which it wants to be
        looked at again (0: at once, it changed something; a wait's next look; a failed step's
        backoff), or None: only an event brings it back."""
        body = await self.store.read(namespace, name)
        if body is None:
            return None
        try:
            again = await self._round(body)
        except (Conflict, LostTask) as why:
            log.info("%s/%s: %s; looking again", namespace, name, type(why).__name__)
            self.store.forget(namespace, name)  # the next look reads afresh
            return 0.0
        except Gone:
            return None
        return again if again is not None else self._requeue_after(body)

    def _requeue_after(self, body: dict[str, Any]) -> float | None:
        """A failed step's backoff: when it may be tried again."""
        status = parse(body).status
        return backoff.waiting(status, status.backoff.request, now()) if status.backoff else None

    def forget_waits(self) -> None:
        """The tenure ended: a new one recovers every task on record (the table decides)."""
        self._waits.clear()
        self._began.clear()

    def forget(self, uid: str) -> None:
        self._waits.pop(uid, None)

    async def _round(self, body: dict[str, Any]) -> float | None:
        """Carry out the core's next step (core/next_step.py): 0 when it changed something
        (look again at once), a wait's next look, or None when there is nothing to do."""
        inst = parse(body)
        wait = self._waits.get(inst.metadata.uid)
        step = next_step(inst, self.node, self.owner, wait.task_id if wait else None, now())
        match step.kind:
            case Kind.IGNORE:
                return None
            case Kind.CLAIM:
                await self._claim(body, inst)
            case Kind.PREEMPT:
                await self._preempt(body, inst, step.preempted_by)
            case Kind.LOOK_AT_WAIT:
                return await self._look_at_wait(body, inst, wait)
            case Kind.RECOVER:
                return await self._recover(body, inst)
            case Kind.ADD_FINALIZER:
                await self.store.write_finalizers(body, [*inst.metadata.finalizers, FINALIZER])
            case Kind.SYNC:
                self.forget(inst.metadata.uid)
                return await self._sync(body, inst)
            case Kind.REQUEST:
                self.forget(inst.metadata.uid)
                return await self._take(body, inst, step.request)
            case Kind.MIGRATE:
                return await self._migrate(body, inst)
            case Kind.MIGRATION_PEER:
                return await self._migration_peer(body, inst)
        return 0.0

    async def _take(self, body: dict[str, Any], inst: VirtualInstance, request: Request) -> float | None:
        """A request: refused (who asked may not; the state does not allow it), recorded
        (reset-state, lock, unlock), or carried out."""
        request, refusal = await self._vouch(inst, request)
        if refusal is None and request.action not in BOOKKEEPING:
            refusal = policy.refusal(request.action, inst.status.vmState or VmState.BUILDING, None)
        if refusal is None and request.action == A.EVACUATE:  # the scheduler's, for a dead node: this one runs
            refusal = migration.evacuation_refusal(inst.spec.nodeName, self.node, None, 0, inst.status.currentTask)
        if refusal is None and request.action == A.MIGRATE:
            asked = inst.spec.action
            refusal = migration.refusal(inst.status.vmState or VmState.BUILDING, bool(asked.live),
                                        inst.spec.nodeName, inst.status.node, asked.targetNode)
        if refusal:
            await self._reject(body, request, refusal)
        elif request.action in BOOKKEEPING:
            await self._bookkeeping(body, inst, request)
        elif request.action == A.MIGRATE:
            await self._begin_migration(body, inst, request)
        else:
            return await self._execute(body, inst, request)
        return 0.0

    # ---- writes ----------------------------------------------------------------------
    async def _cas(self, body: dict[str, Any], mutate: Callable[[VirtualInstanceStatus], VirtualInstanceStatus],
                   guard: Callable[[VirtualInstance], bool] | None) -> dict[str, Any]:
        """Write mutate(status) at body's resourceVersion. On 409, re-read; retry only while
        `guard` says the task is still ours, else let the caller decide again."""
        while True:
            try:
                current = parse(body)
                status = self._as_written(mutate(current.status), current)
                return await self.store.write_status(body, status)
            except Conflict:
                self.metrics.conflicts.inc()
                if guard is None:
                    raise
                body = await self.store.get(*_key(body))
                if body is None:
                    raise Gone()
                if not guard(parse(body)):
                    raise LostTask()

    def _as_written(self, status: VirtualInstanceStatus, inst: VirtualInstance) -> VirtualInstanceStatus:
        """What a write of `status` records: this agent alive, the conditions judged against the
        spec it acted on (Ready only when that spec is met), and that spec's generation."""
        generation = inst.metadata.generation
        return presentation.with_presentation(_with_agent_ready(status, self.node), now(), inst.spec, generation
                                              ).model_copy(update={"observedGeneration": generation})

    def _task_guard(self, task_id: str) -> Callable[[VirtualInstance], bool]:
        def guard(inst: VirtualInstance) -> bool:
            task = inst.status.currentTask
            return task is not None and task.id == task_id and task.owner == self.owner
        return guard

    async def _claim(self, body: dict[str, Any], inst: VirtualInstance) -> None:
        await self._cas(body, lambda s: s.model_copy(
            update={"node": self.node, "domainUUID": inst.metadata.uid}), guard=None)

    # ---- carrying out a plan ---------------------------------------------------------
    async def _execute(self, body: dict[str, Any], inst: VirtualInstance, request: Request) -> float | None:
        plan = plan_of(request.action)
        target_flavor = inst.spec.flavor if request.action in (A.CREATE, A.RESIZE) else None
        target_image = inst.spec.image if request.action in (A.CREATE, A.REBUILD) else None
        image = await self.ops.image_state(inst, target_image) if target_image else ("", "")
        if image[0] == catalog.DOWNLOADING:  # waited for before the task begins: nothing to recover
            return await self._wait_for_image(body, inst, image[1])
        facts = await self.ops.facts(inst)
        body = await self._cas(body, lambda s: catalog.image_condition(transitions.begin(
            s, plan, request.id, self.owner, now(), facts.power_state, target_flavor, target_image,
            handled=request.imperative, requested_by=request.requested_by), target_image, *image, now()),
            guard=None)
        self.metrics.tasks_started.labels(request.action.value).inc()
        self._began[request.id] = time.monotonic()
        await self.events.emit(body, "Started", f"{request.action.value} {request.id}: "
                                                f"{plan.steps[0].task_state.value}")
        crash_if("after_claim", request.action.value, plan.steps[0].task_state.value)
        return await self._run_steps(body, plan, from_step=0)

    async def _wait_for_image(self, body: dict[str, Any], inst: VirtualInstance, waiting: str) -> float:
        """The image is downloading to this node: say so (once per change), look again soon."""
        def downloading(status: VirtualInstanceStatus) -> VirtualInstanceStatus:
            return catalog.image_condition(status, inst.spec.image, catalog.DOWNLOADING, waiting, now())

        if not _same(self._as_written(downloading(inst.status), inst), inst.status):
            await self._cas(body, downloading, guard=None)
        return catalog.LOOK_AGAIN_S

    async def _run_steps(self, body: dict[str, Any], plan: Plan, from_step: int,
                         escalated: bool = False, note: str = "") -> float | None:
        """Run the plan's steps from `from_step`, each after its task state is on record. A step
        that waits on the guest ends this decision: the instance is looked at again later."""
        task = parse(body).status.currentTask
        guard = self._task_guard(task.id)
        ops_left = [s for s in plan.steps[from_step:] if s.op]
        try:
            for index, step in enumerate(plan.steps[from_step:], start=from_step):
                current = parse(body)
                if current.status.taskState != step.task_state:
                    facts = await self.ops.facts(current)
                    body = await self._cas(body, lambda s, st=step, f=facts: transitions.advance(
                        s, st, now(), domain_id=f.domain_id, escalated=escalated or None,
                        wait_s=self.ops.wait_s(st.op)), guard)
                if step.op is None:
                    continue
                crash_if("after_started", plan.action.value, step.task_state.value)
                if step.op in waits.WAITING_OPS:
                    return await self._press(body, plan, step.op, guard, note)
                await self.ops.run(step.op, parse(body))
                ops_left.pop(0)
                crash_if("between_steps" if ops_left else "after_call", plan.action.value,
                         parse(body).status.taskState.value)
        except OperationError as error:
            await self._end(body, plan, succeeded=False, message="; ".join(filter(None, (note, str(error)))))
            return 0.0
        await self._end(body, plan, succeeded=True, message=note)
        return 0.0

    # ---- waiting on the guest (core/waits.py) ------------------------------------------
    async def _press(self, body: dict[str, Any], plan: Plan, op: Op, guard, note: str) -> float | None:
        """Ask the guest (ACPI) and return: the wait is a deadline, not a blocked thread. A task
        recovered past its deadline is not asked again: it escalates (or is forced) at once."""
        inst = parse(body)
        task = inst.status.currentTask
        deadline = task.deadline or now() + timedelta(seconds=self.ops.wait_s(op) or 0)
        if datetime.now(UTC) >= deadline:
            return await self._wait_ended(body, inst, Wait(task.id, op, 0, deadline, note), "expired")
        baseline = await self.ops.press(op, inst)
        if baseline is None:  # nothing to wait for: a guest that is not running, or already off
            if op == Op.REBOOT_SOFT:
                body, escalation = await self._escalate(body, guard, "the guest was not running")
                note = "; ".join(filter(None, (note, escalation)))
            crash_if("after_call", plan.action.value, parse(body).status.taskState.value)
            await self._end(body, plan, succeeded=True, message=note)
            return 0.0
        wait = self._waits[inst.metadata.uid] = Wait(task.id, op, baseline, deadline, note)
        return await self._look_at_wait(body, inst, wait)

    async def _look_at_wait(self, body: dict[str, Any], inst: VirtualInstance, wait: Wait) -> float | None:
        """Did the guest answer? If not, is the deadline past (escalate / force)? Else later."""
        plan = plan_of(Action(inst.status.currentTask.name))
        if wait.op == Op.REBOOT_SOFT:
            hard = supersedes_running_task(inst.spec, inst.status)
            if hard:
                self.forget(inst.metadata.uid)
                await self._end(body, plan, succeeded=False, message=f"superseded by hard reboot {hard}")
                return 0.0
            answered = self.ops.rebooted_since(inst, wait.baseline)
        else:
            facts = await self.ops.facts(inst)
            answered = not facts.exists or facts.power_state in POWERED_OFF
        outcome = waits.look_again(answered, wait.deadline, datetime.now(UTC))
        if isinstance(outcome, float):
            return outcome
        return await self._wait_ended(body, inst, wait, outcome)

    async def _wait_ended(self, body: dict[str, Any], inst: VirtualInstance, wait: Wait, outcome: str) -> float:
        """The guest answered, or the deadline passed: escalate / force, then end the task."""
        plan = plan_of(Action(inst.status.currentTask.name))
        self.forget(inst.metadata.uid)
        message = wait.message
        try:
            if outcome == "expired" and wait.op == Op.REBOOT_SOFT:
                body, escalation = await self._escalate(
                    body, self._task_guard(wait.task_id),
                    f"the guest ignored the soft reboot for {self.ops.soft_reboot_timeout:g}s")
                message = "; ".join(filter(None, (message, escalation)))
            elif outcome == "expired":
                await self.ops.force_off(inst)
                message = "; ".join(filter(None, (
                    message, f"the guest ignored the ACPI shutdown for {self.ops.stop_timeout:g}s; powered off")))
        except OperationError as error:
            await self._end(body, plan, succeeded=False, message="; ".join(filter(None, (message, str(error)))))
            return 0.0
        crash_if("after_call", plan.action.value, parse(body).status.taskState.value)
        await self._end(body, plan, succeeded=True, message=message)
        return 0.0

    async def _escalate(self, body: dict[str, Any], guard, why: str) -> tuple[dict[str, Any], str]:
        facts = await self.ops.facts(parse(body))
        body = await self._cas(body, lambda s: transitions.advance(
            s, ESCALATE_TO_HARD, now(), domain_id=facts.domain_id, escalated=True), guard)
        await self.events.emit(body, "Escalated", f"{why}; rebooting hard", warning=True)
        await self.ops.run(ESCALATE_TO_HARD.op, parse(body))
        return body, f"{why}; escalated to hard"

    async def _end(self, body: dict[str, Any], plan: Plan, succeeded: bool, message: str,
                   vm_state: VmState | None = None) -> None:
        inst = parse(body)
        task = inst.status.currentTask
        self.forget(inst.metadata.uid)
        if plan.action == A.DELETE and succeeded:
            finalizers = [f for f in inst.metadata.finalizers if f != FINALIZER]
            await self.events.emit(body, "Deleted", f"domain and disks of {inst.metadata.uid} removed")
            await self.store.write_finalizers(body, finalizers)
            self._count_end(task, "Succeeded")
            return
        facts = await self.ops.facts(inst)
        seen = await self._interfaces_with_result(inst, facts.exists)
        body = await self._cas(body, lambda s: _with_interfaces(transitions.finish(
            s, plan, succeeded, message, now(), facts.power_state, vm_state=vm_state,
            backoff_policy=self.backoff_policy), seen), self._task_guard(task.id))
        reason = "Succeeded" if succeeded else "Failed"
        self._count_end(task, reason)
        await self.events.emit(body, reason, f"{task.name} {task.id}: {message or reason.lower()}",
                               warning=not succeeded)

    async def _interfaces_with_result(self, inst: VirtualInstance, exists: bool) -> list[InterfaceStatus] | None:
        """The interfaces to record with a task's result (a create's first record of them) rather
        than in a write of their own; None when there is nothing new to look for, or libvirt
        did not say (a sync looks again)."""
        if not (exists and interfaces.should_look(inst.status)):
            return None
        try:
            return await self.ops.interfaces(inst)
        except OperationError as error:
            log.info("%s/%s: interfaces not read with the result: %s", inst.metadata.namespace, inst.metadata.name, error)
            return None

    def _count_end(self, task: CurrentTask, result: str) -> None:
        """A task begun here is timed by the monotonic clock; one recovered from another
        process by its record (`startedAt`, whole seconds)."""
        began = self._began.pop(task.id, None)
        seconds = time.monotonic() - began if began is not None else (now() - task.startedAt).total_seconds()
        self.metrics.tasks_finished.labels(task.name, result).inc()
        self.metrics.task_seconds.labels(task.name).observe(max(0.0, seconds))

    async def _preempt(self, body: dict[str, Any], inst: VirtualInstance, by: str) -> None:
        """End the task on record without another hypervisor call (the one it is stuck in may
        never return): delete or reset-state comes next."""
        task = inst.status.currentTask
        plan = plan_of(Action(task.name))
        self.forget(inst.metadata.uid)
        body = await self._cas(body, lambda s: transitions.finish(
            s, plan, False, f"superseded by {by}", now(), s.powerState, vm_state=task.originVmState,
            backoff_policy=self.backoff_policy), guard=lambda i: i.status.currentTask == task)
        self._count_end(task, "Failed")
        await self.events.emit(body, "Superseded", f"{task.name} {task.id} ({task.taskState.value}): "
                                                   f"superseded by {by}", warning=True)

    # ---- recovery --------------------------------------------------------------------
    async def _recover(self, body: dict[str, Any], inst: VirtualInstance) -> float | None:
        """A task on record that nobody in this process is carrying out: its agent died (we
        hold the node's lease, so it is not running anywhere). Apply the recovery table."""
        task = inst.status.currentTask
        facts = await self.ops.facts(inst)
        rule = recovery.recover(task, facts)
        log.info("%s/%s: recovering %s (%s): %s %s", *_key(body), task.taskState, task.id, rule.kind,
                 rule.message)
        taken = task.model_copy(update={"owner": self.owner, "attempt": task.attempt + 1})
        body = await self._cas(body, lambda s: s.model_copy(update={"currentTask": taken}),
                               guard=lambda i: i.status.currentTask == task)
        self.metrics.recoveries.labels(rule.kind).inc()
        await self.events.emit(body, "Recovering", f"{task.name} {task.id} found in {task.taskState.value} "
                                                   f"after an agent restart: {rule.kind} {rule.message}".strip())
        if rule.kind == "redo":
            plan = plan_of(rule.action)
            note = f"redone after an agent restart in {task.taskState.value}"
            return await self._run_steps(body, plan, rule.from_step, escalated=rule.hard,
                                         note=f"{note}: {rule.message}" if rule.message else note)
        plan = plan_of(Action(task.name))
        if rule.kind == "finish":
            await self._end(body, plan, succeeded=True, message=f"recovered: {rule.message}".strip(": "),
                            vm_state=rule.vm_state)
            return 0.0
        message = rule.message
        if rule.cleanup:
            try:
                note = await self.ops.run(rule.cleanup, parse(body))
            except OperationError as error:
                note = f"cleanup failed: {error}"
            message = f"{message}; {note}" if note else message
        if rule.kind == "revert":
            try:
                await self.ops.run(Op.REVERT_RESIZE_INFLIGHT, parse(body))
            except OperationError as error:
                await self._end(body, plan, succeeded=False, vm_state=VmState.ERROR,
                                message=f"{rule.message}; revert failed: {error}")
                return 0.0
        vm = VmState.ERROR if rule.kind == "error" else rule.vm_state
        await self._end(body, plan, succeeded=False, message=message, vm_state=vm)
        return 0.0

    # ---- migration (core/migration.py: this agent is the source or the target) ---------------
    async def _begin_migration(self, body: dict[str, Any], inst: VirtualInstance, request: Request) -> None:
        """The source takes the request: both sides and the origin on record from this first
        write, then the label every agent's watch sees (the scheduler picks the target)."""
        asked = inst.spec.action
        facts = await self.ops.facts(inst)
        record = MigrationRecord(sourceNode=self.node, targetNode=asked.targetNode, live=bool(asked.live))
        body = await self._cas(body, lambda s: transitions.begin_migration(
            s, request.id, self.owner, now(), facts.power_state, record, TaskState.MIGRATE_SCHEDULING,
            requested_by=request.requested_by), guard=None)
        self.metrics.tasks_started.labels(A.MIGRATE.value).inc()
        self._began[request.id] = time.monotonic()
        kind = "live" if record.live else "cold"
        await self.events.emit(body, "Started", f"Migrate {request.id} ({kind}) from node {self.node} to "
                                                f"{record.targetNode or 'a node the scheduler picks'}")
        crash_if("after_claim", A.MIGRATE.value, TaskState.MIGRATE_SCHEDULING.value)
        await self.store.write_label(body, parse(body))

    async def _migrate(self, body: dict[str, Any], inst: VirtualInstance) -> float | None:
        """This agent acts on the migration step on record: run its operation (every one but
        the migration call may run again), or go on as the facts say (core/migration.look)."""
        task = inst.status.currentTask
        await self.store.write_label(body, inst)  # a crash may have come between the task and its label
        here = await self.ops.migration_facts(inst)
        decision = migration.look(task, here)
        if decision.kind == "wait":
            return migration.LOOK_AGAIN_S
        if decision.kind == "goto":
            if task.taskState == TaskState.MIGRATING:  # on record, not called by this look: recovered
                self.metrics.recoveries.labels("migrate").inc()
                await self.events.emit(body, "Recovering", f"Migrate {task.id} found in migrating: "
                                                           f"{decision.message}")
            return await self._migration_goto(body, task, decision.next_state, decision.message)
        step = migration.STEPS[task.taskState]
        try:
            result = await self.ops.run(step.op, inst)
        except OperationError as error:
            return await self._migration_failed(body, task, step, str(error))
        if result == migration.NOT_YET:
            return migration.LOOK_AGAIN_S
        crash_if("after_call", A.MIGRATE.value, task.taskState.value)
        if step.on_success is None:
            return await self._migration_end(body, task, succeeded=True)
        return await self._migration_goto(body, task, step.on_success, "", **(result or {}))

    async def _migration_failed(self, body: dict[str, Any], task: CurrentTask, step, error: str) -> float | None:
        note = "; ".join(filter(None, (task.migration.note, f"{task.taskState.value}: {error}")))
        await self.events.emit(body, "MigrationStepFailed", f"Migrate {task.id}: {note}", warning=True)
        if step.on_failure is None:
            return await self._migration_end(body, task, succeeded=False, message=note)
        extra = {"revertFailed": True} if task.taskState == TaskState.MIGRATE_REVERTING_SOURCE else {}
        return await self._migration_goto(body, task, step.on_failure, error, **extra)

    async def _migration_goto(self, body: dict[str, Any], task: CurrentTask, next_state: TaskState,
                              message: str, **record: Any) -> float | None:
        """Write the next step (the actor of this one hands over); the migration call itself
        runs right after its step is on record, in this same decision, and nowhere else."""
        note = "; ".join(filter(None, (task.migration.note, message)))
        body = await self._cas(body, lambda s: transitions.migration_step(
            s, next_state, self.owner, now(), note=note, **record), guard=lambda i: i.status.currentTask == task)
        crash_if("after_started", A.MIGRATE.value, next_state.value)
        if next_state != TaskState.MIGRATING:
            return 0.0
        inst = parse(body)
        task = inst.status.currentTask
        try:
            await self.ops.run(Op.MIGRATE, inst)
        except OperationError as error:
            decision = migration.look_at_migrating(await self.ops.migration_facts(inst))
            if decision.kind == "wait":
                return migration.LOOK_AGAIN_S  # the next look decides by what libvirt shows then
            return await self._migration_goto(body, task, decision.next_state, f"migrating: {error}")
        crash_if("after_call", A.MIGRATE.value, TaskState.MIGRATING.value)
        return await self._migration_goto(body, task, TaskState.MIGRATE_CLEANING_SOURCE, "")

    async def _migration_peer(self, body: dict[str, Any], inst: VirtualInstance) -> float | None:
        """The other side's step is on record: nothing to do while its node lives; once that node
        has been dead past --migration-peer-dead-after, take over so that the task ends
        (core/migration.takeover)."""
        task = inst.status.currentTask
        acting = migration.actor(task)
        dead_for = await self.peer_dead_for(acting)
        if dead_for is None or dead_for < self.peer_dead_after_s:
            return migration.PEER_LOOK_S if dead_for is None else max(1.0, self.peer_dead_after_s - dead_for)
        decision = migration.takeover(task, await self.ops.migration_facts(inst))
        if decision.kind == "wait":
            return migration.LOOK_AGAIN_S
        log.warning("%s/%s: %s %s: node %s dead for %.0f s; taking over: %s", *_key(body), task.name, task.id,
                    acting, dead_for, decision.message)
        self.metrics.recoveries.labels("migration_takeover").inc()
        await self.events.emit(body, "TakingOver", f"{task.name} {task.id} in {task.taskState.value}: node {acting} "
                                                   f"dead for {dead_for:.0f} s; {decision.message}", warning=True)
        if decision.kind == "goto":
            return await self._migration_goto(body, task, decision.next_state, decision.message)
        where = ((task.migration.sourceNode, task.originVmState) if decision.kind == "end_on_source"
                 else (task.migration.targetNode, VmState.ERROR))
        return await self._migration_end(body, task, False, decision.message, where=where)

    async def _migration_end(self, body: dict[str, Any], task: CurrentTask, succeeded: bool,
                             message: str = "", where: tuple[str, VmState] | None = None) -> float | None:
        """The last step's actor ends the task: where the instance now rests (core/migration.ending,
        or `where` a survivor's takeover names)."""
        node, vm = where or migration.ending(task, succeeded)
        succeeded = succeeded and task.taskState in (TaskState.MIGRATE_FINISHING, TaskState.EVACUATE_REBUILDING)
        moved = (f"rebuilt on node {node} from image {task.originImage or '(none: diskless)'}; what was on node "
                 f"{task.migration.sourceNode}'s local disk is lost" if task.name == A.EVACUATE.value
                 else f"moved from node {task.migration.sourceNode} to node {node}")
        message = message or task.migration.note or (moved if succeeded else "rolled back")
        if task.migration.revertFailed:
            vm = VmState.ERROR
        facts = await self.ops.facts(parse(body)) if node == self.node else None
        power = facts.power_state if facts else parse(body).status.powerState

        evacuated = {"evacuatedFrom": task.migration.sourceNode} if task.name == A.EVACUATE.value else {}

        def ended(status: VirtualInstanceStatus) -> VirtualInstanceStatus:
            status = transitions.finish(status, None, succeeded, message, now(), power, vm_state=vm,
                                        backoff_policy=self.backoff_policy)
            return status.model_copy(update={"node": node, **evacuated})

        body = await self._cas(body, ended, guard=lambda i: i.status.currentTask == task)
        self._count_end(task, "Succeeded" if succeeded else "Failed")
        reason = {(A.MIGRATE.value, True): "Migrated", (A.MIGRATE.value, False): "MigrationFailed",
                  (A.EVACUATE.value, True): "Evacuated", (A.EVACUATE.value, False): "EvacuationFailed"}
        await self.events.emit(body, reason[task.name, succeeded], f"{task.name} {task.id}: {message}",
                               warning=not succeeded)
        await self.store.write_label(body, parse(body))
        return 0.0

    # ---- no task, no request ---------------------------------------------------------
    async def _sync(self, body: dict[str, Any], inst: VirtualInstance) -> float | None:
        """Nothing to do for the spec: record libvirt's power state (drift) and the interfaces'
        addresses, and that this generation is handled when no action wrote it yet (e.g. a spec
        change that needs none). 0 when it wrote; while a guest just started has no lease yet,
        when to look for it again."""
        facts = await self.ops.facts(inst)
        seen = await self.ops.interfaces(inst) if facts.exists and interfaces.should_look(inst.status) else None

        def synced(status: VirtualInstanceStatus) -> VirtualInstanceStatus:
            return _with_interfaces(transitions.observe_power(status, facts.power_state, facts.exists, now()), seen)

        if _same(self._as_written(synced(inst.status), inst), inst.status):
            return interfaces.address_poll_after(inst.status, now())
        await self._cas(body, synced, guard=None)
        return 0.0

    # ---- who asked -----------------------------------------------------------------
    async def _vouch(self, inst: VirtualInstance, request: Request) -> tuple[Request, str | None]:
        """The request with its requester as far as the apiserver vouches for it (recorded in
        lastAction and history), and why it is refused, if it is (core/authorization.py): an
        action that needs the requester's identity without one, or one RBAC does not allow."""
        action = inst.spec.action if request.imperative else None
        claimed = (action.requestedBy if action else
                   None if request.action == A.DELETE else inst.metadata.annotations.get(REQUESTED_BY))
        asking = authorization.Asking(
            request.action, request.imperative, claimed, False, inst.metadata.namespace, inst.metadata.name,
            secret=action.secretRef.name if action and action.secretRef else None, lock=inst.status.lock)
        # asked afresh when the decision depends on it; a cached answer is enough for the record
        needed = authorization.needs_identity(asking)
        asking = replace(asking, trusted=bool(claimed) and await self.ops.access.policies_in_force(fresh=needed))
        request = replace(request, requested_by=claimed if asking.trusted else None)
        answers = {check: await self.ops.access.allowed(claimed, action.requesterGroups if action else None, check)
                   for check in authorization.checks(asking)}
        return request, authorization.refusal(asking, answers)

    async def _reject(self, body: dict[str, Any], request: Request, why: str) -> None:
        await self._cas(body, lambda s: transitions.reject(
            s, request.action.value, request.id, why, now(), handled=request.imperative,
            requested_by=request.requested_by), guard=None)
        await self.events.emit(body, "Rejected", f"{request.action.value} {request.id}: {why}", warning=True)

    async def _bookkeeping(self, body: dict[str, Any], inst: VirtualInstance, request: Request) -> None:
        """Requests that only record something: reset-state, lock, unlock."""
        facts = await self.ops.facts(inst)
        status, vm = inst.status, inst.status.vmState or VmState.BUILDING
        changes: dict[str, Any] = {}
        if request.action == A.RESET_STATE:
            vm = VmState(inst.spec.action.state)
            message, reason = f"state reset to {vm.value} by an administrator", "StateReset"
        elif request.action == A.LOCK:
            changes["lock"] = InstanceLock(lockedBy=request.requested_by or "unknown",
                                           reason=inst.spec.action.reason or "", lockedAt=now())
            message, reason = f"locked: {inst.spec.action.reason or 'no reason given'}", "Locked"
        else:
            changes["lock"] = None
            message, reason = f"unlocked (was locked by {status.lock.lockedBy})" if status.lock \
                else "was not locked", "Unlocked"
        await self._cas(body, lambda s: transitions.settle(
            s, vm, request.action.value, request.id, "Succeeded", message, now(), facts.power_state,
            handled=True, requested_by=request.requested_by, **changes), guard=None)
        await self.events.emit(body, reason, f"{message} ({request.id})", warning=request.action == A.RESET_STATE)


async def _never_dead(node: str) -> float | None:
    return None


def _same(a: VirtualInstanceStatus, b: VirtualInstanceStatus) -> bool:
    strip = {"conditions": {"__all__": {"lastTransitionTime"}}}
    return a.model_dump(exclude=strip) == b.model_dump(exclude=strip)
