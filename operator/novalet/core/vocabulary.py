"""Nova's state vocabularies (nova/compute/vm_states.py, task_states.py, power_state.py)."""
from enum import StrEnum


class VmState(StrEnum):
    BUILDING = "building"
    ACTIVE = "active"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    STOPPED = "stopped"
    RESCUED = "rescued"
    RESIZED = "resized"
    ERROR = "error"
    DELETED = "deleted"


class TaskState(StrEnum):
    SCHEDULING = "scheduling"
    NETWORKING = "networking"
    BLOCK_DEVICE_MAPPING = "block_device_mapping"
    SPAWNING = "spawning"
    IMAGE_SNAPSHOT_PENDING = "image_snapshot_pending"
    IMAGE_SNAPSHOT = "image_snapshot"
    IMAGE_UPLOADING = "image_uploading"
    UPDATING_PASSWORD = "updating_password"
    RESIZE_PREP = "resize_prep"
    RESIZE_MIGRATING = "resize_migrating"
    RESIZE_MIGRATED = "resize_migrated"
    RESIZE_FINISH = "resize_finish"
    RESIZE_REVERTING = "resize_reverting"
    RESIZE_CONFIRMING = "resize_confirming"
    REBOOT_PENDING = "reboot_pending"
    REBOOT_STARTED = "reboot_started"
    REBOOTING = "rebooting"
    REBOOT_PENDING_HARD = "reboot_pending_hard"
    REBOOT_STARTED_HARD = "reboot_started_hard"
    REBOOTING_HARD = "rebooting_hard"
    PAUSING = "pausing"
    UNPAUSING = "unpausing"
    SUSPENDING = "suspending"
    RESUMING = "resuming"
    POWERING_OFF = "powering_off"
    POWERING_ON = "powering_on"
    RESCUING = "rescuing"
    UNRESCUING = "unrescuing"
    REBUILDING = "rebuilding"
    REBUILD_BLOCK_DEVICE_MAPPING = "rebuild_block_device_mapping"
    REBUILD_SPAWNING = "rebuild_spawning"
    MIGRATING = "migrating"
    DELETING = "deleting"


class PowerState(StrEnum):
    """libvirt's view of the guest, in Nova's power_state names."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    NOSTATE = "nostate"


class Action(StrEnum):
    """Everything the operator can be asked to do to an instance.

    Declarative spec fields map to CREATE, START, STOP, PAUSE, UNPAUSE, SUSPEND, RESUME,
    RESCUE, UNRESCUE, RESIZE and REBUILD; the rest are one-shot `spec.action` requests."""

    CREATE = "Create"
    START = "Start"
    STOP = "Stop"
    PAUSE = "Pause"
    UNPAUSE = "Unpause"
    SUSPEND = "Suspend"
    RESUME = "Resume"
    REBOOT_SOFT = "RebootSoft"
    REBOOT_HARD = "RebootHard"
    RESCUE = "Rescue"
    UNRESCUE = "Unrescue"
    RESIZE = "Resize"
    CONFIRM_RESIZE = "ConfirmResize"
    REVERT_RESIZE = "RevertResize"
    REBUILD = "Rebuild"
    SNAPSHOT = "Snapshot"
    SET_PASSWORD = "SetPassword"
    DELETE = "Delete"
    RESET_STATE = "ResetState"
    LOCK = "Lock"
    UNLOCK = "Unlock"


class Op(StrEnum):
    """The hypervisor operations plan steps and recovery rules name (agent/operations.py runs
    each; tests/unit/test_plans.py checks the two agree)."""
    PLUG_NETWORK = "plug_network"
    PREPARE_DISKS = "prepare_disks"
    SPAWN = "spawn"
    START = "start"
    STOP = "stop"                      # waits on the guest (core/waits.py)
    PAUSE = "pause"
    UNPAUSE = "unpause"
    SUSPEND = "suspend"
    RESUME = "resume"
    REBOOT_SOFT = "reboot_soft"        # waits on the guest (core/waits.py)
    REBOOT_HARD = "reboot_hard"
    RESCUE = "rescue"
    UNRESCUE = "unrescue"
    RESIZE_POWER_OFF = "resize_power_off"
    RESIZE_APPLY_FLAVOR = "resize_apply_flavor"
    RESIZE_FINISH = "resize_finish"
    CONFIRM_RESIZE = "confirm_resize"
    REVERT_RESIZE = "revert_resize"
    REBUILD_TEARDOWN = "rebuild_teardown"
    REBUILD_DISKS = "rebuild_disks"
    SNAPSHOT = "snapshot"
    SET_PASSWORD = "set_password"
    DELETE = "delete"
    # recovery only
    REMOVE_PARTIAL_SNAPSHOT = "remove_partial_snapshot"
    REVERT_RESIZE_INFLIGHT = "revert_resize_inflight"
