"""A migration whose other side dies for good (core/migration.takeover): when the node acting on the
step on record has been dead (its agent's Lease expired) longer than --migration-peer-dead-after,
the surviving side ends the migration, the guest running where it is; and the dead node's agent,
when it comes back, removes what the migration left there (never a running domain). Two real
libvirtds, diskless guests."""
import asyncio
import time

import pytest

from .conftest import domain_uuids, remove_domains
from .harness import status_of, unique_node
from .test_crash_recovery import wait_dead
from .test_migration import Side, wait_hypervisors

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 96}
LEASE = ["--lease-duration", "4", "--renew-deadline", "2", "--lease-retry-period", "1"]
DEAD_AFTER = ["--migration-peer-dead-after", "2"]


@pytest.mark.parametrize("dies,crash_at,moved", [
    ("target", "after_call@Migrate:migrate_preparing_target", False),
    ("source", "after_call@Migrate:migrating", True),
], ids=["target-dies-after-preparing", "source-dies-after-the-call"])
async def test_the_surviving_side_ends_the_migration(dies, crash_at, moved, libvirt_hosts, agents, image_pool,
                                                     instances, kube_api):
    a, b = libvirt_hosts(2)
    before_b = domain_uuids(b.uri)
    sides = {role: Side(host, unique_node(), image_pool, None) for role, host in (("source", a), ("target", b))}
    for side in sides.values():
        side.state = agents.workdir / f"state-{side.node}"

    def start(role: str, crash: str | None = None):
        side = sides[role]
        return agents.start(side.node, crash_at=crash, stop_timeout=1.0, extra_args=[
            "--libvirt-uri", side.host.uri, "--image-pool", str(image_pool),
            "--migration-socket-dir", f"/run/novalet/{side.node}", *LEASE, *DEAD_AFTER])

    try:
        source, target = sides["source"], sides["target"]
        doomed = {role: start(role, crash_at if role == dies else None) for role in sides}[dies]
        agents.start_controller()
        await wait_hypervisors(kube_api, source.node, target.node)
        await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": source.node})
        body = await instances.wait_idle("vm", "active", agents=agents)
        uid = body["metadata"]["uid"]
        await instances.patch_spec("vm", {"nodeName": None})

        await instances.request("vm", {"name": "Migrate", "id": "m-1", "live": True, "targetNode": target.node})
        await wait_dead(doomed)  # and it stays dead
        record = await instances.wait_done("vm", "m-1", timeout=90, agents=agents)
        status = status_of(await instances.get("vm"))
        here, there = (target, source) if moved else (source, target)
        assert (record["result"], status["node"], status["vmState"], status.get("taskState")) == (
            "Succeeded" if moved else "Failed", here.node, "active", None), record
        assert "died" in record["message"], record
        assert here.power(uid) == "running"
        assert there.files(uid), "the dead node's leftovers are there until it comes back"

        # the dead node comes back: its agent removes what the migration left (domain, files)
        start(dies)
        deadline = time.monotonic() + 60
        while there.power(uid) is not None or there.files(uid):
            assert time.monotonic() < deadline, "the migration's leftovers are still on the returned node"
            await asyncio.sleep(0.5)
        assert here.power(uid) == "running"
        assert status_of(await instances.get("vm"))["node"] == here.node
    finally:
        remove_domains(b.uri, domain_uuids(b.uri) - before_b)
