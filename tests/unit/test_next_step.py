"""The agent's next-step decision (core/next_step.py), row by row of its table, and for any
instance: exactly one step, never a request while a task is on record."""
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novalet import FINALIZER
from novalet.api.models import VirtualInstance
from novalet.core.next_step import Kind, next_step
from novalet.core.vocabulary import Action

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
ME, OWNER = "node-a", "node-a/host/1/abc"
TASK = {"name": "RebootSoft", "id": "r1", "taskState": "reboot_started", "originVmState": "active",
        "owner": OWNER, "startedAt": NOW.isoformat()}


def instance(node_name=None, status_node=ME, task=None, finalizers=(FINALIZER,), deleting=False,
             action=None, vm_state="active", power="Running") -> VirtualInstance:
    metadata = {"name": "vm", "namespace": "ns", "uid": "u-1", "generation": 2,
                "finalizers": list(finalizers)}
    if deleting:
        metadata["deletionTimestamp"] = NOW.isoformat()
    spec = {"flavor": {"vcpus": 1, "memoryMiB": 128}, "powerState": power, **({"nodeName": node_name} if node_name else {})}
    if action:
        spec["action"] = action
    status = {"vmState": vm_state, "node": status_node, "flavor": {"vcpus": 1, "memoryMiB": 128}, "image": "",
              **({"currentTask": task, "taskState": task["taskState"]} if task else {})}
    return VirtualInstance.model_validate({"metadata": metadata, "spec": spec, "status": status})


ROWS = [
    ("pinned to another node", instance(node_name="node-b"), None, Kind.IGNORE),
    ("claimed by another node", instance(status_node="node-b"), None, Kind.IGNORE),
    ("pinned here, not claimed yet", instance(node_name=ME, status_node=None), None, Kind.CLAIM),
    ("unpinned, not placed yet: the scheduler places it", instance(status_node=None), None, Kind.IGNORE),
    ("unpinned, placed here by the scheduler", instance(status_node=ME, finalizers=()), None, Kind.ADD_FINALIZER),
    ("a task, and a delete", instance(task=TASK, deleting=True), "r1", Kind.PREEMPT),
    ("a task, and reset-state", instance(task=TASK, action={"name": "ResetState", "id": "x", "state": "active"}),
     "r1", Kind.PREEMPT),
    ("a task this agent waits on", instance(task=TASK), "r1", Kind.LOOK_AT_WAIT),
    ("a task another process left", instance(task={**TASK, "owner": "node-a/host/9/old"}), "r1", Kind.RECOVER),
    ("a task this tenure never started", instance(task=TASK), None, Kind.RECOVER),
    ("deleted, finalizer gone", instance(finalizers=(), deleting=True), None, Kind.IGNORE),
    ("no finalizer yet", instance(finalizers=()), None, Kind.ADD_FINALIZER),
    ("being deleted", instance(deleting=True), None, Kind.REQUEST),
    ("a new spec.action", instance(action={"name": "Reboot", "type": "Hard", "id": "h1"}), None, Kind.REQUEST),
    ("a declarative change", instance(power="Paused"), None, Kind.REQUEST),
    ("nothing asked", instance(), None, Kind.SYNC),
]


@pytest.mark.parametrize("inst,waiting,kind", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_the_table(inst, waiting, kind):
    step = next_step(inst, ME, OWNER, waiting, NOW)
    assert step.kind == kind
    assert (step.request is not None) == (kind == Kind.REQUEST)
    assert (step.preempted_by is not None) == (kind == Kind.PREEMPT)


def test_the_request_is_the_one_desire_names():
    step = next_step(instance(deleting=True), ME, OWNER, None, NOW)
    assert step.request.action == Action.DELETE
    step = next_step(instance(power="Paused"), ME, OWNER, None, NOW)
    assert step.request.action == Action.PAUSE and not step.request.imperative


@settings(max_examples=300, deadline=None)
@given(node_name=st.sampled_from([None, ME, "node-b"]), status_node=st.sampled_from([None, ME, "node-b"]),
       task=st.sampled_from([None, TASK, {**TASK, "owner": "other"}]), deleting=st.booleans(),
       finalizers=st.sampled_from([(), (FINALIZER,)]), waiting=st.sampled_from([None, "r1", "r2"]),
       power=st.sampled_from(["Running", "Stopped", "Paused"]))
def test_a_task_on_record_is_never_passed_over_for_a_new_request(node_name, status_node, task, deleting,
                                                                 finalizers, waiting, power):
    inst = instance(node_name=node_name, status_node=status_node, task=task, deleting=deleting,
                    finalizers=finalizers, power=power)
    step = next_step(inst, ME, OWNER, waiting, NOW)
    if task is not None and step.kind not in (Kind.IGNORE, Kind.CLAIM):
        assert step.kind in (Kind.PREEMPT, Kind.LOOK_AT_WAIT, Kind.RECOVER)
    if step.kind == Kind.LOOK_AT_WAIT:
        assert waiting == task["id"] and task["owner"] == OWNER
