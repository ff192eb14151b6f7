"""The private libvirtd runs real QEMU guests, and they survive a libvirtd restart."""

import time
import uuid

import libvirt
import pytest

pytestmark = pytest.mark.stack


def _diskless_xml(name: str, dom_type: str, memory_mib: int = 64) -> str:
    return f"""<domain type='{dom_type}'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices><serial type='pty'/><console type='pty'/></devices>
</domain>"""


def _state(dom) -> int:
    return dom.state()[0]


@pytest.fixture
def conn(libvirt_uri):
    c = libvirt.open(libvirt_uri)
    yield c
    c.close()


@pytest.fixture
def domain_name(conn, request):
    name = f"stack-{request.node.name[:20]}-{uuid.uuid4().hex[:6]}".replace("_", "-")
    yield name
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefine()


def test_domain_type_is_tcg_unless_probed(libvirt_domain_type, monkeypatch, tmp_path):
    from novalet_dev import libvirtd as mod

    assert libvirt_domain_type in ("qemu", "kvm")
    monkeypatch.setenv("NOVALET_CACHE", str(tmp_path))
    monkeypatch.delenv("NOVALET_DOMAIN_TYPE", raising=False)
    assert mod.domain_type() == "qemu"  # /dev/kvm alone never counts
    mod.record_kvm_probe(False)
    assert mod.domain_type() == "qemu"
    mod.record_kvm_probe(True, kernel="test")
    assert mod.domain_type() == "kvm"
    monkeypatch.setenv("NOVALET_DOMAIN_TYPE", "qemu")
    assert mod.domain_type() == "qemu"


def test_uri_is_private(libvirtd):
    assert libvirtd.uri.startswith("qemu+unix:///system?socket=")
    assert str(libvirtd.state_dir) in libvirtd.uri
    assert "/run/libvirt" not in libvirtd.uri


def test_domain_lifecycle(conn, domain_name, libvirt_domain_type, libvirtd):
    dom = conn.defineXML(_diskless_xml(domain_name, libvirt_domain_type))
    assert _state(dom) == libvirt.VIR_DOMAIN_SHUTOFF
    assert not dom.isActive()

    dom.create()
    assert _state(dom) == libvirt.VIR_DOMAIN_RUNNING
    pid = libvirtd.qemu_pid(domain_name)
    assert pid and pid > 1
    assert (libvirtd.qemu_log_dir / f"{domain_name}.log").exists()

    dom.suspend()
    assert dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]

    dom.resume()
    assert dom.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED]

    dom.destroy()
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED]
    assert libvirtd.qemu_pid(domain_name) is None

    dom.undefine()
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(domain_name)


def test_running_domain_survives_libvirtd_restart(libvirt_uri, libvirtd, domain_name, libvirt_domain_type):
    conn = libvirt.open(libvirt_uri)
    dom = conn.defineXML(_diskless_xml(domain_name, libvirt_domain_type))
    dom.create()
    uuid_before = dom.UUIDString()
    pid_before = libvirtd.qemu_pid(domain_name)
    assert pid_before
    daemon_pid_before = libvirtd.pid
    conn.close()

    libvirtd.restart()
    assert libvirtd.pid != daemon_pid_before

    conn = libvirt.open(libvirt_uri)
    try:
        # reconnecting to guests happens in the background after start: give a broken
        # reconnect (which would kill the guest) time to show
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            dom = conn.lookupByName(domain_name)
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            time.sleep(0.25)
        assert dom.UUIDString() == uuid_before
        assert libvirtd.qemu_pid(domain_name) == pid_before
        with open(f"/proc/{pid_before}/cmdline", "rb") as f:
            assert b"qemu-system" in f.read()
        # the restarted daemon controls the guest: pause and resume through it
        dom.suspend()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        dom.resume()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn.close()
