"""The tiny real test guest, built from Debian packages alone.

What it is: the kernel of Debian's versioned ``linux-image-<abi>-amd64`` package (its vmlinuz is
unpacked to the uncompressed ELF ``vmlinux``, which QEMU boots directly through PVH: faster
under TCG than letting the guest decompress a bzImage), plus an initramfs made of
``busybox-static`` and a handful of modules copied from the same kernel package:

* ``evdev`` + ``button``: the ACPI power button becomes an input event that busybox ``acpid``
  turns into ``/etc/acpi/PWRF/00000080`` = ``poweroff -f``. So an ACPI shutdown
  (``virDomainShutdownFlags(VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)``) powers the guest off.
* Soft reboot: libvirt's QEMU driver implements ``virDomainReboot(VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)``
  as a "fake reboot": it presses the ACPI power button and, when the guest powers off, resets
  the VM instead of letting QEMU exit (QEMU runs with ``-no-shutdown``). The RESET is reported
  as a ``VIR_DOMAIN_EVENT_ID_REBOOT`` event and the guest boots again and prints the marker a
  second time. So the same power-button handler serves both; no guest agent is involved.
* ``virtio_blk`` (+ its virtio dependencies): lets the guest report the disks it sees, so tests
  can check that a rescue boot has the instance disk attached as second disk.

``/init`` prints ``NOVALET-GUEST-READY rescue=<0|1> disks=<vda,vdb,...>`` on the serial
console (``console=ttyS0``) once acpid listens (presses before that are lost). Before it, and so
ready when the marker shows:

* cloud-init NoCloud: the first disk whose ISO 9660 (or FAT) volume label is ``cidata`` (any case;
  read from each disk's superblock with ``dd``: Debian's busybox ``findfs`` does not find an ISO
  9660 label) is mounted read-only (``isofs`` + ``cdrom``, or ``vfat`` + ``fat`` + two NLS tables, loaded only then), its
  ``user-data`` and ``meta-data`` copied byte for byte, and ``NOVALET-GUEST-CIDATA
  user-data=<sha256|none>`` printed (``none`` also without such a disk).
* busybox ``httpd`` on port 80 (all addresses, ``lo`` is up): ``/`` answers the DMI product uuid in
  lower case (libvirt gives QEMU the domain uuid, which novalet sets to the instance's
  ``metadata.uid``; no trailing newline), ``/user-data`` and ``/meta-data`` the cidata files, 404
  when there are none.

After it, in the background: when the guest has a virtio-net device, ``virtio_net`` (+
``failover``, ``net_failover``) is loaded, every ``ethN`` brought up and busybox ``udhcpc`` run on
it (its log in ``/var/log/udhcpc.<iface>.log``); its script sets the address, a default route and
``/etc/resolv.conf`` and prints ``NOVALET-GUEST-NET <iface> <ip>`` on the console for each new
lease. And the QEMU guest agent, when the domain has its channel (novalet's always do): Debian's
``qemu-ga`` (the host's ``/usr/sbin/qemu-ga`` if ``qemu-guest-agent`` is installed, else the one in
the package ``apt-get download`` fetches) with the shared libraries ``ldd`` resolves on the host and
the dynamic loader, ``virtio_console`` loaded only then; with no udev, /init links
``/dev/virtio-ports/org.qemu.guest_agent.0`` to the port whose ``/sys/class/virtio-ports/*/name``
says so, runs qemu-ga there (respawned; its log in ``/var/log/qemu-ga.log``) and prints
``NOVALET-GUEST-AGENT org.qemu.guest_agent.0`` (``none`` without the channel). So libvirt's
``setUserPassword`` works: qemu-ga runs ``chpasswd``, here a script (Debian's busybox has no such
applet) that writes a SHA-512 crypt hash (busybox ``mkpasswd``, the password through a pipe) into
root's entry of ``/etc/shadow`` (root only, ``*`` = locked at first), which ``httpd`` serves at
``/shadow``; and ``interfaceAddresses(..._SRC_AGENT)`` reports the guest's addresses. In the
foreground, a root shell on the serial console (``setsid cttyhack sh``, respawned
when it exits): ``virsh console`` or libvirt's console stream can run commands (with a
``<serial type='pty'>`` and a ``<log file=... append='on'/>`` child, the serial log still gets
everything).

Everything is cached outside the repo in ``~/.cache/novalet/guest/<kernel-version>/`` (override the
root with ``NOVALET_CACHE``, as for the rest of devenv; pin the package with
``NOVALET_GUEST_KERNEL_PACKAGE``).

Needs on the host: ``apt-get`` (download only, no install), ``dpkg-deb``, ``qemu-img``, ``ldd``, the
``busybox-static`` package (downloaded with apt-get if /bin/busybox is not static) and the shared
libraries qemu-ga needs (glib, libnuma, liburing, libudev: QEMU's own dependencies).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import struct
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from novalet.virt.images import link_or_copy

from . import processes

log = logging.getLogger(__name__)

MARKER = "NOVALET-GUEST-READY"
CIDATA_MARKER = "NOVALET-GUEST-CIDATA"  # NOVALET-GUEST-CIDATA user-data=<sha256|none>
NET_MARKER = "NOVALET-GUEST-NET"  # NOVALET-GUEST-NET <iface> <ip>, once per new lease
AGENT_MARKER = "NOVALET-GUEST-AGENT"  # NOVALET-GUEST-AGENT <port>|none, once qemu-ga is started
AGENT_PORT = "org.qemu.guest_agent.0"  # novalet.virt.domain_xml.GUEST_AGENT_CHANNEL
AGENT_PACKAGE = "qemu-guest-agent"  # its qemu-ga, with the shared libraries ldd finds on the host
GUEST_MEMORY_MIB = 128  # 96 MiB is the measured minimum under TCG
BUILD_FORMAT = "6"  # the cache key also hashes the init, the scripts and the module lists (build_id)
MODULES = ("evdev", "button", "virtio_blk", "virtio_pci")  # loaded at every boot
# loaded by /init only when needed (dependencies already loaded at boot are not repeated)
ON_DEMAND_MODULES = {
    "net": ("virtio_net",),  # + failover, net_failover
    "agent": ("virtio_console",),  # the virtio-serial port of the guest agent
    "iso9660": ("isofs",),  # + cdrom
    "vfat": ("vfat", "nls_cp437", "nls_ascii"),  # + fat; FAT's default codepage and iocharset
}
DEFAULT_CMDLINE = "console=ttyS0 quiet loglevel=3 novalet.guest=tiny"
DISK_SIZE = "16M"  # the empty qcow2 of the tiny image (the guest runs from its initramfs)

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
load() {  # a module group: /etc/novalet-modules.<group>, in load order
  for m in $(cat "/etc/novalet-modules.$1"); do
    [ -d "/sys/module/$m" ] || insmod "/lib/modules/$m.ko" || echo "novalet-guest: insmod $m failed"
  done
}
peek() { dd if="$1" bs=1 skip="$2" count="$3" 2>/dev/null; }
cidata() {  # the first disk labelled cidata: mount it, copy user-data and meta-data to /www
  for b in /sys/block/*; do
    dev=/dev/${b##*/}
    case "${b##*/}" in loop*|ram*|\*) continue ;; esac
    if [ "$(peek "$dev" 32769 5)" = CD001 ]; then fs=iso9660 label=$(peek "$dev" 32808 32)
    elif [ "$(peek "$dev" 82 5)" = FAT32 ]; then fs=vfat label=$(peek "$dev" 71 11)
    else
      case "$(peek "$dev" 54 5)" in FAT1[26]) fs=vfat label=$(peek "$dev" 43 11) ;; *) continue ;; esac
    fi
    [ "$(echo $label | tr A-Z a-z)" = cidata ] || continue
    load "$fs"
    mount -t "$fs" -o ro "$dev" /mnt/cidata || { echo "novalet-guest: cannot mount $dev ($fs)"; continue; }
    for f in user-data meta-data; do
      [ -f "/mnt/cidata/$f" ] && cp "/mnt/cidata/$f" "/www/$f"
    done
    umount /mnt/cidata
    break
  done
  sum=none
  [ -f /www/user-data ] && sum=$(sha256sum /www/user-data) && sum=${sum%% *}
  echo "NOVALET-GUEST-CIDATA user-data=$sum"
}
net() {  # virtio-net: every ethN up, udhcpc on each (its script prints NOVALET-GUEST-NET)
  grep -qx 0x0001 /sys/bus/virtio/devices/*/device 2>/dev/null || return 0
  load net
  for n in /sys/class/net/eth*; do
    [ -e "$n" ] || continue
    i=${n##*/}
    ip link set "$i" up
    (  # until the kernel's link watch marks it up, the NIC drops what is sent: the first DISCOVER
      k=0
      while [ "$(cat "$n/operstate")" != up ] && [ $k -lt 30 ]; do sleep 0.1; k=$((k+1)); done
      exec udhcpc -f -i "$i" -s /etc/udhcpc.script -T 2 -A 5 >"/var/log/udhcpc.$i.log" 2>&1
    ) &
  done
}
agent() {  # qemu-ga on the virtio-serial port org.qemu.guest_agent.0 (no udev: the symlink is made here)
  port=org.qemu.guest_agent.0
  grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null || { echo "NOVALET-GUEST-AGENT none"; return 0; }
  load agent
  k=0
  until name=$(grep -lx "$port" /sys/class/virtio-ports/*/name 2>/dev/null) && [ -c "/dev/$(basename "${name%/name}")" ]; do
    [ $k -lt 100 ] || { echo "novalet-guest: no virtio port $port"; echo "NOVALET-GUEST-AGENT none"; return 0; }
    sleep 0.1; k=$((k+1))
  done
  mkdir -p /dev/virtio-ports
  ln -sf "../$(basename "${name%/name}")" "/dev/virtio-ports/$port"
  (
    while :; do  # respawned, as the console shell is
      qemu-ga -m virtio-serial -p "/dev/virtio-ports/$port" -l /var/log/qemu-ga.log -f /var/run/qemu-ga.pid -t /var/run
      sleep 1
    done
  ) &
  echo "NOVALET-GUEST-AGENT $port"
}
load boot
mkdir -p /var/log /var/run /www /mnt/cidata /root
acpid -d -c /etc/acpi -p /var/run/acpid.pid &
acpid_pid=$!
ip link set lo up
tr A-F a-f </sys/class/dmi/id/product_uuid | tr -d '\n' >/www/index.html
cidata
httpd -p 80 -h /www
i=0
while [ $i -lt 50 ]; do
  ls -l /proc/$acpid_pid/fd 2>/dev/null | grep -q /dev/input/event && break
  sleep 0.1; i=$((i+1))
done
[ $i -lt 50 ] || echo "novalet-guest: acpid does not listen on /dev/input/event*"
rescue=0
case " $(cat /proc/cmdline) " in *" novalet.rescue=1 "*) rescue=1 ;; esac
disks=""
for d in /sys/block/*; do
  n=${d##*/}
  case "$n" in loop*|ram*|\*) ;; *) disks="$disks${disks:+,}$n" ;; esac
done
echo "NOVALET-GUEST-READY rescue=$rescue disks=$disks"
net &
agent &
cd /root
while :; do
  setsid cttyhack sh
  sleep 1
done
"""

