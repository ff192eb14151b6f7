"""The tiny guest as a real guest: cloud-init NoCloud data, its HTTP server, the serial console
shell and DHCP on the guests' network, on a real QEMU behind the private libvirtd.

The domains are built by novalet's own domain XML builder as it builds an instance's: the tiny
guest's kernel and initrd, an empty qcow2, the cidata disk (a raw ISO 9660 volume labelled
``cidata``, written here with pycdlib as novalet writes it) attached read-only, a virtio NIC on the
libvirt network ``default`` (which lives only in the stack's network namespace), and the serial
port as a pty with a log file: the serial log (the markers) and libvirt's console stream (the
shell) both work. HTTP to the guest is sent from inside that namespace (``guest_netns``). The
guest agent channel is there as in every instance's domain: libvirt talks to the guest's qemu-ga.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import json
import re
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from novalet.virt.domain_xml import Disk, DomainConfig, KernelBoot, NetworkInterface, build_domain_xml
from novalet_dev.guest import (
    AGENT_MARKER,
    AGENT_PORT,
    CIDATA_MARKER,
    GUEST_MEMORY_MIB,
    MARKER,
    NET_MARKER,
    wait_for_marker,
)
from novalet_dev.libvirtd import GATEWAY, NETWORK_NAME
from novalet_dev.testing import TINY

pytestmark = pytest.mark.stack

BOOT_TIMEOUT = 90  # TCG on a loaded CI machine; about 5 s idle
SUBNET = ipaddress.ip_network(f"{GATEWAY}/24", strict=False)

# not valid UTF-8, NUL, CRLF, no final newline: the HTTP server must give the bytes back as they are
USER_DATA = b"#cloud-config\r\nhostname: tiny\n\x00\xff\xfe binary \xc3\x28 tail"
META_DATA = b"instance-id: i-tiny\nlocal-hostname: tiny\n"
PASSWORD = "pä ss:wörd $HOME 'x' \\ 42"  # spaces, a colon, UTF-8, quotes, a backslash: as given

# run inside the network namespace: GET each path from the guest, print status and body
HTTP_GET = """
import base64, json, sys, urllib.error, urllib.request
out = {}
for path in sys.argv[2:]:
    try:
        with urllib.request.urlopen(f"http://{sys.argv[1]}{path}", timeout=10) as r:
            out[path] = [r.status, base64.b64encode(r.read()).decode()]
    except urllib.error.HTTPError as e:
        out[path] = [e.code, ""]
print(json.dumps(out))
"""


def cidata_iso(path: Path, user_data: bytes | None, meta_data: bytes) -> Path:
    """A NoCloud volume as novalet writes it: ISO 9660 labelled cidata, Rock Ridge and Joliet names."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    files = [("META_DAT.;1", "meta-data", meta_data)]
    if user_data is not None:
        files.append(("USER_DAT.;1", "user-data", user_data))
    for iso_name, name, content in files:
        iso.add_fp(io.BytesIO(content), len(content), f"/{iso_name}", rr_name=name, joliet_path=f"/{name}")
    iso.write(str(path))
    iso.close()
    return path


def domain_xml(name: str, uid: str, domain_type: str, pool: Path, work: Path, serial_log: Path, *,
               cidata: Path | None = None, mac: str | None = None, agent: bool = True) -> str:
    disk = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    nics = (NetworkInterface("default", mac, "network", NETWORK_NAME),) if mac else ()
    xml = build_domain_xml(DomainConfig(
        name=name, uuid=uid, domain_type=domain_type, vcpus=1, memory_mib=GUEST_MEMORY_MIB,
        disks=(Disk(str(disk)),), serial_log=str(serial_log), cidata=str(cidata) if cidata else None,
        interfaces=nics, guest_agent=agent,
        kernel=KernelBoot(str(pool / f"{TINY}.kernel"), str(pool / f"{TINY}.initrd"),
                          (pool / f"{TINY}.cmdline").read_text().strip()),
    ))
    serial = ET.fromstring(xml).find("devices/serial")
    assert serial.get("type") == "pty" and serial.find("log").get("file") == str(serial_log)
    return xml


class Console:
    """The guest's serial console through libvirt's console stream (what `virsh console` uses)."""

    def __init__(self, conn, dom) -> None:
        import libvirt

        self.libvirt = libvirt
        self.stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        dom.openConsole(None, self.stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self.output = b""
        self.n = 0

    def send(self, text: str) -> None:
        self.stream.send(text.encode())

    def expect(self, pattern: bytes, timeout: float, start: int = 0) -> re.Match | None:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern, re.DOTALL).search(self.output, start)
            if m or time.monotonic() >= deadline:
                return m
            got = self.stream.recv(4096)
            if got == -2:  # nothing yet
                time.sleep(0.05)
            elif not got:
                raise EOFError(f"console closed; output so far: {self.output[-1500:]!r}")
            else:
                self.output += got

    def run(self, command: str, timeout: float = 30.0) -> str:
        """Run one shell command line; its output (the lines between two markers that only the
        shell's echo, not the typed line, spells out plainly)."""
        self.n += 1
        start = len(self.output)
        self.send(f'echo "<"{self.n}">"; {command}; echo "</"{self.n}">"\r')
        m = self.expect(rb"\n<%d>\r?\n(.*?)</%d>\r?\n" % (self.n, self.n), timeout, start)
        assert m, f"no output of {command!r} within {timeout}s; console: {self.output[start:][-1500:]!r}"
        return m.group(1).decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        try:
            self.stream.abort()
        except self.libvirt.libvirtError:
            pass


