"""Coalesces events into at most one running reconcile per instance, plus one queued."""
import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .engine import Engine

log = logging.getLogger(__name__)
Key = tuple[str, str]


class Scheduler:
    def __init__(self, engine: Engine, active: asyncio.Event):
        self.engine, self.active = engine, active
        self.tasks: dict[Key, asyncio.Task] = {}
        self.again: set[Key] = set()
        self.by_uid: dict[str, Key] = {}

    def remember(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self.by_uid[meta["uid"]] = (meta["namespace"], meta["name"])

    def forget(self, body: dict[str, Any]) -> None:
        self.by_uid.pop(body["metadata"]["uid"], None)

    def kick(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key in self.tasks and not self.tasks[key].done():
            self.again.add(key)
            return
        self.tasks[key] = asyncio.create_task(self._run(key))

    def kick_uid_threadsafe(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None]:
        """A callback for libvirt's event thread: a domain changed, look at its instance."""
        def kick(uid: str) -> None:
            key = self.by_uid.get(uid)
            if key:
                loop.call_soon_threadsafe(self.kick, *key)
        return kick

    async def _run(self, key: Key) -> None:
        await self.active.wait()
        while True:
            self.again.discard(key)
            try:
                await self.engine.reconcile(*key)
            except Exception:
                log.exception("%s/%s: reconcile failed; retrying", *key)
                await asyncio.sleep(2)
                self.again.add(key)
            if key not in self.again:
                break
        self.tasks.pop(key, None)
