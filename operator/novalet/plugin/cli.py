"""`kubectl novalet VERB NAME`: the thin shell around plugin.requests (flags, apiserver, terminal);
`console` hands over to novalet.console, the code behind `novalet console`.

kubectl runs any `kubectl-novalet` on the PATH as `kubectl novalet`; the package installs it.
"""
import argparse
import asyncio
import json
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client, watch

from .. import console as novalet_console
from ..api.models import VirtualInstance
from ..kube.client import api_client, default_namespace
from . import requests as rq

GROUP, VERSION, PLURAL = "novalet.io", "v1alpha1", "virtualinstances"
JSON_PATCH, MERGE_PATCH = "application/json-patch+json", "application/merge-patch+json"
WRITE_TRIES = 5  # a one-shot write is conditional on what it read: re-read and ask again on a race

VERBS: dict[str, str] = {
    "reboot": "reboot the guest (soft: ACPI, escalated to hard after the agent's timeout)",
    "stop": "power the guest off (spec.powerState: Stopped)",
    "start": "power a stopped guest on (spec.powerState: Running)",
    "pause": "pause the guest in memory (spec.powerState: Paused)",
    "unpause": "unpause a paused guest (spec.powerState: Running)",
    "suspend": "save the guest's memory to disk (spec.powerState: Suspended)",
    "resume": "resume a suspended guest (spec.powerState: Running)",
    "rescue": "boot the rescue configuration (spec.rescue: true)",
    "unrescue": "leave rescue mode (spec.rescue: false)",
    "resize": "change the flavor (spec.flavor); confirm or revert it afterwards",
    "confirm-resize": "keep a resize (ConfirmResize)",
    "revert-resize": "go back to the flavor before the resize (RevertResize)",
    "rebuild": "rebuild the disk from its image, or from --image (spec.image)",
    "snapshot": "save the disk as an image (Snapshot)",
    "set-password": "set a guest user's password from a Secret (SetPassword)",
    "lock": "lock the instance (only you and administrators may act on it)",
    "unlock": "unlock the instance",
    "reset-state": "administrators: reset vmState to active or error, clearing the task (ResetState)",
    "migrate": "administrators: move the instance to another node (Migrate): cold by default (stopped, "
               "its disk moved, booted there), --live keeps it running; --to NODE, else the scheduler picks",
    "evacuate": "administrators: rebuild the instance from its image on another node, its node being dead "
                "(Evacuate); what was on the dead node's local disk is lost",
    "wait": "wait until the instance is Ready, or needs a person (exit 1 then)",
    "history": "list the instance's last actions: who asked, when, and how they ended",
    "console": "attach to the guest's serial console (as `novalet console`: run it where the "
               "instance's libvirt is reachable)",
}
REQUEST_FLAGS = ("output", "no_wait", "timeout")  # about a request and its wait: not for console


def _common_flags(suppress: bool, requests: bool = True) -> argparse.ArgumentParser:
    """kubectl's flags, accepted anywhere on the line (before or after the verb); with `requests`,
    also those about a request's outcome."""
    default = argparse.SUPPRESS if suppress else None
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=default, help="the instance's namespace")
    common.add_argument("--context", default=default, help="the kubeconfig context to use")
    common.add_argument("--kubeconfig", default=default, help="path to the kubeconfig file")
    if not requests:
        return common
    common.add_argument("-o", "--output", choices=["text", "json"], default=default,
                        help="json: one JSON document on stdout (for scripts)")
    common.add_argument("--no-wait", action="store_true", default=default,
                        help="write the request and exit (its id is printed)")
    common.add_argument("--timeout", type=float, default=default,
                        help="seconds to wait for the outcome (default 600)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl novalet", parents=[_common_flags(suppress=True)],
        description="Act on a VirtualInstance as a GitOps user would (each verb writes the spec field "
                    "or a spec.action with a fresh id), then wait for the outcome with live progress. "
                    "Exit 0: done; 1: Rejected, Failed, timed out or not found; 2: usage. "
                    "`console` attaches to the guest's serial console instead (novalet console's session).")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in VERBS.items():
        sub = verbs.add_parser(verb, help=text, description=text,
                               parents=[_common_flags(suppress=True, requests=verb != "console")])
        sub.add_argument("name", metavar="NAME", help="the VirtualInstance")
        if verb == "console":
            novalet_console.add_session_options(sub)
        elif verb == "reboot":
            sub.add_argument("--hard", action="store_true", help="power-cycle at once (no ACPI)")
        elif verb == "resize":
            sub.add_argument("--vcpus", type=int, help="new vCPU count")
            sub.add_argument("--memory-mib", type=int, help="new memory in MiB")
        elif verb == "rebuild":
            sub.add_argument("--image", help="rebuild from this image (changes spec.image)")
        elif verb == "snapshot":
            sub.add_argument("snapshot_name", metavar="SNAPSHOT", help="the image name to store it under")
        elif verb == "set-password":
            sub.add_argument("--secret", required=True, help="a Secret in the instance's namespace")
            sub.add_argument("--key", help="the Secret's key holding the password (default: password)")
            sub.add_argument("--user", help="the guest user (default: root)")
        elif verb == "lock":
            sub.add_argument("--reason", help="why (shown in status.lock and to those refused)")
        elif verb == "reset-state":
            sub.add_argument("--state", required=True, choices=["active", "error"])
        if verb in ("migrate", "evacuate"):
            sub.add_argument("--to", metavar="NODE", help="the target node (its Hypervisor must pass the "
                                                          "scheduler's filters); default: the scheduler picks")
        if verb == "migrate":
            sub.add_argument("--live", action="store_true", help="live migration: the guest keeps running")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "console":
        given = [name for name in REQUEST_FLAGS if hasattr(args, name)]  # before the verb, e.g. -o json console
        if given:
            parser.error(f"console is a session, not a request: --{given[0].replace('_', '-')} does not apply")
        if "/" in args.name:
            parser.error(f"console NAME is the instance's name, got {args.name!r}: the namespace goes in -n")
    for name, value in (("namespace", None), ("context", None), ("kubeconfig", None), ("output", "text"),
                        ("no_wait", False), ("timeout", 600.0)):
        if not hasattr(args, name):
            setattr(args, name, value)
    if args.verb == "resize" and not (args.vcpus or args.memory_mib):
        parser.error("resize needs --vcpus and/or --memory-mib")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.verb == "console":
        return console(args)
    try:
        return asyncio.run(Session(args).run())
    except KeyboardInterrupt:
        print("\nstopped waiting; the request stands", file=sys.stderr)
        return 130


