"""The engine: per instance, decide with the core, act through libvirt, record through CAS.

One asyncio lock per instance serializes this process; the compare-and-swap status writes
serialize processes. A 409 means someone else wrote: re-read and decide again.
"""
import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from .. import FINALIZER
from ..api.models import Condition, InstanceLock, VirtualInstance, VirtualInstanceStatus
from ..api.policies import REQUESTED_BY
from ..core import authorization, backoff, policy, recovery, transitions
from ..core.backoff import BackoffPolicy
from ..core.desire import Request, next_request, preempts_running_task, supersedes_running_task
from ..core.plans import BOOKKEEPING, ESCALATE_TO_HARD, Plan, plan_of
from ..core.transitions import DEFAULT_BACKOFF
from ..core.vocabulary import Action, VmState
from ..kube.events import EventRecorder
from ..kube.instances import Conflict, Gone, InstanceStore, parse
from .crashpoints import crash_if
from .operations import OperationError, Operations

log = logging.getLogger(__name__)
A = Action
MAX_ROUNDS = 32


class LostTask(Exception):
    """Another writer took or ended the task this agent was carrying out."""


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _key(body: dict[str, Any]) -> tuple[str, str]:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def _with_agent_ready(status: VirtualInstanceStatus, node: str) -> VirtualInstanceStatus:
    old = next((c for c in status.conditions if c.type == "HostAgentReady"), None)
    if old and old.status == "True":
        return status
    ready = Condition(type="HostAgentReady", status="True", reason="AgentAlive",
                      message=f"agent on node {node} is handling this instance", lastTransitionTime=now())
    others = [c for c in status.conditions if c.type != "HostAgentReady"]
    return status.model_copy(update={"conditions": [*others, ready]})