# qemu-ga's guest-set-user-password (libvirt's virDomainSetUserPassword) runs `chpasswd [-e]` with
# `user:password` lines on its stdin; Debian's busybox has no chpasswd applet, so this is one. The
# password goes to busybox mkpasswd through a pipe (printf is the shell's builtin): never in argv.
CHPASSWD_SCRIPT = r"""#!/bin/sh
umask 077
rc=0
while IFS= read -r line || [ -n "$line" ]; do
  user=${line%%:*} pw=${line#*:}
  if [ -z "$user" ] || [ "$user" = "$line" ]; then echo "chpasswd: no user:password line" >&2; rc=1; continue; fi
  if [ "$1" = -e ]; then hash=$pw; else hash=$(printf '%s\n' "$pw" | mkpasswd -m sha512) || { rc=1; continue; }; fi
  found=0 today=$(($(date +%s) / 86400))
  while IFS= read -r entry; do
    case "$entry" in
    "$user":*)
      rest=${entry#*:} rest=${rest#*:} rest=${rest#*:}
      printf '%s:%s:%s:%s\n' "$user" "$hash" "$today" "$rest"; found=1 ;;
    *) printf '%s\n' "$entry" ;;
    esac
  done </etc/shadow >/etc/shadow.new
  if [ $found = 1 ]; then mv /etc/shadow.new /etc/shadow; else rm -f /etc/shadow.new; echo "chpasswd: unknown user $user" >&2; rc=1; fi
done
exit $rc
"""
PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
GROUP = "root:x:0:\n"
SHADOW = "root:*:0:0:99999:7:::\n"  # locked until a password is set

