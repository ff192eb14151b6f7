"""Renders the lifecycle tables (policy, plans, recovery) as Markdown, from the code itself.

`novalet docs` writes docs/lifecycle-tables.md; `novalet docs --check` fails when it is stale.
Nothing here restates a rule: the policy and plan tables are read from their dicts, and the
recovery table calls `recover()` on representative libvirt facts and prints what it decides.
"""
import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from .api.models import CurrentTask, MigrationRecord
from .core import migration, plans, policy, recovery
from .core.facts import MISSING, Facts
from .core.vocabulary import Action, PowerState, TaskState, VmState

DEFAULT_OUTPUT = "docs/lifecycle-tables.md"
HEADER = ("<!-- Generated from operator/novalet/core by `novalet docs`"
          " (python -m novalet.docs_render). Do not edit. -->\n")


def _code(value: object) -> str:
    return f"`{value}`"


def _states(states, universe, none_label: str | None = None) -> str:
    states = set(states)
    if states >= set(universe) and (none_label is None or None in states):
        return "any"
    parts = [none_label] if none_label is not None and None in states else []
    parts += [_code(s) for s in universe if s in states]
    return ", ".join(parts) or "-"


# --- policy ---------------------------------------------------------------------------------------

def policy_table() -> str:
    lines = ["| Action | Allowed vmStates | Allowed taskStates |", "|---|---|---|"]
    for action in Action:
        rule = policy.POLICY[action]
        lines.append(f"| {action.value} | {_states(rule.vm_states, VmState)} "
                     f"| {_states(rule.task_states, TaskState, 'none (idle)')} |")
    return "\n".join(lines)


# --- plans ----------------------------------------------------------------------------------------

def _end_state(plan: plans.Plan, succeeded: bool) -> str:
    """What final_vm_state decides, probed with two different origins and pre-resize states."""
    probes = [(VmState.PAUSED, VmState.STOPPED), (VmState.SUSPENDED, VmState.ACTIVE)]
    results = [plans.final_vm_state(plan, o, p, succeeded) for o, p in probes]
    if all(r == o for r, (o, _) in zip(results, probes)):
        return "origin vmState"
    if all(r == p for r, (_, p) in zip(results, probes)):
        fallback = plans.final_vm_state(plan, VmState.RESIZED, None, succeeded)
        return f"vmState before the resize (else {_code(fallback)})"
    if results[0] == results[1]:
        return _code(results[0])
    return " / ".join(_code(r) for r in results)  # pragma: no cover - no such plan today


