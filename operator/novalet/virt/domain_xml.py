"""libvirt domain XML for novalet instances: pure functions, no I/O.

Everything is built with ElementTree, so names coming from Kubernetes objects are escaped; strings
that XML 1.0 cannot carry at all (control characters) are refused with ValueError.

The novalet metadata element (namespace ``https://novalet.io/xmlns/instance/v1``) records who the
domain belongs to (namespace, name, uid, node), which config is defined (``normal`` or
``rescue``), the image and flavor it was built with, and the flavor before an unconfirmed resize
(``oldFlavor``) so that a revert can restore it. Orphan reaping and crash recovery read it back with
:func:`read_metadata`.
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace

NS = "https://novalet.io/xmlns/instance/v1"
NS_PREFIX = "novalet"
DOMAIN_PREFIX = "novalet-"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
RESCUE_CMDLINE_FLAG = "novalet.rescue=1"
CONFIGS = ("normal", "rescue")
DOMAIN_TYPES = ("qemu", "kvm")

# not representable in XML 1.0 (or, for \r, not preserved: parsers normalize it to \n)
_XML_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\r\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _q(tag: str) -> str:
    return f"{{{NS}}}{tag}"


def _check_text(what: str, value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if _XML_BAD_CHARS.search(value):
        raise ValueError(f"{what} contains control characters that XML cannot carry: {value!r}")
    return value


def domain_name(uid: str) -> str:
    """The libvirt domain name of an instance: ``novalet-<metadata.uid>``."""
    return DOMAIN_PREFIX + str(uuidlib.UUID(uid))


@dataclass(frozen=True)
class Flavor:
    vcpus: int
    memory_mib: int

    def __post_init__(self) -> None:
        if not isinstance(self.vcpus, int) or isinstance(self.vcpus, bool) or not 1 <= self.vcpus <= 1024:
            raise ValueError(f"vcpus must be an integer in 1..1024, got {self.vcpus!r}")
        if (not isinstance(self.memory_mib, int) or isinstance(self.memory_mib, bool)
                or not 16 <= self.memory_mib <= 16 * 1024 * 1024):
            raise ValueError(f"memory_mib must be an integer >= 16, got {self.memory_mib!r}")


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot (like Nova's kernel_id / ramdisk_id image properties)."""

    kernel: str
    initrd: str | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class Disk:
    path: str
    format: str = "qcow2"
    target: str = "vda"

    def __post_init__(self) -> None:
        if self.format not in ("qcow2", "raw"):
            raise ValueError(f"disk format must be qcow2 or raw, got {self.format!r}")
        if not re.fullmatch(r"vd[a-z]", self.target):
            raise ValueError(f"disk target must be vd[a-z], got {self.target!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"disk path must be absolute, got {self.path!r}")


@dataclass(frozen=True)
class NetworkInterface:
    """A NIC: on a libvirt network (`kind` network) or an existing host bridge (`kind` bridge)."""

    name: str
    mac: str
    kind: str  # "network" | "bridge"
    source: str  # the libvirt network's or the bridge's name

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", self.mac):
            raise ValueError(f"invalid MAC address {self.mac!r}")
        if self.kind not in ("network", "bridge"):
            raise ValueError(f"interface kind must be network or bridge, got {self.kind!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", self.source):
            raise ValueError(f"invalid {self.kind} name {self.source!r}")
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,14}", self.name):
            raise ValueError(f"invalid interface name {self.name!r}")


@dataclass(frozen=True)
class InstanceMetadata:
    namespace: str
    name: str
    uid: str
    node: str = ""
    config: str = "normal"  # "normal" | "rescue"
    image: str = ""  # "" = diskless
    flavor: Flavor | None = None
    old_flavor: Flavor | None = None  # recorded by an unconfirmed resize, for revert
    interfaces: tuple[NetworkInterface, ...] = ()  # fixed at creation: every redefinition keeps them

    def __post_init__(self) -> None:
        if isinstance(self.interfaces, list):
            object.__setattr__(self, "interfaces", tuple(self.interfaces))
        for f in ("namespace", "name", "uid", "node", "image"):
            _check_text(f, getattr(self, f))
        if self.config not in CONFIGS:
            raise ValueError(f"config must be one of {CONFIGS}, got {self.config!r}")


