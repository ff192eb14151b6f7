"""The VirtualInstance API: the single source of truth for the CRD schema (crds/)."""
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.vocabulary import PowerState, TaskState, VmState

# A DNS-1123 label: safe in a file name, a libvirt XML attribute and an image pool path.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
ImageName = Annotated[str, Field(pattern=r"^$|^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$", max_length=63)]
ActionId = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")]


def cel(*rules: tuple[str, str]) -> dict:
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StatusModel(BaseModel):
    """Status is written by agents of possibly different versions during a rolling upgrade:
    fields this version does not know are kept (read and written back), never dropped."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Flavor(Model):
    vcpus: int = Field(ge=1, le=64, description="Virtual CPUs.")
    memoryMiB: int = Field(ge=96, le=1048576, description="Guest memory in MiB.")


class SecretKeyRef(Model):
    name: str = Field(pattern=NAME_PATTERN, description="A Secret in the instance's namespace.")
    key: str = Field(default="password", max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class ActionRequest(Model):
    """A one-shot request. A new id is a new request; an id already recorded is done."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=cel(
        ("self.name != 'Reboot' || has(self.type)", "Reboot needs type: Soft or Hard"),
        ("self.name == 'Reboot' || !has(self.type)", "type applies to Reboot only"),
        ("self.name != 'Snapshot' || has(self.snapshotName)", "Snapshot needs snapshotName"),
        ("self.name != 'SetPassword' || has(self.secretRef)", "SetPassword needs secretRef"),
        ("self.name != 'ResetState' || has(self.state)", "ResetState needs state: active or error"),
        ("self.name == 'Lock' || !has(self.reason)", "reason applies to Lock only"),
        ("self.name == 'Migrate' || self.name == 'Evacuate' || !has(self.targetNode)",
         "targetNode applies to Migrate and Evacuate only"),
        ("self.name == 'Migrate' || !has(self.live)", "live applies to Migrate only"),
    ))
    name: Literal["Reboot", "Rebuild", "Snapshot", "SetPassword", "ConfirmResize", "RevertResize",
                  "ResetState", "Lock", "Unlock", "Migrate", "Evacuate"]
    id: ActionId = Field(description="Unique per request; commit a new id to ask again.")
    type: Literal["Soft", "Hard"] | None = Field(default=None, description="Reboot type.")
    snapshotName: str | None = Field(default=None, pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$",
                                     description="The VirtualImage of the instance's namespace the snapshot lands "
                                                 "as (a DNS name; refused when taken).")
    secretRef: SecretKeyRef | None = Field(default=None, description="Where the new password is.")
    user: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
                             description="Guest user for SetPassword (default root).")
    state: Literal["active", "error"] | None = Field(default=None, description="ResetState target.")
    reason: str | None = Field(default=None, max_length=255, description="Why the instance is locked (Lock).")
    targetNode: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=63,
                                   description="Migrate, Evacuate: the node to move to (the scheduler's filters "
                                               "still apply); empty: the scheduler picks one.")
    live: bool | None = Field(default=None, description="Migrate: true moves the running guest without a restart "
                                                        "(active or paused); false (the default) stops it, moves "
                                                        "the disk and boots it there (active or stopped).")
    requestedBy: str | None = Field(
        default=None, max_length=512,
        description="The requester's username, set by the apiserver's admission policy "
                    "(novalet-requester); a value other than the requester's own is refused.")
    requesterGroups: list[Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=256,
        description="The requester's groups as the apiserver authenticated them, set with requestedBy "
                    "(the agent's SubjectAccessReviews ask for this identity); others are refused.")


IFACE_PATTERN = r"^[a-z]([a-z0-9-]{0,13}[a-z0-9])?$"
# OpenSSH public key lines: a known type, the base64 key, an optional comment on the same line
SSH_KEY_PATTERN = (r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)"
                   r"|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\r\n]*)?$")
USER_DATA_MAX_CHARS = 32768
MAX_INTERFACES = 8
MAX_SSH_KEYS = 32


