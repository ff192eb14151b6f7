"""The guests' network exists only inside the local stack's network namespace.

The private libvirtd runs in a network namespace of its own, where libvirt's network driver keeps
the network ``default`` (a bridge with DHCP, forward mode ``open``, no uplink): a guest plugged
into it gets an address by DHCP there, `novalet dev exec` reaches it, the host's own namespace
shows none of it and keeps its links, routes and firewall rules, and when the stack stops the
namespace goes with everything in it.
"""
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from novalet_dev.libvirtd import BRIDGE, GATEWAY, NETWORK_NAME, Libvirtd

pytestmark = pytest.mark.stack
SUBNET = ipaddress.ip_network(f"{GATEWAY}/24", strict=False)


def _network_guest_xml(name: str, dom_type: str) -> str:
    """A diskless BIOS guest with one virtio NIC on ``default``, booting from the network:
    SeaBIOS hands over to iPXE's ROM, whose first step is a DHCP request."""
    return f"""<domain type='{dom_type}'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <interface type='network'><source network='{NETWORK_NAME}'/><model type='virtio'/></interface>
    <serial type='pty'/><console type='pty'/>
  </devices>
</domain>"""


def _nic(dom) -> tuple[str, str]:
    """(MAC, tap device) of the domain's interface, from its live XML."""
    iface = ET.fromstring(dom.XMLDesc()).find("./devices/interface")
    return iface.find("mac").get("address"), iface.find("target").get("dev")


def _links(output: str) -> dict[str, str]:
    """`ip -o link` output -> {name: the rest of the line}."""
    links = {}
    for line in output.splitlines():
        _, name, rest = line.split(":", 2)
        links[name.strip().split("@")[0]] = rest
    return links


def _host(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL).stdout


def _timeless(text: str) -> str:
    """Without the lifetimes that count down by themselves (SLAAC addresses, learnt routes)."""
    return re.sub(r"\b(valid_lft|preferred_lft|expires) \S+", r"\1 -", text)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        return f"({e.strerror})"


