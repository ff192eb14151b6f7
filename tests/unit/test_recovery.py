"""The recovery table (DESIGN.md section 2), row by row, with fake libvirt facts."""
from datetime import UTC, datetime

import pytest

from novalet.api.models import CurrentTask, MigrationRecord
from novalet.core import migration, recovery
from novalet.core.facts import MISSING, Facts
from novalet.core.plans import PLANS
from novalet.core.recovery import Recovery, recover
from novalet.core.vocabulary import Action, PowerState, TaskState, VmState

A, T, V, P = Action, TaskState, VmState, PowerState
NOW = datetime(2024, 1, 1, tzinfo=UTC)


RUNNING = Facts()
OFF = Facts(power_state=P.SHUTOFF)


def task(state: TaskState, origin: VmState = V.ACTIVE, id: str = "t1", **kw) -> CurrentTask:
    return CurrentTask(name="x", id=id, taskState=state, originVmState=origin, owner="node-a",
                       startedAt=NOW, **kw)


# A migration's task states are decided by core/migration.py (each agent reads its own side).
RECOVERED = [t for t in TaskState if t not in migration.STATES]


def test_every_task_state_but_a_migrations_has_a_rule():
    missing = [t for t in RECOVERED if t not in recovery.RULES]
    assert not missing, f"task states with no recovery rule: {missing}"
    overlap = [t for t in migration.STATES if t in recovery.RULES]
    assert not overlap, f"migration states the recovery table decides too (core/migration.py does): {overlap}"


@pytest.mark.parametrize("state", RECOVERED)
@pytest.mark.parametrize("facts", [RUNNING, OFF, MISSING], ids=["running", "off", "missing"])
def test_every_rule_answers_for_running_off_and_missing_domains(state, facts):
    result = recover(task(state), facts)
    assert isinstance(result, Recovery)


# --- build ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("state, step", [
    (T.SCHEDULING, 0), (T.NETWORKING, 1), (T.BLOCK_DEVICE_MAPPING, 2)])
def test_build_steps_before_spawn_are_redone_from_where_they_were(state, step):
    for facts in (RUNNING, OFF, MISSING):
        assert recover(task(state, V.BUILDING), facts) == Recovery("redo", A.CREATE, from_step=step)


def test_spawning_with_running_domain_finishes_active():
    assert recover(task(T.SPAWNING, V.BUILDING), RUNNING) == Recovery(
        "finish", A.CREATE, vm_state=V.ACTIVE)


@pytest.mark.parametrize("power", [P.SHUTOFF, P.SHUTDOWN, P.NOSTATE, None])
def test_spawning_with_defined_but_off_domain_redoes_the_spawn(power):
    result = recover(task(T.SPAWNING, V.BUILDING), Facts(power_state=power))
    assert (result.kind, result.action, result.from_step) == ("redo", A.CREATE, 3)
    assert PLANS[A.CREATE].steps[result.from_step].task_state == T.SPAWNING


def test_spawning_with_missing_domain_redoes_from_block_device_mapping():
    result = recover(task(T.SPAWNING, V.BUILDING), MISSING)
    assert (result.kind, result.action) == ("redo", A.CREATE)
    assert PLANS[A.CREATE].steps[result.from_step].task_state == T.BLOCK_DEVICE_MAPPING


@pytest.mark.parametrize("power", [P.PAUSED, P.CRASHED, P.PMSUSPENDED])
def test_spawning_with_domain_in_another_state_is_an_error(power):
    result = recover(task(T.SPAWNING, V.BUILDING), Facts(power_state=power))
    assert (result.kind, result.vm_state) == ("error", V.ERROR)
    assert str(power) in result.message


# --- snapshot, password --------------------------------------------------------------------------

@pytest.mark.parametrize("state", [T.IMAGE_SNAPSHOT_PENDING, T.IMAGE_SNAPSHOT, T.IMAGE_UPLOADING])
@pytest.mark.parametrize("origin", [V.ACTIVE, V.STOPPED, V.PAUSED])
def test_snapshot_is_abandoned_with_cleanup(state, origin):
    result = recover(task(state, origin), RUNNING)
    assert result == Recovery("abandon", A.SNAPSHOT, vm_state=origin, message="interrupted",
                              cleanup="remove_partial_snapshot")


def test_updating_password_is_abandoned_asking_to_request_again():
    result = recover(task(T.UPDATING_PASSWORD), RUNNING)
    assert (result.kind, result.action, result.vm_state) == ("abandon", A.SET_PASSWORD, V.ACTIVE)
    assert "request again" in result.message
    assert result.cleanup is None


# --- resize --------------------------------------------------------------------------------------

def test_resize_prep_is_cleared():
    result = recover(task(T.RESIZE_PREP, V.STOPPED), OFF)
    assert (result.kind, result.vm_state) == ("abandon", V.STOPPED)


