"""`novalet console NAMESPACE/NAME` (and `kubectl novalet console NAME`, which calls :func:`run`
here): the guest's serial console through libvirt's console stream (what `virsh console` uses),
run wherever the instance's libvirt is reachable.

The VirtualInstance gives the domain (``novalet-<metadata.uid>``) and, when it is elsewhere, the
node to name in the error. The console is a non-blocking ``virStream`` opened with
``dom.openConsole``; both directions are copied on libvirt's event-loop thread
(:func:`~novalet.virt.hypervisor.ensure_event_loop`), as libvirt-python's
``examples/consolecallback.py`` does: stdin is watched with ``virEventAddHandle``, the stream
with ``eventAddCallback``, and every call on the stream happens on that thread (ending from the
main thread, on a signal, is handed over by a zero timeout). The main thread only waits. The
terminal is put in raw mode only when stdin is a TTY, and restored on every way out.

Exit status: 0 on the escape key (Ctrl-] by default) or the end of stdin; 1 with a message
otherwise (no such instance, not running, not on this libvirt, console held elsewhere, the
console or libvirt closed under us); 128+N on signal N.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import libvirt

from .virt.domain_xml import domain_name
from .virt.hypervisor import POWER_STATES, ensure_event_loop

GROUP, VERSION, PLURAL = "novalet.io", "v1alpha1", "virtualinstances"
CHUNK = 4096
MAX_PENDING = 64 * 1024  # typed bytes the stream has not taken yet: stop reading stdin beyond this
BUSY = "Active console session exists"  # libvirt's message when another stream holds the console
CLOSE_REASONS = {libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error", libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file",
                 libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "no keepalive answer",
                 libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed"}


class ConsoleError(Exception):
    """What to tell the user (exit status 1)."""


# ------------------------------------------------------------------ arguments
def escape_byte(text: str) -> int:
    """`^]` -> 0x1d: a control character written as virsh writes it (^@, ^A .. ^Z, ^[, ^\\, ^], ^^, ^_)."""
    if len(text) == 2 and text[0] == "^" and "@" <= text[1].upper() <= "_":
        return ord(text[1].upper()) ^ 0x40
    raise ValueError(f"expected ^X with X one of @ A-Z [ \\ ] ^ _, got {text!r}")


def escape_argument(text: str) -> str:
    """argparse's type for --escape: the text as given, if `escape_byte` takes it (else exit 2)."""
    try:
        escape_byte(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_session_options(parser: argparse.ArgumentParser) -> None:
    """The session's own options (`kubectl novalet console` declares them with this; the
    Kubernetes flags are each command's own)."""
    parser.add_argument("--libvirt-uri", default=None,
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)")
    parser.add_argument("--escape", type=escape_argument, default="^]", metavar="^X",
                        help="the key that ends the session (default: ^], Ctrl-])")
    parser.add_argument("--force", action="store_true",
                        help="take the console from another session (which ends)")


def split_target(target: str, default_namespace) -> tuple[str, str]:
    """NAMESPACE/NAME, or NAME in `default_namespace()` (kubectl's: the context's namespace)."""
    namespace, _, name = target.rpartition("/")
    if not name or "/" in namespace or (_ and not namespace):
        raise ConsoleError(f"expected NAMESPACE/NAME or NAME, got {target!r}")
    return (namespace or default_namespace()), name


def libvirt_uri(given: str | None) -> str:
    return given or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"


# ------------------------------------------------------------------ the instance
def read_instance(kubeconfig: str | None, context: str | None, namespace: str, name: str) -> dict:
    """The VirtualInstance, through the Kubernetes API with kubectl's rules."""
    import aiohttp
    from kubernetes_asyncio.client import ApiException
    from kubernetes_asyncio.config import ConfigException

    try:
        body = asyncio.run(_get(kubeconfig, context, namespace, name))
    except ApiException as error:  # e.g. forbidden
        detail = f"{error.status} {error.reason}: {_api_message(error)}"
    except (ConfigException, aiohttp.ClientError, OSError, TimeoutError) as error:  # no kubeconfig, no apiserver
        detail = str(error) or type(error).__name__
    else:
        if body is None:
            raise ConsoleError(f"virtualinstance {namespace}/{name} not found")
        return body
    raise ConsoleError(f"cannot read virtualinstance {namespace}/{name} from the Kubernetes API: {detail}")


def _api_message(error) -> str:
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(error.body)


async def _get(kubeconfig: str | None, context: str | None, namespace: str, name: str) -> dict | None:
    from kubernetes_asyncio import client

    from .kube.client import api_client

    async with await api_client(kubeconfig, context) as api:
        try:
            return await client.CustomObjectsApi(api).get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise


def elsewhere(where: str, node: str | None) -> str:
    """Where to run the command instead."""
    namespace, name = where.split("/", 1)
    if not node:
        return f"no agent has built {where} yet (status.node is empty)"
    return (f"the instance runs on node {node}: run this where its agent's libvirt is reachable, e.g. "
            f"kubectl exec -it -n <agent namespace> <agent pod on {node}> -- novalet console {namespace}/{name} "
            f"(the pod: kubectl get pods -A -l app.kubernetes.io/component=agent "
            f"--field-selector spec.nodeName={node})")


# ------------------------------------------------------------------ libvirt
def connect(uri: str, where: str, node: str | None) -> libvirt.virConnect:
    ensure_event_loop()  # before the connection: its stream's data arrives through the loop
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as error:
        raise ConsoleError(f"cannot connect to libvirt at {uri}: {error.get_error_message()}; "
                           f"{elsewhere(where, node)}") from None
    try:
        conn.setKeepAlive(5, 3)  # a libvirtd gone away ends the session instead of hanging it
    except libvirt.libvirtError:
        pass
    return conn


def find_domain(conn: libvirt.virConnect, uid: str, uri: str, where: str, node: str | None) -> libvirt.virDomain:
    name = domain_name(uid)
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise ConsoleError(f"cannot look up domain {name} at {uri}: {error.get_error_message()}") from None
        raise ConsoleError(f"{where} has no domain {name} on this libvirt ({uri}); "
                           f"{elsewhere(where, node)}") from None
    state = dom.state()[0]
    if not dom.isActive():
        namespace, short = where.split("/", 1)
        raise ConsoleError(f"{where} is not running (libvirt: {POWER_STATES.get(state, state)}): start it "
                           f"first, e.g. kubectl novalet start {short} -n {namespace}")
    return dom


def open_console(conn: libvirt.virConnect, dom: libvirt.virDomain, force: bool, where: str) -> libvirt.virStream:
    stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
    try:
        dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0)
    except libvirt.libvirtError as error:
        message = error.get_error_message() or str(error)
        if BUSY in message:
            raise ConsoleError(f"another session holds the console of {where} ({message}): "
                               f"--force takes it over (and ends that session)") from None
        raise ConsoleError(f"cannot open the console of {where}: {message}") from None
    return stream


