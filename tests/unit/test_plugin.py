"""`kubectl novalet`'s pure part, table-driven: what each verb writes, when its request is over
and how it ended (the shell around it is tested end to end in tests/e2e/test_plugin.py)."""
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from novalet.api.models import ActionId, VirtualInstance
from novalet.plugin import requests as rq
from novalet.plugin.cli import VERBS, console_args, main, parse

NOW = datetime(2026, 12, 4, 20, 0, tzinfo=UTC)
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
ACTION_ID = TypeAdapter(ActionId)  # the schema's own rule for spec.action.id


def instance(spec: dict | None = None, generation: int = 2, **status) -> VirtualInstance:
    return VirtualInstance.model_validate({
        "metadata": {"name": "vm", "namespace": "ns", "generation": generation},
        "spec": {"flavor": FLAVOR, **(spec or {})},
        "status": {"node": "hv-1", "vmState": "active", "powerState": "running", "flavor": FLAVOR,
                   "observedGeneration": generation, **status}})


def record(id_: str, result: str = "Succeeded", message: str = "") -> dict:
    return {"name": "X", "id": id_, "result": result, "message": message}


# ---- what a verb writes ----------------------------------------------------------------
@pytest.mark.parametrize("verb,options,spec,action", [
    ("stop", {}, {"powerState": "Stopped"}, None),
    ("pause", {}, {"powerState": "Paused"}, None),
    ("suspend", {}, {"powerState": "Suspended"}, None),
    ("rescue", {}, {"rescue": True}, None),
    ("unrescue", {}, {"rescue": False}, None),
    ("resize", {"vcpus": 2}, {"flavor": {"vcpus": 2, "memoryMiB": 128}}, None),
    ("resize", {"memory_mib": 256}, {"flavor": {"vcpus": 1, "memoryMiB": 256}}, None),
    ("rebuild", {"image": "tiny"}, {"image": "tiny"}, None),
    ("reboot", {}, None, {"name": "Reboot", "id": "i", "type": "Soft"}),
    ("reboot", {"hard": True}, None, {"name": "Reboot", "id": "i", "type": "Hard"}),
    ("rebuild", {}, None, {"name": "Rebuild", "id": "i"}),
    ("snapshot", {"snapshot_name": "snap-1"}, None, {"name": "Snapshot", "id": "i", "snapshotName": "snap-1"}),
    ("set-password", {"secret": "pw"}, None, {"name": "SetPassword", "id": "i", "secretRef": {"name": "pw"}}),
    ("set-password", {"secret": "pw", "key": "k", "user": "debian"}, None,
     {"name": "SetPassword", "id": "i", "secretRef": {"name": "pw", "key": "k"}, "user": "debian"}),
    ("confirm-resize", {}, None, {"name": "ConfirmResize", "id": "i"}),
    ("revert-resize", {}, None, {"name": "RevertResize", "id": "i"}),
    ("lock", {"reason": "audit"}, None, {"name": "Lock", "id": "i", "reason": "audit"}),
    ("lock", {}, None, {"name": "Lock", "id": "i"}),
    ("unlock", {}, None, {"name": "Unlock", "id": "i"}),
    ("reset-state", {"state": "error"}, None, {"name": "ResetState", "id": "i", "state": "error"}),
    ("migrate", {"live": True, "to": "node-b"}, None, {"name": "Migrate", "id": "i", "live": True, "targetNode": "node-b"}),
    ("migrate", {}, None, {"name": "Migrate", "id": "i", "live": False}),
    ("evacuate", {"to": "node-b"}, None, {"name": "Evacuate", "id": "i", "targetNode": "node-b"}),
])
def test_each_verb_writes_what_a_gitops_user_would(verb, options, spec, action):
    asked = rq.ask(verb, options, instance(), "i")
    assert (asked.spec, asked.action) == (spec, action)
    if action is not None:  # what the schema accepts: the plugin never writes a request it refuses
        instance({"action": action})


@pytest.mark.parametrize("verb,power", [("start", "Paused"), ("unpause", "Stopped"), ("resume", "Paused"),
                                        ("resume", "Stopped")])
def test_a_verb_that_undoes_another_refuses_the_wrong_state(verb, power):
    with pytest.raises(rq.Refused, match=f"{verb} applies to a"):
        rq.ask(verb, {}, instance({"powerState": power}), "i")


@pytest.mark.parametrize("verb,power", [("start", "Stopped"), ("unpause", "Paused"), ("resume", "Suspended"),
                                        ("start", "Running")])
