"""The agent's Prometheus metrics, scraped like Prometheus does after a lifecycle, against
what happened: a create, a pause, a rejected request and a delete of one diskless instance."""
import asyncio

import pytest

from .harness import free_port, sample, scrape, status_of, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


async def scraped(port: int) -> dict:
    return await asyncio.to_thread(scrape, port)


async def test_metrics_count_what_the_agent_did(instances, agents):
    node, port = unique_node(), free_port()
    agents.start(node, extra_args=["--metrics-port", str(port)])
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    await instances.wait_idle("vm", "active", agents=agents)
    await instances.patch_spec("vm", {"powerState": "Paused"})
    await instances.wait_idle("vm", "paused", agents=agents)

    samples = await scraped(port)
    assert sample(samples, "novalet_instances", vm_state="paused", task_state="") == 1
    for action in ("Create", "Pause"):
        assert sample(samples, "novalet_tasks_started_total", action=action) == 1
        assert sample(samples, "novalet_tasks_finished_total", action=action, result="Succeeded") == 1
        assert sample(samples, "novalet_task_duration_seconds_count", action=action) == 1
        assert sample(samples, "novalet_task_duration_seconds_sum", action=action) > 0
    assert sample(samples, "novalet_libvirt_call_duration_seconds_count", call="pause") == 1
    assert sample(samples, "novalet_libvirt_call_duration_seconds_count", call="facts") >= 2
    assert sample(samples, "novalet_lease_renewals_total", result="renewed") >= 1
    assert sample(samples, "novalet_lease_renewals_total", result="failed") == 0
    assert sample(samples, "novalet_workqueue_wait_seconds_count") >= 2
    # create: the finalizer and six status writes; pause: two. Every write is made by a reconcile
    assert sample(samples, "novalet_apiserver_write_duration_seconds_count", write="finalizers") == 1
    assert sample(samples, "novalet_apiserver_write_duration_seconds_count", write="status") >= 8
    writes_s = sum(sample(samples, "novalet_apiserver_write_duration_seconds_sum", write=w)
                   for w in ("finalizers", "status"))
    assert 0 < writes_s < sample(samples, "novalet_reconcile_duration_seconds_sum")
    assert ("novalet_workqueue_depth", ()) in samples
    assert sample(samples, "novalet_recoveries_total", rule="redo") == 0  # nothing was interrupted

    # a request the state does not allow is refused: no task, no libvirt call
    await instances.request("vm", {"name": "ConfirmResize", "id": "confirm-1"})
    body = await instances.wait("vm", lambda b: (status_of(b).get("lastAction") or {}).get("id") == "confirm-1",
                                what="the refusal", agents=agents)
    assert status_of(body)["lastAction"]["result"] == "Rejected"
    await instances.delete("vm")
    await instances.wait_gone("vm", agents=agents)

    samples = await scraped(port)
    assert sample(samples, "novalet_tasks_started_total", action="ConfirmResize") == 0
    assert sample(samples, "novalet_tasks_finished_total", action="Delete", result="Succeeded") == 1
    assert sample(samples, "novalet_libvirt_call_duration_seconds_count", call="pause") == 1
    assert sample(samples, "novalet_apiserver_write_duration_seconds_count", write="finalizers") == 2
    assert not [key for key in samples if key[0] == "novalet_instances"]  # gone from the node


def get(url: str) -> tuple[int, str]:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as answer:  # loopback only
        return answer.status, answer.read().decode()


async def test_agent_and_controller_answer_their_liveness_probe(agents):
    """--health-port: kopf's liveness endpoint, which the chart's liveness and readiness probes ask."""
    agent_port, controller_port = free_port(), free_port()
    agent = agents.start(unique_node(), extra_args=["--health-port", str(agent_port)])
    controller = agents.start_controller(extra_args=["--health-port", str(controller_port)])
    for port, process in ((agent_port, agent), (controller_port, controller)):
        for _ in range(60):
            try:
                status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
                break
            except OSError:
                assert process.process.poll() is None, process.tail()
                await asyncio.sleep(0.5)
        else:
            pytest.fail(f"nothing answered on port {port}\n{process.tail()}")
        assert status == 200 and body.startswith("{"), body