POWER_BUTTON_HANDLER = "#!/bin/sh\necho novalet-guest: power button, powering off\npoweroff -f\n"

# busybox udhcpc runs it with deconfig | bound | renew | leasefail | nak; the lease in the environment
UDHCPC_SCRIPT = r"""#!/bin/sh
state=/var/run/udhcpc.$interface.ip
case "$1" in
deconfig)
  ip -4 addr flush dev "$interface"
  ip link set "$interface" up
  rm -f "$state"
  ;;
bound|renew)
  [ "$(cat "$state" 2>/dev/null)" = "$ip" ] && exit 0
  ip -4 addr flush dev "$interface"
  ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
  for r in $router; do
    ip route add default via "$r" dev "$interface" 2>/dev/null
    break
  done
  [ -n "$dns" ] && for s in $dns; do echo "nameserver $s"; done >/etc/resolv.conf
  echo "$ip" >"$state"
  echo "NOVALET-GUEST-NET $interface $ip" >/dev/console
  ;;
esac
exit 0
"""


class GuestBuildError(RuntimeError):
    """The tiny guest cannot be built; the message says what to install or fix."""


@dataclass(frozen=True)
class GuestArtifacts:
    version: str  # kernel version, e.g. 6.1.0-56-amd64
    kernel: Path
    initrd: Path
    cmdline: str


