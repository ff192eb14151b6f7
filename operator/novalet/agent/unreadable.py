"""Objects this agent cannot read are reported on the object and skipped, never fatal.

During a rolling upgrade a newer agent (or a newer CRD) can leave an object this version does
not understand: a status value it has no word for (a new vmState), a field of another type, a
spec field it does not know. Acting on such an object could undo what the newer version meant,
so the agent leaves it alone, says so with a Warning Event on the object (once per
resourceVersion), and goes on with every other instance of its node: one such object never
stops the recovery sweep. Its domain is never reaped either: the object exists.
"""
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from ..api.models import VirtualInstance
from ..kube.events import EventRecorder
from ..kube.instances import parse

log = logging.getLogger(__name__)
SHOWN_ERRORS = 5


def describe(error: ValidationError) -> str:
    """One line per field: `status.vmState: Input should be 'building', ... (got 'shelved')`."""
    parts = []
    for item in error.errors()[:SHOWN_ERRORS]:
        where = ".".join(str(p) for p in item["loc"])
        got = item.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r:.60})"
        parts.append(f"{where}: {item['msg']}{shown}")
    more = error.error_count() - SHOWN_ERRORS
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def placed_on(body: dict[str, Any], node: str) -> bool:
    """Read from the raw object: pinned to this node, or placed on it."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    pinned = spec.get("nodeName") if isinstance(spec, dict) else None
    placed = status.get("node") if isinstance(status, dict) else None
    return pinned == node if pinned else placed == node


class Unreadable:
    def __init__(self, events: EventRecorder, node: str, active: Callable[[], bool]):
        self.events, self.node, self.active = events, node, active
        self._reported: dict[str, str | None] = {}  # uid -> resourceVersion reported

    async def parse(self, body: dict[str, Any]) -> VirtualInstance | None:
        """The parsed object, or None when this version cannot read it (reported if it is
        this node's)."""
        try:
            return parse(body)
        except ValidationError as error:
            await self.report(body, error)
            return None

    async def report(self, body: dict[str, Any], error: ValidationError) -> None:
        meta = body.get("metadata") or {}
        uid, version = meta.get("uid"), meta.get("resourceVersion")
        if not placed_on(body, self.node) or self._reported.get(uid, "") == version:
            return  # not this node's, or said already
        why = describe(error)
        log.warning("%s/%s: cannot read this object, skipping it: %s", meta.get("namespace"),
                    meta.get("name"), why)
        if not self.active():
            return  # the Lease holder reports it
        self._reported[uid] = version  # before the await: the sweep and a watch event race here
        try:
            await self.events.emit(body, "Unreadable", "this agent cannot read the object (written by a "
                                   f"newer novalet?) and leaves it alone until it can: {why}", warning=True)
        except Exception as failure:  # noqa: BLE001 - fenced, or the apiserver is away: report later
            log.info("could not report %s/%s as unreadable: %s", meta.get("namespace"), meta.get("name"),
                     failure)
            if self._reported.get(uid) == version:
                del self._reported[uid]

    def forget(self, body: dict[str, Any]) -> None:
        self._reported.pop((body.get("metadata") or {}).get("uid"), None)