# ------------------------------------------------------------------ the terminal
@contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode while inside (keys such as Ctrl-C go to the guest), only if `fd` is a TTY;
    the old settings come back however the block ends."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSAFLUSH)
    try:
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:  # the terminal itself is gone (SIGHUP): nothing left to restore
            pass


@contextmanager
def signals_end_the_session() -> Iterator[None]:
    """SIGTERM and SIGHUP (the terminal went away) end the session through the normal way out."""
    def stop(signum, _frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ------------------------------------------------------------------ the pump
@dataclass
class Ending:
    reason: str  # escape | stdin | stream | stdout | libvirt | signal
    detail: str = ""


class Pump:
    """Copies stdin to the stream and the stream to stdout on libvirt's event-loop thread, until
    the escape byte, the end of stdin, or the end of the stream; then `ended` is set."""

    def __init__(self, stream: libvirt.virStream, escape: int, stdin: int = 0, stdout: int = 1) -> None:
        self.stream, self.escape, self.stdin, self.stdout = stream, bytes([escape]), stdin, stdout
        self.pending = b""  # typed, not yet taken by the stream
        self.ending: Ending | None = None
        self.ended = threading.Event()
        self.watch = -1
        self.stream_events = libvirt.VIR_STREAM_EVENT_READABLE

    def start(self) -> None:
        self.stream.eventAddCallback(self._events(), self._on_stream, None)
        self.watch = libvirt.virEventAddHandle(self.stdin, libvirt.VIR_EVENT_HANDLE_READABLE, self._on_stdin, None)

    def stop(self, ending: Ending, wait: float = 2.0) -> None:
        """End from another thread: handed to the loop thread, where the stream lives."""
        def on_loop(timer: int, _opaque) -> None:
            libvirt.virEventRemoveTimeout(timer)
            self._end(ending)

        libvirt.virEventAddTimeout(0, on_loop, None)
        self.ended.wait(wait)

    def _events(self) -> int:
        return (libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
                | (libvirt.VIR_STREAM_EVENT_WRITABLE if self.pending else 0))

    def _on_stdin(self, _watch: int, fd: int, _events: int, _opaque) -> None:
        if self.ending is not None:
            return
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:  # e.g. EIO: the terminal is gone
            data = b""
        if not data:
            self._end(Ending("stdin"))
            return
        cut = data.find(self.escape)
        self.pending += data if cut < 0 else data[:cut]
        try:
            self._flush()
        except libvirt.libvirtError as error:
            self._end(Ending("stream", error.get_error_message() or str(error)))
            return
        if cut >= 0:
            self._end(Ending("escape"))

    def _on_stream(self, stream: libvirt.virStream, events: int, _opaque) -> None:
        if self.ending is not None:
            return
        try:
            if events & libvirt.VIR_STREAM_EVENT_WRITABLE:
                self._flush()
            while True:
                data = stream.recv(CHUNK)
                if data == -2:  # nothing more for now
                    break
                if not data:
                    self._end(Ending("stream", "end of stream"))
                    return
                self._write(data)
        except libvirt.libvirtError as error:
            self._end(Ending("stream", error.get_error_message() or str(error)))
            return
        except OSError as error:
            self._end(Ending("stdout", str(error)))
            return
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self._end(Ending("stream", "hangup" if events & libvirt.VIR_STREAM_EVENT_HANGUP else "error"))

    def _flush(self) -> None:
        while self.pending:
            sent = self.stream.send(self.pending)
            if sent == -2:  # the stream is full: wait for WRITABLE
                break
            self.pending = self.pending[sent:]
        events = self._events()
        if events != self.stream_events:
            self.stream.eventUpdateCallback(events)
            self.stream_events = events
        libvirt.virEventUpdateHandle(self.watch, libvirt.VIR_EVENT_HANDLE_READABLE
                                     if len(self.pending) < MAX_PENDING else 0)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.stdout, view):]

    def _end(self, ending: Ending) -> None:
        """On the loop thread: stop watching, drop the stream, wake the main thread (once)."""
        if self.ending is not None:
            return
        self.ending = ending
        if self.watch >= 0:
            libvirt.virEventRemoveHandle(self.watch)
        for call in (self.stream.eventRemoveCallback, self.stream.abort):
            try:
                call()
            except libvirt.libvirtError:
                pass
        self.ended.set()