@pytest.fixture
def boot(libvirt_uri, libvirt_domain_type, image_pool, tmp_path):
    """boot(cidata=None, nic=False, agent=True) -> (dom, conn, uid, mac, serial_log), booted to the
    ready marker; ``agent``: the guest agent channel (in every instance's domain)."""
    import libvirt

    from novalet.virt.hypervisor import ensure_event_loop

    ensure_event_loop()  # before the connection: the console stream's data comes through it
    conn = libvirt.open(libvirt_uri)
    doms = []

    def start(cidata: Path | None = None, nic: bool = False, agent: bool = True):
        uid = str(uuid.uuid4())
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in uuid.UUID(uid).bytes[:3]) if nic else None
        work = tmp_path / uid[:8]
        work.mkdir()
        work.chmod(0o755)
        serial = work / "serial.log"
        xml = domain_xml(f"tiny-guest-test-{uid[:8]}", uid, libvirt_domain_type, image_pool, work, serial,
                         cidata=cidata, mac=mac, agent=agent)
        t0 = time.monotonic()
        dom = conn.createXML(xml, 0)
        doms.append(dom)
        line = wait_for_marker(serial, MARKER, timeout=BOOT_TIMEOUT)
        print(f"ready in {time.monotonic() - t0:.1f}s: {line}")
        return dom, conn, uid, mac, serial

    try:
        yield start
    finally:
        for dom in doms:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
        conn.close()


def running(dom) -> bool:
    import libvirt

    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:  # a transient domain is gone once shut off
        return False


