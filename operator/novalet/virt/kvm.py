"""Which libvirt domain type the agent uses (`novalet run --domain-type auto`).

/dev/kvm alone proves nothing: on some machines it is a software nested mode where a real guest
never finishes booting. So "kvm" only when NOVALET_DOMAIN_TYPE says so or a boot probe recorded
that a guest booted under KVM; otherwise "qemu" (TCG). The probe is `novalet probe-domain-type`
(novalet.virt.probe: a guest booted through the node's libvirt; the chart runs it in the agent
pod's initContainer, before the agent, into a directory both containers share as NOVALET_CACHE);
the development stack has one of its own that records into the same file (`python -m
novalet_dev.guest --probe-kvm URI --record`, its tiny Linux guest booted under KVM). The agent only
reads the recorded file, once, at start; it never runs the probe.
"""
import json
import os
from pathlib import Path


def cache_root() -> Path:
    """The user cache for novalet (same rule as hack/build-controlplane.sh)."""
    if os.environ.get("NOVALET_CACHE"):
        return Path(os.environ["NOVALET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "novalet"


def kvm_probe_file() -> Path:
    """Where a KVM boot probe records its result (JSON: {"kvm_boots": bool, ...})."""
    return cache_root() / "kvm-probe.json"


def domain_type() -> str:
    """The libvirt domain type to use: "kvm" only when proven, else "qemu" (TCG).
    NOVALET_DOMAIN_TYPE=kvm|qemu forces one."""
    forced = os.environ.get("NOVALET_DOMAIN_TYPE", "").strip().lower()
    if forced in ("kvm", "qemu"):
        return forced
    try:
        result = json.loads(kvm_probe_file().read_text())
    except (OSError, ValueError):
        return "qemu"
    return "kvm" if isinstance(result, dict) and result.get("kvm_boots") is True else "qemu"