def test_a_verb_that_undoes_another_asks_for_running(verb, power):
    assert rq.ask(verb, {}, instance({"powerState": power}), "i").spec == {"powerState": "Running"}


def test_a_new_request_never_replaces_one_no_agent_has_taken():
    waiting = instance({"action": {"name": "Reboot", "type": "Soft", "id": "r-1"}})
    with pytest.raises(rq.Refused, match="Reboot r-1 is still waiting"):
        rq.ask("reboot", {"hard": True}, waiting, "r-2")
    taken = instance({"action": {"name": "Reboot", "type": "Soft", "id": "r-1"}},
                     handledAction={"id": "r-1", "name": "Reboot", "handledAt": NOW.isoformat()})
    assert rq.ask("reboot", {"hard": True}, taken, "r-2").action["id"] == "r-2"
    # a declarative verb leaves spec.action alone, so it never loses the waiting request
    assert rq.ask("stop", {}, waiting, "x").spec == {"powerState": "Stopped"}


@given(st.sampled_from(sorted(rq.ONE_SHOT)), st.text("0123456789abcdef", min_size=6, max_size=6))
def test_a_fresh_action_id_is_one_the_schema_accepts(verb, token):
    action_id = rq.new_action_id(verb, NOW, token)
    assert ACTION_ID.validate_python(action_id) == action_id


# ---- when the request is over ------------------------------------------------------------
def test_a_one_shot_request_ends_with_its_record():
    ticket = rq.Ticket("reboot", 3, "r-2")
    assert rq.outcome(instance(taskState="rebooting", lastAction=record("r-1")), ticket) is None
    assert rq.outcome(instance(lastAction=record("r-2", "Rejected", "locked")), ticket) == \
        rq.Outcome("Rejected", "locked")
    # another action followed: the record is still found in the history
    assert rq.outcome(instance(lastAction=record("r-3"), history=[record("r-2", "Failed", "x"), record("r-3")]),
                      ticket) == rq.Outcome("Failed", "x")
    assert rq.outcome(None, ticket) == rq.Outcome("Failed", "the instance is gone")


@pytest.mark.parametrize("case,spec,status,result", [
    ("not observed yet", {"powerState": "Stopped"}, {"observedGeneration": 2}, None),
    ("task in flight", {"powerState": "Stopped"},
     {"vmState": "active", "taskState": "powering_off"}, None),
    ("claimed, next step pending", {"powerState": "Stopped"}, {"vmState": "active"}, None),
    ("met", {"powerState": "Stopped"}, {"vmState": "stopped", "powerState": "shutoff"}, "Succeeded"),
    ("refused for this generation", {"flavor": {"vcpus": 2, "memoryMiB": 128}, "powerState": "Suspended"},
     {"vmState": "suspended", "lastAction": record("spec-g3-resize", "Rejected", "cannot resize while suspended")},
     "Rejected"),
    ("refused for an older generation", {"powerState": "Stopped"},
     {"vmState": "active", "lastAction": record("spec-g2-resize", "Rejected")}, None),
    ("backing off", {"powerState": "Stopped"},
     {"vmState": "active", "backoff": {"request": "spec-g3-stop", "failures": 2, "lastError": "boom",
                                       "nextRetryAt": NOW.isoformat()}}, "Failed"),
    ("error", {"powerState": "Stopped"}, {"vmState": "error", "lastAction": record("x", "Failed", "boom")},
     "Failed"),
    ("resized: nothing left to do, not met", {"powerState": "Stopped"}, {"vmState": "resized"}, "Failed"),
])
def test_a_declarative_change_ends_when_its_generation_is_met_or_refused(case, spec, status, result):
    inst = instance(spec, generation=3, **{"observedGeneration": 3, **status})
    ended = rq.outcome(inst, rq.Ticket("stop" if "powerState" in spec and "flavor" not in spec else "resize", 3))
    assert (ended.result if ended else None) == result, (case, ended)


def test_a_resize_succeeds_awaiting_confirmation_and_says_what_next():
    big = {"vcpus": 2, "memoryMiB": 256}
    ended = rq.outcome(instance({"flavor": big}, vmState="resized", flavor=big), rq.Ticket("resize", 2))
    assert ended.ok and "confirm-resize" in ended.message