class Engine:
    def __init__(self, store: InstanceStore, events: EventRecorder, ops: Operations, node: str,
                 owner: str, backoff_policy: BackoffPolicy = DEFAULT_BACKOFF):
        self.store, self.events, self.ops = store, events, ops
        self.backoff_policy = backoff_policy
        self.node, self.owner = node, owner
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._changes: dict[tuple[str, str], asyncio.Event] = {}
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}

    # ---- placement -------------------------------------------------------------------
    def is_mine(self, inst: VirtualInstance) -> bool:
        if inst.spec.nodeName:
            return inst.spec.nodeName == self.node
        return inst.status.node in (None, self.node)

    def preempts(self, body: dict[str, Any]) -> bool:
        """A watch event asks for something that must not wait behind the running task."""
        try:
            inst = parse(body)
        except ValueError:
            return False
        return self.is_mine(inst) and preempts_running_task(
            inst.spec, inst.status, inst.metadata.deletionTimestamp is not None) is not None

    # ---- the loop ----------------------------------------------------------------------
    async def reconcile(self, namespace: str, name: str) -> float | None:
        """Bring one instance toward its spec. Returns the seconds after which it wants to be
        looked at again (a failed step's backoff), or None."""
        async with self._locks[(namespace, name)]:
            for _ in range(MAX_ROUNDS):
                body = await self.store.get(namespace, name)
                if body is None:
                    return None
                try:
                    if not await self._round(body):
                        return self._requeue_after(body)
                except (Conflict, LostTask) as why:
                    log.info("%s/%s: %s; re-reading", namespace, name, type(why).__name__)
                except Gone:
                    return None
            log.warning("%s/%s: still changing after %d rounds", namespace, name, MAX_ROUNDS)
            return None

    def _requeue_after(self, body: dict[str, Any]) -> float | None:
        status = parse(body).status
        return backoff.waiting(status, status.backoff.request, now()) if status.backoff else None

    async def _round(self, body: dict[str, Any]) -> bool:
        """One decision. True when it changed something and the next round may have work."""
        inst = parse(body)
        if not self.is_mine(inst):
            return False
        if inst.status.node != self.node:
            await self._claim(body, inst)
            return True
        deleting = inst.metadata.deletionTimestamp is not None
        if inst.status.currentTask is not None:
            preempted_by = preempts_running_task(inst.spec, inst.status, deleting)
            if preempted_by:
                await self._preempt(body, inst, preempted_by)
            else:
                await self._recover(body, inst)
            return True
        finalizers = inst.metadata.finalizers
        if deleting and FINALIZER not in finalizers:
            return False
        if not deleting and FINALIZER not in finalizers:
            await self.store.write_finalizers(body, [*finalizers, FINALIZER])
            return True
        request = next_request(inst.spec, inst.status, inst.metadata.generation or 0, deleting, now())
        if request is None:
            return await self._sync(body, inst)
        request, refusal = await self._vouch(inst, request)
        if refusal:
            await self._reject(body, request, refusal)
            return True
        if request.action in BOOKKEEPING:
            await self._bookkeeping(body, inst, request)
            return True
        refusal = policy.refusal(request.action, inst.status.vmState or VmState.BUILDING, None)
        if refusal:
            await self._reject(body, request, refusal)
            return True
        await self._execute(body, inst, request)
        return True

    # ---- writes ----------------------------------------------------------------------
    async def _cas(self, body: dict[str, Any], mutate: Callable[[VirtualInstanceStatus], VirtualInstanceStatus],
                   guard: Callable[[VirtualInstance], bool] | None) -> dict[str, Any]:
        """Write mutate(status) at body's resourceVersion. On 409, re-read; retry only while
        `guard` says the task is still ours, else let the caller decide again."""
        while True:
            try:
                current = parse(body)
                status = _with_agent_ready(mutate(current.status), self.node).model_copy(
                    update={"observedGeneration": current.metadata.generation})  # the spec it acted on
                return await self.store.write_status(body, status)
            except Conflict:
                if guard is None:
                    raise
                body = await self.store.get(*_key(body))
                if body is None:
                    raise Gone()
                if not guard(parse(body)):
                    raise LostTask()

    def _task_guard(self, task_id: str) -> Callable[[VirtualInstance], bool]:
        def guard(inst: VirtualInstance) -> bool:
            task = inst.status.currentTask
            return task is not None and task.id == task_id and task.owner == self.owner
        return guard

    async def _claim(self, body: dict[str, Any], inst: VirtualInstance) -> None:
        await self._cas(body, lambda s: s.model_copy(
            update={"node": self.node, "domainUUID": inst.metadata.uid}), guard=None)

    # ---- carrying out a plan ---------------------------------------------------------
    async def _execute(self, body: dict[str, Any], inst: VirtualInstance, request: Request) -> None:
        plan = plan_of(request.action)
        facts = await self.ops.facts(inst)
        target_flavor = inst.spec.flavor if request.action in (A.CREATE, A.RESIZE) else None
        target_image = inst.spec.image if request.action in (A.CREATE, A.REBUILD) else None
        body = await self._cas(body, lambda s: transitions.begin(
            s, plan, request.id, self.owner, now(), facts.power_state, target_flavor, target_image,
            handled=request.imperative, requested_by=request.requested_by), guard=None)
        await self.events.emit(body, "Started", f"{request.action.value} {request.id}: "
                                                f"{plan.steps[0].task_state.value}")
        crash_if("after_claim", request.action.value, plan.steps[0].task_state.value)
        await self._run_steps(body, plan, from_step=0)

    async def _run_steps(self, body: dict[str, Any], plan: Plan, from_step: int,
                         escalated: bool = False, note: str = "") -> None:
        task = parse(body).status.currentTask
        guard = self._task_guard(task.id)
        ops_left = [s for s in plan.steps[from_step:] if s.op]
        message = note
        try:
            for index, step in enumerate(plan.steps[from_step:], start=from_step):
                current = parse(body)
                if current.status.taskState != step.task_state:
                    facts = await self.ops.facts(current)
                    body = await self._cas(body, lambda s, st=step, f=facts: transitions.advance(
                        s, st, now(), domain_id=f.domain_id, escalated=escalated or None), guard)
                if step.op is None:
                    continue
                crash_if("after_started", plan.action.value, step.task_state.value)
                if step.op == "reboot_soft":
                    outcome, superseded_by = await self._soft_reboot(body)
                    if superseded_by:
                        await self._end(body, plan, succeeded=False,
                                        message=f"superseded by hard reboot {superseded_by}")
                        return
                else:
                    outcome = await self.ops.run(step.op, parse(body))
                if outcome is False and step.op == "reboot_soft":
                    body, escalation = await self._escalate(body, guard)
                    message = "; ".join(filter(None, (message, escalation)))
                ops_left.pop(0)
                crash_if("between_steps" if ops_left else "after_call", plan.action.value,
                         parse(body).status.taskState.value)
        except OperationError as error:
            await self._end(body, plan, succeeded=False, message="; ".join(filter(None, (note, str(error)))))
            return
        await self._end(body, plan, succeeded=True, message=message)

    def notify(self, body: dict[str, Any]) -> None:
        """The object changed (a watch event): a soft reboot that waits looks at it, in case a
        hard reboot came to supersede it."""
        key = _key(body)
        if key in self._changes:
            self._latest[key] = body
            self._changes[key].set()

    async def _soft_reboot(self, body: dict[str, Any]) -> tuple[bool | None, str | None]:
        """Wait for the guest's soft reboot, unless a hard reboot request supersedes it."""
        key = _key(body)
        changed = self._changes[key] = asyncio.Event()
        reboot = asyncio.ensure_future(self.ops.run("reboot_soft", parse(body)))
        try:
            while True:
                woke = asyncio.ensure_future(changed.wait())
                await asyncio.wait({reboot, woke}, return_when=asyncio.FIRST_COMPLETED)
                woke.cancel()
                if reboot.done():
                    return reboot.result(), None
                changed.clear()
                inst = parse(self._latest.pop(key))
                hard = supersedes_running_task(inst.spec, inst.status)
                if hard:  # the waiting thread times out on its own; its answer no longer matters
                    reboot.add_done_callback(lambda f: f.exception())
                    return None, hard
        finally:
            self._changes.pop(key, None)
            self._latest.pop(key, None)

    async def _escalate(self, body: dict[str, Any], guard) -> tuple[dict[str, Any], str]:
        facts = await self.ops.facts(parse(body))
        body = await self._cas(body, lambda s: transitions.advance(
            s, ESCALATE_TO_HARD, now(), domain_id=facts.domain_id, escalated=True), guard)
        await self.events.emit(body, "Escalated", "guest ignored the soft reboot; rebooting hard",
                               warning=True)
        await self.ops.run(ESCALATE_TO_HARD.op, parse(body))
        return body, f"guest ignored the soft reboot for {self.ops.soft_reboot_timeout:g}s; escalated to hard"

    async def _end(self, body: dict[str, Any], plan: Plan, succeeded: bool, message: str,
                   vm_state: VmState | None = None) -> None:
        inst = parse(body)
        task = inst.status.currentTask
        if plan.action == A.DELETE and succeeded:
            finalizers = [f for f in inst.metadata.finalizers if f != FINALIZER]
            await self.events.emit(body, "Deleted", f"domain and disks of {inst.metadata.uid} removed")
            await self.store.write_finalizers(body, finalizers)
            return
        facts = await self.ops.facts(inst)
        body = await self._cas(body, lambda s: transitions.finish(
            s, plan, succeeded, message, now(), facts.power_state, vm_state=vm_state,
            backoff_policy=self.backoff_policy), self._task_guard(task.id))
        reason = "Succeeded" if succeeded else "Failed"
        await self.events.emit(body, reason, f"{task.name} {task.id}: {message or reason.lower()}",
                               warning=not succeeded)

    async def _preempt(self, body: dict[str, Any], inst: VirtualInstance, by: str) -> None:
        """End the task on record without another hypervisor call (the one it is stuck in may
        never return): delete or reset-state comes next."""
        task = inst.status.currentTask
        plan = plan_of(Action(task.name))
        body = await self._cas(body, lambda s: transitions.finish(
            s, plan, False, f"superseded by {by}", now(), s.powerState, vm_state=task.originVmState,
            backoff_policy=self.backoff_policy), guard=lambda i: i.status.currentTask == task)
        await self.events.emit(body, "Superseded", f"{task.name} {task.id} ({task.taskState.value}): "
                                                   f"superseded by {by}", warning=True)

    # ---- recovery --------------------------------------------------------------------
    async def _recover(self, body: dict[str, Any], inst: VirtualInstance) -> None:
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
        await self.events.emit(body, "Recovering", f"{task.name} {task.id} found in {task.taskState.value} "
                                                   f"after an agent restart: {rule.kind} {rule.message}".strip())
        if rule.kind == "redo":
            plan = plan_of(rule.action)
            note = f"redone after an agent restart in {task.taskState.value}"
            await self._run_steps(body, plan, rule.from_step, escalated=rule.hard,
                                  note=f"{note}: {rule.message}" if rule.message else note)
            return
        plan = plan_of(Action(task.name))
        if rule.kind == "finish":
            await self._end(body, plan, succeeded=True, message=f"recovered: {rule.message}".strip(": "),
                            vm_state=rule.vm_state)
            return
        message = rule.message
        if rule.cleanup:
            try:
                note = await self.ops.run(rule.cleanup, parse(body))
            except OperationError as error:
                note = f"cleanup failed: {error}"
            message = f"{message}; {note}" if note else message
        if rule.kind == "revert":
            try:
                await self.ops.run("revert_resize_inflight", parse(body))
            except OperationError as error:
                await self._end(body, plan, succeeded=False, vm_state=VmState.ERROR,
                                message=f"{rule.message}; revert failed: {error}")
                return
        vm = VmState.ERROR if rule.kind == "error" else rule.vm_state
        await self._end(body, plan, succeeded=False, message=message, vm_state=vm)

    # ---- no task, no request ---------------------------------------------------------
    async def _sync(self, body: dict[str, Any], inst: VirtualInstance) -> bool:
        """Nothing to do for the spec: record libvirt's power state (drift), and that this
        generation is handled when no action wrote it yet (e.g. a spec change that needs none)."""
        facts = await self.ops.facts(inst)

        def synced(status: VirtualInstanceStatus) -> VirtualInstanceStatus:
            return transitions.observe_power(status, facts.power_state, facts.exists, now())

        expected = _with_agent_ready(synced(inst.status), self.node).model_copy(
            update={"observedGeneration": inst.metadata.generation})
        if _same(expected, inst.status):
            return False
        await self._cas(body, synced, guard=None)
        return True

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


def _same(a: VirtualInstanceStatus, b: VirtualInstanceStatus) -> bool:
    strip = {"conditions": {"__all__": {"lastTransitionTime"}}}
    return a.model_dump(exclude=strip) == b.model_dump(exclude=strip)