class Interface(Model):
    name: str = Field(pattern=IFACE_PATTERN, max_length=15,
                      description="The interface's name in status (a DNS label of at most 15 characters).")
    network: str = Field(pattern=NAME_PATTERN, max_length=63,
                         description="A network the node's agent provides (`novalet run --network`), e.g. default.")


class SecretNameRef(Model):
    name: str = Field(pattern=NAME_PATTERN, max_length=253, description="A Secret in the instance's namespace.")


class VirtualInstanceSpec(Model):
    model_config = ConfigDict(extra="forbid", json_schema_extra=cel(
        ("!has(self.userData) || !has(self.userDataSecretRef)", "give userData or userDataSecretRef, not both"),
    ))
    flavor: Flavor
    image: ImageName = Field(default="", description="A VirtualImage of this namespace, else a ClusterVirtualImage, "
                                                     "else an image preloaded in the node's pool; empty = diskless.")
    powerState: Literal["Running", "Stopped", "Paused", "Suspended"] = "Running"
    rescue: bool = Field(default=False, description="Boot the rescue configuration.")
    nodeName: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=63,
                                 description="Pin to a hypervisor node (skips the scheduler's filters); empty = "
                                             "the scheduler places it.")
    nodeSelector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=16,
        description="Labels a node's Hypervisor must have for the scheduler to place the instance there.")
    action: ActionRequest | None = None
    interfaces: list[Interface] | None = Field(
        default=None, max_length=MAX_INTERFACES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Network interfaces, fixed at creation. Omitted: one interface `default` on the network "
                    "`default`; empty: none.")
    userData: str | None = Field(
        default=None, max_length=USER_DATA_MAX_CHARS,
        description="cloud-init user data, delivered on a NoCloud `cidata` disk; a change takes effect at the "
                    "next rebuild.")
    userDataSecretRef: SecretNameRef | None = Field(
        default=None, description="A Secret holding the user data under the key `userdata` (or `userData`); "
                                  "its requester must be allowed to read it.")
    sshAuthorizedKeys: list[Annotated[str, Field(max_length=8192, pattern=SSH_KEY_PATTERN)]] | None = Field(
        default=None, max_length=MAX_SSH_KEYS,
        description="OpenSSH public keys, delivered in the cidata disk's meta-data (public-keys).")


class MigrationRecord(StatusModel):
    """A Migrate task's two sides (core/migration.py), recorded from its first write."""

    sourceNode: str
    targetNode: str | None = Field(default=None, description="Chosen by the scheduler (or checked, when asked for).")
    live: bool = False
    targetURI: str | None = Field(default=None, description="The target's libvirt URI for the source's libvirtd "
                                                            "(peer-to-peer), written when the target is ready.")
    dataURI: str | None = Field(default=None, description="Where the target's QEMU takes the memory stream.")
    disksURI: str | None = Field(default=None, description="Where the target takes the disks (NBD).")
    note: str = Field(default="", description="What went wrong on the way (a rollback's reason).")
    revertFailed: bool = Field(default=False, description="The origin state could not be restored on the source: "
                                                          "the instance ends in error.")


class CurrentTask(StatusModel):
    """Everything needed to finish or undo a task after a crash."""

    name: str
    id: str
    taskState: TaskState
    originVmState: VmState
    originPowerState: PowerState | None = None
    originFlavor: Flavor | None = None
    originImage: str | None = None
    targetFlavor: Flavor | None = None
    targetImage: str | None = None
    domainId: int | None = Field(default=None, description="libvirt domain id when the step began.")
    escalated: bool = False
    deadline: datetime | None = Field(
        default=None, description="When the guest's wait ends (a soft reboot escalates to hard, an ACPI stop "
                                  "becomes a forced one); kept across agent restarts.")
    requestedBy: str | None = None
    migration: MigrationRecord | None = None
    owner: str
    startedAt: datetime
    attempt: int = 1


