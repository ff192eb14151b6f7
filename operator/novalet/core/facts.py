"""What libvirt says about an instance's domain, in the core's vocabulary: the one type every
decision reads (recovery, drift, waits). The libvirt adapter (virt/hypervisor.py) reads more
(flavor, metadata, the state reason); agent/operations.py converts that into this, once."""
from dataclasses import dataclass

from .vocabulary import PowerState


@dataclass(frozen=True)
class Facts:
    exists: bool = True
    power_state: PowerState | None = PowerState.RUNNING
    config: str | None = "normal"   # "normal" | "rescue" | None (not defined)
    issued: str | None = None       # journal: "<task id>:<op>" of the last operation issued
    has_managed_save: bool = False  # shut off with a saved memory image (suspended)
    domain_id: int | None = None    # libvirt's runtime id, new at every start
    migrating: bool = False         # a migration job runs on it (read only by core/migration.py)


MISSING = Facts(exists=False, power_state=None, config=None)