@dataclass(frozen=True)
class DomainConfig:
    name: str
    uuid: str
    domain_type: str
    vcpus: int
    memory_mib: int
    serial_log: str | None = None
    disks: tuple[Disk, ...] = ()
    kernel: KernelBoot | None = None
    interfaces: tuple[NetworkInterface, ...] = ()
    cidata: str | None = None  # the cloud-init NoCloud disk (raw ISO), attached read-only
    guest_agent: bool = True
    metadata: InstanceMetadata | None = None
    machine: str | None = None

    def __post_init__(self) -> None:
        _check_text("name", self.name)
        if not self.name or "/" in self.name or len(self.name) > 200:
            raise ValueError(f"invalid domain name {self.name!r}")
        object.__setattr__(self, "uuid", str(uuidlib.UUID(self.uuid)))
        if self.domain_type not in DOMAIN_TYPES:
            raise ValueError(f"domain_type must be one of {DOMAIN_TYPES}, got {self.domain_type!r}")
        Flavor(self.vcpus, self.memory_mib)  # validates
        if isinstance(self.disks, list):
            object.__setattr__(self, "disks", tuple(self.disks))
        targets = [d.target for d in self.disks]
        if len(set(targets)) != len(targets):
            raise ValueError(f"duplicate disk targets {targets}")
        if self.serial_log is not None and not self.serial_log.startswith("/"):
            raise ValueError(f"serial_log must be absolute, got {self.serial_log!r}")
        if isinstance(self.interfaces, list):
            object.__setattr__(self, "interfaces", tuple(self.interfaces))
        if self.cidata is not None and not self.cidata.startswith("/"):
            raise ValueError(f"cidata must be absolute, got {self.cidata!r}")
        for v in (self.serial_log, self.machine, self.cidata, *(d.path for d in self.disks)):
            if v is not None:
                _check_text("path", v)
        if self.kernel is not None:
            for v in (self.kernel.kernel, self.kernel.initrd, self.kernel.cmdline):
                if v is not None:
                    _check_text("kernel boot", v)


def metadata_element(meta: InstanceMetadata) -> ET.Element:
    root = ET.Element(_q("instance"))
    for tag, value in (("namespace", meta.namespace), ("name", meta.name), ("uid", meta.uid),
                       ("node", meta.node), ("config", meta.config), ("image", meta.image)):
        ET.SubElement(root, _q(tag)).text = value
    for tag, fl in (("flavor", meta.flavor), ("oldFlavor", meta.old_flavor)):
        if fl is not None:
            ET.SubElement(root, _q(tag), {"vcpus": str(fl.vcpus), "memoryMiB": str(fl.memory_mib)})
    for nic in meta.interfaces:
        ET.SubElement(root, _q("interface"), {"name": nic.name, "mac": nic.mac, "kind": nic.kind,
                                              "source": nic.source})
    return root


def metadata_xml(meta: InstanceMetadata) -> str:
    """The metadata element without its namespace, for virDomainSetMetadata, which puts it in
    NS itself (an element that already declares the prefix makes libvirt fail with "failed to
    create a new XML namespace")."""
    element = metadata_element(meta)
    for node in element.iter():
        node.tag = node.tag.removeprefix(f"{{{NS}}}")
    return ET.tostring(element, encoding="unicode")


def build_domain_xml(cfg: DomainConfig) -> str:
    ET.register_namespace(NS_PREFIX, NS)
    dom = ET.Element("domain", {"type": cfg.domain_type})
    ET.SubElement(dom, "name").text = cfg.name
    ET.SubElement(dom, "uuid").text = cfg.uuid
    if cfg.metadata is not None:
        md = ET.SubElement(dom, "metadata")
        md.append(metadata_element(cfg.metadata))
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(cfg.memory_mib)
    ET.SubElement(dom, "currentMemory", {"unit": "MiB"}).text = str(cfg.memory_mib)
    ET.SubElement(dom, "vcpu", {"placement": "static"}).text = str(cfg.vcpus)

    os_el = ET.SubElement(dom, "os")
    type_attrs = {"arch": "x86_64"}
    if cfg.machine:
        type_attrs["machine"] = cfg.machine
    ET.SubElement(os_el, "type", type_attrs).text = "hvm"
    if cfg.kernel is not None:
        ET.SubElement(os_el, "kernel").text = cfg.kernel.kernel
        if cfg.kernel.initrd:
            ET.SubElement(os_el, "initrd").text = cfg.kernel.initrd
        if cfg.kernel.cmdline:
            ET.SubElement(os_el, "cmdline").text = cfg.kernel.cmdline
    else:
        ET.SubElement(os_el, "boot", {"dev": "hd"})

    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "clock", {"offset": "utc"})
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"

    devices = ET.SubElement(dom, "devices")
    for disk in cfg.disks:
        d = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(d, "driver", {"name": "qemu", "type": disk.format})
        ET.SubElement(d, "source", {"file": disk.path})
        ET.SubElement(d, "target", {"dev": disk.target, "bus": "virtio"})
    if cfg.cidata is not None:
        d = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(d, "driver", {"name": "qemu", "type": "raw"})
        ET.SubElement(d, "source", {"file": cfg.cidata})
        ET.SubElement(d, "target", {"dev": "vdz", "bus": "virtio"})
        ET.SubElement(d, "readonly")
    for nic in cfg.interfaces:
        i = ET.SubElement(devices, "interface", {"type": nic.kind})
        ET.SubElement(i, "mac", {"address": nic.mac})
        ET.SubElement(i, "source", {nic.kind: nic.source})
        ET.SubElement(i, "model", {"type": "virtio"})
        ET.SubElement(i, "rom", {"enabled": "no"})  # guests boot from their disk or kernel, never by PXE
    # a pty: libvirt's console stream (`novalet console`, `virsh console`) talks to it; its output
    # is also logged to the file
    s = ET.SubElement(devices, "serial", {"type": "pty"})
    if cfg.serial_log is not None:
        ET.SubElement(s, "log", {"file": cfg.serial_log, "append": "on"})
    ET.SubElement(s, "target", {"port": "0"})
    if cfg.guest_agent:
        ch = ET.SubElement(devices, "channel", {"type": "unix"})
        ET.SubElement(ch, "target", {"type": "virtio", "name": GUEST_AGENT_CHANNEL})
    ET.SubElement(devices, "controller", {"type": "usb", "model": "none"})
    ET.SubElement(devices, "memballoon", {"model": "none"})
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _flavor_from(el: ET.Element | None) -> Flavor | None:
    if el is None:
        return None
    try:
        return Flavor(int(el.get("vcpus", "")), int(el.get("memoryMiB", "")))
    except ValueError:
        return None


