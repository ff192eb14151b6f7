"""Drives novalet the way a user does: patch spec, read status; runs agents as OS processes."""
import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from prometheus_client.parser import text_string_to_metric_families

from novalet import GROUP, PLURAL, VERSION

MERGE = "application/merge-patch+json"


@dataclass
class AgentProcess:
    node: str
    log: Path
    process: subprocess.Popen

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def crashed(self) -> bool:
        return self.process.poll() == -signal.SIGKILL

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@dataclass
class Agents:
    """Starts `novalet run` processes for one test (all share the test's namespace)."""

    kubeconfig: Path
    libvirt_uri: str
    image_pool: Path
    workdir: Path
    namespace: str
    domain_type: str
    started: list[AgentProcess] = field(default_factory=list)

    def start(self, node: str, crash_at: str | None = None, soft_reboot_timeout: float = 4.0,
              stop_timeout: float = 5.0,
              extra_env: dict[str, str] | None = None,
              extra_args: list[str] | None = None) -> AgentProcess:
        state = self.workdir / f"state-{node}"
        log = self.workdir / f"agent-{node}-{len(self.started)}.log"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **(extra_env or {})}
        env.pop("NOVALET_CRASH_AT", None)
        if crash_at:
            env["NOVALET_CRASH_AT"] = crash_at
        cmd = [sys.executable, "-m", "novalet.cli", "run", "--node-name", node,
               "--libvirt-uri", self.libvirt_uri, "--image-pool", str(self.image_pool),
               "--state-dir", str(state), "--namespace", self.namespace,
               "--soft-reboot-timeout", str(soft_reboot_timeout), "--stop-timeout", str(stop_timeout),
               "--domain-type", self.domain_type, *(extra_args or [])]
        with log.open("ab") as out:
            process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        agent = AgentProcess(node, log, process)
        self.started.append(agent)
        return agent

    def start_controller(self, webhook_port: int = 0, metrics_port: int = 0,
                         extra_args: list[str] | None = None) -> AgentProcess:
        """`novalet controller`: the heartbeat watch, and the validating webhook if a port is given."""
        log = self.workdir / f"controller-{len(self.started)}.log"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        cmd = [sys.executable, "-m", "novalet.cli", "controller", "--state-dir", str(self.workdir / "controller")]
        if webhook_port:
            cmd += ["--webhook-port", str(webhook_port)]
        if metrics_port:
            cmd += ["--metrics-port", str(metrics_port)]
        cmd += extra_args or []
        with log.open("ab") as out:
            process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        controller = AgentProcess("controller", log, process)
        self.started.append(controller)
        return controller

    def stop_all(self) -> None:
        for agent in self.started:
            agent.stop()


def unique_node() -> str:
    return f"node-{uuid.uuid4().hex[:8]}"