def console_ready(con: Console) -> None:
    """The shell answers: `echo $((6*7))` prints 42 (the typed line never contains 42)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        start = len(con.output)
        con.send("echo $((6*7))\r")
        if con.expect(rb"\n42\r?\n", 3.0, start):
            return
        assert time.monotonic() < deadline, f"no shell on the console; it showed: {con.output[-1500:]!r}"


def http_get(guest_netns, ip: str, *paths: str) -> dict[str, tuple[int, bytes]]:
    r = guest_netns(sys.executable, "-I", "-c", HTTP_GET, ip, *paths, timeout=60)
    assert r.returncode == 0, r.stderr
    return {path: (status, base64.b64decode(body)) for path, (status, body) in json.loads(r.stdout).items()}


def shadow_has(entry: str, user: str, password: str) -> bool:
    """Is ``entry`` (a line of /etc/shadow) ``user``'s, with a SHA-512 crypt hash of ``password``?
    (openssl computes the hash with the entry's salt; the password goes through its stdin.)"""
    fields = entry.strip().split(":")
    m = re.fullmatch(r"\$6\$([^$]+)\$[./0-9A-Za-z]+", fields[1]) if len(fields) == 9 else None
    if fields[0] != user or not m:
        return False
    out = subprocess.run(["openssl", "passwd", "-6", "-salt", m.group(1), "-stdin"], input=password.encode(),
                         capture_output=True, check=True).stdout
    return out.decode().strip() == fields[1]


def agent_call(fn, timeout: float = 60.0):
    """fn() once the guest agent answers (qemu-ga starts after the ready marker; libvirt says
    VIR_ERR_AGENT_UNRESPONSIVE until the guest has opened its port)."""
    import libvirt

    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_AGENT_UNRESPONSIVE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_cidata_dhcp_http_and_console(boot, tmp_path, guest_netns):
    import libvirt

    iso = cidata_iso(tmp_path / "cidata.iso", USER_DATA, META_DATA)
    dom, conn, uid, mac, serial = boot(cidata=iso, nic=True)
    # the serial log (a pty's log file) has the markers; the cidata disk is the second virtio disk
    assert wait_for_marker(serial, CIDATA_MARKER, timeout=5) == \
        f"{CIDATA_MARKER} user-data={hashlib.sha256(USER_DATA).hexdigest()}"
    assert wait_for_marker(serial, MARKER, timeout=5) == f"{MARKER} rescue=0 disks=vda,vdb"

    # DHCP on the network default: the address the guest prints is its lease from libvirt's dnsmasq
    t0 = time.monotonic()
    line = wait_for_marker(serial, NET_MARKER, timeout=BOOT_TIMEOUT)
    print(f"{line} {time.monotonic() - t0:.1f}s after the ready marker")
    _, iface, ip = line.split()
    assert iface == "eth0" and ipaddress.ip_address(ip) in SUBNET, line
    leases = conn.networkLookupByName(NETWORK_NAME).DHCPLeases(mac)
    assert [lease["ipaddr"] for lease in leases] == [ip], leases

    # the HTTP server, from the guests' network: the uid, the cidata files byte for byte, 404
    got = http_get(guest_netns, ip, "/", "/user-data", "/meta-data", "/vendor-data", "/shadow")
    assert got == {"/": (200, uid.encode()), "/user-data": (200, USER_DATA), "/meta-data": (200, META_DATA),
                   "/vendor-data": (404, got["/vendor-data"][1]),
                   "/shadow": (200, b"root:*:0:0:99999:7:::\n")}  # root's password locked at first

    # the QEMU guest agent (qemu-ga, started after the ready marker on its virtio-serial port):
    # libvirt's setUserPassword goes through it to chpasswd, and the new hash is in /etc/shadow,
    # which the guest serves at /shadow; a user the guest does not have is an error
    assert wait_for_marker(serial, AGENT_MARKER, timeout=BOOT_TIMEOUT) == f"{AGENT_MARKER} {AGENT_PORT}"
    agent_call(lambda: dom.setUserPassword("root", PASSWORD, 0))
    (entry,) = http_get(guest_netns, ip, "/shadow")["/shadow"][1].decode().splitlines()
    assert shadow_has(entry, "root", PASSWORD), entry
    assert not shadow_has(entry, "root", PASSWORD + " "), entry
    with pytest.raises(libvirt.libvirtError, match="failed to set user password"):
        dom.setUserPassword("nobody", PASSWORD, 0)
    # and its word for the guest's addresses: eth0 with its MAC and the DHCP address, lo
    addrs = agent_call(lambda: dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0))
    assert addrs["eth0"]["hwaddr"] == mac, addrs
    assert {"addr": ip, "prefix": 24, "type": libvirt.VIR_IP_ADDR_TYPE_IPV4} in addrs["eth0"]["addrs"], addrs
    assert {"addr": "127.0.0.1", "prefix": 8, "type": libvirt.VIR_IP_ADDR_TYPE_IPV4} in addrs["lo"]["addrs"], addrs

    con = Console(conn, dom)
    try:
        console_ready(con)
        # libvirt's domain uuid (novalet's metadata.uid) is the guest's DMI product uuid
        assert con.run("cat /sys/class/dmi/id/product_uuid").strip() == uid
        assert "iso9660" not in con.run("cat /proc/mounts")  # copied, then unmounted
        assert con.run("cat /sys/block/vdb/ro").strip() == "1"
        assert f"inet {ip}/24" in con.run("ip -o -4 addr show dev eth0")
        assert f"default via {GATEWAY} dev eth0" in con.run("ip route")
        assert con.run(f"readlink /dev/virtio-ports/{AGENT_PORT}").strip().startswith("../vport")
        assert "qemu-ga" in con.run("ps")
        assert shadow_has(con.run("cat /etc/shadow"), "root", PASSWORD)
    finally:
        con.close()
    # what went through the console also reached the serial log
    assert re.search(rb"\n42\r?\n", serial.read_bytes())

    # the power button still powers off with a shell on the console
    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    deadline = time.monotonic() + 60
    while running(dom):
        assert time.monotonic() < deadline, "no power-off within 60 s of the ACPI power button"
        time.sleep(0.2)
    assert b"power button, powering off" in serial.read_bytes()


def test_without_cidata_or_nic_or_agent_channel(boot):
    import libvirt

    dom, conn, uid, _, serial = boot(agent=False)
    assert wait_for_marker(serial, CIDATA_MARKER, timeout=5) == f"{CIDATA_MARKER} user-data=none"
    assert wait_for_marker(serial, MARKER, timeout=5) == f"{MARKER} rescue=0 disks=vda"
    assert wait_for_marker(serial, AGENT_MARKER, timeout=BOOT_TIMEOUT) == f"{AGENT_MARKER} none"
    with pytest.raises(libvirt.libvirtError):
        dom.setUserPassword("root", PASSWORD, 0)
    con = Console(conn, dom)
    try:
        console_ready(con)
        # over lo
        assert con.run("wget -q -O - http://127.0.0.1/; echo") == uid + "\n"  # lower case, no newline
        for path in ("user-data", "meta-data"):
            assert "404 Not Found" in con.run(f"wget -O /dev/null http://127.0.0.1/{path} 2>&1")
        # nothing loaded that the guest does not need; no DHCP client without a NIC, no agent without its port
        modules = {line.split()[0] for line in con.run("lsmod").splitlines()[1:] if line.strip()}
        assert not modules & {"virtio_net", "isofs", "vfat", "virtio_console"}, modules
        assert "udhcpc" not in con.run("ps") and "qemu-ga" not in con.run("ps")
        assert re.fullmatch(r"1: lo: <[^>]*\bUP\b.*", con.run("ip -o link").strip()), con.run("ip -o link")
    finally:
        con.close()