# --------------------------------------------------------------------------------------------------
# helpers


def cache_root() -> Path:
    """``<novalet cache>/guest`` (see :func:`novalet_dev.processes.cache_root`)."""
    return processes.cache_root() / "guest"


def _run(args: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{args[0]} not found: install it (see hack/setup.sh)") from e
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned kernel package, e.g. ``linux-image-6.1.0-56-amd64``."""
    pinned = os.environ.get("NOVALET_GUEST_KERNEL_PACKAGE")
    if pinned:
        return pinned
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-amd64)\s*$", line)
        if m and "unsigned" not in m.group(1):
            return m.group(1)
    raise GuestBuildError(
        "cannot resolve the versioned kernel package from linux-image-amd64; run `apt-get update` "
        "or set NOVALET_GUEST_KERNEL_PACKAGE=linux-image-<abi>-amd64"
    )


def _apt_download(package: str, dest: Path) -> Path:
    _run(["apt-get", "download", "-q", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise GuestBuildError(f"apt-get download {package} produced no .deb in {dest}")
    return debs[-1]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The kernel's scripts/extract-vmlinux, for xz/gzip/zstd-free kernels (stdlib codecs only)."""
    for magic, kind in ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip")):
        start = bzimage.find(magic)
        while start != -1:
            try:
                if kind == "xz":
                    data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
                else:
                    data = gzip.GzipFile(fileobj=io.BytesIO(bzimage[start:])).read()
            except (lzma.LZMAError, OSError, EOFError):
                data = b""
            if data[:4] == b"\x7fELF":
                return data
            start = bzimage.find(magic, start + 1)
    raise GuestBuildError("cannot find an xz or gzip compressed ELF kernel inside vmlinuz")


def _elf_is_static(path: Path) -> bool:
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _busybox(work: Path) -> Path:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.exists() and _elf_is_static(candidate.resolve()):
            return candidate.resolve()
    deb = _apt_download("busybox-static", work)
    root = work / "busybox-static"
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    for candidate in (root / "bin/busybox", root / "usr/bin/busybox"):
        if candidate.exists():
            return candidate
    raise GuestBuildError("busybox-static package has no bin/busybox")


def _guest_agent(work: Path) -> list[tuple[str, bytes]]:
    """qemu-ga and every shared library it loads, as (path in the initramfs, content): the
    host's /usr/sbin/qemu-ga when qemu-guest-agent is installed, else the one in its downloaded
    package; the libraries are the host's that ``ldd`` resolves (a Debian host with QEMU has them)."""
    binary = Path("/usr/sbin/qemu-ga")
    if not binary.exists():
        deb = _apt_download(AGENT_PACKAGE, work)
        _run(["dpkg-deb", "-x", str(deb), str(work / "qga")])
        binary = work / "qga/usr/sbin/qemu-ga"
        if not binary.exists():
            raise GuestBuildError(f"{deb.name} has no usr/sbin/qemu-ga")
    files = [("usr/sbin/qemu-ga", binary.read_bytes())]
    for line in _run(["ldd", str(binary)]).splitlines():
        m = re.match(r"\s*(\S+)(?: => (.*?))?\s+\(0x[0-9a-f]+\)\s*$", line)
        if "not found" in line or ("=>" in line and not m):
            raise GuestBuildError(f"qemu-ga needs {line.split()[0]}, which is not on this host: install "
                                  f"{AGENT_PACKAGE}'s dependencies (apt-get install {AGENT_PACKAGE})")
        if not m or not (m.group(2) or m.group(1)).startswith("/"):
            continue  # linux-vdso.so.1: the kernel's
        path = m.group(2) or m.group(1)  # the library as the loader finds it; the loader by its own path
        files.append((path.lstrip("/"), Path(path).resolve().read_bytes()))
    if not any(p.startswith("lib64/ld-linux") for p, _ in files):
        raise GuestBuildError(f"ldd {binary} names no dynamic loader: {files[1:]!r}")
    return files


def _module_info(ko: bytes) -> dict[str, str]:
    info = {}
    for m in re.finditer(rb"(?<=\x00)(depends|name|vermagic)=([^\x00]*)\x00", ko):
        info.setdefault(m.group(1).decode(), m.group(2).decode())
    return info


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def collect_modules(modroot: Path, wanted: tuple[str, ...], have: set[str] | None = None) -> list[tuple[str, bytes]]:
    """Modules with their dependencies (read from .modinfo), in load order.

    ``have``: modules already collected (for an earlier group), left out and updated in place.
    """
    index: dict[str, Path] = {}
    for p in modroot.rglob("*.ko*"):
        base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", p.name)
        index[base.replace("-", "_")] = p
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = have if have is not None else set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        if key not in index:
            raise GuestBuildError(f"kernel module {name} (needed by {' <- '.join(chain) or 'init'}) "
                                  f"is not in the kernel package (maybe built in?)")
        data = _read_module(index[key])
        for dep in filter(None, _module_info(data).get("depends", "").split(",")):
            visit(dep, (*chain, name))
        seen.add(key)
        ordered.append((key, data))

    for name in wanted:
        visit(name, ())
    return ordered


class _Cpio:
    """A cpio 'newc' archive writer (what the kernel's initramfs unpacker reads)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\x00"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nameb)
        self.buf.write(b"\x00" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\x00" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def collect_module_groups(modroot: Path) -> dict[str, list[tuple[str, bytes]]]:
    """``boot`` (MODULES) and each ON_DEMAND_MODULES group, each without what an earlier one has."""
    have: set[str] = set()
    groups = {"boot": collect_modules(modroot, MODULES, have)}
    for group, wanted in ON_DEMAND_MODULES.items():
        groups[group] = collect_modules(modroot, wanted, have)
    return groups


def build_id() -> str:
    """What the initramfs is made of besides the packages: a change in the init, a script or a
    module list gives a new id, and so a new build (the cache's ``complete.<id>`` marker)."""
    h = hashlib.sha256()
    for part in (BUILD_FORMAT, INIT_SCRIPT, POWER_BUTTON_HANDLER, UDHCPC_SCRIPT, CHPASSWD_SCRIPT, PASSWD, GROUP,
                 SHADOW, AGENT_PACKAGE, DEFAULT_CMDLINE, repr(MODULES), repr(sorted(ON_DEMAND_MODULES.items()))):
        h.update(part.encode() + b"\x00")
    return f"{BUILD_FORMAT}-{h.hexdigest()[:12]}"


def build_initramfs(busybox: bytes, modules: dict[str, list[tuple[str, bytes]]],
                    agent: list[tuple[str, bytes]] | None = None) -> bytes:
    """The initramfs: busybox, /init and its scripts, the module groups of
    :func:`collect_module_groups` (``/etc/novalet-modules.<group>`` lists each one's load order),
    root's /etc/passwd and /etc/shadow, and the guest agent's files (:func:`_guest_agent`)."""
    c = _Cpio()
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "etc/acpi",
            "etc/acpi/PWRF", "lib", "lib/modules", "www"]
    agent = agent or []
    for path, _ in agent:
        parts = path.split("/")[:-1]
        dirs += ["/".join(parts[:i + 1]) for i in range(len(parts)) if "/".join(parts[:i + 1]) not in dirs]
    for d in dirs:
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", busybox, 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", INIT_SCRIPT.encode(), 0o755)
    c.file("etc/acpi/PWRF/00000080", POWER_BUTTON_HANDLER.encode(), 0o755)
    c.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    c.file("etc/passwd", PASSWD.encode())
    c.file("etc/group", GROUP.encode())
    c.file("etc/shadow", SHADOW.encode(), 0o600)
    c.symlink("www/shadow", "/etc/shadow")  # GET /shadow: root's entry, to see a password set
    c.file("usr/sbin/chpasswd", CHPASSWD_SCRIPT.encode(), 0o755)
    for path, data in agent:
        c.file(path, data, 0o755)
    for group, mods in modules.items():
        for name, data in mods:
            c.file(f"lib/modules/{name}.ko", data)
        c.file(f"etc/novalet-modules.{group}", "".join(f"{n}\n" for n, _ in mods).encode())
    return gzip.compress(c.finish(), compresslevel=6, mtime=0)


