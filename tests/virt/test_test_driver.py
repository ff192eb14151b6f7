"""The Hypervisor on libvirt's test driver (`test:///default`, in-process: no daemon).

The test driver refuses VIR_DOMAIN_START_FORCE_BOOT ("unsupported flags (0x8)",
VIR_ERR_INVALID_ARG); the benchmarks run the agent on it, so every fresh boot (hard reboot,
rebuild, rescue, unrescue, resize) falls back to a plain create() when no managed-save image
exists. What is asserted is what libvirt itself reports about the domain.
"""

from __future__ import annotations

import uuid

import libvirt
import pytest

from novalet.virt.hypervisor import Hypervisor, HypervisorError, InstanceSpec

URI = "test:///default"


@pytest.fixture
def test_hv(tmp_path):
    pool, state = tmp_path / "pool", tmp_path / "state"
    pool.mkdir()
    state.mkdir()
    # a connection of our own keeps the driver's in-process state alive for the whole test
    # (it dies with the last connection) and is how the test reads what libvirt reports
    conn = libvirt.open(URI)
    hv = Hypervisor(URI, pool, state, "qemu")
    created: list[str] = []
    try:
        yield hv, conn, created
    finally:
        for uid in created:
            try:
                hv.undefine_and_delete(uid)
            except HypervisorError as e:
                print(f"cleanup of {uid} failed: {e}")
        hv.close()
        conn.close()


def _running_instance(hv, conn, created) -> tuple[str, libvirt.virDomain]:
    uid = str(uuid.uuid4())
    created.append(uid)
    hv.define(InstanceSpec(uid=uid, namespace="t", name=f"vm-{uid[:8]}", vcpus=1, memory_mib=128, node="n1"))
    hv.start(uid)
    dom = conn.lookupByUUIDString(uid)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    return uid, dom


def test_the_test_driver_refuses_force_boot(test_hv):
    """The premise: if a libvirt release starts accepting the flag, the fallback is dead code."""
    hv, conn, created = test_hv
    _uid, dom = _running_instance(hv, conn, created)
    dom.destroy()
    with pytest.raises(libvirt.libvirtError) as refused:
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_FORCE_BOOT)
    assert refused.value.get_error_code() == libvirt.VIR_ERR_INVALID_ARG


def test_hard_reboot_boots_afresh_on_the_test_driver(test_hv):
    hv, conn, created = test_hv
    uid, dom = _running_instance(hv, conn, created)
    first_id = dom.ID()
    hv.reboot_hard(uid)
    dom = conn.lookupByUUIDString(uid)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert dom.ID() != first_id  # a new run of the domain, not the old one left alone
    assert not dom.hasManagedSaveImage(0)
    facts = hv.facts(uid)
    assert facts.power_state == "running" and facts.domain_id == dom.ID()


def test_hard_reboot_of_a_stopped_instance_starts_it(test_hv):
    hv, conn, created = test_hv
    uid, dom = _running_instance(hv, conn, created)
    first_id = dom.ID()
    hv.destroy(uid)
    assert conn.lookupByUUIDString(uid).state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    hv.reboot_hard(uid)
    dom = conn.lookupByUUIDString(uid)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and dom.ID() != first_id


def test_hard_reboot_discards_a_managed_save_image(test_hv):
    """Suspended (managed save) -> hard reboot: the image is removed first, then a plain boot."""
    hv, conn, created = test_hv
    uid, dom = _running_instance(hv, conn, created)
    first_id = dom.ID()
    hv.suspend(uid)
    dom = conn.lookupByUUIDString(uid)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage(0)
    hv.reboot_hard(uid)
    dom = conn.lookupByUUIDString(uid)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and dom.ID() != first_id
    assert not dom.hasManagedSaveImage(0)


def test_the_fallback_never_restores_a_managed_save_image(test_hv):
    """With a managed-save image still there, a plain create() would restore the saved guest
    instead of booting it: the driver's refusal is reported, nothing is started."""
    hv, conn, created = test_hv
    uid, dom = _running_instance(hv, conn, created)
    dom.managedSave(0)
    assert dom.hasManagedSaveImage(0) and not dom.isActive()
    with pytest.raises(libvirt.libvirtError) as refused:
        hv._start_fresh(dom)
    assert refused.value.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
    dom = conn.lookupByUUIDString(uid)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage(0)


def test_rescue_and_unrescue_boot_on_the_test_driver(test_hv):
    hv, conn, created = test_hv
    uid, dom = _running_instance(hv, conn, created)
    first_id = dom.ID()
    hv.rescue(uid)
    dom = conn.lookupByUUIDString(uid)
    rescue_id = dom.ID()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and rescue_id != first_id
    assert hv.facts(uid).config == "rescue"
    hv.unrescue(uid)
    dom = conn.lookupByUUIDString(uid)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and dom.ID() not in (first_id, rescue_id)
    assert hv.facts(uid).config == "normal"


def test_the_benchmarks_node_file_runs_an_instance_with_the_default_interface(tmp_path):
    """bench/storms.py and bench/recovery_time.py run the agent on a node file of their own: it
    must serve what a user's instance needs, or every create of a storm fails (an instance
    without `spec.interfaces` gets one on the network `default`, and its create checks that
    network is active)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    try:
        from recovery_time import node_xml
    finally:
        sys.path.pop(0)
    from novalet.core.interfaces import DEFAULT_INTERFACES, mac_address
    from novalet.virt.domain_xml import NetworkInterface

    node_file = tmp_path / "node.xml"
    node_file.write_text(node_xml([]))
    pool = tmp_path / "pool"
    pool.mkdir()
    hv = Hypervisor(f"test://{node_file}", pool, tmp_path, "qemu")
    try:
        assert hv.network_active("default")
        uid = str(uuid.uuid4())
        nics = tuple(NetworkInterface(i.name, mac_address(uid, n), "network", i.network)
                     for n, i in enumerate(DEFAULT_INTERFACES))
        hv.define(InstanceSpec(uid=uid, namespace="t", name="vm-0", vcpus=1, memory_mib=128, node="n1",
                               interfaces=nics))
        hv.start(uid)
        assert hv.facts(uid).power_state == "running"
    finally:
        hv.close()