def plan_table() -> str:
    lines = ["| Action | Task states (operation) | On success | On failure |", "|---|---|---|---|"]
    for action, plan in plans.PLANS.items():
        steps = " → ".join(f"{_code(s.task_state)} ({s.op or 'acknowledge'})" for s in plan.steps)
        lines.append(f"| {action.value} | {steps} | {_end_state(plan, True)} "
                     f"| {_end_state(plan, False)} |")
    unplanned = [a.value for a in Action if a not in plans.PLANS and a not in plans.COORDINATED]
    esc = plans.ESCALATE_TO_HARD
    notes = [
        f"A soft reboot the guest ignores escalates to {_code(esc.task_state)} ({esc.op}).",
        f"No plan: {', '.join(unplanned) or 'none'} (sets the vmState directly, clears the task).",
        f"Two agents in turn: {', '.join(a.value for a in Action if a in plans.COORDINATED)} (the migration table below).",
    ]
    unowned = [t for t in TaskState if t not in migration.STATES
               and not any(s.task_state == t for p in plans.PLANS.values() for s in p.steps)]
    if unowned:
        notes.append("Task states no plan writes (Nova names; the recovery table still covers them): "
                     + ", ".join(_code(t) for t in unowned) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


# --- recovery -------------------------------------------------------------------------------------

_TASK_ID = "t"
_DOMAIN_ID = 1  # the domain id recorded when the task's step began
_NOW = datetime(2000, 1, 1, tzinfo=UTC)


def _fact_cases(task_state: TaskState) -> list[tuple[str, Facts]]:
    cases = [("running", Facts(domain_id=_DOMAIN_ID))]
    try:
        plan, index = plans.task_owner(task_state)
        op = plan.steps[index].op
    except KeyError:
        op = None
    if op is not None:
        cases.append((f"running, `{op}` journaled", Facts(issued=f"{_TASK_ID}:{op}")))
    cases.append(("running, restarted since the step began", Facts(domain_id=_DOMAIN_ID + 1)))
    cases += [
        ("running in rescue config", Facts(config="rescue")),
        ("paused", Facts(power_state=PowerState.PAUSED)),
        ("shut off", Facts(power_state=PowerState.SHUTOFF)),
        ("shut off with managed save", Facts(power_state=PowerState.SHUTOFF, has_managed_save=True)),
        ("crashed", Facts(power_state=PowerState.CRASHED)),
        ("not defined", Facts(exists=False, power_state=None, config=None)),
    ]
    return cases


def _describe(task_state: TaskState, facts: Facts) -> str:
    probes = (VmState.PAUSED, VmState.STOPPED)
    results = [recovery.recover(CurrentTask(name="probe", id=_TASK_ID, taskState=task_state,
                                            originVmState=origin, owner="docs", startedAt=_NOW,
                                            domainId=_DOMAIN_ID),
                                facts) for origin in probes]
    r = results[0]
    if r.vm_state is None:
        where = ""
    elif all(res.vm_state == o for res, o in zip(results, probes)):
        where = " → origin vmState"
    else:
        where = f" → {_code(r.vm_state)}"
    action = r.action.value if isinstance(r.action, Action) else r.action
    text = f"{r.kind} {action}{where}"
    if r.kind == "redo" and isinstance(r.action, Action) and r.action in plans.PLANS:
        text += f" from {_code(plans.PLANS[r.action].steps[r.from_step].task_state)}"
    if r.hard:
        text += " (soft redone hard)"
    if r.cleanup:
        text += f", cleanup {_code(r.cleanup)}"
    if r.message:
        text += f": \"{r.message}\""
    return text


def recovery_table() -> str:
    lines = ["| taskState on restart | Decision by libvirt facts |", "|---|---|"]
    for task_state in TaskState:
        if task_state in migration.STATES:
            continue  # the migration table's
        groups: dict[str, list[str]] = {}
        for label, facts in _fact_cases(task_state):
            groups.setdefault(_describe(task_state, facts), []).append(label)
        if len(groups) == 1:
            cells = [f"any: {next(iter(groups))}"]
        else:
            cells = [f"{' / '.join(labels)}: {outcome}" for outcome, labels in groups.items()]
        cell = "<br>".join(c.replace("|", "\\|") for c in cells)
        lines.append(f"| {_code(task_state)} | {cell} |")
    return "\n".join(lines)


# --- migration ------------------------------------------------------------------------------------

def _next(state: TaskState | None, ends: str) -> str:
    return _code(state) if state is not None else ends


def migration_table() -> str:
    lines = ["| Task state | Actor | Operation | Done: next | Failed: next |", "|---|---|---|---|---|"]
    for step in migration.STEPS.values():
        ok = "the task ends: succeeded, on the target" if step.task_state == TaskState.MIGRATE_FINISHING \
            else "the task ends: rolled back, on the source"
        bad = {TaskState.MIGRATE_SCHEDULING: "the task ends: failed (no target), on the source",
               TaskState.MIGRATE_FINISHING: "the task ends: error, on the target",
               TaskState.MIGRATE_REVERTING_TARGET: "the task ends: error, on the source"}.get(step.task_state, "")
        doing = "pick (or check) the target" if step.role == migration.Role.SCHEDULER else "hand-over"
        if step.task_state == TaskState.MIGRATE_TARGET_READY:
            ok = (f"cold, the guest running: {_code(TaskState.MIGRATE_POWERING_OFF)}; "
                  f"else {_code(TaskState.MIGRATING)}")
        lines.append(f"| {_code(step.task_state)} | {step.role} | {_code(step.op) if step.op else doing} "
                     f"| {ok if step.on_success is None or step.task_state == TaskState.MIGRATE_TARGET_READY else _code(step.on_success)} "
                     f"| {_next(step.on_failure, bad) if step.task_state != TaskState.MIGRATE_TARGET_READY else ''} |")
    cases = [("a migration job still runs", Facts(migrating=True)),
             ("running", Facts()), ("paused", Facts(power_state=PowerState.PAUSED)),
             ("shut off", Facts(power_state=PowerState.SHUTOFF)),
             ("not defined (libvirt undefined it once the guest ran on the target)", MISSING)]
    rows = ["", "`migrating` found on record by the source (never called twice), by what the source's libvirt shows:",
            "", "| The source's domain | Decision |", "|---|---|"]
    for label, facts in cases:
        look = migration.look_at_migrating(facts)
        then = f"look again in {migration.LOOK_AGAIN_S:g} s" if look.kind == "wait" else \
            f"{_code(look.next_state)}: \"{look.message}\""
        rows.append(f"| {label} | {then} |")
    rows += ["", ("The other side, when the acting node has been dead (its agent's Lease expired) longer than "
                  "`--migration-peer-dead-after` (the dead node's agent removes what is left there when it "
                  "comes back), by what the survivor's own libvirt shows:"), "",
             "| Task state | Dead actor | The survivor's decision |", "|---|---|---|"]
    for state, step in migration.STEPS.items():
        if step.role == migration.Role.SCHEDULER or state == TaskState.EVACUATE_REBUILDING:
            continue
        probe = CurrentTask(name="Migrate", id=_TASK_ID, taskState=state, originVmState=VmState.ACTIVE, owner="docs",
                            startedAt=_NOW, migration=MigrationRecord(sourceNode="source", targetNode="target"))
        decisions: dict[str, list[str]] = {}
        for label, facts in [*cases[:-1], ("not defined", MISSING)]:
            look = migration.takeover(probe, facts)
            text = {"wait": f"look again in {migration.LOOK_AGAIN_S:g} s",
                    "end_on_source": "the task ends: failed, on the source",
                    "end_on_target": "the task ends: error, on the target"}.get(
                look.kind, f"{_code(look.next_state)}") + (f": \"{look.message}\"" if look.message else "")
            decisions.setdefault(text, []).append(label)
        cell = "<br>".join(text if len(decisions) == 1 else f"{' / '.join(labels)}: {text}"
                           for text, labels in decisions.items())
        rows.append(f"| {_code(state)} | {step.role} | {cell} |")
    return "\n".join(lines + rows)


# --- document -------------------------------------------------------------------------------------

def render() -> str:
    return "\n".join([
        HEADER,
        "# novalet lifecycle tables",
        "",
        ("The tables the operator runs on, rendered from `operator/novalet/core` "
         "(the rules behind them: DESIGN.md section 2)."),
        "",
        "## Admission policy",
        "",
        "An action is admitted only when the instance's vmState and taskState are both listed.",
        "",
        policy_table(),
        "",
        "## Action plans",
        "",
        ("The task states an action passes through (each written with a compare-and-swap before "
         "its operation runs) and the vmState it ends in."),
        "",
        plan_table(),
        "",
        "## Recovery on agent start",
        "",
        ("What `recover()` decides for an instance found mid-task, for each kind of domain libvirt "
         "reports (a journaled operation is the last one the agent recorded as issued for this "
         "task). \"origin vmState\" is the vmState the task started from."),
        "",
        recovery_table(),
        "",
        "## Migration",
        "",
        ("A Migrate task's steps, each carried out by its actor (the scheduler, the source's agent or "
         "the target's), which writes the next one with a compare-and-swap. Every step but `migrating` "
         "is simply run again by its actor after a crash; `migrating` is decided by the source's domain."),
        "",
        migration_table(),
        "",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT,
                        help=f"where to write the Markdown ('-': stdout; default {DEFAULT_OUTPUT})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the output file differs from the code")


def run(args: argparse.Namespace) -> int:
    text = render()
    if args.check:
        path = Path(args.output)
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale; regenerate it with: novalet docs -o {path}", file=sys.stderr)
            return 1
        return 0
    if args.output == "-":
        sys.stdout.write(text)
    else:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="novalet docs", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