class Instances:
    """VirtualInstance objects in one namespace, through the real apiserver."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace

    async def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance",
                "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}
        return await self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except client.exceptions.ApiException as error:
            if error.status == 404:
                return None
            raise

    async def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return await self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}, _content_type=MERGE)

    async def request(self, name: str, action: dict[str, Any]) -> dict[str, Any]:
        """A new one-shot request replaces spec.action whole (a merge patch would keep the old
        request's other fields, e.g. a Reboot's type, and the schema refuses the mix)."""
        return await self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, [{"op": "add", "path": "/spec/action", "value": action}],
            _content_type="application/json-patch+json")

    async def delete(self, name: str) -> None:
        await self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    async def wait(self, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
                   what: str = "condition", agents: Agents | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            body = await self.get(name)
            if body is not None and predicate(body):
                return body
            await asyncio.sleep(0.25)
        logs = "\n".join(f"--- {a.log.name}\n{a.tail()}" for a in (agents.started if agents else []))
        raise AssertionError(f"{name}: timed out after {timeout}s waiting for {what}; "
                             f"status={body and body.get('status')}\n{logs}")

    async def settled(self, name: str, quiet_s: float = 2.0, timeout: float = 30.0) -> dict[str, Any]:
        """The object once nobody has written it for `quiet_s`: an agent's trailing writes (a
        condition, kopf's bookkeeping) may follow the status a test waited for by a moment."""
        deadline = time.monotonic() + timeout
        body = await self.get(name)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            latest = await self.get(name)
            if latest["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"]:
                body, quiet_since = latest, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return body
        raise AssertionError(f"{name}: still written after {timeout}s: {body.get('status')}")

    async def wait_gone(self, name: str, timeout: float = 60.0, agents: Agents | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.get(name) is None:
                return
            await asyncio.sleep(0.25)
        logs = "\n".join(f"--- {a.log.name}\n{a.tail()}" for a in (agents.started if agents else []))
        raise AssertionError(f"{name}: still there after {timeout}s: {await self.get(name)}\n{logs}")

    async def wait_done(self, name: str, request_id: str, timeout: float = 90.0,
                        agents: Agents | None = None) -> dict[str, Any]:
        """Until the request's record is in the history (the spec may move the instance on)."""
        def done(body: dict[str, Any]) -> bool:
            return any(r["id"] == request_id for r in (body.get("status") or {}).get("history", []))
        body = await self.wait(name, done, timeout, f"request {request_id} done", agents)
        return next(r for r in body["status"]["history"] if r["id"] == request_id)

    async def wait_idle(self, name: str, vm_state: str, timeout: float = 90.0,
                        agents: Agents | None = None, last_id: str | None = None) -> dict[str, Any]:
        def idle(body: dict[str, Any]) -> bool:
            status = body.get("status") or {}
            done = last_id is None or (status.get("lastAction") or {}).get("id") == last_id
            return status.get("vmState") == vm_state and status.get("taskState") is None and done
        return await self.wait(name, idle, timeout, f"vmState={vm_state} and no task"
                               + (f" after {last_id}" if last_id else ""), agents)


async def events_until(kube_api, namespace: str, done: Callable[[list], bool], timeout: float = 20.0) -> list:
    """The namespace's Events once `done(events)` holds: the agent posts Events asynchronously,
    so they may trail the status write they describe by a moment."""
    deadline = time.monotonic() + timeout
    while True:
        events = (await client.EventsV1Api(kube_api).list_namespaced_event(namespace)).items
        if done(events) or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.25)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """A Prometheus scrape of 127.0.0.1:port, every sample: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


ARGOCD_HEALTH = Path(__file__).resolve().parents[2] / "charts" / "novalet" / "files" / "argocd-health.lua"


def lua(value: Any) -> str:
    """A JSON value as a Lua 5.1 literal (Argo CD hands the object to its health script as a table)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua(k)}] = {lua(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(lua(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else
                         "".join(f"\\{b:03d}" for b in c.encode()) for c in str(value)) + '"'


def argocd_health(body: dict[str, Any]) -> tuple[str, str]:
    """The chart's Argo CD health check run by a Lua 5.1 interpreter on `body`: (status, message)."""
    script = f"obj = {lua(body)}\nlocal hs = dofile({lua(str(ARGOCD_HEALTH))})\nio.write(hs.status, '\\n', hs.message or '')"
    done = subprocess.run(["lua5.1", "-"], input=script, capture_output=True, text=True, timeout=30, check=True)
    status, _, message = done.stdout.partition("\n")
    return status, message


BUILD_KSTATUS = Path(__file__).resolve().parents[2] / "hack" / "build-kstatus.sh"


@functools.cache
def kstatus_binary() -> str:
    """hack/build-kstatus.sh's binary (built on first use when not cached); a failed build fails
    the test, here and under CI=true alike: nothing skips."""
    done = subprocess.run(["bash", str(BUILD_KSTATUS)], capture_output=True, text=True, timeout=600, check=False)
    path = done.stdout.strip()
    if done.returncode != 0 or not path or not os.access(path, os.X_OK):
        pytest.fail(f"no kstatus checker: hack/build-kstatus.sh failed ({done.returncode}): {done.stderr[-2000:]}\n"
                    "fix: run `hack/setup.sh` (it needs Go >= 1.26 and the Go module proxy)", pytrace=False)
    return path


def kstatus(body: dict[str, Any]) -> tuple[str, str]:
    """kstatus's verdict (sigs.k8s.io/cli-utils `status.Compute`, as Flux, kpt and Config Sync
    run it) on `body`: (status, message), status one of InProgress, Current, Failed, Terminating."""
    done = subprocess.run([kstatus_binary()], input=json.dumps(body), capture_output=True, text=True, timeout=30,
                          check=True)
    verdict = json.loads(done.stdout)
    return verdict["status"], verdict["message"]


def status_of(body: dict[str, Any]) -> dict[str, Any]:
    return body.get("status") or {}
