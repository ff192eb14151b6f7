"""Which domain type boots guests on this node: a boot probe through libvirt (`novalet
probe-domain-type`; the chart runs it as the agent pod's initContainer).

/dev/kvm and libvirt's domain capabilities only say that KVM can be asked for: on some machines
KVM is a software nested mode where a guest "runs" yet a real kernel never finishes booting
(DESIGN.md section 4). So the probe boots a guest under domain type ``kvm`` and believes only
what the guest itself prints on its serial console (libvirt's console stream, what `virsh
console` reads): a transient domain whose firmware is a 64 KiB ROM written here
(:func:`probe_rom`). The ROM takes the steps a Linux kernel takes first, real mode, then 64-bit
long mode with paging, and one that stopped Debian's kernel under that nested KVM (see
STAGES below), printing a marker after each. KVM boots guests when the last marker arrives within
the timeout.

A guest that does not boot under KVM is booted again under ``qemu`` (TCG), as a control: when it
does not boot there either, the probe itself is broken (the ROM unreadable by QEMU, libvirtd
refusing the domain), and the answer is inconclusive rather than "no KVM". If libvirt's domain
capabilities offer no ``kvm`` at all, the answer is no at once, with nothing defined.

The agent reaches the hypervisor only through libvirt (the pod mounts libvirtd's socket and has
no QEMU of its own), so the probe does too: the ROM file goes into the agent's image pool, the
directory both the agent and the node's libvirtd (and its QEMU) see at the same path, and is
removed afterwards; the domain is transient (``createXML``) and always destroyed.

The answer is recorded as JSON (``{"kvm_boots": bool, "detail": ..., ...}``) in the file
:func:`novalet.virt.kvm.domain_type` reads for ``novalet run --domain-type auto``.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROM_SIZE = 64 * 1024  # QEMU's -bios must be a multiple of 64 KiB
RESET_VECTOR = 0xFFF0  # the CPU's first instruction: physical 0xFFFFFFF0, the ROM's last 16 bytes
ROM_BASE_LOW = 0x100000 - ROM_SIZE  # QEMU also maps the (last 128 KiB of the) BIOS below 1 MiB
COM1 = 0x3F8
NAME_PREFIX = "novalet-probe-"  # never "novalet-<uuid>": the agent ignores the domain
MEMORY_MIB = 16
DEFAULT_TIMEOUT = 5.0

# STAGES: what the guest prints, in order, and what it has shown once it has printed that line;
# STOPPED[i]: what a guest that printed only the first i lines did. It boots when it prints the
# last. Measured on the machines of DESIGN.md section 4 (/dev/kvm a software nested mode):
# Debian's kernel ran there, slowly, until its allocator's first 16-byte `lock cmpxchg16b`, which
# ended the guest with "KVM internal error. Suberror: 1" (an emulation failure); the ROM stops at
# the same instruction, after its long-mode marker. Under TCG and a hardware KVM it completes.
STAGES: tuple[tuple[bytes, str], ...] = (
    (b"NOVALET-PROBE 1 real-mode\n", "ran its first instructions (16-bit real mode)"),
    (b"NOVALET-PROBE 2 long-mode\n", "reached 64-bit long mode with paging"),
    (b"NOVALET-PROBE 3 cmpxchg16b\n", "reached 64-bit long mode and completed a 16-byte lock cmpxchg16b"),
)
STOPPED = (
    "printed nothing: not even its first instructions ran",
    "ran its first instructions (16-bit real mode) but never reached 64-bit long mode with paging",
    ("reached 64-bit long mode with paging but never completed a 16-byte lock cmpxchg16b (Linux's memory "
     "allocator needs it)"),
)
MARKER_REAL, MARKER_LONG, MARKER_DONE = (marker for marker, _ in STAGES)
MARKER_WRONG = b"NOVALET-PROBE cmpxchg16b-wrong\n"  # it completed, with another result than the CPU's

# where the pieces sit in the ROM (offsets; code runs from the low copy at ROM_BASE_LOW)
_CODE16, _CODE32, _CODE64, _GDT, _GDTR = 0x000, 0x100, 0x200, 0x400, 0x420
_PML4, _PDPT, _PD, _SCRATCH = 0x1000, 0x2000, 0x3000, 0x4000  # in RAM, zeroed by the 16-bit code
_SEL_CODE32, _SEL_CODE64 = 0x08, 0x18
_CX16_LOW, _CX16_HIGH = 0x0123456789ABCDEF, 0x0FEDCBA987654321


def _print(marker: bytes) -> bytes:
    """`mov al, c; out dx, al` for each byte (DX holds COM1): no data to address, no stack."""
    return b"".join(b"\xb0" + bytes([c]) + b"\xee" for c in marker)


def _u16(value: int) -> bytes:
    return struct.pack("<H", value)


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _rel8(distance: int) -> bytes:
    assert -128 <= distance <= 127, distance
    return struct.pack("<b", distance)


def probe_rom() -> bytes:
    """The 64 KiB firmware ROM of the probe guest (x86, hand-assembled; each line says what it is).

    At reset the CPU runs the ROM's last 16 bytes (offset 0xFFF0) in real mode; they jump to the
    copy QEMU maps below 1 MiB (segment 0xF000), so every address the code uses stays under the
    first 2 MiB, which the page tables map 1:1. The code prints STAGES[0], builds 4-level page
    tables in RAM (one 2 MiB page at 0), loads the GDT, enters 32-bit protected mode, enables PAE,
    long mode (EFER.LME) and paging, jumps into a 64-bit code segment and prints STAGES[1]; then
    a `lock cmpxchg16b` stores a 16-byte value in RAM, checked, and it prints STAGES[2] (or
    MARKER_WRONG) and halts. The descriptors have their accessed bit set: the CPU never writes to
    the ROM.
    """
    code16 = b"".join([
        b"\xfa",                                    # cli
        b"\xba" + _u16(COM1),                       # mov dx, 0x3f8
        _print(MARKER_REAL),
        b"\x31\xc0",                                # xor ax, ax
        b"\x8e\xd8",                                # mov ds, ax
        b"\x8e\xc0",                                # mov es, ax
        b"\xbf" + _u16(_PML4),                      # mov di, PML4
        b"\xb9" + _u16(4 * 4096 // 2),              # mov cx, words in the 3 tables and the scratch page
        b"\xfc\xf3\xab",                            # cld; rep stosw (zero them)
        b"\x66\xc7\x06" + _u16(_PML4) + _u32(_PDPT | 3),  # mov dword [PML4], PDPT|present|writable
        b"\x66\xc7\x06" + _u16(_PDPT) + _u32(_PD | 3),    # mov dword [PDPT], PD|present|writable
        b"\x66\xc7\x06" + _u16(_PD) + _u32(0x83),         # mov dword [PD], 0|present|writable|2MiB
        b"\x2e\x66\x0f\x01\x16" + _u16(_GDTR),      # lgdt cs:[GDTR] (32-bit base)
        b"\x0f\x20\xc0",                            # mov eax, cr0
        b"\x66\x83\xc8\x01",                        # or eax, 1 (PE)
        b"\x0f\x22\xc0",                            # mov cr0, eax
        b"\x66\xea" + _u32(ROM_BASE_LOW + _CODE32) + _u16(_SEL_CODE32),  # jmp dword 0x08:code32
    ])
    code32 = b"".join([
        b"\x0f\x20\xe0",                            # mov eax, cr4
        b"\x83\xc8\x20",                            # or eax, 0x20 (PAE)
        b"\x0f\x22\xe0",                            # mov cr4, eax
        b"\xb8" + _u32(_PML4),                      # mov eax, PML4
        b"\x0f\x22\xd8",                            # mov cr3, eax
        b"\xb9" + _u32(0xC0000080),                 # mov ecx, IA32_EFER
        b"\x0f\x32",                                # rdmsr
        b"\x0d" + _u32(0x100),                      # or eax, LME
        b"\x0f\x30",                                # wrmsr
        b"\x0f\x20\xc0",                            # mov eax, cr0
        b"\x0d" + _u32(0x80000000),                 # or eax, PG
        b"\x0f\x22\xc0",                            # mov cr0, eax (long mode is active now)
        b"\xea" + _u32(ROM_BASE_LOW + _CODE64) + _u16(_SEL_CODE64),  # jmp 0x18:code64
    ])
    halt = b"\xfa\xf4\xeb\xfd"                       # cli; hlt; jmp hlt
    wrong = b"\xba" + _u32(COM1) + _print(MARKER_WRONG) + halt
    done = b"\xba" + _u32(COM1) + _print(MARKER_DONE) + halt
    checks = b"".join([
        b"\x48\x39\x1c\x25" + _u32(_SCRATCH),      # cmp [SCRATCH], rbx
        b"\x75" + _rel8(8 + 2 + 2),                 # jne wrong
        b"\x48\x39\x0c\x25" + _u32(_SCRATCH + 8),  # cmp [SCRATCH+8], rcx
        b"\x75" + _rel8(2),                         # jne wrong
        b"\xeb" + _rel8(len(wrong)),                # jmp done
    ])
    code64 = b"".join([
        b"\xba" + _u32(COM1),                       # mov edx, 0x3f8
        _print(MARKER_LONG),
        b"\x31\xc0\x31\xd2",                        # xor eax, eax; xor edx, edx (RDX:RAX = the zeroed RAM)
        b"\x48\xbb" + _u64(_CX16_LOW),              # mov rbx, low half
        b"\x48\xb9" + _u64(_CX16_HIGH),             # mov rcx, high half
        b"\xf0\x48\x0f\xc7\x0c\x25" + _u32(_SCRATCH),  # lock cmpxchg16b [SCRATCH] (stores RCX:RBX)
        b"\x75" + _rel8(len(checks)),               # jnz wrong (it found something else there)
        checks, wrong, done,
    ])
    gdt = b"".join(_u64(d) for d in (
        0,                                          # null
        0x00CF9B000000FFFF,                         # 0x08: 32-bit code, flat, accessed
        0x00CF93000000FFFF,                         # 0x10: 32-bit data, flat, accessed
        0x00AF9B000000FFFF,                         # 0x18: 64-bit code (L=1), accessed
    ))
    gdtr = _u16(len(gdt) - 1) + _u32(ROM_BASE_LOW + _GDT)
    reset = b"\xea" + _u16(0) + _u16(0xF000)        # jmp 0xf000:0 (the low copy's offset 0)

    rom = bytearray(b"\xf4" * ROM_SIZE)             # hlt everywhere else
    for offset, piece, end in ((_CODE16, code16, _CODE32), (_CODE32, code32, _CODE64), (_CODE64, code64, _GDT),
                               (_GDT, gdt, _GDTR), (_GDTR, gdtr, RESET_VECTOR), (RESET_VECTOR, reset, ROM_SIZE)):
        assert offset + len(piece) <= end, f"ROM piece at {offset:#x} overlaps the next"
        rom[offset:offset + len(piece)] = piece
    return bytes(rom)


# ------------------------------------------------------------------ the decision (pure)
@dataclass(frozen=True)
class Boot:
    """One boot of the probe guest under ``domain_type``: did it print the last marker?"""

    domain_type: str
    booted: bool
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True)
class Answer:
    """The probe's answer: does KVM boot guests here? ``conclusive`` False: the probe itself
    could not run a guest (not even under TCG), so "no" only means "not proven"."""

    kvm_boots: bool
    conclusive: bool
    detail: str
    seconds: float = 0.0

    @property
    def domain_type(self) -> str:
        return "kvm" if self.kvm_boots else "qemu"

    def record(self) -> dict:
        """The JSON the agent reads (`novalet.virt.kvm.domain_type` looks at ``kvm_boots``)."""
        return {"kvm_boots": self.kvm_boots, "conclusive": self.conclusive, "detail": self.detail,
                "seconds": round(self.seconds, 2), "time": time.time(), "probe": "novalet probe-domain-type"}


def verdict(domain_type: str, console: bytes, seconds: float, timeout: float, state: str = "",
            timed_out: bool = True) -> Boot:
    """A boot's outcome from what the guest printed on its console (``state``: the domain's
    libvirt state afterwards; ``timed_out``: the guest still ran at the end of ``timeout``)."""
    if MARKER_DONE in console:
        return Boot(domain_type, True, f"a guest under {domain_type} {STAGES[-1][1]} in {seconds:.1f}s", seconds)
    if MARKER_WRONG in console:
        why = "completed a 16-byte lock cmpxchg16b with a wrong result"
    else:
        why = STOPPED[sum(1 for marker, _ in STAGES if marker in console)]
    domain = f": the domain was {state}" if state else ""
    when = f"within {timeout:g}s{domain}" if timed_out else f"(it stopped after {seconds:.1f}s{domain})"
    return Boot(domain_type, False, f"a guest under {domain_type} {why} {when}", seconds)


def decide(kvm: Boot, control: Boot | None) -> Answer:
    """KVM boots guests when the guest booted under kvm; when it did not, the control (the same
    guest under qemu) says whether that is KVM's doing or the probe's."""
    seconds = kvm.seconds + (control.seconds if control else 0.0)
    if kvm.booted:
        return Answer(True, True, kvm.detail, seconds)
    if control is not None and control.booted:
        return Answer(False, True, f"{kvm.detail}; the same guest boots under qemu (TCG)", seconds)
    ran = f"; under qemu (TCG) as well: {control.detail}" if control else ""
    return Answer(False, False, f"the probe could not boot a guest at all: {kvm.detail}{ran}", seconds)


def domain_xml(name: str, uid: str, domain_type: str, rom: Path) -> str:
    """A transient diskless domain whose firmware is the probe ROM and whose COM1 is a pty."""
    dom = ET.Element("domain", {"type": domain_type})
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uid
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(MEMORY_MIB)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": "pc"}).text = "hvm"
    ET.SubElement(os_el, "loader", {"type": "rom", "readonly": "yes"}).text = str(rom)
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "destroy"  # a triple fault resets: no loop
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    serial = ET.SubElement(devices, "serial", {"type": "pty"})
    ET.SubElement(serial, "target", {"port": "0"})
    ET.SubElement(devices, "controller", {"type": "usb", "model": "none"})
    ET.SubElement(devices, "memballoon", {"model": "none"})
    return ET.tostring(dom, encoding="unicode")


# ------------------------------------------------------------------ the probe (libvirt)
def kvm_unavailable(conn) -> str | None:
    """Why libvirt cannot run a ``kvm`` domain here at all (None: it says it can)."""
    import libvirt

    try:
        caps = ET.fromstring(conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0))
    except libvirt.libvirtError as error:
        return f"libvirt offers no kvm domain: {_first_line(error)}"
    except ET.ParseError as error:
        return f"libvirt's domain capabilities are unreadable: {error}"
    if caps.findtext("domain") != "kvm":
        return "libvirt offers no kvm domain"
    return None


def boot(conn, pool: Path, domain_type: str, timeout: float) -> Boot:
    """Boot the probe guest under ``domain_type`` and read its console for up to ``timeout`` s.

    The domain starts paused, the console stream is opened, then the guest runs: nothing it
    prints is lost. The domain is destroyed and the ROM file removed on every way out.
    """
    import libvirt

    uid = str(uuidlib.uuid4())
    name = NAME_PREFIX + uid[:8]
    rom = pool / f".{name}.rom"
    tmp = pool / f".{name}.rom.tmp"
    dom = stream = None
    t0 = time.monotonic()
    try:
        tmp.write_bytes(probe_rom())
        os.chmod(tmp, 0o644)  # QEMU may run as another user than the agent
        tmp.replace(rom)
        dom = conn.createXML(domain_xml(name, uid, domain_type, rom), libvirt.VIR_DOMAIN_START_PAUSED)
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        dom.resume()
        deadline = time.monotonic() + timeout
        output = _read(stream, dom, deadline)
        state = "" if MARKER_DONE in output else _state(dom)
        return verdict(domain_type, output, time.monotonic() - t0, timeout, state, time.monotonic() >= deadline)
    except (libvirt.libvirtError, OSError) as error:
        return Boot(domain_type, False, f"a guest under {domain_type} could not run: {_first_line(error)}",
                    time.monotonic() - t0)
    finally:
        if stream is not None:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError as error:  # gone already (a reset ends it: on_reboot=destroy)
                log.debug("probe domain %s: destroy: %s", name, error)
        rom.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def _read(stream, dom, deadline: float) -> bytes:
    """The console's bytes until the last marker, the guest stops running, or the deadline
    (non-blocking reads: no libvirt event loop needed)."""
    import libvirt

    output = b""
    while MARKER_DONE not in output and MARKER_WRONG not in output and time.monotonic() < deadline:
        try:
            data = stream.recv(4096)
        except libvirt.libvirtError:  # the domain ended
            break
        if data == -2:  # nothing yet
            if not _running(dom):  # e.g. paused by a KVM internal error, or gone after a reset
                output += _drain(stream)
                break
            time.sleep(0.02)
            continue
        if not data:  # end of stream
            break
        output += data
    return output


def _running(dom) -> bool:
    import libvirt

    try:
        return dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    except libvirt.libvirtError:  # transient and gone
        return False


def _drain(stream) -> bytes:
    """What the console still holds (the guest printed it before it stopped)."""
    import libvirt

    output = b""
    for _ in range(10):
        try:
            data = stream.recv(4096)
        except libvirt.libvirtError:
            break
        if data == -2:
            time.sleep(0.02)
            continue
        if not data:
            break
        output += data
    return output


def _state(dom) -> str:
    """The domain's libvirt state and reason, for the detail (e.g. "paused, reason unknown")."""
    import libvirt

    try:
        state, reason = dom.state()
    except libvirt.libvirtError as error:
        return f"gone ({_first_line(error)})"
    family = {libvirt.VIR_DOMAIN_RUNNING: "RUNNING", libvirt.VIR_DOMAIN_BLOCKED: "BLOCKED",
              libvirt.VIR_DOMAIN_PAUSED: "PAUSED", libvirt.VIR_DOMAIN_SHUTDOWN: "SHUTDOWN",
              libvirt.VIR_DOMAIN_SHUTOFF: "SHUTOFF", libvirt.VIR_DOMAIN_CRASHED: "CRASHED"}.get(state)
    if family is None:
        return f"in state {state}"
    prefix = f"VIR_DOMAIN_{family}_"
    reasons = [n[len(prefix):].lower() for n in dir(libvirt)
               if n.startswith(prefix) and not n.endswith("_LAST") and getattr(libvirt, n) == reason]
    return f"{family.lower()}, reason {reasons[0] if reasons else reason}"


