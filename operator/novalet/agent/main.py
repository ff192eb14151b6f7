"""`novalet run`: the agent for one hypervisor node, on kopf.

kopf watches VirtualInstances and hands each event to the engine; the engine writes status
itself with compare-and-swap, so no handler returns a value into status and kopf's own
bookkeeping (progress annotations, posted events, peering) is switched off.
"""
import argparse
import asyncio
import logging
import os
import socket
import uuid
from typing import Any

import kopf

from .. import GROUP, PLURAL, VERSION
from ..kube.client import api_client, register_login
from ..kube.events import EventRecorder
from ..kube.instances import InstanceStore, parse
from ..kube.lease import NodeLease
from .engine import Engine
from .operations import Operations
from .scheduler import Scheduler

log = logging.getLogger("novalet.agent")
RESYNC_SECONDS = 30.0


def agent_identity(node: str) -> str:
    return f"{node}/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.node = args.node_name
        self.identity = agent_identity(self.node)
        self.lease_held = asyncio.Event()
        self.activation: asyncio.Task | None = None

    async def start(self) -> None:
        from ..virt.hypervisor import Hypervisor

        api = await api_client()
        self.store = InstanceStore(api)
        events = EventRecorder(api, "novalet.io/agent", self.identity)
        self.lease = NodeLease(api, self.args.lease_namespace, self.node, self.identity)
        uri = self.args.libvirt_uri or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
        kind = self.args.domain_type
        if kind == "auto":  # TCG unless a probe has booted a real guest under KVM
            from ..devenv.libvirtd import domain_type
            kind = domain_type()
        hypervisor = await asyncio.to_thread(
            Hypervisor, uri, self.args.image_pool, self.args.state_dir, kind)
        log.info("node %s: libvirt %s, domain type %s, images in %s", self.node, uri, kind,
                 self.args.image_pool)
        self.ops = Operations(hypervisor, api, self.node, self.args.soft_reboot_timeout, self.args.stop_timeout)
        self.engine = Engine(self.store, events, self.ops, self.node, self.identity)
        self.scheduler = Scheduler(self.engine, self.lease_held)
        self.ops.on_domain_event(self.scheduler.kick_uid_threadsafe(asyncio.get_running_loop()))

    async def hold_lease(self) -> None:
        """Renew the node Lease; act only while holding it. On (re)gaining it, sweep first."""
        while True:
            try:
                held = await self.lease.try_acquire_or_renew()
            except Exception as error:  # noqa: BLE001 - apiserver down: stand by until renewed
                log.warning("lease renewal failed: %s", error)
                held = False
            if held and not self.lease_held.is_set() and self.activation is None:
                log.info("holding lease for node %s as %s: recovery sweep", self.node, self.identity)
                self.activation = asyncio.create_task(self.activate())
            elif not held and (self.lease_held.is_set() or self.activation):
                log.warning("lost the lease for node %s: standing by", self.node)
                if self.activation:
                    self.activation.cancel()
                self.activation = None
                self.lease_held.clear()
            await asyncio.sleep(self.lease.duration_s / 4)

    async def activate(self) -> None:
        """Recover every task left on this node, then take new work. Runs beside the lease
        renewals: a long recovery must not let the lease run out."""
        while True:
            try:
                await self.sweep()
                break
            except Exception:
                log.exception("recovery sweep failed; retrying")
                await asyncio.sleep(2)
        log.info("recovery sweep done: taking new work")
        self.lease_held.set()
        self.activation = None

    async def sweep(self, retry_failed: bool = False) -> None:
        """Every instance of this node, before new work: recover tasks, reap orphans."""
        bodies = await self.store.list_all()
        mine = [b for b in bodies if self.engine.is_mine(parse(b))]
        for body in mine:
            self.scheduler.remember(body)
        await asyncio.gather(*(self.engine.reconcile(b["metadata"]["namespace"], b["metadata"]["name"],
                                                     retry_failed=retry_failed) for b in mine))
        await self.ops.reap_orphans({b["metadata"]["uid"] for b in bodies}, self._still_exists)

    async def _still_exists(self, meta) -> bool:
        body = await self.store.get(meta.namespace, meta.name)
        return body is not None and body["metadata"]["uid"] == meta.uid

    async def resync(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_SECONDS)
            if self.lease_held.is_set():
                try:
                    await self.sweep(retry_failed=True)
                except Exception:
                    log.exception("periodic resync failed")


def build_registry(agent: Agent) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register_login(registry)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False          # our Events say what happened, once
        settings.watching.server_timeout = 300
        settings.networking.error_backoffs = [1, 2, 5]
        await agent.start()
        asyncio.get_running_loop().create_task(agent.hold_lease())
        asyncio.get_running_loop().create_task(agent.resync())

    @kopf.on.cleanup(registry=registry)
    async def release(**_: Any) -> None:
        await agent.lease.release()  # a clean stop hands the node over at once

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def on_event(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type == "DELETED":
            agent.scheduler.forget(body)
            return
        agent.scheduler.remember(body)
        agent.engine.notify(dict(body))
        agent.scheduler.kick(body["metadata"]["namespace"], body["metadata"]["name"])

    return registry


def run_agent(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kopf.objects", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    agent = Agent(args)
    registry = build_registry(agent)
    namespaces = args.namespace or []
    asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=not namespaces,
                              namespaces=namespaces))
    return 0