def console_args(args: argparse.Namespace) -> argparse.Namespace:
    """What `novalet console` would have parsed: NAMESPACE/NAME with -n, else NAME alone (the
    kubeconfig context's namespace, which novalet.console looks up as the other verbs do)."""
    return argparse.Namespace(
        target=f"{args.namespace}/{args.name}" if args.namespace else args.name,
        kubeconfig=args.kubeconfig, context=args.context, libvirt_uri=args.libvirt_uri,
        escape=args.escape, force=args.force)


def console(args: argparse.Namespace) -> int:
    """The session itself is novalet.console's (exit status included)."""
    try:
        return novalet_console.run(console_args(args))
    except KeyboardInterrupt:  # before the session (reading the instance): in it, Ctrl-C is the guest's
        return 130


class Session:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.json = args.output == "json"
        self.started = time.monotonic()
        self.live = sys.stderr.isatty()
        self.shown = ""

    async def run(self) -> int:
        args = self.args
        namespace = args.namespace or default_namespace(args.kubeconfig, args.context)
        self.where = f"{namespace}/{args.name}"
        api = await api_client(args.kubeconfig, args.context)
        async with api:
            self.custom = client.CustomObjectsApi(api)
            self.namespace = namespace
            try:
                return await self._act()
            except client.ApiException as error:
                return self._finish(None, rq.Outcome("Rejected", _api_message(error)), None)

    async def _act(self) -> int:
        body = await self._get()
        if body is None:
            return self._finish(None, rq.Outcome("Failed", f"virtualinstance {self.where} not found"), None)
        if self.args.verb == "history":
            return self._history(body)
        if self.args.verb == "wait":
            ticket = rq.Ticket("wait", body["metadata"]["generation"])
        else:
            try:
                body, ticket = await self._write(body)
            except rq.Refused as refused:
                return self._finish(None, rq.Outcome("Rejected", str(refused)), None)
        if self.args.no_wait:
            return self._finish(ticket, None, body)
        return await self._wait(ticket, body)

    async def _write(self, body: dict[str, Any]) -> tuple[dict[str, Any], rq.Ticket]:
        verb, options = self.args.verb, vars(self.args)
        action_id = rq.new_action_id(verb, datetime.now(UTC), secrets.token_hex(3))
        for attempt in range(WRITE_TRIES):
            ask = rq.ask(verb, options, VirtualInstance.model_validate(body), action_id)
            try:
                if ask.spec is not None:
                    written = await self._patch({"spec": ask.spec}, MERGE_PATCH)
                else:  # only if nothing changed since the read: a request in between is never replaced
                    written = await self._patch([
                        {"op": "test", "path": "/metadata/resourceVersion",
                         "value": body["metadata"]["resourceVersion"]},
                        {"op": "add", "path": "/spec/action", "value": ask.action}], JSON_PATCH)
                generation = written["metadata"]["generation"]
                return written, rq.Ticket(verb, generation, ask.action["id"] if ask.action else None)
            except client.ApiException as error:
                if not _raced(error) or attempt == WRITE_TRIES - 1:
                    raise
            body = await self._get()
            if body is None:
                raise rq.Refused(f"virtualinstance {self.where} is gone")
        raise AssertionError("unreachable")

    async def _wait(self, ticket: rq.Ticket, body: dict[str, Any] | None) -> int:
        deadline = self.started + self.args.timeout
        updates: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        watcher = asyncio.create_task(self._watch(body["metadata"]["resourceVersion"], updates))
        try:
            inst = _parsed(body)
            while True:
                self._progress(inst)
                result = rq.outcome(inst, ticket)
                if result is not None:
                    return self._finish(ticket, result, inst)
                if time.monotonic() > deadline:
                    return self._finish(ticket, rq.Outcome("Failed", (
                        f"timed out after {self.args.timeout:g}s: {rq.progress(inst)}")), inst, timed_out=True)
                try:
                    inst = _parsed(await asyncio.wait_for(updates.get(), 0.5))
                except TimeoutError:
                    pass  # refresh the elapsed time
        finally:
            watcher.cancel()

    async def _watch(self, resource_version: str, updates: asyncio.Queue) -> None:
        """Every change of the one object, in order; after a lost watch, the object as it is."""
        while True:
            try:
                stream = watch.Watch().stream(
                    self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                    field_selector=f"metadata.name={self.args.name}", resource_version=resource_version,
                    allow_watch_bookmarks=False, timeout_seconds=60)
                async with stream:
                    async for event in stream:
                        obj = event["object"]
                        if event["type"] == "DELETED":
                            await updates.put(None)
                            return
                        resource_version = obj["metadata"]["resourceVersion"]
                        await updates.put(obj)
            except (TimeoutError, client.ApiException, OSError):
                await asyncio.sleep(1.0)
                body = await self._get()  # e.g. 410 Gone: start again from now
                await updates.put(body)
                if body is None:
                    return
                resource_version = body["metadata"]["resourceVersion"]

    async def _get(self) -> dict[str, Any] | None:
        try:
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                  self.args.name)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise

    async def _patch(self, patch: Any, content_type: str) -> dict[str, Any]:
        return await self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.args.name, patch, _content_type=content_type)

    # ---- the terminal ----------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _progress(self, inst: VirtualInstance | None) -> None:
        """A line per state the instance passes through; on a terminal, the last one ticks."""
        if self.json and not self.live:
            return
        line = rq.progress(inst)
        stamp = f"{self._elapsed():6.1f}s  {line}"
        if self.live:
            end = "\n" if line != self.shown and self.shown else ""
            sys.stderr.write(f"{end}\r\x1b[K{stamp}")
        elif line != self.shown:
            sys.stderr.write(stamp + "\n")
        sys.stderr.flush()
        self.shown = line

    def _finish(self, ticket: rq.Ticket | None, result: rq.Outcome | None, inst: Any,
                timed_out: bool = False) -> int:
        if self.live and self.shown:
            sys.stderr.write("\n")
        if isinstance(inst, dict):
            inst = _parsed(inst)
        request = (ticket.action_id or f"generation {ticket.generation}") if ticket else None
        if self.json:
            status = inst.status if inst is not None else None
            print(json.dumps({
                "namespace": self.where.split("/")[0], "name": self.args.name, "verb": self.args.verb,
                "actionId": ticket.action_id if ticket else None,
                "generation": ticket.generation if ticket else None,
                "result": "TimedOut" if timed_out else (result.result if result else "Requested"),
                "message": result.message if result else "",
                "vmState": status.vmState if status else None,
                "taskState": status.taskState if status else None,
                "powerState": status.powerState if status else None,
                "elapsedSeconds": round(self._elapsed(), 2)}))
        elif result is None:
            print(f"{self.args.verb} {self.where}: requested ({request})")
        elif result.ok:
            print(f"{self.args.verb} {self.where}: Succeeded in {self._elapsed():.1f}s: {result.message}")
        else:
            about = f" ({request})" if request else ""
            print(f"error: {self.args.verb} {self.where}{about}: {result.result}: {result.message}", file=sys.stderr)
        return 0 if result is None or result.ok else 1

    def _history(self, body: dict[str, Any]) -> int:
        records = _parsed(body).status.history
        if self.json:
            print(json.dumps([r.model_dump(mode="json", exclude_none=True) for r in records]))
            return 0
        rows = [("ID", "ACTION", "RESULT", "REQUESTED BY", "STARTED", "FINISHED", "MESSAGE")]
        rows += [(r.id, r.name, r.result, r.requestedBy or "-", _when(r.startedAt), _when(r.finishedAt),
                  r.message) for r in records]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        return 0


def _parsed(body: dict[str, Any] | None) -> VirtualInstance | None:
    return VirtualInstance.model_validate(body) if body is not None else None


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "-"


def _raced(error: client.ApiException) -> bool:
    """A conditional write that lost a race: the resourceVersion it tested has moved."""
    return error.status == 409 or (error.status == 422 and "test" in _api_message(error).lower()
                                   and "resourceVersion" in _api_message(error))


def _api_message(error: client.ApiException) -> str:
    """The apiserver's own words (a CEL rule's message, an admission policy's)."""
    try:
        return json.loads(error.body).get("message") or str(error.reason)
    except (TypeError, ValueError):
        return f"{error.status} {error.reason}"


if __name__ == "__main__":
    sys.exit(main())