class ActionRecord(StatusModel):
    name: str
    id: str
    result: Literal["Succeeded", "Failed", "Rejected"]
    message: str = ""
    requestedBy: str | None = Field(default=None, description="Who asked, as the apiserver authenticated them.")
    startedAt: datetime | None = None
    finishedAt: datetime | None = None


class Condition(StatusModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: datetime | None = None
    observedGeneration: int | None = None


class HandledAction(StatusModel):
    """The last spec.action request an agent took (or refused). Never evicted: an id equal to
    it is never run again, however long it stays in the spec."""

    id: str
    name: str
    handledAt: datetime


class InstanceLock(StatusModel):
    """Nova's lock: only the locker and administrators may act on a locked instance."""

    lockedBy: str
    reason: str = ""
    lockedAt: datetime


class Backoff(StatusModel):
    """A declarative step that keeps failing is retried with exponential backoff."""

    request: str = Field(description="The failing step's request id (spec-g<generation>-<action>).")
    failures: int = Field(ge=1)
    lastError: str = ""
    nextRetryAt: datetime


class ResizeOrigin(StatusModel):
    flavor: Flavor
    vmState: VmState
    powerState: PowerState | None = None


class InterfaceStatus(StatusModel):
    name: str
    mac: str = Field(description="Stable: derived from the instance uid and the interface's index.")
    ipAddresses: list[str] = Field(default_factory=list, max_length=16,
                                   description="From the network's DHCP leases (and the guest agent).")


class VirtualInstanceStatus(StatusModel):
    vmState: VmState | None = None
    taskState: TaskState | None = None
    powerState: PowerState | None = None
    phase: str | None = None
    node: str | None = None
    evacuatedFrom: str | None = Field(default=None, description="The node the instance was last evacuated from: "
                                                                "its agent destroys the stale domain and disks "
                                                                "when it comes back, never starts them.")
    domainUUID: str | None = None
    observedGeneration: int | None = None
    flavor: Flavor | None = Field(default=None, description="The flavor the domain runs with.")
    image: str | None = Field(default=None, description="The image the disk was built from.")
    revertedFlavor: Flavor | None = Field(default=None, description="A reverted resize's flavor: "
                                          "not applied again until spec.flavor changes.")
    resizedFrom: ResizeOrigin | None = Field(default=None, description="Origin of an unconfirmed resize.")
    currentTask: CurrentTask | None = None
    handledAction: HandledAction | None = None
    lock: InstanceLock | None = None
    backoff: Backoff | None = None
    lastAction: ActionRecord | None = None
    history: list[ActionRecord] = Field(default_factory=list, max_length=50)
    conditions: list[Condition] = Field(default_factory=list, max_length=16)
    interfaces: list[InterfaceStatus] | None = Field(default=None, max_length=MAX_INTERFACES)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resourceVersion: str | None = None
    generation: int | None = None
    deletionTimestamp: str | None = None
    finalizers: list[str] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict)


class VirtualInstance(BaseModel):
    model_config = ConfigDict(extra="ignore")
    apiVersion: str = "novalet.io/v1alpha1"
    kind: str = "VirtualInstance"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: VirtualInstanceSpec
    status: VirtualInstanceStatus = Field(default_factory=VirtualInstanceStatus)


# ---------------------------------------------------------------------------- the image catalog
SHA256_PATTERN = r"^[0-9a-f]{64}$"
URL_PATTERN = r"^https?://[^\s]+$"


class HttpFile(Model):
    url: str = Field(max_length=2048, pattern=URL_PATTERN,
                     description="An http:// or https:// URL each node's agent downloads from.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="The file's SHA-256 (64 lowercase hex digits); "
                                                            "a download that differs is refused.")


class SnapshotSource(Model):
    """Written by the agent that snapshotted an instance; the image lives on that node."""

    instanceName: str = Field(pattern=NAME_PATTERN, max_length=253)
    instanceUID: str = Field(max_length=36, pattern=r"^[0-9a-f-]{36}$")
    actionId: ActionId
    node: str = Field(pattern=NAME_PATTERN, max_length=63)


