"""SetPassword reaches a real guest: a real agent builds a tiny guest, which runs the QEMU guest
agent (qemu-ga) on its org.qemu.guest_agent.0 port; a Secret holds the password; the request,
made by the test's admin identity (which may read the Secret), ends Succeeded in
status.lastAction, and the guest's /etc/shadow has the new password's hash: the guest serves its
root entry at http://<guest>/shadow, which the test reads from inside the stack's network
namespace (`guest_netns`). Real apiserver, admission policies, libvirtd, QEMU and guest agent."""
import asyncio
import base64
import re
import subprocess

import libvirt
import pytest
from kubernetes_asyncio import client

from .conftest import TINY
from .harness import status_of, unique_node
from .libvirt_checks import domain
from .test_guest_network import address, fetch, wait_address

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
PASSWORD = "Zebra quartz: 4417 $PATH ünïcode"  # a space, a colon, UTF-8, no shell expansion


def shadow_has(entry: str, user: str, password: str) -> bool:
    """Is ``entry`` (a line of /etc/shadow) ``user``'s, with a SHA-512 crypt hash of ``password``?
    (openssl computes it with the entry's salt; the password goes through its stdin.)"""
    fields = entry.strip().split(":")
    m = re.fullmatch(r"\$6\$([^$]+)\$[./0-9A-Za-z]+", fields[1]) if len(fields) == 9 else None
    if fields[0] != user or not m:
        return False
    out = subprocess.run(["openssl", "passwd", "-6", "-salt", m.group(1), "-stdin"], input=password.encode(),
                         capture_output=True, check=True).stdout
    return out.decode().strip() == fields[1]


async def agent_answers(libvirt_view, uid: str, timeout: float = 60.0) -> dict:
    """The guest agent's word for the guest's interfaces, once it answers (qemu-ga starts just
    after the guest's ready marker)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return domain(libvirt_view, uid).interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0)
        except libvirt.libvirtError as e:
            if loop.time() > deadline:
                raise AssertionError(f"the guest agent did not answer within {timeout}s: {e}") from None
        await asyncio.sleep(0.5)


async def test_set_password_reaches_the_guest(instances, agents, guest_netns, kube_api, namespace, libvirt_view):
    node = unique_node()
    agents.start(node)
    created = await instances.create("vm", {"flavor": FLAVOR, "image": TINY, "nodeName": node})
    uid = created["metadata"]["uid"]
    ip = address(await wait_address(instances, agents))
    assert await fetch(guest_netns, f"http://{ip}/shadow") == b"root:*:0:0:99999:7:::\n"  # locked at first
    nics = await agent_answers(libvirt_view, uid)  # its agent knows the address DHCP gave it
    assert ip in [a["addr"] for a in nics["eth0"]["addrs"]], nics

    await client.CoreV1Api(kube_api).create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="pw"), data={"password": base64.b64encode(PASSWORD.encode()).decode()}))
    await instances.request("vm", {"name": "SetPassword", "id": "pw-1", "user": "root", "secretRef": {"name": "pw"}})
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="pw-1")
    last = status_of(body)["lastAction"]
    assert last["result"] == "Succeeded", last
    assert last["requestedBy"] == body["spec"]["action"]["requestedBy"] == "novalet-admin"  # the apiserver's word
    entry = (await fetch(guest_netns, f"http://{ip}/shadow")).decode()
    assert shadow_has(entry, "root", PASSWORD), entry
    assert not shadow_has(entry, "root", PASSWORD[:-1]), entry

    # a user the guest does not have: Failed, and root's password stays
    await instances.request("vm", {"name": "SetPassword", "id": "pw-2", "user": "nobody",
                                   "secretRef": {"name": "pw"}})
    body = await instances.wait_idle("vm", "active", agents=agents, last_id="pw-2")
    last = status_of(body)["lastAction"]
    assert last["result"] == "Failed" and PASSWORD not in last["message"], last
    assert (await fetch(guest_netns, f"http://{ip}/shadow")).decode() == entry
