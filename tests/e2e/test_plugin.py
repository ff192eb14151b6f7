"""`kubectl novalet` as a user runs it: the real kubectl finds the plugin on the PATH, the plugin
writes the spec through the real apiserver (admission policies and all), a real agent acts on
real libvirt, and the plugin's exit code, progress and output say what happened."""
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from . import libvirt_checks as lv
from .harness import status_of, unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
VENV_BIN = str(Path(sys.executable).parent)  # where the package installed kubectl-novalet


async def novalet(control_plane, *args: str, kubeconfig: bool = True, timeout: float = 120.0
                  ) -> subprocess.CompletedProcess:
    """`kubectl novalet ARGS`, through the real kubectl's plugin lookup."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{control_plane.bin_dir}{os.pathsep}{os.environ['PATH']}"}
    if kubeconfig:
        env["KUBECONFIG"] = str(control_plane.kubeconfig)
    else:
        env.pop("KUBECONFIG", None)
    return await asyncio.to_thread(subprocess.run, [str(control_plane.bin_dir / "kubectl"), "novalet", *args],
                                   capture_output=True, text=True, env=env, timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done


async def test_every_power_verb_waits_with_progress_and_says_how_it_ended(instances, agents, control_plane,
                                                                         libvirt_view):
    node = unique_node()
    agents.start(node, stop_timeout=1.0)  # the diskless guest ignores ACPI: a stop forces it off after 1 s
    created = await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    ns = instances.namespace
    waited = ok(await novalet(control_plane, "wait", "vm", "-n", ns))
    assert "Succeeded" in waited.stdout and "vmState active" in waited.stdout

    stopped = ok(await novalet(control_plane, "-n", ns, "stop", "vm"))
    assert "stop " + f"{ns}/vm: Succeeded" in stopped.stdout and "vmState stopped" in stopped.stdout
    # the progress line saw the task as it happened, with the elapsed time
    assert "task Stop powering_off" in stopped.stderr and "s  vmState" in stopped.stderr, stopped.stderr
    assert lv.power(libvirt_view, created["metadata"]["uid"]) == "shutoff"

    refused = await novalet(control_plane, "resume", "vm", "--namespace", ns)  # resume undoes suspend only
    assert refused.returncode == 1 and "resume applies to a suspended instance" in refused.stderr

    ok(await novalet(control_plane, "start", "vm", f"--namespace={ns}"))
    paused = json.loads(ok(await novalet(control_plane, "pause", "vm", "-n", ns, "-o", "json")).stdout)
    assert (paused["result"], paused["vmState"], paused["powerState"]) == ("Succeeded", "paused", "paused")
    assert lv.power(libvirt_view, created["metadata"]["uid"]) == "paused"
    ok(await novalet(control_plane, "unpause", "vm", "-n", ns))
    assert lv.power(libvirt_view, created["metadata"]["uid"]) == "running"


async def test_one_shot_actions_get_fresh_ids_and_land_in_history_with_the_requester(
        instances, agents, control_plane, libvirt_view):
    node = unique_node()
    agents.start(node, stop_timeout=1.0)
    created = await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    ns = instances.namespace
    ok(await novalet(control_plane, "wait", "vm", "-n", ns))
    uid = created["metadata"]["uid"]
    boots = lv.domain(libvirt_view, uid).ID()

    first = json.loads(ok(await novalet(control_plane, "reboot", "--hard", "vm", "-n", ns, "-o", "json")).stdout)
    second = json.loads(ok(await novalet(control_plane, "reboot", "--hard", "vm", "-n", ns, "-o", "json")).stdout)
    assert first["result"] == second["result"] == "Succeeded" and first["actionId"] != second["actionId"]
    assert lv.domain(libvirt_view, uid).ID() != boots  # a hard reboot is a new QEMU process

    # --no-wait: the request is written and its id printed; `wait` then follows it to the end
    requested = json.loads(ok(await novalet(control_plane, "lock", "vm", "--reason", "audit", "-n", ns,
                                            "--no-wait", "-o", "json")).stdout)
    assert requested["result"] == "Requested" and requested["actionId"].startswith("lock-")
    ok(await novalet(control_plane, "wait", "vm", "-n", ns))
    body = await instances.wait("vm", lambda b: status_of(b).get("lock") is not None, what="the lock")
    assert status_of(body)["lock"]["reason"] == "audit"
    ok(await novalet(control_plane, "unlock", "vm", "-n", ns))
    ok(await novalet(control_plane, "rescue", "vm", "-n", ns))
    assert status_of(await instances.get("vm"))["vmState"] == "rescued"
    ok(await novalet(control_plane, "unrescue", "vm", "-n", ns))
    reset = json.loads(ok(await novalet(control_plane, "reset-state", "vm", "--state", "active", "-n", ns,
                                        "-o", "json")).stdout)  # the admin kubeconfig may: RBAC on /admin

    history = json.loads(ok(await novalet(control_plane, "history", "vm", "-n", ns, "-o", "json")).stdout)
    ours = {r["id"]: r for r in history}
    for action_id in (first["actionId"], second["actionId"], requested["actionId"], reset["actionId"]):
        assert ours[action_id]["result"] == "Succeeded"
        assert ours[action_id]["requestedBy"]  # stamped by the apiserver's admission policy
    table = ok(await novalet(control_plane, "history", "vm", "-n", ns)).stdout
    assert table.startswith("ID") and first["actionId"] in table


async def test_a_resize_waits_for_a_person_and_refusals_exit_non_zero(instances, agents, control_plane):
    node = unique_node()
    agents.start(node, stop_timeout=1.0)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    ns = instances.namespace
    ok(await novalet(control_plane, "wait", "vm", "-n", ns))

    resized = ok(await novalet(control_plane, "resize", "vm", "--vcpus", "2", "--memory-mib", "192", "-n", ns))
    assert "vmState resized" in resized.stdout and "confirm-resize" in resized.stdout
    waited = await novalet(control_plane, "wait", "vm", "-n", ns)  # Ready=False until a person decides
    assert waited.returncode == 1 and "ResizeNotConfirmed" in waited.stderr
    ok(await novalet(control_plane, "confirm-resize", "vm", "-n", ns))
    assert status_of(await instances.get("vm"))["flavor"] == {"vcpus": 2, "memoryMiB": 192}
    ok(await novalet(control_plane, "resize", "vm", "--vcpus", "3", "-n", ns))
    ok(await novalet(control_plane, "revert-resize", "vm", "-n", ns))
    assert status_of(await instances.get("vm"))["flavor"] == {"vcpus": 2, "memoryMiB": 192}

    ok(await novalet(control_plane, "suspend", "vm", "-n", ns))
    rejected = await novalet(control_plane, "resize", "vm", "--vcpus", "1", "-n", ns)  # not while suspended
    assert rejected.returncode == 1 and ": Rejected: " in rejected.stderr, rejected.stderr

    # the apiserver's own refusal (the schema's name rule) is reported in its words
    bad = await novalet(control_plane, "snapshot", "vm", "Not_A_Name", "-n", ns)
    assert bad.returncode == 1 and "snapshotName" in bad.stderr, bad.stderr
    missing = await novalet(control_plane, "stop", "nothing-here", "-n", ns)
    assert missing.returncode == 1 and "not found" in missing.stderr


async def test_kubeconfig_context_and_its_namespace_are_kubectls(instances, agents, control_plane, tmp_path):
    """--kubeconfig and --context as kubectl takes them; the context's namespace is the default."""
    node = unique_node()
    agents.start(node)
    await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": node})
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    context = dict(config["contexts"][0])
    context = {"name": "tenant", "context": {**context["context"], "namespace": instances.namespace}}
    config["contexts"].append(context)
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))

    done = ok(await novalet(control_plane, "wait", "vm", "--kubeconfig", str(path), "--context", "tenant",
                            kubeconfig=False))
    assert f"{instances.namespace}/vm: Succeeded" in done.stdout
    elsewhere = await novalet(control_plane, "wait", "vm", "--kubeconfig", str(path), kubeconfig=False)
    assert elsewhere.returncode == 1 and "default/vm not found" in elsewhere.stderr  # the current context's
