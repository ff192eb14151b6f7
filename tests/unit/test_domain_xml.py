"""Domain XML building (pure): escaping, metadata round trip, rescue config."""

import uuid
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novalet.virt.domain_xml import (
    GUEST_AGENT_CHANNEL,
    NS,
    Disk,
    DomainConfig,
    Flavor,
    InstanceMetadata,
    KernelBoot,
    NetworkInterface,
    build_domain_xml,
    domain_name,
    instance_domain_config,
    metadata_xml,
    read_metadata,
)

UID = "0b9a3c1e-5d2f-4c1a-9e8b-7f6a5d4c3b2a"


def meta(**kw) -> InstanceMetadata:
    base = {"namespace": "team-a", "name": "web-1", "uid": UID, "node": "node-1", "config": "normal", "image": "tiny",
                "flavor": Flavor(2, 256)}
    base.update(kw)
    return InstanceMetadata(**base)


def config(m: InstanceMetadata | None = None, **kw) -> DomainConfig:
    m = m or meta()
    disk = Disk(f"/var/lib/novalet/instances/{UID}/disk.qcow2") if m.image else None
    rescue = Disk(f"/var/lib/novalet/instances/{UID}/disk.rescue.qcow2") if m.image else None
    kernel = KernelBoot("/pool/tiny.kernel", "/pool/tiny.initrd", "console=ttyS0 quiet") if m.image else None
    kw.setdefault("serial_log", f"/var/lib/novalet/instances/{UID}/serial.log")
    return instance_domain_config(m, domain_type=kw.pop("domain_type", "qemu"), disk=disk, kernel=kernel,
                                  rescue_disk=rescue, **kw)


def parse(cfg: DomainConfig) -> ET.Element:
    return ET.fromstring(build_domain_xml(cfg))


def test_normal_domain_shape():
    root = parse(config())
    assert root.get("type") == "qemu"
    assert root.findtext("name") == f"novalet-{UID}"
    assert root.findtext("uuid") == UID
    assert root.findtext("vcpu") == "2"
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "256"
    assert root.findtext("on_poweroff") == "destroy"
    assert root.findtext("on_reboot") == "restart"
    assert root.findtext("on_crash") == "destroy"
    assert root.findtext("os/kernel") == "/pool/tiny.kernel"
    assert root.findtext("os/initrd") == "/pool/tiny.initrd"
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet"
    assert root.find("features/acpi") is not None
    disks = root.findall("devices/disk")
    assert len(disks) == 1
    assert disks[0].find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disks[0].find("driver").get("type") == "qcow2"
    serial = root.find("devices/serial")  # a pty for the console stream, logged to the file
    assert serial.get("type") == "pty"
    assert serial.find("log").attrib == {"file": f"/var/lib/novalet/instances/{UID}/serial.log", "append": "on"}
    ch = root.find("devices/channel")
    assert ch.get("type") == "unix"
    assert ch.find("target").attrib == {"type": "virtio", "name": GUEST_AGENT_CHANNEL}
    assert root.findall("devices/interface") == []


def test_kvm_domain_type():
    assert parse(config(domain_type="kvm")).get("type") == "kvm"
    with pytest.raises(ValueError):
        config(domain_type="xen")


def test_disk_image_without_kernel_boots_from_disk():
    cfg = instance_domain_config(meta(), domain_type="qemu", serial_log=None,
                                 disk=Disk("/s/disk.qcow2"), kernel=None)
    root = parse(cfg)
    assert root.find("os/kernel") is None
    assert root.find("os/boot").get("dev") == "hd"
    assert root.find("devices/serial").get("type") == "pty"


def test_diskless_domain():
    root = parse(config(meta(image="")))
    assert root.findall("devices/disk") == []
    assert root.find("os/kernel") is None


def test_rescue_config_boots_rescue_kernel_with_instance_disk_second():
    root = parse(config(meta(config="rescue")))
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet novalet.rescue=1"
    disks = root.findall("devices/disk")
    assert [(d.find("target").get("dev"), d.find("source").get("file").rsplit("/", 1)[1]) for d in disks] == [
        ("vda", "disk.rescue.qcow2"), ("vdb", "disk.qcow2")]
    assert read_metadata(ET.tostring(root, encoding="unicode")).config == "rescue"


def test_rescue_of_diskless_is_bios_without_disk():
    root = parse(config(meta(config="rescue", image="")))
    assert root.findall("devices/disk") == []
    assert root.find("os/kernel") is None


def test_rescue_with_disk_needs_rescue_disk():
    with pytest.raises(ValueError):
        instance_domain_config(meta(config="rescue"), domain_type="qemu", serial_log=None,
                               disk=Disk("/s/disk.qcow2"), kernel=None)


def test_metadata_round_trip_with_old_flavor():
    m = meta(old_flavor=Flavor(1, 128))
    xml = build_domain_xml(config(m))
    assert read_metadata(xml) == m
    assert f'xmlns:novalet="{NS}"' in xml


NICS = (NetworkInterface("default", "52:54:00:0a:0b:0c", "network", "default"),
        NetworkInterface("ext", "52:54:00:0d:0e:0f", "bridge", "br-ext"))


