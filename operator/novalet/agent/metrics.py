"""The agent's Prometheus metrics (prometheus-client), served on `--metrics-port`.

What happened to tasks (started, finished by result, how long), which recovery rules a
restart applied, the compare-and-swap writes the apiserver refused, how long libvirt calls
took and which failed, the Lease's renewals, the work queue's depth and the time a key waited
in it, how long a reconcile took and how much of it went to the apiserver's answers to the
agent's writes (so where a node's time goes is visible: libvirt, the apiserver, or neither), and the instances of this node by vmState and taskState (read from the agent's cache at
each scrape, so the figure is what the agent last saw).
"""
import json
from collections import Counter as Tally
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# seconds: a pause takes tens of milliseconds, a create with an image seconds, a resize minutes
TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CALL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry = registry or CollectorRegistry()
        self.tasks_started = Counter("novalet_tasks_started", "Tasks begun, by action.",
                                     ["action"], registry=registry)
        self.tasks_finished = Counter("novalet_tasks_finished", "Tasks ended, by action and result.",
                                      ["action", "result"], registry=registry)
        self.task_seconds = Histogram("novalet_task_duration_seconds",
                                      "From a task's start on record to its end, by action.",
                                      ["action"], buckets=TASK_BUCKETS, registry=registry)
        self.recoveries = Counter("novalet_recoveries", "Tasks found on record after an agent restart, "
                                  "by the recovery rule applied.", ["rule"], registry=registry)
        self.conflicts = Counter("novalet_cas_conflicts", "Status writes the apiserver refused with 409 "
                                 "(another writer was first).", registry=registry)
        self.libvirt_seconds = Histogram("novalet_libvirt_call_duration_seconds",
                                         "libvirt calls (hypervisor operations), by call.", ["call"],
                                         buckets=CALL_BUCKETS, registry=registry)
        self.libvirt_errors = Counter("novalet_libvirt_call_errors", "libvirt calls that failed or timed "
                                      "out, by call.", ["call"], registry=registry)
        self.watch_events = Counter("novalet_watch_events", "VirtualInstance events the agent's watch "
                                    "received: of its node's instances (mine) or of others (other).",
                                    ["instance"], registry=registry)
        self.lease_renewals = Counter("novalet_lease_renewals", "Attempts to take or renew the node's "
                                      "Lease, by result (renewed, lost, failed).", ["result"], registry=registry)
        self.queue_depth = Gauge("novalet_workqueue_depth", "Instances queued to be looked at.",
                                 registry=registry)
        self.queue_wait = Histogram("novalet_workqueue_wait_seconds", "From a key's queuing to the "
                                    "start of its reconcile.", buckets=WAIT_BUCKETS, registry=registry)
        self.reconcile_seconds = Histogram("novalet_reconcile_duration_seconds", "One look at an instance "
                                           "(one decision and what it carried out).", buckets=CALL_BUCKETS,
                                           registry=registry)
        self.write_seconds = Histogram("novalet_apiserver_write_duration_seconds", "The agent's writes of "
                                       "VirtualInstances, request to answer, by write (status, finalizers).",
                                       ["write"], buckets=CALL_BUCKETS, registry=registry)

    def count_instances(self, statuses: Callable[[], Iterable[dict]]) -> None:
        """Report `novalet_instances` from `statuses()` (the status of each instance of this
        node) at every scrape."""
        self.registry.register(_InstancesByState(statuses))

    def serve(self, port: int, address: str) -> None:
        start_http_server(port, addr=address, registry=self.registry)


class _InstancesByState(Collector):
    def __init__(self, statuses: Callable[[], Iterable[dict]]):
        self.statuses = statuses

    def collect(self):
        family = GaugeMetricFamily("novalet_instances", "Instances of this node, by vmState and taskState "
                                   "(taskState \"\" when idle), as the agent last saw them.",
                                   labels=["vm_state", "task_state"])
        tally = Tally((s.get("vmState") or "", s.get("taskState") or "") for s in self.statuses())
        for (vm_state, task_state), count in sorted(tally.items()):
            family.add_metric([vm_state, task_state], count)
        yield family


def statuses_in(bodies: Iterable[bytes], node: str) -> Iterable[dict]:
    """The status of each cached body (compact JSON) that is on `node`."""
    for raw in bodies:
        status = json.loads(raw).get("status") or {}
        if status.get("node") == node:
            yield status
