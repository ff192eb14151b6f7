"""The controller's heartbeat check goes on past an object this version cannot read (a newer
agent's status value): the other instances of a dead agent's node are still marked."""
from novalet.controller.heartbeat import HeartbeatWatch
from novalet.controller.metrics import ControllerMetrics

FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def body(name: str, vm_state: str) -> dict:
    return {"apiVersion": "novalet.io/v1alpha1", "kind": "VirtualInstance",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": "1"},
            "spec": {"flavor": FLAVOR, "nodeName": "gone"}, "status": {"vmState": vm_state, "node": "gone"}}


class Store:
    def __init__(self, bodies):
        self.bodies, self.written = bodies, []

    async def list_all(self):
        for body in self.bodies:
            yield body

    async def write_status(self, body, status):
        self.written.append((body["metadata"]["name"], status))


async def test_an_unreadable_object_does_not_stop_the_heartbeat_check():
    watch = HeartbeatWatch.__new__(HeartbeatWatch)
    watch.store = Store([body("newer", "shelved"), body("ok", "active")])
    watch.metrics = ControllerMetrics()
    watch.acting = lambda: True

    async def leases():
        return {}  # the node's agent never renewed: every instance of it is marked

    watch.leases = leases
    assert await watch.check_once() == 1
    [(name, status)] = watch.store.written
    conditions = {c.type: c for c in status.conditions}
    assert name == "ok" and conditions["HostAgentReady"].status == "False"
    assert (conditions["Ready"].status, conditions["Ready"].reason) == ("False", "HostAgentUnavailable")
    assert watch.metrics.registry.get_sample_value("novalet_instances_agent_unavailable") == 1  # the readable one


async def test_a_standby_replica_reads_the_leases_and_writes_nothing():
    """Two controller replicas: the one holding the scheduler's Lease marks dead agents'
    instances; the other keeps the Leases (its webhook reads their networks) and writes nothing."""
    watch = HeartbeatWatch.__new__(HeartbeatWatch)
    watch.store = Store([body("ok", "active")])
    watch.metrics = ControllerMetrics()
    read = []

    async def leases():
        read.append(True)
        return {}

    watch.leases = leases
    watch.acting = lambda: False
    assert await watch.check_once() == 0 and watch.store.written == [] and read
    watch.acting = lambda: True
    assert await watch.check_once() == 1