def probe(uri: str, pool: Path, timeout: float = DEFAULT_TIMEOUT) -> Answer:
    """Does KVM boot guests on the node behind ``uri``? (See the module's docstring.)"""
    import libvirt

    t0 = time.monotonic()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as error:
        return Answer(False, False, f"cannot connect to libvirt at {uri}: {_first_line(error)}")
    try:
        why = kvm_unavailable(conn)
        if why is not None:
            return Answer(False, True, why, time.monotonic() - t0)
        kvm = boot(conn, pool, "kvm", timeout)
        return decide(kvm, None if kvm.booted else boot(conn, pool, "qemu", timeout))
    finally:
        conn.close()


def boot_once(uri: str, pool: Path, domain_type: str, timeout: float = DEFAULT_TIMEOUT) -> Boot:
    """One boot of the probe guest under ``domain_type`` (qemu: the probe checked under TCG)."""
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as error:
        return Boot(domain_type, False, f"cannot connect to libvirt at {uri}: {_first_line(error)}")
    try:
        return boot(conn, pool, domain_type, timeout)
    finally:
        conn.close()


def record(answer: Answer, path: Path) -> Path:
    """Write the answer where `novalet.virt.kvm.domain_type` reads it (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(answer.record()) + "\n")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ the command
def run(args) -> int:
    """`novalet probe-domain-type`: print the domain type and why, record the answer.

    Exit status 0 with an answer (kvm or qemu), 1 when the probe could not boot a guest even
    under TCG (libvirt unreachable, the pool not shared with libvirtd's QEMU): then "qemu" is
    recorded all the same, and the chart's initContainer fails, to be retried by the kubelet.
    With ``--domain-type qemu`` only the probe itself is checked, under TCG, and nothing recorded.
    """
    import libvirt

    from .kvm import kvm_probe_file

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors reach us as exceptions
    uri = args.connect or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
    if args.domain_type == "qemu":
        result = boot_once(uri, args.pool, "qemu", args.timeout)
        print(f"the probe guest under qemu (TCG): {'boots' if result.booted else 'does not boot'}")
        print(f"reason: {result.detail}")
        return 0 if result.booted else 1
    answer = probe(uri, args.pool, args.timeout)
    print(f"domain type: {answer.domain_type}")
    print(f"reason: {answer.detail}")
    path = args.record or kvm_probe_file()
    try:
        record(answer, path)
    except OSError as error:
        print(f"error: cannot record the answer in {path}: {error}")
        return 1
    print(f"recorded in {path}")
    return 0 if answer.conclusive else 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
