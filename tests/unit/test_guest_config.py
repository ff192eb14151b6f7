"""What a guest is given, pure: its interfaces (defaulted, stable MACs, status from leases), the
networks a node offers and the webhook's check of them, and the cidata disk's content."""
import io
from datetime import UTC, datetime, timedelta

import pycdlib
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from novalet.agent.operations import parse_network
from novalet.api.models import ActionRecord, InterfaceStatus, VirtualInstance, VirtualInstanceSpec
from novalet.core import interfaces
from novalet.core.admission import review
from novalet.virt.cidata import CloudInit, meta_data, write_iso

UID = "0b9a3c1e-5d2f-4c1a-9e8b-7f6a5d4c3b2a"
NOW = datetime(2026, 12, 4, 21, 0, tzinfo=UTC)
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk4fHcX0Q2nq1b0nWcS4bZ9Uq6zWkq3O0kq8wXl0p1a user@laptop"


def spec(**fields) -> VirtualInstanceSpec:
    return VirtualInstanceSpec.model_validate({"flavor": FLAVOR, **fields})


def test_omitted_interfaces_are_one_default_and_an_empty_list_is_none():
    assert [(i.name, i.network) for i in interfaces.interfaces_of(spec())] == [("default", "default")]
    assert interfaces.interfaces_of(spec(interfaces=[])) == ()
    two = spec(interfaces=[{"name": "a", "network": "default"}, {"name": "b", "network": "ext"}])
    assert [i.name for i in interfaces.interfaces_of(two)] == ["a", "b"]


@given(st.uuids(), st.integers(0, 7))
def test_a_mac_is_stable_locally_administered_and_distinct_per_interface(uid, index):
    mac = interfaces.mac_address(str(uid), index)
    assert mac == interfaces.mac_address(str(uid), index)
    assert mac.startswith("52:54:00:") and len(mac.split(":")) == 6
    assert mac != interfaces.mac_address(str(uid), index + 1)


@pytest.mark.parametrize("bad", [
    {"interfaces": [{"name": "Eth0", "network": "default"}]},          # not a DNS label
    {"interfaces": [{"name": "a" * 16, "network": "default"}]},        # longer than 15
    {"interfaces": [{"name": "a", "network": "default"}] * 9},         # more than 8
    {"sshAuthorizedKeys": ["not a key"]},
    {"sshAuthorizedKeys": [KEY + "\ninstance-id: forged"]},             # a second line
    {"sshAuthorizedKeys": [KEY] * 33},
    {"userData": "x" * 32769},
])
def test_bad_guest_config_is_refused_by_the_schema(bad):
    with pytest.raises(ValidationError):
        spec(**bad)


def status_with(power: str, addresses: list[str], finished: datetime | None) -> VirtualInstance:
    last = ActionRecord(name="Create", id="c", result="Succeeded", finishedAt=finished) if finished else None
    return VirtualInstance.model_validate({
        "metadata": {"uid": UID}, "spec": {"flavor": FLAVOR},
        "status": {"vmState": "active", "powerState": power, "lastAction": last and last.model_dump(),
                   "interfaces": [{"name": "default", "mac": "52:54:00:00:00:01", "ipAddresses": addresses}]}})


@pytest.mark.parametrize("power,addresses,finished,after", [
    ("running", [], NOW - timedelta(seconds=5), interfaces.ADDRESS_POLL_S),   # just booted: look again soon
    ("running", [], NOW - timedelta(minutes=10), None),                      # long ago: the resync looks
    ("running", ["192.168.177.9"], NOW, None),                               # has its lease
    ("shutoff", [], NOW, None),                                              # off: no DHCP to wait for
])
def test_a_missing_lease_is_looked_for_soon_only_after_an_action(power, addresses, finished, after):
    assert interfaces.address_poll_after(status_with(power, addresses, finished).status, NOW) == after


def test_interface_status_pairs_each_nic_with_the_addresses_of_its_mac():
    got = interfaces.interface_status([("default", "52:54:00:00:00:01"), ("ext", "52:54:00:00:00:02")],
                                      {"52:54:00:00:00:01": ["192.168.177.9", "192.168.177.10"]})
    assert got == [InterfaceStatus(name="default", mac="52:54:00:00:00:01",
                                   ipAddresses=["192.168.177.10", "192.168.177.9"]),
                   InterfaceStatus(name="ext", mac="52:54:00:00:00:02", ipAddresses=[])]


@pytest.mark.parametrize("text,parsed", [
    ("default=network:default", ("default", ("network", "default"))),
    ("ext=bridge:br-ext", ("ext", ("bridge", "br-ext"))),
])
def test_a_node_offers_libvirt_networks_and_host_bridges(text, parsed):
    assert parse_network(text) == parsed


@pytest.mark.parametrize("text", ["default", "default=user:x", "=network:default", "x=bridge:br0;rm -rf /"])
def test_a_bad_network_flag_is_refused(text):
    with pytest.raises(ValueError):
        parse_network(text)


def new(**fields) -> VirtualInstance:
    return VirtualInstance.model_validate({"metadata": {"name": "vm", "namespace": "ns"},
                                           "spec": {"flavor": FLAVOR, **fields}})


OFFERS = {"hv-1": frozenset({"default"}), "hv-2": frozenset({"default", "ext"})}


@pytest.mark.parametrize("fields,refused", [
    ({}, None),
    ({"interfaces": [{"name": "a", "network": "ext"}]}, None),                       # hv-2 has it
    ({"interfaces": [{"name": "a", "network": "ext"}], "nodeName": "hv-1"}, "node hv-1 does not provide"),
    ({"interfaces": [{"name": "a", "network": "nope"}]}, "which no node provides"),
    ({"interfaces": [{"name": "a", "network": "nope"}], "nodeName": "hv-9"}, None),  # not heard from: its call
])
def test_the_webhook_refuses_a_network_no_live_agent_provides(fields, refused):
    why = review(new(**fields), None, OFFERS)
    assert (why is None) if refused is None else (refused in why and "networks: " in why)
    assert review(new(**fields), None, {}) is None  # no agent heard from: the agent decides


def test_meta_data_is_yaml_with_the_uid_name_and_keys_and_nothing_injected():
    doc = yaml.safe_load(meta_data(UID, "web-1", [KEY]))
    assert doc == {"instance-id": UID, "local-hostname": "web-1", "public-keys": [KEY]}
    assert "public-keys" not in yaml.safe_load(meta_data(UID, "web-1", None))


def test_the_cidata_volume_carries_both_files_byte_for_byte(tmp_path):
    user_data = "#cloud-config\nruncmd: [echo 'héllo']\n".encode()
    path = tmp_path / "cidata.iso"
    write_iso(path, CloudInit(meta_data(UID, "web-1", [KEY]), user_data))
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        for name, content in (("user-data", user_data), ("meta-data", meta_data(UID, "web-1", [KEY]))):
            for kind in ("rr_path", "joliet_path"):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **{kind: f"/{name}"})
                assert out.getvalue() == content
    finally:
        iso.close()
    assert not list(tmp_path.glob(".*partial"))
