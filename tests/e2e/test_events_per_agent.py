"""Each agent watches only its own instances (docs/multi-node.md): the label `novalet.io/node`
(set by the admission policy novalet-placement on a pinned instance, by the agent on one the
scheduler placed on its node) is the selector of its watch. Three agents, 300 instances pinned
100 to each, and each agent's `novalet_watch_events_total{instance="other"}` stays 0. The agents
run on libvirt's test driver (each node a driver of its own behind the stack's libvirtd), the
apiserver and the admission policy are the real ones."""
import asyncio
import dataclasses
import re
import urllib.parse
import urllib.request

import pytest
from kubernetes_asyncio import client

from .harness import free_port, unique_node

pytestmark = [pytest.mark.stack, pytest.mark.slow]
PER_NODE = 100
NODE_XML = ("<node><cpu><mhz>3000</mhz><model>t</model><active>2</active><total>2</total><nodes>1</nodes>"
            "<sockets>1</sockets><cores>2</cores><threads>1</threads></cpu><memory>67108864</memory></node>")


def driver_uri(libvirt_uri: str, node_file) -> str:
    socket = urllib.parse.parse_qs(urllib.parse.urlsplit(libvirt_uri).query)["socket"][0]
    return f"test+unix://{node_file}?socket={urllib.parse.quote(socket, safe='/')}"


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^novalet_watch_events_total\{instance="(\w+)"\} (\S+)$', text, re.MULTILINE)}


async def test_each_agent_receives_only_its_own_instances(instances, agents, libvirt_uri, tmp_path, kube_api,
                                                         namespace):
    nodes, ports = [unique_node() for _ in range(3)], [free_port() for _ in range(3)]
    for node, port in zip(nodes, ports, strict=True):
        node_file = tmp_path / f"{node}.xml"
        node_file.write_text(NODE_XML)
        fleet = dataclasses.replace(agents, libvirt_uri=driver_uri(libvirt_uri, node_file))
        fleet.start(node, extra_args=["--metrics-port", str(port), "--workers", "8"])
    names = [(f"vm-{n}-{i:03d}", node) for n, node in enumerate(nodes) for i in range(PER_NODE)]
    for start in range(0, len(names), 25):
        await asyncio.gather(*(instances.create(name, {"flavor": {"vcpus": 1, "memoryMiB": 128}, "image": "",
                                                       "nodeName": node, "interfaces": []})
                               for name, node in names[start:start + 25]))
    custom = client.CustomObjectsApi(kube_api)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 240
    while True:
        listed = await custom.list_namespaced_custom_object("novalet.io", "v1alpha1", namespace, "virtualinstances")
        active = [i for i in listed["items"] if (i.get("status") or {}).get("vmState") == "active"
                  and not i["status"].get("taskState")]
        if len(active) == len(names):
            break
        assert loop.time() < deadline, f"{len(active)} of {len(names)} active"
        await asyncio.sleep(1)
    for item in listed["items"]:  # the label each watch selects by
        assert item["metadata"]["labels"]["novalet.io/node"] == item["spec"]["nodeName"], item["metadata"]
    for node, port in zip(nodes, ports, strict=True):
        counts = await asyncio.to_thread(scrape, port)
        assert counts.get("other", 0) == 0, (node, counts)
        assert counts["mine"] > 0, (node, counts)  # kopf may fold an object's events into one