@pytest.mark.parametrize("state", [T.RESIZE_MIGRATING, T.RESIZE_MIGRATED, T.RESIZE_FINISH])
@pytest.mark.parametrize("origin", [V.ACTIVE, V.STOPPED])
def test_mid_resize_reverts_to_the_origin(state, origin):
    for facts in (RUNNING, OFF, MISSING):
        result = recover(task(state, origin), facts)
        assert (result.kind, result.action, result.vm_state) == ("revert", A.RESIZE, origin)


def test_confirm_and_revert_are_redone():
    assert recover(task(T.RESIZE_CONFIRMING, V.RESIZED), RUNNING) == Recovery("redo", A.CONFIRM_RESIZE)
    assert recover(task(T.RESIZE_REVERTING, V.RESIZED), RUNNING) == Recovery("redo", A.REVERT_RESIZE)


# --- reboot --------------------------------------------------------------------------------------

def test_hard_reboot_that_restarted_the_domain_finishes_exactly_once():
    """A hard reboot starts a new QEMU process: a domain id other than the one recorded at
    reboot_started_hard means it happened, so it is not done again."""
    result = recover(task(T.REBOOT_STARTED_HARD, id="r9", domainId=5), Facts(domain_id=6))
    assert (result.kind, result.action, result.vm_state) == ("finish", A.REBOOT_HARD, V.ACTIVE)


def test_hard_reboot_with_the_same_domain_id_is_redone_from_the_started_step():
    result = recover(task(T.REBOOT_STARTED_HARD, domainId=5), Facts(domain_id=5))
    assert result == Recovery("redo", A.REBOOT_HARD, from_step=1)


def test_hard_reboot_from_a_stopped_domain_that_now_runs_finishes():
    result = recover(task(T.REBOOT_STARTED_HARD, V.STOPPED, domainId=None), Facts(domain_id=3))
    assert (result.kind, result.vm_state) == ("finish", V.ACTIVE)


def test_hard_reboot_with_the_domain_off_is_redone():
    result = recover(task(T.REBOOT_STARTED_HARD, id="r9", domainId=5), Facts(power_state=P.SHUTOFF))
    assert (result.kind, result.action) == ("redo", A.REBOOT_HARD)


def test_soft_reboot_issued_and_running_finishes():
    result = recover(task(T.REBOOT_STARTED, id="r1"), Facts(issued="r1:reboot_soft"))
    assert (result.kind, result.action, result.vm_state) == ("finish", A.REBOOT_SOFT, V.ACTIVE)


@pytest.mark.parametrize("facts", [OFF, MISSING, Facts(power_state=P.CRASHED)],
                         ids=["off", "missing", "crashed"])
@pytest.mark.parametrize("state", [T.REBOOT_PENDING, T.REBOOT_STARTED, T.REBOOTING])
def test_soft_reboot_with_guest_not_running_is_redone_hard(state, facts):
    result = recover(task(state), facts)
    assert (result.kind, result.action, result.hard) == ("redo", A.REBOOT_HARD, True)


@pytest.mark.parametrize("state, step", [
    (T.REBOOT_PENDING, 0), (T.REBOOT_STARTED, 1), (T.REBOOTING, 0)])
def test_soft_reboot_with_guest_running_is_redone_soft(state, step):
    assert recover(task(state), RUNNING) == Recovery("redo", A.REBOOT_SOFT, from_step=step)


@pytest.mark.parametrize("state, step", [
    (T.REBOOT_PENDING_HARD, 0), (T.REBOOT_STARTED_HARD, 1), (T.REBOOTING_HARD, 0)])
def test_hard_reboot_states_are_redone_hard_without_the_escalation_flag(state, step):
    for facts in (RUNNING, OFF):
        assert recover(task(state), facts) == Recovery("redo", A.REBOOT_HARD, from_step=step)


def test_escalated_soft_reboot_restarted_by_the_hard_reboot_finishes():
    t = task(T.REBOOT_STARTED_HARD, id="r1", escalated=True, domainId=4)
    result = recover(t, Facts(domain_id=5))
    assert (result.kind, result.action) == ("finish", A.REBOOT_HARD)


# --- power ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("state, origin, done, target, action", [
    (T.POWERING_OFF, V.ACTIVE, Facts(power_state=P.SHUTOFF), V.STOPPED, A.STOP),
    (T.POWERING_OFF, V.ACTIVE, Facts(power_state=P.SHUTDOWN), V.STOPPED, A.STOP),
    (T.POWERING_ON, V.STOPPED, RUNNING, V.ACTIVE, A.START),
    (T.PAUSING, V.ACTIVE, Facts(power_state=P.PAUSED), V.PAUSED, A.PAUSE),
    (T.UNPAUSING, V.PAUSED, RUNNING, V.ACTIVE, A.UNPAUSE),
    (T.SUSPENDING, V.ACTIVE, Facts(power_state=P.SHUTOFF, has_managed_save=True), V.SUSPENDED,
     A.SUSPEND),
    (T.RESUMING, V.SUSPENDED, RUNNING, V.ACTIVE, A.RESUME),
])
def test_power_task_done_sets_the_target(state, origin, done, target, action):
    assert recover(task(state, origin), done) == Recovery("finish", action, vm_state=target)


