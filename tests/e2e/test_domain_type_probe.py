"""`novalet probe-domain-type` against the stack's real private libvirtd: it answers kvm or qemu
with a reason, records the answer where `novalet run --domain-type auto` reads it, and leaves no
domain and no firmware file behind; under TCG its guest really prints every marker, so a "no" for
KVM is KVM's answer, not a broken probe. (The probe's pure parts: tests/unit/test_domain_type_probe.py.)
"""
import json
import os
import subprocess
import sys

import libvirt
import pytest

from novalet.virt import kvm
from novalet.virt.probe import NAME_PREFIX, STAGES

pytestmark = pytest.mark.stack


def probe_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "novalet.cli", "probe-domain-type", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120, env={**os.environ, **(env or {})},
                          check=False)


def probe_domains(uri: str) -> list[str]:
    """Domains of the probe's, running or defined (a transient domain is gone once destroyed)."""
    conn = libvirt.open(uri)
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith(NAME_PREFIX)]
    finally:
        conn.close()


def test_the_probe_answers_records_and_leaves_nothing(libvirt_uri, image_pool, tmp_path):
    pool_before = sorted(p.name for p in image_pool.iterdir())
    cache = tmp_path / "cache"
    r = probe_command("--connect", libvirt_uri, "--pool", str(image_pool), "--timeout", "5",
                      env={"NOVALET_CACHE": str(cache)})
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr  # a conclusive answer: the probe guest booted somewhere
    lines = r.stdout.splitlines()
    assert lines[0] in ("domain type: kvm", "domain type: qemu"), r.stdout
    chosen = lines[0].removeprefix("domain type: ")
    if chosen == "kvm":
        assert lines[1].startswith(f"reason: a guest under kvm {STAGES[-1][1]} in ")
    else:  # libvirt offers no kvm here, or the guest did not boot under it but did under TCG
        assert lines[1].startswith("reason: libvirt offers no kvm domain") or (
            lines[1].startswith("reason: a guest under kvm ")
            and lines[1].endswith("; the same guest boots under qemu (TCG)")), lines[1]
    recorded = cache / "kvm-probe.json"
    assert lines[2] == f"recorded in {recorded}"
    data = json.loads(recorded.read_text())
    assert data["kvm_boots"] is (chosen == "kvm") and data["conclusive"] is True
    assert data["detail"] == lines[1].removeprefix("reason: ")

    # what the agent does with it (`novalet run --domain-type auto`, NOVALET_CACHE as in the chart)
    saved = {k: os.environ.get(k) for k in ("NOVALET_CACHE", "NOVALET_DOMAIN_TYPE")}
    try:
        os.environ["NOVALET_CACHE"] = str(cache)
        os.environ.pop("NOVALET_DOMAIN_TYPE", None)
        assert kvm.domain_type() == chosen
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    assert probe_domains(libvirt_uri) == []
    assert sorted(p.name for p in image_pool.iterdir()) == pool_before  # the ROM file is gone


def test_the_probe_guest_boots_under_tcg(libvirt_uri, image_pool, tmp_path):
    """The probe itself (`--domain-type qemu`): every marker arrives on the console stream."""
    pool_before = sorted(p.name for p in image_pool.iterdir())
    record = tmp_path / "kvm-probe.json"
    r = probe_command("--connect", libvirt_uri, "--pool", str(image_pool), "--domain-type", "qemu",
                      "--record", str(record))
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    first, reason = r.stdout.splitlines()
    assert first == "the probe guest under qemu (TCG): boots"
    assert reason.startswith(f"reason: a guest under qemu {STAGES[-1][1]} in ")
    assert not record.exists()  # a check of the probe, not an answer for the agent
    assert probe_domains(libvirt_uri) == []
    assert sorted(p.name for p in image_pool.iterdir()) == pool_before


def test_a_probe_that_cannot_boot_anything_fails_and_records_qemu(libvirt_uri, tmp_path):
    """A pool libvirtd's QEMU cannot read (here: none at all): no guest under KVM nor TCG, so the
    answer is inconclusive: exit status 1 (the chart's initContainer is retried), qemu recorded."""
    record = tmp_path / "kvm-probe.json"
    r = probe_command("--connect", libvirt_uri, "--pool", str(tmp_path / "missing"), "--record", str(record))
    assert r.returncode == 1, r.stdout + r.stderr
    first, reason, _ = r.stdout.splitlines()
    assert first == "domain type: qemu"
    assert reason.startswith("reason: the probe could not boot a guest at all: ")
    data = json.loads(record.read_text())
    assert (data["kvm_boots"], data["conclusive"]) == (False, False)
    assert probe_domains(libvirt_uri) == []
    assert not (tmp_path / "missing").exists()


def test_the_probe_runs_from_the_image_as_the_chart_runs_it(novalet_image, libvirtd, libvirt_uri, image_pool,
                                                            tmp_path):
    """The image's `novalet probe-domain-type`, in a container set up as the chart's initContainer
    is: root without privilege (the chart's capabilities), a read-only root file system, no
    network, only libvirtd's socket and the image pool mounted at their own paths, the answer
    written to a directory of its own given as NOVALET_CACHE (the emptyDir the agent reads)."""
    from .test_image import PODMAN, limits

    pool_before = sorted(p.name for p in image_pool.iterdir())
    cache = tmp_path / "cache"
    cache.mkdir()
    socket = str(libvirtd.socket_path)
    r = subprocess.run([*PODMAN, "run", "--rm", "--network", "none", "--read-only", *limits(),
                        "--user", "0", "--cap-drop", "ALL", "--cap-add", "CHOWN,DAC_OVERRIDE,FOWNER",
                        "--security-opt", "no-new-privileges",
                        "-v", f"{socket}:{socket}", "-v", f"{image_pool}:{image_pool}", "-v", f"{cache}:/var/cache/novalet",
                        "-e", "NOVALET_CACHE=/var/cache/novalet", novalet_image,
                        "probe-domain-type", f"--connect={libvirt_uri}", f"--pool={image_pool}", "--timeout=5"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180, check=False)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    first, reason, where = r.stdout.splitlines()
    chosen = first.removeprefix("domain type: ")
    assert chosen in ("kvm", "qemu") and reason.startswith("reason: ")
    assert where == "recorded in /var/cache/novalet/kvm-probe.json"
    data = json.loads((cache / "kvm-probe.json").read_text())
    assert (data["kvm_boots"], data["conclusive"]) == (chosen == "kvm", True)
    assert probe_domains(libvirt_uri) == []
    assert sorted(p.name for p in image_pool.iterdir()) == pool_before
