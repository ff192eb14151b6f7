"""Marks instances whose node agent is gone: HostAgentReady=False with the last renewal.

Something alive must say that an agent is not: the agent itself cannot. This runs in the
cluster controller; the agent sets the condition back to True when it returns.
"""
import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from kubernetes_asyncio import client
from pydantic import ValidationError

from ..api.models import Condition, VirtualInstance, VirtualInstanceStatus
from ..core import conditions
from ..core.desire import imperative_action, seen_ids
from ..core.presentation import with_presentation
from ..kube.instances import Conflict, InstanceStore, parse
from ..kube.lease import LeaseView, view
from .metrics import ControllerMetrics

log = logging.getLogger(__name__)
NODE_LABEL = "novalet.io/node"


def agent_condition(inst: VirtualInstance, leases: dict[str, LeaseView], now: datetime) -> Condition | None:
    """The HostAgentReady=False condition this instance should show, or None (agent alive)."""
    node = inst.status.node or inst.spec.nodeName
    live = {n for n, lease in leases.items() if not lease.expired(now)}
    if node is None:
        if live:
            return None
        reason, message = "NoAgent", "no novalet agent is running to take this instance"
    elif node in live:
        return None
    else:
        lease = leases.get(node)
        when = lease.renewed.isoformat() if lease and lease.renewed else "never"
        reason = "AgentUnavailable"
        message = f"the agent of node {node} last renewed its lease at {when}"
    waiting = imperative_action(inst.spec) and inst.spec.action.id not in seen_ids(inst.status)
    if waiting:
        message += f"; request {inst.spec.action.id} waits for it and runs when it returns"
    return Condition(type="HostAgentReady", status="False", reason=reason, message=message,
                     lastTransitionTime=now.replace(microsecond=0))


def with_condition(inst: VirtualInstance, condition: Condition) -> VirtualInstanceStatus | None:
    """The status with the condition set (and Ready judged again: False while the agent is
    away), or None when it already says the same."""
    status = inst.status
    if conditions.same(conditions.find(status, condition.type), condition):
        return None
    status = conditions.set_condition(status, condition.type, condition.status, condition.reason,
                                      condition.message, condition.lastTransitionTime)
    return with_presentation(status, condition.lastTransitionTime, inst.spec, inst.metadata.generation)


class HeartbeatWatch:
    def __init__(self, api: client.ApiClient, lease_namespace: str, interval_s: float = 5.0,
                 metrics: ControllerMetrics | None = None, acting: Callable[[], bool] | None = None):
        """`acting`: whether this replica writes (it holds the scheduler's Lease); None: always."""
        self.metrics = metrics or ControllerMetrics()
        self.acting = acting or (lambda: True)
        self.coordination = client.CoordinationV1Api(api)
        self.store = InstanceStore(api)
        self.lease_namespace, self.interval_s = lease_namespace, interval_s
        self.latest: dict[str, LeaseView] = {}  # as of the last check (the webhook reads the networks)

    async def leases(self) -> dict[str, LeaseView]:
        result = await self.coordination.list_namespaced_lease(self.lease_namespace, label_selector=NODE_LABEL)
        self.latest = {lease.metadata.labels[NODE_LABEL]: view(lease) for lease in result.items}
        return self.latest

    def networks(self) -> dict[str, frozenset[str]]:
        """The networks each live agent says its node provides (at the last check)."""
        now = datetime.now(UTC)
        return {node: lease.networks for node, lease in self.latest.items()
                if lease.networks is not None and not lease.expired(now)}

    async def check_once(self) -> int:
        now = datetime.now(UTC)
        leases = await self.leases()
        if not self.acting():  # a standby replica: the Leases for its webhook, no writes
            return 0
        marked = unavailable = 0
        async for body in self.store.list_all():
            try:
                inst = parse(body)
            except ValidationError as error:  # a newer version's object: not for this controller
                meta = body.get("metadata") or {}
                log.debug("%s/%s: cannot read, skipped: %s", meta.get("namespace"), meta.get("name"), error)
                continue
            condition = agent_condition(inst, leases, now)
            unavailable += condition is not None
            status = condition and with_condition(inst, condition)
            if status is None:
                continue
            try:
                await self.store.write_status(body, status)
                marked += 1
                self.metrics.marked.inc()
            except Conflict:
                pass  # someone wrote first (maybe the agent, back): next round looks again
        self.metrics.agent_unavailable.set(unavailable)
        return marked

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
                self.metrics.heartbeat_checks.labels("done").inc()
            except Exception:
                log.exception("heartbeat check failed")
                self.metrics.heartbeat_checks.labels("failed").inc()
            await asyncio.sleep(self.interval_s)