def test_interfaces_and_the_cidata_disk():
    root = parse(config(meta(interfaces=NICS), cidata=f"/var/lib/novalet/instances/{UID}/cidata.iso"))
    nics = root.findall("devices/interface")
    assert [(n.get("type"), n.find("mac").get("address"), n.find("source").attrib, n.find("model").get("type"))
            for n in nics] == [("network", "52:54:00:0a:0b:0c", {"network": "default"}, "virtio"),
                               ("bridge", "52:54:00:0d:0e:0f", {"bridge": "br-ext"}, "virtio")]
    cidata = root.findall("devices/disk")[-1]
    assert cidata.find("source").get("file").endswith("/cidata.iso")
    assert cidata.find("driver").get("type") == "raw" and cidata.find("readonly") is not None


def test_interfaces_are_recorded_in_the_metadata_and_kept_by_every_redefinition():
    m = meta(interfaces=NICS)
    assert read_metadata(build_domain_xml(config(m))) == m
    rescue = parse(config(meta(interfaces=NICS, config="rescue")))
    assert len(rescue.findall("devices/interface")) == 2


@pytest.mark.parametrize("bad", [{"mac": "52:54:00:0A:0B:0C"}, {"kind": "user"}, {"source": "br0;rm"},
                                 {"source": ""}, {"name": "Eth0"}])
def test_interface_validation(bad):
    with pytest.raises(ValueError):
        NetworkInterface(**{"name": "default", "mac": "52:54:00:0a:0b:0c", "kind": "network",
                            "source": "default", **bad})


def test_metadata_for_set_metadata_carries_no_namespace_of_its_own():
    """libvirt's setMetadata adds the namespace; one declared already makes it fail."""
    bare = metadata_xml(meta(old_flavor=Flavor(1, 128)))
    assert "xmlns" not in bare and "novalet:" not in bare
    assert bare.startswith("<instance>") and '<oldFlavor vcpus="1" memoryMiB="128" />' in bare


@pytest.mark.parametrize("hostile", [
    '</name><devices><interface type="network"/></devices>',
    "a&b<c>\"d\"'e'",
    "]]><!-- -->",
    "ns:with:colons and spaces",
    "ünïcödé-名前",
])
def test_hostile_names_are_escaped(hostile):
    m = meta(namespace=hostile, name=hostile, node=hostile, image=hostile)
    xml = build_domain_xml(config(m))
    root = ET.fromstring(xml)  # still well-formed
    assert root.findall("devices/interface") == []
    assert len(root.findall("name")) == 1
    back = read_metadata(xml)
    assert back.namespace == hostile and back.name == hostile and back.node == hostile and back.image == hostile


def test_control_characters_are_refused():
    with pytest.raises(ValueError, match="control characters"):
        meta(name="bad\x00name")
    with pytest.raises(ValueError):
        meta(namespace="esc\x1b[31m")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff"),
               max_size=40))
def test_any_xml_representable_name_round_trips(name):
    try:
        m = meta(name=name)
    except ValueError:
        return  # control characters are refused
    assert read_metadata(build_domain_xml(config(m))).name == name


def test_read_metadata_absent_or_garbled():
    assert read_metadata("<domain type='qemu'><name>x</name></domain>") is None
    assert read_metadata("not xml <") is None
    assert read_metadata("<domain><metadata><other xmlns='urn:x'/></metadata></domain>") is None
    assert read_metadata(f"<instance xmlns='{NS}'><name>x</name></instance>") is None  # no uid
    # unknown config value -> garbled
    assert read_metadata(f"<instance xmlns='{NS}'><uid>{UID}</uid><config>evil</config></instance>") is None


def test_read_metadata_from_libvirt_style_prefix():
    xml = (f"<domain><metadata><nv:instance xmlns:nv='{NS}'><nv:uid>{UID}</nv:uid><nv:namespace>a</nv:namespace>"
           f"<nv:name>b</nv:name><nv:config>rescue</nv:config><nv:flavor vcpus='1' memoryMiB='96'/>"
           f"</nv:instance></metadata></domain>")
    m = read_metadata(xml)
    assert (m.uid, m.namespace, m.name, m.config, m.flavor) == (UID, "a", "b", "rescue", Flavor(1, 96))


def test_validation():
    with pytest.raises(ValueError):
        Flavor(0, 128)
    with pytest.raises(ValueError):
        Flavor(1, 8)
    with pytest.raises(ValueError):
        domain_name("../etc")
    with pytest.raises(ValueError):
        DomainConfig(name="x/y", uuid=UID, domain_type="qemu", vcpus=1, memory_mib=128)
    with pytest.raises(ValueError):
        DomainConfig(name="x", uuid="not-a-uuid", domain_type="qemu", vcpus=1, memory_mib=128)
    with pytest.raises(ValueError):
        Disk("relative/path.qcow2")
    with pytest.raises(ValueError):
        meta(config="weird")
    assert domain_name(UID.upper()) == f"novalet-{UID}"
    assert DomainConfig(name="x", uuid=str(uuid.UUID(UID)).upper(), domain_type="qemu", vcpus=1,
                        memory_mib=128).uuid == UID


def test_read_metadata_as_returned_by_virDomainGetMetadata():
    # libvirt strips the namespace from the element it returns
    xml = (f"<instance><namespace>a</namespace><name>b</name><uid>{UID}</uid><node/><config>normal</config>"
           f"<image/><flavor vcpus='1' memoryMiB='128'/><oldFlavor vcpus='2' memoryMiB='256'/></instance>")
    m = read_metadata(xml)
    assert (m.uid, m.image, m.flavor, m.old_flavor) == (UID, "", Flavor(1, 128), Flavor(2, 256))
