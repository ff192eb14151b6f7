"""`novalet console NAMESPACE/NAME` as a person runs it: on a pseudo-terminal, against a real
apiserver, the private libvirtd and a tiny guest built by a real agent (its root shell is on the
serial console). The shell answers through libvirt's console stream, Ctrl-] (or the --escape key)
ends the session with exit 0 and the terminal's settings as they were (also after SIGTERM); a
second session is refused unless it takes the console with --force (the first then ends, saying
so); a guest stopping ends the session; and each refusal says why: no such instance, not running, not on this libvirt (with
the node it runs on and the kubectl exec to use). `kubectl novalet console NAME -n NAMESPACE`, through the real
kubectl's plugin lookup, reaches the same console."""
import asyncio
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import yaml

from .conftest import TINY
from .harness import unique_node

pytestmark = pytest.mark.stack
FLAVOR = {"vcpus": 1, "memoryMiB": 128}
SHELL_TIMEOUT = 90  # TCG on a loaded machine: the boot and the shell's first prompt
VENV_BIN = str(Path(sys.executable).parent)  # where the package installed kubectl-novalet


class Terminal:
    """A command on a pseudo-terminal (stdin, stdout and stderr): what it shows, keys to type,
    and the terminal's settings before and after."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, self.slave = os.openpty()
        self.settings = termios.tcgetattr(self.slave)
        self.process = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave, env=env,
                                        start_new_session=True)
        self.output = bytearray()
        self.lock = threading.Lock()
        self.closing = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while not self.closing:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    return
                with self.lock:
                    self.output += data

    def shown(self, start: int = 0) -> bytes:
        with self.lock:
            return bytes(self.output[start:])

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    async def expect(self, needle: bytes, timeout: float, start: int = 0) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.shown(start):
            if time.monotonic() > deadline or self.process.poll() is not None:
                return needle in self.shown(start)
            await asyncio.sleep(0.05)
        return True

    async def exited(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            assert time.monotonic() < deadline, f"still running after {timeout}s; it showed {self.shown()[-800:]!r}"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # its last words, through the reader
        return self.process.returncode

    def restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.settings

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.closing = True
        self.reader.join(timeout=5)
        os.close(self.master)
        os.close(self.slave)


async def shell_answers(term: Terminal) -> None:
    """`echo $((6*7))` prints 42 (the typed line never contains 42); typed again until the shell is up."""
    deadline = time.monotonic() + SHELL_TIMEOUT
    while True:
        start = len(term.shown())
        term.type(b"echo $((6*7))\r")
        if await term.expect(b"\n42\r\n", 3.0, start):
            return
        assert term.process.poll() is None, f"the console ended: {term.shown()[-800:]!r}"
        assert time.monotonic() < deadline, f"no shell on the console; it showed {term.shown()[-1500:]!r}"


@pytest.fixture
def console(control_plane, libvirt_uri):
    """console(*args, tty=True, kubectl=False): `novalet console ARGS` (with kubectl, `kubectl novalet
    console ARGS` through the real kubectl) as a Terminal, or (tty=False) run to the end with stdin
    from /dev/null -> CompletedProcess. KUBECONFIG, LIBVIRT_DEFAULT_URI and PATH point at the stack
    and the plugin, as `eval "$(novalet dev env)"` sets them."""
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig), "LIBVIRT_DEFAULT_URI": libvirt_uri,
           "PATH": f"{VENV_BIN}{os.pathsep}{control_plane.bin_dir}{os.pathsep}{os.environ['PATH']}"}
    started: list[Terminal] = []

    def run(*args: str, tty: bool = True, kubectl: bool = False):
        argv = ([str(control_plane.bin_dir / "kubectl"), "novalet", "console", *args] if kubectl
                else [sys.executable, "-m", "novalet.cli", "console", *args])
        if not tty:
            return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=60, check=False)
        started.append(Terminal(argv, env))
        return started[-1]

    yield run
    for term in started:
        term.close()


async def test_the_shell_through_the_console_escape_force_and_stop(instances, agents, console, namespace,
                                                                   tmp_path):
    node = unique_node()
    agents.start(node)
    created = await instances.create("vm", {"flavor": FLAVOR, "image": TINY, "nodeName": node})
    uid = created["metadata"]["uid"]
    await instances.wait_idle("vm", "active", agents=agents)
    where = f"{namespace}/vm"

    # the shell answers; Ctrl-] ends the session at once, exit 0, the terminal as it was
    first = console(where)
    assert await first.expect(b"Escape character is ^]", 30), first.shown()
    assert f"Connected to {where} (domain novalet-{uid} on node {node})".encode() in first.shown()
    await shell_answers(first)
    assert not first.restored()  # raw while attached
    first.type(b"\x1d")
    assert await first.exited(5) == 0, first.shown()
    assert first.restored()

    # one session at a time: a second is refused and told about --force, the first goes on
    held = console(where)
    await shell_answers(held)
    refused = console(where, tty=False)
    assert refused.returncode == 1
    assert f"another session holds the console of {where}" in refused.stderr
    assert "--force takes it over" in refused.stderr
    await shell_answers(held)

    # --force takes it (here with NAME alone: the kubeconfig context's namespace, and another
    # escape key); the session it took the console from ends, saying so, its terminal restored
    config = yaml.safe_load(agents.kubeconfig.read_text())
    for entry in config["contexts"]:
        if entry["name"] == config["current-context"]:
            entry["context"]["namespace"] = namespace
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    taker = console("vm", "--force", "--kubeconfig", str(kubeconfig), "--escape", "^b")
    assert await taker.expect(b"Escape character is ^b", 30), taker.shown()
    assert await held.exited(10) == 1
    assert b"another session may have taken it with --force" in held.shown(), held.shown()[-800:]
    assert held.restored()
    await shell_answers(taker)
    taker.type(b"\x1d")  # not this session's escape: goes to the guest
    await shell_answers(taker)
    taker.type(b"\x02")
    assert await taker.exited(5) == 0, taker.shown()
    assert taker.restored()

    # SIGTERM (and SIGHUP: the terminal went away) ends a session the same way: exit 128+15,
    # the terminal restored, the console released
    killed = console(where)
    await shell_answers(killed)
    killed.process.send_signal(signal.SIGTERM)
    assert await killed.exited(5) == 128 + signal.SIGTERM
    assert killed.restored()

    # stdin at its end (</dev/null, the end of a pipe) ends the session as virsh does: exit 0
    piped = console(where, tty=False)
    assert piped.returncode == 0 and f"Connected to {where}" in piped.stderr, piped.stderr

    # nobody holds it now (the escape, the signal and the end of stdin released it): attached
    # without --force; the guest stopping ends the session
    last = console(where)
    await shell_answers(last)
    await instances.patch_spec("vm", {"powerState": "Stopped"})
    await instances.wait_idle("vm", "stopped", agents=agents)
    assert await last.exited(10) == 1
    assert f"{where} stopped: its console closed".encode() in last.shown(), last.shown()[-800:]
    assert last.restored()

    # refusals that say why
    off = console(where, tty=False)
    assert off.returncode == 1
    assert f"{where} is not running (libvirt: shutoff): start it first, e.g. kubectl novalet start vm " \
           f"-n {namespace}" in off.stderr
    elsewhere = console(where, "--libvirt-uri", "test:///default", tty=False)
    assert elsewhere.returncode == 1
    assert f"{where} has no domain novalet-{uid} on this libvirt (test:///default); the instance runs on node " \
           f"{node}: run this where its agent's libvirt is reachable, e.g. kubectl exec -it -n <agent namespace> " \
           f"<agent pod on {node}> -- novalet console {where}" in elsewhere.stderr


async def test_kubectl_novalet_console_reaches_the_same_console(instances, agents, console, namespace):
    node = unique_node()
    agents.start(node)
    created = await instances.create("vm", {"flavor": FLAVOR, "image": TINY, "nodeName": node})
    await instances.wait_idle("vm", "active", agents=agents)
    term = console("vm", "-n", namespace, kubectl=True)
    assert await term.expect(b"Escape character is ^]", 30), term.shown()
    assert (f"Connected to {namespace}/vm (domain novalet-{created['metadata']['uid']} on node {node})".encode()
            in term.shown())
    await shell_answers(term)
    term.type(b"\x1d")
    assert await term.exited(5) == 0, term.shown()
    assert term.restored()
    missing = console("nope", "-n", namespace, kubectl=True, tty=False)
    assert missing.returncode == 1 and f"virtualinstance {namespace}/nope not found" in missing.stderr


async def test_a_missing_instance_is_said_so(crds, console, namespace):
    # on a terminal: the message, exit 1, the terminal untouched
    term = console(f"{namespace}/nope")
    assert await term.exited(30) == 1
    assert f"novalet console: virtualinstance {namespace}/nope not found".encode() in term.shown()
    assert term.restored()
    # NAME alone: the context's namespace (none here: default)
    assert "virtualinstance default/nope not found" in console("nope", tty=False).stderr
    bad = console(f"{namespace}/nope", "--escape", "x", tty=False)
    assert bad.returncode == 2 and "expected ^X" in bad.stderr