def read_metadata(xml: str) -> InstanceMetadata | None:
    """Novalet metadata from a full domain XML, the bare metadata element, or what
    ``virDomainGetMetadata(VIR_DOMAIN_METADATA_ELEMENT, NS)`` returns; None if absent/garbled."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    # virDomainGetMetadata returns the element with its namespace stripped: accept a bare <instance>
    q = _q if root.tag != "instance" else (lambda tag: tag)
    inst = root if root.tag in (_q("instance"), "instance") else root.find(f"./metadata/{_q('instance')}")
    if inst is None:
        return None

    def text(tag: str) -> str:
        el = inst.find(q(tag))
        return (el.text or "") if el is not None else ""

    if not text("uid"):
        return None
    try:
        interfaces = tuple(NetworkInterface(el.get("name", ""), el.get("mac", ""), el.get("kind", ""),
                                            el.get("source", "")) for el in inst.findall(q("interface")))
        return InstanceMetadata(
            namespace=text("namespace"), name=text("name"), uid=text("uid"), node=text("node"),
            config=text("config") or "normal", image=text("image"),
            flavor=_flavor_from(inst.find(q("flavor"))), old_flavor=_flavor_from(inst.find(q("oldFlavor"))),
            interfaces=interfaces,
        )
    except ValueError:
        return None


def instance_domain_config(
    meta: InstanceMetadata,
    *,
    domain_type: str,
    serial_log: str | None,
    disk: Disk | None,
    kernel: KernelBoot | None,
    rescue_disk: Disk | None = None,
    guest_agent: bool = True,
    cidata: str | None = None,
) -> DomainConfig:
    """The domain config of an instance in its normal or rescue config (``meta.config``).

    Normal: the instance disk as vda; direct kernel boot if the image has a kernel.
    Rescue (like Nova): a fresh rescue disk from the same image as vda, the instance disk as vdb,
    the same image's kernel with ``novalet.rescue=1`` appended to the cmdline. A diskless
    instance's rescue config is the diskless BIOS boot (no disk, no kernel).
    """
    if meta.flavor is None:
        raise ValueError("instance metadata must record the flavor")
    disks: tuple[Disk, ...] = ()
    if meta.config == "rescue":
        if disk is not None:
            if rescue_disk is None:
                raise ValueError("a rescue config of an instance with a disk needs a rescue disk")
            disks = (replace(rescue_disk, target="vda"), replace(disk, target="vdb"))
            if kernel is not None:
                cmd = f"{kernel.cmdline} {RESCUE_CMDLINE_FLAG}".strip()
                kernel = replace(kernel, cmdline=cmd)
        else:
            kernel = None  # diskless: BIOS only
    elif disk is not None:
        disks = (replace(disk, target="vda"),)
    return DomainConfig(
        name=domain_name(meta.uid), uuid=meta.uid, domain_type=domain_type,
        vcpus=meta.flavor.vcpus, memory_mib=meta.flavor.memory_mib, serial_log=serial_log,
        disks=disks, kernel=kernel, guest_agent=guest_agent, metadata=meta,
        interfaces=meta.interfaces, cidata=cidata,
    )
