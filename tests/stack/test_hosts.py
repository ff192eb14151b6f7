"""Several hypervisor hosts on one machine (`novalet dev up --hosts N`, novalet_dev.hosts).

Each host is a private libvirtd of its own: its own socket, state, libvirt host UUID (as a live
migration between them will need), network namespace and, in it, a libvirt network `default` on
a bridge and subnet no other host uses. The machine's own namespace sees none of it; `dev env
--host` and `dev exec --host` pick a host, `dev status` lists them, `dev down` stops them all.
"""
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from test_guest_network import holders_of_netns, host_network_state

from novalet_dev.hosts import MAX_HOSTS, Hosts, host_index, host_name, host_network
from novalet_dev.libvirtd import DEFAULT_NETWORK, NETWORK_NAME
from novalet_dev.processes import pid_alive

pytestmark = pytest.mark.stack


def dev(state: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """`novalet dev ARGV --state-dir STATE` (the state dir before any `--`)."""
    head, sep, tail = (list(argv), [], [])
    if "--" in argv:
        i = argv.index("--")
        head, sep, tail = list(argv[:i]), ["--"], list(argv[i + 1:])
    r = subprocess.run([sys.executable, "-m", "novalet.cli", "dev", *head, "--state-dir", str(state), *sep, *tail],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    if check:
        assert r.returncode == 0, f"dev {' '.join(argv)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def links(output: str) -> set[str]:
    return {line.split(":", 2)[1].strip().split("@")[0] for line in output.splitlines()}


def capabilities_uuid(conn) -> str:
    return ET.fromstring(conn.getCapabilities()).findtext("host/uuid")


@pytest.fixture
def state():
    base = Path(tempfile.mkdtemp(prefix="nv-hosts-", dir="/tmp"))  # short: unix socket paths
    try:
        yield base
    finally:
        dev(base, "down", check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_host_names_and_networks_never_collide():
    nets = [host_network(i) for i in range(1, MAX_HOSTS + 1)]
    assert nets[0] == DEFAULT_NETWORK  # host-1 is the stack's libvirtd of old
    assert len({n.bridge for n in nets}) == len({n.subnet for n in nets}) == MAX_HOSTS
    assert all(len(n.bridge) <= 15 and n.name == NETWORK_NAME for n in nets)  # IFNAMSIZ
    subnets = [ipaddress.ip_network(n.subnet) for n in nets]
    assert not any(a.overlaps(b) for i, a in enumerate(subnets) for b in subnets[i + 1:])
    assert [host_index(host_name(i)) for i in (1, 2, MAX_HOSTS)] == [1, 2, MAX_HOSTS]
    for bad in ("host-0", "host-", "hv-1", f"host-{MAX_HOSTS + 1}", "host-01"):
        with pytest.raises(ValueError):
            host_index(bad)


def test_three_hosts_each_a_libvirtd_of_its_own_in_a_netns_of_its_own(state):
    before = host_network_state()

    # a one-host stack, as ever; then --hosts 3 adds two beside it
    dev(state, "up", "--no-kube")
    first = json.loads(dev(state, "status", "--json", check=False).stdout)
    assert [h["host"] for h in first["hosts"]] == ["host-1"]
    assert first["libvirtd"]["uri"] == first["hosts"][0]["uri"]
    assert (state / "libvirt" / "libvirt-sock").exists()  # host-1's paths are the old ones
    up = dev(state, "up", "--no-kube", "--hosts", "3").stdout
    assert "libvirtd already up" in up and "libvirtd host-2 up" in up and "libvirtd host-3 up" in up, up
    hosts = Hosts(state).listed()
    assert [h.name for h in hosts] == ["host-1", "host-2", "host-3"]
    assert hosts[0].libvirtd.pid == first["libvirtd"]["pid"]  # host-1 kept running

    uuids, inodes, pids = set(), set(), []
    for h in hosts:
        lv = h.libvirtd
        assert lv.is_running() and lv.healthy()
        pids.append(lv.pid)
        assert str(lv.socket_path) in h.uri.replace("%20", " ") and lv.socket_path.exists()
        conn = libvirt.open(h.uri)
        try:
            assert capabilities_uuid(conn) == h.host_uuid
            uuids.add(capabilities_uuid(conn))
            net = conn.networkLookupByName(NETWORK_NAME)
            assert net.isActive() and net.bridgeName() == h.network.bridge
            ip = ET.fromstring(net.XMLDesc()).find("ip")
            assert ip.get("address") == h.network.gateway
        finally:
            conn.close()
        # the daemon, its bridge and its subnet live in its own namespace, and only there
        ino = os.stat(lv.netns_path).st_ino
        inodes.add(ino)
        assert lv.in_netns(lv.pid)
        inside = lv.exec_in_netns(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert links(inside) == {"lo", h.network.bridge}, inside
        routes = lv.exec_in_netns(["ip", "route", "show", "table", "all"], capture_output=True, text=True,
                                  check=True).stdout
        assert f"{h.network.subnet} dev {h.network.bridge}" in routes and "default" not in routes.split()
    assert len(uuids) == 3 and len(set(pids)) == 3
    assert len(inodes) == 3 and os.stat("/proc/self/ns/net").st_ino not in inodes
    assert len({h.network.subnet for h in hosts}) == len({h.network.bridge for h in hosts}) == 3

    # the machine's own namespace: no bridge, address, route or rule of theirs
    assert host_network_state() == before

    # dev env --host / dev exec --host / dev status
    exports = dict(line.removeprefix("export ").split("=", 1)
                   for line in dev(state, "env", "--host", "host-2").stdout.splitlines())
    assert shlex.split(exports["LIBVIRT_DEFAULT_URI"]) == [hosts[1].uri]
    assert shlex.split(dev(state, "env").stdout.splitlines()[0].split("=", 1)[1]) == [hosts[0].uri]
    missing = dev(state, "env", "--host", "host-4", check=False)
    assert missing.returncode == 1 and "--hosts 4" in missing.stderr
    addrs = dev(state, "exec", "--host", "host-2", "--", "ip", "-o", "-4", "addr").stdout
    assert f"{hosts[1].network.gateway}/24" in addrs and DEFAULT_NETWORK.gateway not in addrs, addrs
    status = dev(state, "status", check=False)
    assert status.returncode == 3  # --no-kube: no control plane
    for h in hosts:
        line = next(x for x in status.stdout.splitlines() if x.split()[:2] == [h.name, "up"])
        assert h.host_uuid in line and h.network.bridge in line and h.uri in line
    assert [(h["host"], h["healthy"]) for h in json.loads(dev(state, "status", "--json", check=False).stdout)
            ["hosts"]] == [("host-1", True), ("host-2", True), ("host-3", True)]

    # dev down stops every host, and every namespace goes with it
    assert dev(state, "down").stdout.strip() == "stopped"
    assert not any(pid_alive(p) for p in pids)
    assert [holders_of_netns(ino) for ino in inodes] == [[]] * len(inodes)
    assert not any(h.libvirtd.netns_exists() for h in hosts)
    assert host_network_state() == before
    # restarted, each host keeps its host UUID
    dev(state, "up", "--no-kube", "--hosts", "2")
    assert [h.host_uuid for h in Hosts(state).listed()] == [h.host_uuid for h in hosts[:2]]


def test_the_libvirt_hosts_fixture(libvirt_hosts, libvirtd):
    hosts = libvirt_hosts(3)
    assert [h.name for h in hosts] == ["host-1", "host-2", "host-3"]
    assert hosts[0].libvirtd is libvirtd and hosts[0].uri == libvirtd.uri
    assert libvirt_hosts(2) == hosts[:2]  # started once, kept
    seen = set()
    for h in hosts:
        conn = libvirt.open(h.uri)
        try:
            seen.add(capabilities_uuid(conn))
            assert conn.networkLookupByName(NETWORK_NAME).bridgeName() == h.network.bridge
        finally:
            conn.close()
        assert h.image_pool.is_dir() or h.index == 1
    assert len(seen) == 3
