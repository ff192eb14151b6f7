"""The agent's heartbeat: a coordination.k8s.io Lease per node, renewed by the agent holding it.

The holder is the one agent process allowed to act on the node's instances; a second agent
for the same node waits as a hot standby and takes over once it has seen no renewal for a whole
lease duration on its own clock (client-go's observedTime: no trust in the holder's clock). The
holder's side of the fence (stop acting before that can happen) is agent/fence.py with the
timing rules in core/fencing.py. Every instance write is still a compare-and-swap besides.
"""
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from ..core.fencing import LeaseTiming, may_take_over

DEFAULT_TIMING = LeaseTiming()

log = logging.getLogger(__name__)


def lease_name(node: str) -> str:
    return f"novalet-agent-{node}"


NETWORKS_ANNOTATION = "novalet.io/networks"  # the networks the node's agent provides, comma-separated


@dataclass(frozen=True)
class LeaseView:
    holder: str | None
    renewed: datetime | None
    duration_s: int
    networks: frozenset[str] | None = None  # None: an agent that does not say (an older version)

    def expired(self, now: datetime) -> bool:
        return self.renewed is None or now > self.renewed + timedelta(seconds=self.duration_s)

    def dead_for(self, now: datetime, never: float) -> float | None:
        """Seconds since the Lease ran out (None: it is current; `never` when it was never renewed)."""
        if not self.expired(now):
            return None
        if self.renewed is None:
            return never
        return (now - (self.renewed + timedelta(seconds=self.duration_s))).total_seconds()


def holder_is_dead_here(holder: str | None, host: str) -> bool:
    """The holder was a process on this host that no longer runs (identity `node/host/pid/nonce`):
    a restarted agent takes over at once instead of waiting for the lease to run out."""
    parts = (holder or "").split("/")
    if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():  # same pid, other nonce: a container restarted; the old one is gone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def view(lease: client.V1Lease | None) -> LeaseView:
    if lease is None or lease.spec is None:
        return LeaseView(None, None, 0)
    spec = lease.spec
    said = ((lease.metadata and lease.metadata.annotations) or {}).get(NETWORKS_ANNOTATION)
    networks = frozenset(n for n in said.split(",") if n) if said is not None else None
    return LeaseView(spec.holder_identity, spec.renew_time, spec.lease_duration_seconds or 0, networks)


class NodeLease:
    def __init__(self, api: client.ApiClient, namespace: str, node: str, identity: str,
                 timing: LeaseTiming = DEFAULT_TIMING, clock: Callable[[], float] = time.monotonic,
                 networks: Iterable[str] = (), name: str | None = None, labels: dict[str, str] | None = None):
        """A node's Lease (`name`/`labels` default to the node agent's; the scheduler's has its own)."""
        self.coordination = client.CoordinationV1Api(api)
        self.name = name or lease_name(node)
        self.labels = {"novalet.io/node": node} if labels is None else labels
        self.networks = ",".join(sorted(networks))  # published with each renewal, for the webhook
        self.namespace, self.node, self.identity, self.timing = namespace, node, identity, timing
        self.clock = clock
        self._observed: tuple[object, ...] | None = None  # the other holder's record, as last seen
        self._observed_at = 0.0

    @property
    def duration_s(self) -> int:
        return int(self.timing.duration_s)

    def _unchanged_since(self, lease: client.V1Lease) -> float:
        """When this agent first saw the Lease's current record (holder, renewal)."""
        record = (lease.spec.holder_identity, lease.spec.renew_time, lease.metadata.resource_version)
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        return self._observed_at

    async def read(self, node: str | None = None) -> client.V1Lease | None:
        try:
            return await self.coordination.read_namespaced_lease(lease_name(node) if node else self.name,
                                                                 self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def try_acquire_or_renew(self) -> bool:
        """True while this agent holds the node's lease. A compare-and-swap on the Lease."""
        now = datetime.now(UTC)
        lease = await self.read()
        current = view(lease)
        if current.holder not in (None, self.identity) \
                and not may_take_over(self._unchanged_since(lease), self.clock(), self.timing) \
                and not holder_is_dead_here(current.holder, socket.gethostname()):
            return False
        spec = client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.duration_s,
                                  renew_time=now, acquire_time=now if current.holder != self.identity
                                  else lease.spec.acquire_time)
        try:
            if lease is None:
                body = client.V1Lease(metadata=client.V1ObjectMeta(
                    name=self.name, namespace=self.namespace, labels=self.labels,
                    annotations={NETWORKS_ANNOTATION: self.networks}), spec=spec)
                await self.coordination.create_namespaced_lease(self.namespace, body)
            else:
                lease.spec = spec  # replace carries metadata.resourceVersion: 409 if someone won
                lease.metadata.annotations = {**(lease.metadata.annotations or {}),
                                              NETWORKS_ANNOTATION: self.networks}
                await self.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as error:
            if error.status in (409, 422):
                return False
            raise
        return True

    async def release(self) -> None:
        lease = await self.read()
        if lease is not None and view(lease).holder == self.identity:
            lease.spec.holder_identity = None
            lease.spec.renew_time = None
            try:
                await self.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
            except ApiException as error:
                log.info("lease release skipped: %s", error.reason)
