"""docs/lifecycle-tables.md is rendered from the core tables and must not drift from them."""
from pathlib import Path

from novalet import docs_render
from novalet.core import migration
from novalet.core.vocabulary import Action, TaskState

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "lifecycle-tables.md"
REGEN = ".venv/bin/python -m novalet.docs_render -o docs/lifecycle-tables.md  (or: novalet docs)"


def test_checked_in_tables_match_the_code():
    assert DOC.exists(), f"{DOC.relative_to(ROOT)} is missing; generate it with: {REGEN}"
    assert DOC.read_text() == docs_render.render(), (
        f"{DOC.relative_to(ROOT)} is stale; regenerate it with: {REGEN}")


def test_every_action_and_task_state_has_a_row():
    text = docs_render.render()
    policy_rows = docs_render.policy_table().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in policy_rows] == [a.value for a in Action]
    recovery_rows = docs_render.recovery_table().splitlines()[2:]
    recovered = [t for t in TaskState if t not in migration.STATES]  # a migration's: the migration table
    assert [row.split("|")[1].strip() for row in recovery_rows] == [f"`{t}`" for t in recovered]
    migration_rows = docs_render.migration_table().split("\n\n")[0].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in migration_rows] == [f"`{t}`" for t in migration.STEPS]
    assert set(TaskState) == set(recovered) | set(migration.STEPS)  # every task state has a row, once
    assert "| Delete | any | any |" in text
    assert docs_render.migration_table() in text


def test_migration_rows_come_from_the_table():
    steps = docs_render.migration_table().split("| The source's domain |")[0]  # the steps' table
    rows = {row.split(" | ")[0].strip("| `"): row for row in steps.splitlines() if row.startswith("| `")}
    for state, step in migration.STEPS.items():
        assert f" {step.role} " in rows[state], state
        if step.op:
            assert f"`{step.op}`" in rows[state], state
    assert "| `migrate_cleaning_source` | `migrate_reverting_source` |" in rows["migrating"]
    # `migrating` found on record: one row per fact, each from look_at_migrating
    decisions = docs_render.migration_table().split("| The source's domain | Decision |")[1]
    assert "look again" in decisions
    assert "| running | `migrate_reverting_source`" in decisions
    assert "`migrate_cleaning_source`" in decisions.split("not defined")[1]
    # the survivor's takeover: one row per step an agent acts on, each from takeover()
    takeover = decisions.split("| Task state | Dead actor | The survivor's decision |")[1]
    assert "| `migrate_preparing_target` | target | the task ends: failed, on the source" in takeover
    assert "running / paused: `migrate_finishing`" in takeover


def test_recovery_rows_come_from_recover():
    rows = {row.split(" | ")[0].strip("| `"): row for row in docs_render.recovery_table().splitlines()[2:]}
    assert "redo RebootHard from `reboot_started_hard` (soft redone hard)" in rows["reboot_started"]
    assert "restarted since the step began: finish RebootHard → `active`" in rows["reboot_started_hard"]
    assert "not defined: redo Create from `block_device_mapping`" in rows["spawning"]
    assert "cleanup `remove_partial_snapshot`" in rows["image_snapshot"]


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    out = tmp_path / "tables.md"
    assert docs_render.main(["--check", "-o", str(out)]) == 1
    assert "novalet docs" in capsys.readouterr().err
    assert docs_render.main(["-o", str(out)]) == 0
    assert out.read_text() == docs_render.render()
    assert docs_render.main(["--check", "-o", str(out)]) == 0
    out.write_text(out.read_text() + "edited\n")
    assert docs_render.main(["--check", "-o", str(out)]) == 1
