"""The validating webhook (`novalet controller`) refuses what depends on the current state,
with a message a user can act on; the CRD schema and CEL refuse what is static."""
import asyncio
import json
import socket

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from novalet.controller.main import WEBHOOK_NAME

from .harness import free_port, sample, scrape, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
async def webhook(agents, kube_api, control_plane):
    port, metrics_port = free_port(), free_port()
    controller = agents.start_controller(webhook_port=port, metrics_port=metrics_port)
    controller.metrics_port = metrics_port
    admission = client.AdmissionregistrationV1Api(kube_api)
    for _ in range(240):  # until the configuration exists and the server answers
        try:
            await admission.read_validating_webhook_configuration(WEBHOOK_NAME)
            if listening(port):
                break
        except ApiException:
            pass
        await asyncio.sleep(0.25)
    else:
        pytest.fail(f"the webhook never came up\n{controller.tail()}")
    yield controller
    controller.stop()
    await admission.delete_validating_webhook_configuration(WEBHOOK_NAME)  # fails closed otherwise


async def refused(coro) -> str:
    with pytest.raises(ApiException) as error:
        await coro
    body = json.loads(error.value.body)
    assert error.value.status in (400, 422), body["message"]  # not 403: RBAC allowed the request
    return body["message"]


async def test_state_dependent_request_refused_at_admission(webhook, instances, agents):
    node = unique_node()
    agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node, "powerState": "Stopped"})
    await instances.wait_idle("vm", "stopped", agents=agents)
    body = await refused(instances.request("vm", {"name": "Reboot", "type": "Soft", "id": "r1"}))
    assert "cannot reboot (soft) while vm_state is stopped; allowed:" in body
    assert "reboot (hard)" in body
    after = await instances.get("vm")
    assert "action" not in after["spec"]  # nothing was stored: the user's object is as it was
    await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "r2"})  # allowed one passes
    record = await instances.wait_done("vm", "r2", agents=agents)  # (then the spec stops it again)
    assert record["result"] == "Succeeded"

    samples = await asyncio.to_thread(scrape, webhook.metrics_port)  # the controller counted both
    assert sample(samples, "novalet_admission_reviews_total", result="denied") == 1
    assert sample(samples, "novalet_admission_reviews_total", result="allowed") >= 2  # the create, r2
    assert sample(samples, "novalet_heartbeat_checks_total", result="done") >= 1
    assert sample(samples, "novalet_instances_agent_unavailable") == 0


async def test_reused_action_id_refused(webhook, instances, agents):
    """The CRD's CEL rule refuses the id handled last (test_requests_once.py); the webhook also
    refuses an older id still in the history."""
    node = unique_node()
    agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    await instances.wait_idle("vm", "active", agents=agents)
    for request_id in ("once", "then"):
        await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": request_id})
        await instances.wait_idle("vm", "active", agents=agents, last_id=request_id)
    await instances.patch_spec("vm", {"action": None})
    body = await refused(instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "once"}))
    assert "action id once was already used; commit a new id" in body
    body = await refused(instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "then"}))
    assert "action id then was already handled; commit a new id" in body


async def test_static_rules_refused_by_the_schema_without_a_webhook(instances):
    body = await refused(instances.create("bad", {"flavor": FLAVOR, "image": "../../etc/shadow"}))
    assert "spec.image" in body
    body = await refused(instances.create("bad", {"flavor": FLAVOR, "action": {"name": "Reboot", "id": "x"}}))
    assert "Reboot needs type: Soft or Hard" in body
    body = await refused(instances.create("bad", {"flavor": {"vcpus": 0, "memoryMiB": 128}}))
    assert "spec.flavor.vcpus" in body


async def test_a_network_no_live_agent_provides_is_refused_at_admission(webhook, instances, agents, kube_api):
    """Each agent publishes its networks on its Lease; the webhook refuses the others by name."""
    node = unique_node()
    agents.start(node, extra_args=["--network", "default=network:default", "--network", "ext=bridge:br-nv-ext"])
    custom = client.CustomObjectsApi(kube_api)
    body = {"apiVersion": "novalet.io/v1alpha1", "kind": "VirtualInstance", "metadata": {"name": "vm"},
            "spec": {"flavor": FLAVOR, "image": "", "nodeName": node,
                     "interfaces": [{"name": "default", "network": "default"}, {"name": "st", "network": "storage"}]}}

    async def dry_run():  # server-side dry run: admission runs, nothing is stored
        return await custom.create_namespaced_custom_object("novalet.io", "v1alpha1", instances.namespace,
                                                            "virtualinstances", body, dry_run="All")
    message = None
    for _ in range(80):  # until the controller's heartbeat has seen the agent's Lease (every 5 s)
        try:
            await dry_run()
        except ApiException as error:
            message = json.loads(error.body)["message"]
            break
        await asyncio.sleep(0.25)
    assert message and (f"spec.interfaces: st asks for network storage, which node {node} does not provide "
                        "(networks: default, ext)") in message, message
    body["spec"]["interfaces"][1]["network"] = "ext"
    await dry_run()  # a network the node provides is admitted