@pytest.mark.parametrize("state, origin, not_done, action", [
    (T.POWERING_OFF, V.ACTIVE, RUNNING, A.STOP),
    (T.POWERING_OFF, V.ACTIVE, MISSING, A.STOP),
    (T.POWERING_ON, V.STOPPED, OFF, A.START),
    (T.PAUSING, V.ACTIVE, RUNNING, A.PAUSE),
    (T.UNPAUSING, V.PAUSED, Facts(power_state=P.PAUSED), A.UNPAUSE),
    (T.SUSPENDING, V.ACTIVE, RUNNING, A.SUSPEND),
    # shut off without a managed-save image is not suspended
    (T.SUSPENDING, V.ACTIVE, Facts(power_state=P.SHUTOFF, has_managed_save=False), A.SUSPEND),
    (T.RESUMING, V.SUSPENDED, Facts(power_state=P.SHUTOFF, has_managed_save=True), A.RESUME),
    # running, but in the rescue configuration: not the normal target
    (T.POWERING_ON, V.STOPPED, Facts(config="rescue"), A.START),
])
def test_power_task_not_done_is_redone(state, origin, not_done, action):
    assert recover(task(state, origin), not_done) == Recovery("redo", action)


# --- rescue --------------------------------------------------------------------------------------

def test_rescuing():
    assert recover(task(T.RESCUING), Facts(config="rescue")) == Recovery(
        "finish", A.RESCUE, vm_state=V.RESCUED)
    assert recover(task(T.RESCUING), RUNNING) == Recovery("redo", A.RESCUE)
    assert recover(task(T.RESCUING), Facts(power_state=P.SHUTOFF, config="rescue")) == Recovery(
        "redo", A.RESCUE)


def test_unrescuing():
    assert recover(task(T.UNRESCUING, V.RESCUED), RUNNING) == Recovery(
        "finish", A.UNRESCUE, vm_state=V.ACTIVE)
    assert recover(task(T.UNRESCUING, V.RESCUED), Facts(config="rescue")) == Recovery(
        "redo", A.UNRESCUE)


# --- rebuild, migrate, delete --------------------------------------------------------------------

@pytest.mark.parametrize("state", [T.REBUILDING, T.REBUILD_BLOCK_DEVICE_MAPPING, T.REBUILD_SPAWNING])
def test_rebuild_is_redone(state):
    for facts in (RUNNING, OFF, MISSING):
        assert recover(task(state), facts) == Recovery("redo", A.REBUILD)


# `migrating` is the migration table's (core/migration.look_at_migrating): found on record, the
# source's domain decides, and the migration call is never made twice.

def test_migrating_with_a_job_still_running_waits():
    for facts in (Facts(migrating=True), Facts(power_state=P.PAUSED, migrating=True)):
        look = migration.look_at_migrating(facts)
        assert (look.kind, look.next_state) == ("wait", None)


def test_migrating_with_the_source_domain_gone_cleans_the_source():
    """libvirt undefines the source's domain only once the guest runs on the target."""
    look = migration.look_at_migrating(MISSING)
    assert (look.kind, look.next_state) == ("goto", T.MIGRATE_CLEANING_SOURCE)


@pytest.mark.parametrize("power", [P.RUNNING, P.PAUSED, P.SHUTOFF])
def test_migrating_with_the_source_domain_still_here_rolls_back(power):
    """The guest did not move: the source's domain is kept and the rollback begins on the source."""
    look = migration.look_at_migrating(Facts(power_state=power))
    assert (look.kind, look.next_state) == ("goto", T.MIGRATE_REVERTING_SOURCE)
    assert look.message


@pytest.mark.parametrize("origin", [V.ACTIVE, V.PAUSED, V.STOPPED])
def test_the_source_reads_migrating_on_record_with_look_at_migrating(origin):
    """The actor's look at `migrating` on record is look_at_migrating's, whatever the origin."""
    record = MigrationRecord(sourceNode="node-a", targetNode="node-b", live=origin == V.PAUSED)
    for facts in (RUNNING, OFF, MISSING, Facts(migrating=True)):
        t = task(T.MIGRATING, origin, migration=record)
        assert migration.look(t, facts) == migration.look_at_migrating(facts)


def test_deleting_is_redone():
    for facts in (RUNNING, OFF, MISSING):
        assert recover(task(T.DELETING), facts) == Recovery("redo", A.DELETE)
