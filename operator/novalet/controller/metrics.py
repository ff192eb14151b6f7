"""The controller's Prometheus metrics (prometheus-client), served on `--metrics-port`:
admission reviews by result, heartbeat checks, instances marked HostAgentReady=False, and how
many instances' agents are unavailable at the last check."""
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry = registry or CollectorRegistry()
        self.admission_reviews = Counter("novalet_admission_reviews", "Spec changes the validating webhook "
                                         "reviewed, by result (allowed, denied).", ["result"], registry=registry)
        self.heartbeat_checks = Counter("novalet_heartbeat_checks", "Rounds of the agents' heartbeat check, by "
                                        "result (done, failed).", ["result"], registry=registry)
        self.marked = Counter("novalet_agent_unavailable_marks", "Instances marked HostAgentReady=False "
                              "(their node's agent Lease expired or is missing).", registry=registry)
        self.agent_unavailable = Gauge("novalet_instances_agent_unavailable", "Instances whose node's agent "
                                       "was unavailable at the last heartbeat check.", registry=registry)

    def serve(self, port: int, address: str) -> None:
        start_http_server(port, addr=address, registry=self.registry)