class ImageSource(Model):
    model_config = ConfigDict(extra="forbid", json_schema_extra=cel(
        ("has(self.http) != has(self.snapshot)", "give exactly one of http or snapshot"),
    ))
    http: HttpFile | None = Field(default=None, description="The disk (qcow2 or raw), fetched by each node.")
    snapshot: SnapshotSource | None = Field(
        default=None, description="A snapshot of an instance in this namespace (set by novalet's Snapshot action).")


class KernelBoot(Model):
    """Direct kernel boot, like Nova's kernel_id / ramdisk_id image properties."""

    kernel: HttpFile
    initrd: HttpFile | None = None
    cmdline: str = Field(default="", max_length=1024, pattern=r"^[ -~]*$",
                         description="The kernel command line (printable ASCII).")


IMMUTABLE_IMAGE = "an image's spec is immutable (its bytes back instance disks): create an image with a new name"


class VirtualImageSpec(Model):
    model_config = ConfigDict(extra="forbid", json_schema_extra=cel(
        ("self == oldSelf", IMMUTABLE_IMAGE),
    ))
    source: ImageSource
    kernelBoot: KernelBoot | None = Field(default=None, description="Boot this kernel (and initrd) directly.")


class ClusterVirtualImageSpec(VirtualImageSpec):
    model_config = ConfigDict(extra="forbid", json_schema_extra=cel(
        ("self == oldSelf", IMMUTABLE_IMAGE),
        ("has(self.source.http)", "a ClusterVirtualImage is fetched over http (snapshots are namespaced)"),
    ))


class NodeImageStatus(StatusModel):
    """One node's copy of the image."""

    node: str
    phase: Literal["Pending", "Downloading", "Ready", "Failed"]
    bytesDone: int | None = Field(default=None, description="Downloaded so far (Downloading).")
    bytesTotal: int | None = Field(default=None, description="Size announced by the server, when it did.")
    progress: str | None = Field(default=None, description="bytesDone of bytesTotal as a percentage.")
    format: str | None = None
    sizeBytes: int | None = Field(default=None, description="The disk file's size on the node.")
    virtualSizeBytes: int | None = Field(default=None, description="The disk size the guest sees.")
    message: str = ""
    lastUpdateTime: datetime | None = None


class VirtualImageStatus(StatusModel):
    nodes: list[NodeImageStatus] = Field(
        default_factory=list, max_length=1000,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["node"]},
        description="Each node's copy: fetched on first use there.")


# ---------------------------------------------------------------------------- hypervisors
class Resources(StatusModel):
    vcpus: int = Field(ge=0)
    memoryMiB: int = Field(ge=0)


class AllocationRatios(StatusModel):
    """Nova's cpu_allocation_ratio / ram_allocation_ratio: what may be placed per physical unit."""

    cpu: float = Field(default=1.0, gt=0)
    memory: float = Field(default=1.0, gt=0)


class HypervisorStatus(StatusModel):
    """A node as its agent reports it (Nova's compute node record, KubeVirt's node labels)."""

    capacity: Resources | None = Field(default=None, description="The host's (or the agent's --vcpus/--memory-mib).")
    allocationRatios: AllocationRatios | None = None
    allocatable: Resources | None = Field(default=None, description="capacity x allocation ratio.")
    allocated: Resources | None = Field(default=None, description="The flavors of the instances placed here.")
    free: Resources | None = Field(default=None, description="allocatable - allocated (never below 0).")
    instances: int = 0
    domainType: str | None = Field(default=None, description="kvm or qemu (TCG).")
    agentVersion: str | None = None
    agentIdentity: str | None = Field(default=None, description="The agent holding the node's Lease.")
    heartbeatTime: datetime | None = Field(default=None, description="The agent's last report (every 30 s).")
    imagesCached: list[str] = Field(default_factory=list, max_length=500,
                                    description="Images on the node: preloaded names, catalog copies.")
    networks: list[str] = Field(default_factory=list, max_length=64, description="Networks it provides.")