# --------------------------------------------------------------------------------------------------
# public API


def ensure_guest_artifacts(package: str | None = None) -> GuestArtifacts:
    """Build (once) and return the cached kernel + initramfs of the tiny guest."""
    root = cache_root()
    complete = f"complete.{build_id()}"

    def newest_cached() -> GuestArtifacts | None:
        cached = sorted((p for p in root.glob("*") if (p / complete).exists()),
                        key=lambda p: p.stat().st_mtime)
        return _load(cached[-1]) if cached else None

    try:
        package = package or kernel_package()
    except GuestBuildError:
        if (art := newest_cached()) is not None:  # offline: reuse the newest complete build
            return art
        raise
    version = package.removeprefix("linux-image-")
    out = root / version
    if (out / complete).exists():
        return _load(out)
    try:
        return _build(package, out)
    except GuestBuildError as e:
        if (art := newest_cached()) is not None:  # e.g. the mirror dropped that version; stale apt lists
            log.warning("cannot build the tiny guest from %s (%s); using the cached %s", package, e, art.version)
            return art
        raise


def _build(package: str, out: Path) -> GuestArtifacts:
    version = out.name
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("complete.*"):  # another init's files are about to be replaced
        stale.unlink(missing_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="novalet-guest-", dir=out) as tmp:
        work = Path(tmp)
        deb = _apt_download(package, work)
        _run(["dpkg-deb", "-x", str(deb), str(work / "k")])
        vmlinuz = sorted((work / "k/boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestBuildError(f"{deb.name} has no boot/vmlinuz-*")
        vmlinux = extract_vmlinux(vmlinuz[0].read_bytes())
        modroots = sorted((work / "k").glob("lib/modules/*")) + sorted((work / "k").glob("usr/lib/modules/*"))
        if not modroots:
            raise GuestBuildError(f"{deb.name} has no lib/modules/<version>")
        modules = collect_module_groups(modroots[0])
        agent = _guest_agent(work)
        initrd = build_initramfs(_busybox(work).read_bytes(), modules, agent)
        # written in the private temp dir, then renamed: concurrent builders never see half a file
        for fname, data in (("vmlinux", vmlinux), ("initrd.img", initrd),
                            ("cmdline", (DEFAULT_CMDLINE + "\n").encode()),
                            (f"complete.{build_id()}", f"{package}\n".encode())):
            (work / fname).write_bytes(data)
            os.replace(work / fname, out / fname)
    log.info("built tiny guest %s in %.1fs (modules: %s; guest agent: %s)", version, time.monotonic() - t0,
             "; ".join(f"{g}: {' '.join(n for n, _ in mods)}" for g, mods in modules.items()),
             ", ".join(f"/{p} {len(d)}" for p, d in agent))
    return _load(out)


def _load(d: Path) -> GuestArtifacts:
    return GuestArtifacts(version=d.name, kernel=d / "vmlinux", initrd=d / "initrd.img",
                          cmdline=(d / "cmdline").read_text().strip())


def build_tiny_image(pool: Path, name: str) -> None:
    """Write ``<name>.qcow2`` (empty 16 MiB disk) + ``.kernel`` + ``.initrd`` + ``.cmdline`` into a pool."""
    from novalet.virt.images import validate_image_name

    validate_image_name(name)
    art = ensure_guest_artifacts()
    pool.mkdir(parents=True, exist_ok=True)
    link_or_copy(art.kernel, pool / f"{name}.kernel")
    link_or_copy(art.initrd, pool / f"{name}.initrd")
    (pool / f"{name}.cmdline").write_text(art.cmdline + "\n")
    disk = pool / f"{name}.qcow2"
    if not disk.exists():
        tmp = pool / f".{name}.qcow2.tmp-{uuid.uuid4().hex[:8]}"
        try:
            create_empty_disk(tmp)
            tmp.rename(disk)
        finally:
            tmp.unlink(missing_ok=True)


def create_empty_disk(path: Path) -> None:
    """The tiny guest's disk: an empty qcow2 of DISK_SIZE (``qemu-img create`` writes the same
    bytes every time, so the same sha256)."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), DISK_SIZE])


def count_markers(serial_log: Path, marker: str = MARKER) -> int:
    try:
        return serial_log.read_bytes().count(marker.encode())
    except FileNotFoundError:
        return 0


def wait_for_marker(serial_log: Path, marker: str = MARKER, timeout: float = 60.0, occurrence: int = 1) -> str:
    """Wait until ``marker`` appears ``occurrence`` times in the serial log; return that line.

    Raises TimeoutError with the log's tail, so a failing test shows what the guest printed.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = serial_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            text = ""
        if text.count(marker) >= occurrence:
            idx = -1
            for _ in range(occurrence):
                idx = text.index(marker, idx + 1)
            return text[idx:].split("\n", 1)[0].strip()
        if time.monotonic() >= deadline:
            tail = text[-1500:]
            raise TimeoutError(f"{marker!r} (x{occurrence}) not seen in {serial_log} within {timeout}s; "
                               f"log tail:\n{tail}")
        time.sleep(0.1)


def probe_kvm(uri: str, timeout: float = 20.0, *, record: bool = False) -> bool:
    """True only if the tiny guest boots to its ready marker under domain type ``kvm``.

    /dev/kvm may exist and a diskless domain may "run" while a real kernel never finishes booting
    (software nested KVM), so only a real boot counts. Any failure reports False. With
    ``record=True`` the result goes to ``novalet_dev.libvirtd.record_kvm_probe`` (which
    ``domain_type()`` reads).
    """
    result, detail = _probe_kvm(uri, timeout)
    if record:
        from novalet_dev.libvirtd import record_kvm_probe

        record_kvm_probe(result, detail=detail, timeout_s=timeout)
    return result


def _probe_kvm(uri: str, timeout: float) -> tuple[bool, str]:
    import libvirt

    from novalet.virt.domain_xml import DomainConfig, KernelBoot, build_domain_xml

    try:
        art = ensure_guest_artifacts()
    except GuestBuildError as e:
        log.warning("KVM probe: cannot build the tiny guest: %s", e)
        return False, f"cannot build the tiny guest: {e}"
    probe_uuid = str(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="novalet-kvm-probe-") as tmp:
        os.chmod(tmp, 0o755)
        serial = Path(tmp) / "serial.log"
        cfg = DomainConfig(
            name=f"novalet-kvm-probe-{probe_uuid[:8]}", uuid=probe_uuid, domain_type="kvm",
            vcpus=1, memory_mib=GUEST_MEMORY_MIB, serial_log=str(serial),
            kernel=KernelBoot(str(art.kernel), str(art.initrd), art.cmdline), guest_agent=False,
        )
        conn = None
        dom = None
        try:
            conn = libvirt.open(uri)
            t0 = time.monotonic()
            dom = conn.createXML(build_domain_xml(cfg), 0)
            wait_for_marker(serial, timeout=timeout)
            return True, f"tiny guest ready under KVM in {time.monotonic() - t0:.1f}s"
        except (libvirt.libvirtError, TimeoutError) as e:
            first = str(e).splitlines()[0] if str(e) else repr(e)
            log.info("KVM probe negative: %s", first)
            return False, first
        finally:
            if dom is not None:
                try:
                    dom.destroy()
                except libvirt.libvirtError:
                    pass
            if conn is not None:
                conn.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m novalet_dev.guest [--pool DIR [--name NAME]] [--probe-kvm URI [--record]]``.

    Builds (and caches) the tiny guest; optionally installs it into a pool and runs the KVM probe.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m novalet_dev.guest", description=main.__doc__)
    ap.add_argument("--pool", type=Path, help="write <name>.qcow2/.kernel/.initrd/.cmdline into this pool")
    ap.add_argument("--name", default="tiny")
    ap.add_argument("--probe-kvm", metavar="URI", help="boot the tiny guest under KVM through this libvirt URI")
    ap.add_argument("--record", action="store_true", help="record the probe result for devenv.libvirtd.domain_type")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        art = ensure_guest_artifacts()
        print(f"tiny guest {art.version}: kernel={art.kernel} initrd={art.initrd} cmdline={art.cmdline!r}")
        if args.pool:
            build_tiny_image(args.pool, args.name)
            print(f"image {args.name!r} written to {args.pool}")
    except GuestBuildError as e:
        print(f"error: {e}")
        return 1
    if args.probe_kvm:
        ok = probe_kvm(args.probe_kvm, record=args.record)
        print(f"KVM boots a real guest: {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
