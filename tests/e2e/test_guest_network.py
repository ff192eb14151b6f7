"""Guests on the network, with their user data: real agents build tiny guests (virtio-net, DHCP,
an HTTP server answering its uid and its cidata files) on the local stack's libvirt network, which
lives in the stack's own network namespace; the test reaches them only from inside it
(`guest_netns`, as `novalet dev exec` does), or from another guest (its shell driven through
`novalet console`). Real apiserver, libvirtd, dnsmasq and QEMU."""
import asyncio
import base64
import json
import os
import re
import sys
import time

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from novalet.core.interfaces import mac_address

from .conftest import TINY
from .harness import status_of, unique_node
from .test_console import Terminal, shell_answers

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk4fHcX0Q2nq1b0nWcS4bZ9Uq6zWkq3O0kq8wXl0p1a alice@laptop",
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY= bob"]
USER_DATA = "#cloud-config\nwrite_files:\n- path: /etc/motd\n  content: \"héllo, wörld\\n\"\n"


def address(body: dict) -> str | None:
    nics = status_of(body).get("interfaces") or []
    return nics[0]["ipAddresses"][0] if nics and nics[0].get("ipAddresses") else None


async def fetch(guest_netns, url: str, timeout: float = 90.0) -> bytes:
    """GET url from inside the stack's network namespace, until the guest answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        done = await asyncio.to_thread(guest_netns, "curl", "-sf", "--max-time", "3", "-o", "-", url,
                                       timeout=10)
        if done.returncode == 0:
            return done.stdout.encode()  # text mode: the guest's files are UTF-8
        if loop.time() > deadline:
            raise AssertionError(f"{url} did not answer within {timeout}s: curl exit {done.returncode}")
        await asyncio.sleep(1.0)


async def wait_address(instances, agents, name: str = "vm") -> dict:
    return await instances.wait(name, address, timeout=120, what="a DHCP address in status", agents=agents)


async def fetch_in_guest(term: Terminal, url: str, timeout: float = 60.0) -> str:
    """GET url with busybox wget, typed into the guest's shell on its console, until it answers:
    the body as the guest's shell printed it, between brackets (the typed line echoed back holds
    `[$(timeout`, never a bracketed answer)."""
    deadline = time.monotonic() + timeout
    while True:
        start = len(term.shown())
        term.type(f'echo "[$(timeout 5 wget -q -O - {url})]"\r'.encode())  # this wget has no -T
        if await term.expect(b"]\r\n", 8.0, start):
            answer = re.search(rb"\[([^]$]*)\]\r\n", term.shown(start))
            if answer and answer.group(1):
                return answer.group(1).decode()
        assert term.process.poll() is None, f"the console ended: {term.shown()[-800:]!r}"
        assert time.monotonic() < deadline, f"{url} did not answer the guest; it showed {term.shown()[-1500:]!r}"
        await asyncio.sleep(1.0)


async def test_a_guest_gets_its_address_by_dhcp_keeps_it_and_reaches_another(instances, agents, guest_netns,
                                                                               control_plane, libvirt_uri):
    node = unique_node()
    agents.start(node, stop_timeout=20.0)
    created = await instances.create("vm", {"flavor": FLAVOR, "image": TINY, "nodeName": node})
    uid = created["metadata"]["uid"]
    body = await wait_address(instances, agents)
    (nic,) = status_of(body)["interfaces"]
    ip = nic["ipAddresses"][0]
    assert (nic["name"], nic["mac"]) == ("default", mac_address(uid, 0)) and ip.startswith("192.168.177.")
    assert (await fetch(guest_netns, f"http://{ip}/")).decode() == uid  # the guest itself answers
    wide = await asyncio.to_thread(control_plane.kubectl, "get", "vinst", "vm", "-n", instances.namespace,
                                   "-o", "wide")
    assert ip in wide.stdout.splitlines()[1] and "IP" in wide.stdout.splitlines()[0]

    # a hard reboot and a stop/start: the same MAC, so the same lease, and the guest answers there
    await instances.request("vm", {"name": "Reboot", "type": "Hard", "id": "hard-1"})
    assert (await instances.wait_done("vm", "hard-1", agents=agents))["result"] == "Succeeded"
    await instances.patch_spec("vm", {"powerState": "Stopped"})
    await instances.wait_idle("vm", "stopped", agents=agents)
    await instances.patch_spec("vm", {"powerState": "Running"})
    body = await instances.wait_idle("vm", "active", agents=agents)
    assert status_of(body)["interfaces"][0]["mac"] == nic["mac"]
    assert (await fetch(guest_netns, f"http://{ip}/")).decode() == uid
    assert address(await instances.get("vm")) == ip

    # a second guest on the same network answers too; both are reachable on the bridge
    other = await instances.create("vm-2", {"flavor": FLAVOR, "image": TINY, "nodeName": node})
    other_uid = other["metadata"]["uid"]
    other_ip = address(await wait_address(instances, agents, "vm-2"))
    assert other_ip != ip
    assert (await fetch(guest_netns, f"http://{other_ip}/")).decode() == other_uid

    # and they reach each other: from a root shell on each one's serial console (`novalet
    # console`, as a person runs it), each guest fetches the other's address and gets its uid
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig), "LIBVIRT_DEFAULT_URI": libvirt_uri}
    consoles = {name: Terminal([sys.executable, "-m", "novalet.cli", "console", f"{instances.namespace}/{name}"],
                               env) for name in ("vm", "vm-2")}
    try:
        await asyncio.gather(*(shell_answers(term) for term in consoles.values()))
        assert await fetch_in_guest(consoles["vm"], f"http://{other_ip}/") == other_uid
        assert await fetch_in_guest(consoles["vm-2"], f"http://{ip}/") == uid
        for term in consoles.values():
            term.type(b"\x1d")  # Ctrl-]: the session ends, the console is free again
            assert await term.exited(5) == 0, term.shown()[-800:]
    finally:
        for term in consoles.values():
            term.close()


async def test_user_data_and_keys_arrive_byte_for_byte_inline_and_from_a_secret(instances, agents, guest_netns,
                                                                              kube_api):
    node = unique_node()
    agents.start(node)
    created = await instances.create("vm", {"flavor": FLAVOR, "image": TINY, "nodeName": node,
                                            "userData": USER_DATA, "sshAuthorizedKeys": KEYS})
    secret_data = b"#!/bin/sh\necho from a secret \xe2\x9c\x93\n"
    await client.CoreV1Api(kube_api).create_namespaced_secret(instances.namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="web-user-data"),
        data={"userdata": base64.b64encode(secret_data).decode()}))
    from_secret = await instances.create("vm-s", {"flavor": FLAVOR, "image": TINY, "nodeName": node,
                                                  "userDataSecretRef": {"name": "web-user-data"}})

    ip = address(await wait_address(instances, agents))
    assert await fetch(guest_netns, f"http://{ip}/user-data") == USER_DATA.encode()
    meta = yaml.safe_load(await fetch(guest_netns, f"http://{ip}/meta-data"))
    assert meta == {"instance-id": created["metadata"]["uid"], "local-hostname": "vm", "public-keys": KEYS}

    ip_s = address(await wait_address(instances, agents, "vm-s"))
    assert await fetch(guest_netns, f"http://{ip_s}/user-data") == secret_data
    assert yaml.safe_load(await fetch(guest_netns, f"http://{ip_s}/meta-data"))["instance-id"] == \
        from_secret["metadata"]["uid"]


async def refused(coro) -> str:
    with pytest.raises(ApiException) as error:
        await coro
    assert error.value.status == 422
    return json.loads(error.value.body)["message"]


@pytest.mark.parametrize("spec,says", [
    ({"userData": "x" * 32769}, "spec.userData: Too long: may not be more than 32768"),
    ({"sshAuthorizedKeys": [KEYS[0]] * 33}, "spec.sshAuthorizedKeys: Too many: 33: must have at most 32"),
    ({"sshAuthorizedKeys": ["ssh-rsa"]}, "spec.sshAuthorizedKeys[0]: Invalid value"),  # no key
    ({"interfaces": [{"name": "Eth0", "network": "default"}]}, "spec.interfaces[0].name: Invalid value"),
    ({"interfaces": [{"name": "a", "network": "default"}, {"name": "a", "network": "other"}]},
     "spec.interfaces[1]: Duplicate value"),
    ({"userData": "x", "userDataSecretRef": {"name": "s"}}, "give userData or userDataSecretRef, not both"),
])
async def test_bad_guest_config_is_refused_by_the_apiserver_with_the_field(crds, instances, spec, says):
    message = await refused(instances.create("bad", {"flavor": FLAVOR, "image": "", **spec}))
    assert says in message, message


async def test_interfaces_cannot_change_after_creation(crds, instances):
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "interfaces": []})
    message = await refused(instances.patch_spec("vm", {"interfaces": [{"name": "a", "network": "default"}]}))
    assert "spec.interfaces cannot change after creation" in message
