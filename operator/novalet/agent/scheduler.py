"""Coalesces events into at most one running reconcile per instance, plus one queued."""
import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from .engine import Engine
from .fence import Fence, Fenced

log = logging.getLogger(__name__)
Key = tuple[str, str]


class Scheduler:
    def __init__(self, engine: Engine, active: asyncio.Event, fence: Fence):
        self.engine, self.active, self.fence = engine, active, fence
        self.tasks: dict[Key, asyncio.Task] = {}
        self.again: set[Key] = set()
        self.wakeups: dict[Key, asyncio.TimerHandle] = {}
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

    def preempt(self, namespace: str, name: str) -> None:
        """Cancel the instance's running reconcile (it may wait on a hung libvirt call) and
        start a new one: delete and reset-state never wait behind a task."""
        running = self.tasks.pop((namespace, name), None)
        if running is not None and not running.done():
            log.info("%s/%s: preempting the running reconcile", namespace, name)
            running.cancel()
        self.kick(namespace, name)

    def kick_later(self, key: Key, delay_s: float) -> None:
        """Look at the instance again after `delay_s` (a failed step's backoff); the latest
        delay replaces a wake-up set before."""
        old = self.wakeups.pop(key, None)
        if old is not None:
            old.cancel()
        self.wakeups[key] = asyncio.get_running_loop().call_later(delay_s, self._wake, key)

    def _wake(self, key: Key) -> None:
        self.wakeups.pop(key, None)
        self.kick(*key)

    def cancel_all(self) -> None:
        """The Lease is lost: drop every queued and running reconcile (a new tenure's sweep
        looks at every instance again)."""
        for task in self.tasks.values():
            task.cancel()
        for wakeup in self.wakeups.values():
            wakeup.cancel()
        self.tasks.clear()
        self.wakeups.clear()
        self.again.clear()

    async def _run(self, key: Key) -> None:
        await self.active.wait()
        self.fence.begin_work()
        while True:
            self.again.discard(key)
            try:
                delay = await self.engine.reconcile(*key)
                if delay is not None:
                    self.kick_later(key, delay)
            except Fenced as why:
                log.info("%s/%s: %s", *key, why)
                break
            except ValidationError:  # unreadable by this version: reported on the object, skipped
                log.info("%s/%s: cannot read the object; waiting for it to change", *key)
                break
            except Exception:
                log.exception("%s/%s: reconcile failed; retrying", *key)
                await asyncio.sleep(2)
                self.again.add(key)
            if key not in self.again:
                break
        if self.tasks.get(key) is asyncio.current_task():
            self.tasks.pop(key)
