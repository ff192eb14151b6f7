"""The domain-type probe's pure parts (novalet.virt.probe): the firmware ROM the probe guest
boots, the verdict from what it printed, the answer the agent reads. The probe against a real
libvirtd: tests/e2e/test_domain_type_probe.py."""
import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from novalet.cli import build_parser
from novalet.virt import kvm
from novalet.virt.probe import (
    MARKER_DONE,
    MARKER_LONG,
    MARKER_REAL,
    MARKER_WRONG,
    RESET_VECTOR,
    ROM_BASE_LOW,
    STAGES,
    STOPPED,
    Answer,
    Boot,
    _print,
    decide,
    domain_xml,
    kvm_unavailable,
    probe_rom,
    record,
    verdict,
)


# --- the ROM ---------------------------------------------------------------------------------

def test_the_rom_is_one_64k_bios_image():
    rom = probe_rom()
    assert len(rom) == 64 * 1024 and len(rom) % (64 * 1024) == 0  # what QEMU's -bios takes
    assert rom == probe_rom()  # the same bytes every time


def test_the_reset_vector_jumps_to_the_code_below_1mib():
    """The CPU starts at the ROM's offset 0xFFF0 in real mode: a far jump to F000:0000, the
    ROM's first byte in the copy QEMU maps at 0xF0000, where the code begins with `cli`."""
    rom = probe_rom()
    opcode, offset, segment = struct.unpack_from("<BHH", rom, RESET_VECTOR)
    assert (opcode, offset, segment) == (0xEA, 0x0000, 0xF000)
    assert segment * 16 + offset == ROM_BASE_LOW == 0xF0000
    assert rom[0] == 0xFA  # cli


def test_the_rom_prints_each_marker_on_com1_in_order():
    """Each marker is a run of `mov al, c; out dx, al`, after `mov dx/edx, 0x3f8` (COM1)."""
    rom = probe_rom()
    at = [rom.index(_print(marker)) for marker in (MARKER_REAL, MARKER_LONG, MARKER_DONE)]
    assert at == sorted(at)
    assert rom[at[0] - 3:at[0]] == b"\xba\xf8\x03"  # 16-bit: mov dx, 0x3f8
    assert rom[at[1] - 5:at[1]] == b"\xba\xf8\x03\x00\x00"  # 64-bit code: mov edx, 0x3f8
    assert _print(MARKER_WRONG) in rom
    assert [marker for marker, _ in STAGES] == [MARKER_REAL, MARKER_LONG, MARKER_DONE]
    assert all(marker.endswith(b"\n") for marker in (MARKER_REAL, MARKER_LONG, MARKER_DONE, MARKER_WRONG))


def test_the_rom_does_the_16_byte_compare_exchange_with_lock():
    """The step that stopped a Linux guest under the nested KVM of DESIGN.md section 4."""
    rom = probe_rom()
    assert b"\xf0\x48\x0f\xc7\x0c\x25" in rom  # lock cmpxchg16b [disp32]
    assert rom.index(b"\xf0\x48\x0f\xc7") > rom.index(_print(MARKER_LONG))


def test_the_gdt_descriptors_are_marked_accessed():
    """The CPU writes the accessed bit into a descriptor it loads unless it is set: never into the ROM."""
    rom = probe_rom()
    gdt = rom.index(struct.pack("<Q", 0x00CF9B000000FFFF)) - 8  # after the null descriptor
    descriptors = struct.unpack_from("<4Q", rom, gdt)
    assert descriptors[0] == 0 and descriptors[3] == 0x00AF9B000000FFFF  # the 64-bit code segment
    assert all((d >> 40) & 1 for d in descriptors[1:])


# --- the verdict and the answer --------------------------------------------------------------

def test_a_guest_that_printed_the_last_marker_boots():
    boot = verdict("kvm", MARKER_REAL + MARKER_LONG + MARKER_DONE, 0.4, 5)
    assert boot.booted and boot.detail == f"a guest under kvm {STAGES[-1][1]} in 0.4s"


@pytest.mark.parametrize("console, stopped", [(b"", 0), (MARKER_REAL, 1), (MARKER_REAL + b"garbage", 1),
                                              (MARKER_REAL + MARKER_LONG, 2)])
def test_a_guest_that_stopped_short_does_not_boot_and_says_where(console, stopped):
    boot = verdict("kvm", console, 5.1, 5)
    assert not boot.booted
    assert boot.detail == f"a guest under kvm {STOPPED[stopped]} within 5s"


def test_the_detail_says_whether_the_guest_ran_out_of_time_or_stopped():
    assert verdict("kvm", MARKER_REAL + MARKER_LONG, 0.3, 5, "paused, reason unknown", timed_out=False).detail == (
        f"a guest under kvm {STOPPED[2]} (it stopped after 0.3s: the domain was paused, reason unknown)")
    assert verdict("kvm", b"", 5.0, 5, "running, reason unpaused").detail == (
        f"a guest under kvm {STOPPED[0]} within 5s: the domain was running, reason unpaused")