# ------------------------------------------------------------------ the command
def run(args: argparse.Namespace) -> int:
    try:
        return attach(args)
    except ConsoleError as error:
        print(f"novalet console: {error}", file=sys.stderr)
        return 1


def attach(args: argparse.Namespace) -> int:
    from kubernetes_asyncio.config import ConfigException

    from .kube.client import default_namespace

    def namespace() -> str:
        try:
            return default_namespace(args.kubeconfig, args.context)
        except (ConfigException, OSError) as error:  # no kubeconfig, unknown context
            raise ConsoleError(f"cannot tell the namespace (give NAMESPACE/NAME): {error}") from None

    ns, name = split_target(args.target, namespace)
    where = f"{ns}/{name}"
    body = read_instance(args.kubeconfig, args.context, ns, name)
    uid, node = body["metadata"]["uid"], (body.get("status") or {}).get("node")
    uri = libvirt_uri(args.libvirt_uri)
    conn = connect(uri, where, node)
    try:
        dom = find_domain(conn, uid, uri, where, node)
        paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        stream = open_console(conn, dom, args.force, where)
        print(f"Connected to {where} (domain {dom.name()}{f' on node {node}' if node else ''})\n"
              f"Escape character is {args.escape}", file=sys.stderr)
        if paused:
            print(f"(the guest is paused: it answers once unpaused: kubectl novalet unpause {name} -n {ns})",
                  file=sys.stderr)
        ending = session(conn, stream, escape_byte(args.escape))
        return outcome(ending, dom, where, uri)
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