@pytest.mark.parametrize("status,result", [
    ({}, "Succeeded"),
    ({"taskState": "rebooting"}, None),
    ({"vmState": "resized"}, "Failed"),  # waits for a person: confirm or revert
    ({"vmState": "error"}, "Failed"),
    ({"vmState": None, "node": None}, None),  # not built yet
    ({"conditions": [{"type": "HostAgentReady", "status": "False", "reason": "Unavailable"}]}, None),
])
def test_wait_ends_when_ready_or_when_only_a_person_can_help(status, result):
    ended = rq.outcome(instance(**status), rq.Ticket("wait", 2))
    assert (ended.result if ended else None) == result


def test_progress_names_the_task_and_an_unavailable_agent():
    line = rq.progress(instance(taskState="rebooting_hard", currentTask={
        "name": "RebootHard", "id": "r", "taskState": "rebooting_hard", "originVmState": "active",
        "owner": "hv-1/1", "startedAt": NOW.isoformat()},
        conditions=[{"type": "HostAgentReady", "status": "False", "message": "lease expired"}]))
    assert line == ("vmState active, task RebootHard rebooting_hard, power running, "
                    "agent on hv-1 unavailable: lease expired")
    assert rq.progress(instance(node=None)) == "waiting for the scheduler (or, pinned, its node's agent) to place it"


# ---- the command line --------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["-n", "ns", "--context", "c", "reboot", "vm", "--hard"],
    ["reboot", "--namespace=ns", "vm", "--hard", "--context", "c"],
    ["reboot", "vm", "--hard", "-n", "ns", "--context=c"],
])
def test_kubectl_flags_go_anywhere_on_the_line(argv):
    args = parse(argv)
    assert (args.verb, args.name, args.hard, args.namespace, args.context) == ("reboot", "vm", True, "ns", "c")
    assert (args.output, args.no_wait, args.timeout, args.kubeconfig) == ("text", False, 600.0, None)


def test_every_verb_parses_and_every_one_shot_name_is_a_verb():
    assert set(rq.ONE_SHOT) | set(rq.POWER) | {"rescue", "unrescue", "resize"} <= set(VERBS)
    extra = {"snapshot": ["s"], "set-password": ["--secret", "pw"], "reset-state": ["--state", "active"],
             "resize": ["--vcpus", "2"]}
    for verb in VERBS:
        assert parse([verb, "vm", *extra.get(verb, [])]).verb == verb


def test_resize_without_a_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        parse(["resize", "vm"])
    assert exited.value.code == 2 and "--vcpus" in capsys.readouterr().err


# ---- console: novalet.console's session, reached through kubectl's flags -------------------
@pytest.mark.parametrize("argv,target", [
    (["console", "vm", "-n", "ns"], "ns/vm"),
    (["-n", "ns", "console", "vm"], "ns/vm"),
    (["console", "--namespace=ns", "vm"], "ns/vm"),
    (["console", "vm"], "vm"),  # novalet.console takes the kubeconfig context's namespace
])
def test_console_hands_novalet_console_its_target_and_defaults(argv, target):
    args = parse(argv)
    assert args.verb == "console"
    assert vars(console_args(args)) == {"target": target, "kubeconfig": None, "context": None,
                                        "libvirt_uri": None, "escape": "^]", "force": False}


def test_console_takes_novalet_consoles_options_and_kubectls_flags():
    args = parse(["console", "vm", "--escape", "^b", "--force", "--libvirt-uri", "test:///default",
                  "--context", "c", "--kubeconfig", "/k", "-n", "ns"])
    assert vars(console_args(args)) == {"target": "ns/vm", "kubeconfig": "/k", "context": "c",
                                        "libvirt_uri": "test:///default", "escape": "^b", "force": True}


def test_console_is_run_by_novalet_console(monkeypatch):
    import novalet.console

    seen = []
    monkeypatch.setattr(novalet.console, "run", lambda args: seen.append(vars(args)) or 7)
    assert main(["console", "vm", "-n", "ns", "--force"]) == 7  # its exit status, as is
    assert seen == [{"target": "ns/vm", "kubeconfig": None, "context": None, "libvirt_uri": None,
                     "escape": "^]", "force": True}]


@pytest.mark.parametrize("argv,error", [
    (["console", "vm", "--escape", "x"], "expected ^X"),
    (["console", "ns/vm"], "the namespace goes in -n"),
    (["console", "vm", "-o", "json"], "unrecognized arguments: -o json"),
    (["console", "vm", "--no-wait"], "unrecognized arguments: --no-wait"),
    (["-o", "json", "console", "vm"], "console is a session, not a request: --output does not apply"),
    (["--timeout", "5", "console", "vm"], "--timeout does not apply"),
])
def test_console_usage_errors(argv, error, capsys):
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2 and error in capsys.readouterr().err