def test_a_wrong_compare_exchange_result_is_no_boot():
    boot = verdict("kvm", MARKER_REAL + MARKER_LONG + MARKER_WRONG, 0.2, 5, timed_out=False)
    assert not boot.booted and "wrong result" in boot.detail


def test_kvm_is_chosen_only_when_the_guest_boots_under_it():
    yes = decide(Boot("kvm", True, "booted", 0.5), None)
    assert (yes.kvm_boots, yes.conclusive, yes.domain_type) == (True, True, "kvm")


def test_a_guest_that_boots_only_under_tcg_means_qemu_conclusively():
    answer = decide(Boot("kvm", False, "stopped", 0.3), Boot("qemu", True, "booted", 0.4))
    assert (answer.kvm_boots, answer.conclusive, answer.domain_type) == (False, True, "qemu")
    assert answer.detail == "stopped; the same guest boots under qemu (TCG)"
    assert answer.seconds == pytest.approx(0.7)


def test_a_probe_that_boots_nothing_is_inconclusive():
    """Not even TCG: the probe is broken (pool not shared, libvirt refusing), not KVM."""
    answer = decide(Boot("kvm", False, "could not run: x"), Boot("qemu", False, "could not run: y"))
    assert (answer.kvm_boots, answer.conclusive, answer.domain_type) == (False, False, "qemu")
    assert "could not run: x" in answer.detail and "could not run: y" in answer.detail


@pytest.mark.parametrize("answer, chosen", [(Answer(True, True, "booted"), "kvm"),
                                            (Answer(False, True, "stopped"), "qemu"),
                                            (Answer(False, False, "broken"), "qemu")])
def test_the_agent_reads_the_recorded_answer(tmp_path, monkeypatch, answer, chosen):
    """`novalet run --domain-type auto` reads what the probe recorded (NOVALET_CACHE, as in the chart)."""
    monkeypatch.setenv("NOVALET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NOVALET_DOMAIN_TYPE", raising=False)
    assert kvm.domain_type() == "qemu"  # nothing recorded: TCG
    path = record(answer, kvm.kvm_probe_file())
    assert path == tmp_path / "cache" / "kvm-probe.json"
    data = json.loads(path.read_text())
    assert data["kvm_boots"] is answer.kvm_boots and data["detail"] == answer.detail
    assert data["conclusive"] is answer.conclusive
    assert kvm.domain_type() == chosen
    assert [p.name for p in path.parent.iterdir()] == ["kvm-probe.json"]  # no temporary file left
    monkeypatch.setenv("NOVALET_DOMAIN_TYPE", "qemu" if chosen == "kvm" else "kvm")
    assert kvm.domain_type() != chosen  # forcing wins over the probe


# --- the domain and the command --------------------------------------------------------------

def test_the_probe_domain_boots_the_rom_with_a_pty_console():
    root = ET.fromstring(domain_xml("novalet-probe-1234abcd", "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d", "kvm",
                                    Path("/pool/.novalet-probe-1234abcd.rom")))
    assert root.get("type") == "kvm" and root.findtext("name") == "novalet-probe-1234abcd"
    loader = root.find("os/loader")
    assert loader.get("type") == "rom" and loader.text == "/pool/.novalet-probe-1234abcd.rom"
    assert root.find("os/type").text == "hvm" and root.find("os/type").get("arch") == "x86_64"
    assert root.find("devices/serial").get("type") == "pty"
    assert root.find("devices/disk") is None and root.find("devices/interface") is None
    assert root.findtext("on_reboot") == "destroy"  # a triple fault ends it, no reset loop


def test_a_libvirt_without_kvm_domains_is_answered_without_a_domain():
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    try:
        before = conn.listAllDomains()
        assert kvm_unavailable(conn).startswith("libvirt offers no kvm domain")
        assert len(conn.listAllDomains()) == len(before)
    finally:
        conn.close()


def test_the_command_line():
    args = build_parser().parse_args(["probe-domain-type", "--connect", "qemu:///system", "--pool", "/p",
                                      "--record", "/r/kvm-probe.json", "--timeout", "2.5"])
    assert (args.connect, args.pool, args.record, args.timeout, args.domain_type) == (
        "qemu:///system", Path("/p"), Path("/r/kvm-probe.json"), 2.5, "kvm")
    defaults = build_parser().parse_args(["probe-domain-type"])
    assert (defaults.connect, defaults.pool, defaults.record, defaults.timeout) == (
        None, Path("/var/lib/novalet/images"), None, 5.0)
    assert build_parser().parse_args(["probe-domain-type", "--domain-type", "qemu"]).domain_type == "qemu"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["probe-domain-type", "--timeout", "0"])