def session(conn: libvirt.virConnect, stream: libvirt.virStream, escape: int) -> Ending:
    """Copy both ways until the pump ends; the terminal is raw (if a TTY) only meanwhile."""
    pump = Pump(stream, escape)
    conn.registerCloseCallback(
        lambda _conn, reason, _opaque: pump.stop(Ending("libvirt", CLOSE_REASONS.get(reason, str(reason))), wait=0),
        None)
    asked = None  # an ending from this thread: a signal
    try:
        with signals_end_the_session(), raw_terminal(pump.stdin):
            try:
                pump.start()
                while not pump.ended.wait(0.2):
                    pass
            except Interrupted as signalled:
                asked = Ending("signal", str(signalled.signum))
            except KeyboardInterrupt:  # stdin not a TTY: Ctrl-C reaches us, not the guest
                asked = Ending("signal", str(int(signal.SIGINT)))
            finally:
                if pump.ending is None:  # a signal, or an exception on the way: leave nothing behind
                    pump.stop(asked or Ending("stream", "interrupted"))
    finally:
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
    try:
        print(file=sys.stderr)  # the guest's prompt is left mid-line
    except OSError:  # the terminal is gone
        pass
    return pump.ending or asked or Ending("stream", "libvirt's event loop did not answer")


def outcome(ending: Ending, dom: libvirt.virDomain, where: str, uri: str) -> int:
    if ending.reason in ("escape", "stdin"):
        return 0
    if ending.reason == "signal":
        return 128 + int(ending.detail)
    if ending.reason == "stdout":
        print(f"novalet console: cannot write the console's output: {ending.detail}", file=sys.stderr)
        return 1
    if ending.reason == "libvirt":
        print(f"novalet console: the connection to libvirt at {uri} closed ({ending.detail})", file=sys.stderr)
        return 1
    # the guest stopping ends the stream (its pty closes); a session that took the console with
    # --force aborts ours (an I/O failure here), the domain running on
    if not still_running(dom, grace=3.0 if ending.detail in ("end of stream", "hangup") else 0.0):
        print(f"novalet console: {where} stopped: its console closed", file=sys.stderr)
    else:
        print(f"novalet console: libvirt closed the console of {where} ({ending.detail}): another session "
              f"may have taken it with --force", file=sys.stderr)
    return 1


def still_running(dom: libvirt.virDomain, grace: float = 3.0) -> bool:
    """Is the domain still running once the stream has ended? A guest stopping closes its pty a
    moment before libvirt calls the domain shut off: give it `grace` seconds to say so."""
    deadline = time.monotonic() + grace
    while True:
        try:
            if not dom.isActive():
                return False
        except libvirt.libvirtError:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.1)