def host_network_state() -> dict[str, str]:
    """What the machine's own network namespace has: links, addresses, routes, policy rules,
    forwarding switches and every firewall rule (nf_tables, which iptables-nft writes, and the
    legacy x_tables in use)."""
    for tool in ("ip", "nft"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: run `sudo hack/setup.sh` (installs iproute2, nftables)", pytrace=False)
    return {
        "links": _host("ip", "-o", "link"),
        "addresses": _timeless(_host("ip", "-o", "addr")),
        "routes": _timeless(_host("ip", "route", "show", "table", "all")),
        "routes6": _timeless(_host("ip", "-6", "route", "show", "table", "all")),
        "rules": _host("ip", "rule"),
        "nft": _host("nft", "list", "ruleset"),
        **{name: _read(f"/proc/net/{name}") for name in ("ip_tables_names", "ip6_tables_names", "arp_tables_names")},
        **{path: _read(f"/proc/sys/net/{path}") for path in
           ("ipv4/ip_forward", "ipv4/conf/all/forwarding", "ipv6/conf/all/forwarding")},
    }


def _netns_ino(path: Path) -> int:
    return os.stat(path).st_ino


def holders_of_netns(ino: int) -> list[str]:
    """Every process in, and every mount (in any mount namespace) of, the network namespace
    with inode ``ino``: empty once the kernel can free it."""
    found, seen_mnt = [], set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino == ino:
                found.append(f"process {entry.name}: {_read(f'/proc/{entry.name}/comm').strip()}")
            mnt = os.stat(f"/proc/{entry.name}/ns/mnt").st_ino
            if mnt in seen_mnt:
                continue
            seen_mnt.add(mnt)
            found += [f"mount in the mount namespace of {entry.name}: {line.strip()}"
                      for line in _read(f"/proc/{entry.name}/mountinfo").splitlines() if f"net:[{ino}]" in line]
        except OSError:
            continue  # gone meanwhile
    return found


def wait_for_lease(net, mac: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for lease in net.DHCPLeases():
            if lease["mac"] == mac:
                return lease
        time.sleep(0.25)
    pytest.fail(f"no DHCP lease for {mac} within {timeout}s (leases: {net.DHCPLeases()})")


@pytest.fixture
def conn(libvirt_uri):
    c = libvirt.open(libvirt_uri)
    yield c
    c.close()


@pytest.fixture
def net_guest(libvirt_uri, request):
    """Names a domain for the test; destroyed and undefined afterwards."""
    name = f"net-{request.node.name[:20]}-{uuid.uuid4().hex[:6]}".replace("_", "-")
    yield name
    c = libvirt.open(libvirt_uri)
    try:
        dom = c.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        c.close()


def test_the_default_network_is_active_in_the_private_libvirtd(conn):
    net = conn.networkLookupByName(NETWORK_NAME)
    assert net.isActive() and net.autostart() and net.isPersistent()
    xml = ET.fromstring(net.XMLDesc())
    assert xml.find("forward").get("mode") == "open"  # no firewall rule anywhere; no uplink to use
    assert xml.find("bridge").get("name") == BRIDGE == net.bridgeName()
    assert xml.find("dns").get("enable") == "no"  # dnsmasq never looks for an upstream server
    ip = xml.find("ip")
    assert ip.get("address") == GATEWAY
    dhcp = ip.find("dhcp/range")
    assert ipaddress.ip_address(dhcp.get("start")) in SUBNET and ipaddress.ip_address(dhcp.get("end")) in SUBNET


def test_the_bridge_lives_in_the_stacks_netns_only(libvirtd, guest_netns):
    assert _netns_ino(guest_netns.path) != os.stat("/proc/self/ns/net").st_ino
    # libvirtd itself runs in that namespace
    assert libvirtd.in_netns(libvirtd.pid)
    inside = _links(guest_netns("ip", "-o", "link", check=True).stdout)
    assert BRIDGE in inside and "UP" in inside[BRIDGE]
    assert BRIDGE not in _links(_host("ip", "-o", "link"))
    # no uplink: besides lo and the bridge, only the bridge's ports (guests' taps)
    ports = set(_links(guest_netns("ip", "-o", "link", "show", "master", BRIDGE, check=True).stdout))
    assert set(inside) - {"lo", BRIDGE} <= ports, inside
    routes = guest_netns("ip", "route", "show", "table", "all", check=True).stdout
    assert "default" not in routes.split(), routes
    assert f"{SUBNET} dev {BRIDGE}" in routes


def test_dev_exec_runs_in_the_stacks_netns(libvirtd):
    novalet = [sys.executable, "-m", "novalet.cli", "dev", "exec", "--state-dir", str(libvirtd.state_dir.parent), "--"]
    r = subprocess.run([*novalet, "ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert any(line.split()[1] == BRIDGE and f"{GATEWAY}/24" in line.split() for line in r.stdout.splitlines()), r.stdout
    assert f"{GATEWAY}/" not in _host("ip", "-o", "addr")
    # the command's exit status is the command's own, and its argv reaches it untouched
    r = subprocess.run([*novalet, sys.executable, "-c", "import sys; print(sys.argv[1:]); raise SystemExit(7)",
                        "a b", "$(x)"], capture_output=True, text=True, timeout=30, check=False)
    assert (r.returncode, r.stdout.strip()) == (7, "['a b', '$(x)']"), r.stderr


def test_a_guest_on_default_gets_a_dhcp_lease_in_the_netns(conn, net_guest, libvirt_domain_type, guest_netns):
    dom = conn.defineXML(_network_guest_xml(net_guest, libvirt_domain_type))
    dom.create()
    mac, tap = _nic(dom)
    # the guest's tap is a port of the bridge, inside the namespace, not in the host's
    ports = _links(guest_netns("ip", "-o", "link", "show", "master", BRIDGE, check=True).stdout)
    assert tap in ports
    assert tap not in _links(_host("ip", "-o", "link"))
    lease = wait_for_lease(conn.networkLookupByName(NETWORK_NAME), mac)
    assert ipaddress.ip_address(lease["ipaddr"]) in SUBNET and lease["iface"] == BRIDGE
    # the guest's MAC, learnt by the bridge from the guest's own frames
    fdb = guest_netns("bridge", "fdb", "show", "br", BRIDGE, check=True).stdout
    assert mac in fdb.lower()


def test_a_network_guest_survives_a_libvirtd_restart_in_the_same_netns(libvirtd, conn, net_guest,
                                                                       libvirt_domain_type, guest_netns):
    dom = conn.defineXML(_network_guest_xml(net_guest, libvirt_domain_type))
    dom.create()
    mac, tap = _nic(dom)
    ino = _netns_ino(guest_netns.path)
    qemu = libvirtd.qemu_pid(net_guest)
    assert libvirtd.in_netns(qemu)

    libvirtd.restart()

    assert _netns_ino(guest_netns.path) == ino and libvirtd.in_netns(libvirtd.pid)
    c = libvirt.open(libvirtd.uri)
    try:
        assert c.lookupByName(net_guest).state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert libvirtd.qemu_pid(net_guest) == qemu
        assert c.networkLookupByName(NETWORK_NAME).isActive()
        assert tap in _links(guest_netns("ip", "-o", "link", "show", "master", BRIDGE, check=True).stdout)
        wait_for_lease(c.networkLookupByName(NETWORK_NAME), mac)
    finally:
        c.close()


def test_a_stack_leaves_the_host_namespace_alone_and_takes_its_netns_along(libvirt_domain_type):
    """A stack of its own: the host's links, addresses, routes and firewall rules are the same
    before, while a guest runs on the network, and after; once stopped, nothing holds the
    namespace (no process, no mount anywhere), so the kernel frees it with its devices."""
    base = Path(tempfile.mkdtemp(prefix="nv-net-", dir="/tmp"))  # short: unix socket paths
    lv = Libvirtd(base / "libvirt")
    try:
        before = host_network_state()
        try:
            lv.start()
            ino = _netns_ino(lv.netns_path)
            c = lv.connect()
            try:
                dom = c.defineXML(_network_guest_xml("hostcheck", libvirt_domain_type))
                dom.create()
                assert lv.in_netns(lv.qemu_pid("hostcheck"))
                during = host_network_state()
            finally:
                c.close()
            assert holders_of_netns(ino)
        finally:
            lv.stop(destroy_domains=True)
        after = host_network_state()
        assert during == before
        assert after == before
        assert holders_of_netns(ino) == []
        assert not lv.netns_exists() and not lv.netns_path.exists()
        assert lv.status()["netns"] is None
    finally:
        shutil.rmtree(base, ignore_errors=True)
