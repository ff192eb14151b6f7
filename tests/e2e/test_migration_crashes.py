"""The migration crash matrix: the source's agent and, separately, the target's is SIGKILLed at
every crash point a migration passes (after the claim, after each step's task state is on record,
after each operation: the libvirt migration call included, before its result is written), then
started again. Whatever the point, the guest ends running exactly once: on the target when its
domain runs there, else rolled back on the source, in its origin state; nothing is left on the
side that lost (no domain, no instance files). Checked on both real libvirtds.

The guests are diskless (they boot at once, and never answer ACPI: a cold migration's power off
is forced after the agents' short --stop-timeout); the disk's own move over NBD is covered by
test_migration.py with the tiny guest. Each row goes into the crash-point matrix printed at the
end of the session (tests/conftest.py), kept in docs/recovery.md."""
import asyncio
from dataclasses import dataclass

import pytest

from novalet.core.vocabulary import TaskState

from .conftest import domain_uuids, remove_domains
from .harness import status_of, unique_node
from .test_crash_recovery import MATRIX_PROPERTY, RECOVERY_BOUND_S, wait_dead
from .test_migration import Side, wait_hypervisors

pytestmark = [pytest.mark.stack, pytest.mark.slow]
FLAVOR = {"vcpus": 1, "memoryMiB": 96}
T = TaskState
STOP_TIMEOUT = 1.0


@dataclass(frozen=True)
class MigrationCase:
    side: str            # "source" | "target": whose agent is killed
    point: str           # crash point name
    task_state: TaskState
    live: bool
    then: tuple[str, str, TaskState] | None = None  # a second kill, on the way back (side, point, state)

    @property
    def crash_at(self) -> str:
        return f"{self.point}@Migrate:{self.task_state.value}"

    def crash_of(self, role: str, first: bool) -> str | None:
        """The crash point `role`'s agent is started with: the first kill's side first, then
        (restarted) the second kill's; the other side has the second kill's from the start (it
        is only reached on the way back)."""
        if first and role == self.side:
            return self.crash_at
        if self.then and self.then[0] == role and (not first or role != self.side):
            return f"{self.then[1]}@Migrate:{self.then[2].value}"
        return None

    @property
    def row(self) -> tuple[str, str]:
        who = f"{self.side} agent killed" + (f", then the {self.then[0]}'s" if self.then else "")
        point = f"{self.point}:{self.task_state.value}" + (
            f", then {self.then[1]}:{self.then[2].value}" if self.then else "")
        return f"Migrate {'live' if self.live else 'cold'}, {who}", point

    @property
    def id(self) -> str:
        then = f"-then-{self.then[0]}-{self.then[1]}-{self.then[2].value}" if self.then else ""
        return f"{self.side}-{'live' if self.live else 'cold'}-{self.point}-{self.task_state.value}{then}"


def _cases() -> list[MigrationCase]:
    source_live = [("after_claim", T.MIGRATE_SCHEDULING), ("after_started", T.MIGRATING),
                   ("after_call", T.MIGRATING), ("after_started", T.MIGRATE_CLEANING_SOURCE),
                   ("after_call", T.MIGRATE_CLEANING_SOURCE), ("after_started", T.MIGRATE_FINISHING)]
    source_cold = [("after_started", T.MIGRATE_POWERING_OFF), ("after_call", T.MIGRATE_POWERING_OFF),
                   ("after_started", T.MIGRATING), ("after_call", T.MIGRATING)]
    target = [("after_call", T.MIGRATE_PREPARING_TARGET), ("after_started", T.MIGRATE_TARGET_READY),
              ("after_call", T.MIGRATE_FINISHING)]
    return ([MigrationCase("source", p, s, True) for p, s in source_live]
            + [MigrationCase("source", p, s, False) for p, s in source_cold]
            + [MigrationCase("target", p, s, True) for p, s in target]
            + [MigrationCase("target", "after_call", T.MIGRATE_FINISHING, False)]
            # killed again on the way back (the rollback's own steps)
            + [MigrationCase("source", "after_started", T.MIGRATING, True, then)
               for then in (("source", "after_started", T.MIGRATE_REVERTING_SOURCE),
                            ("source", "after_call", T.MIGRATE_REVERTING_SOURCE),
                            ("source", "after_started", T.MIGRATE_REVERTING_TARGET),
                            ("target", "after_call", T.MIGRATE_REVERTING_TARGET))]
            + [MigrationCase("source", "after_started", T.MIGRATING, False,
                             ("target", "after_call", T.MIGRATE_REVERTING_TARGET))])


CASES = _cases()
ROW_BASE = 1000  # after the single-agent matrix's rows


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_migration_crash_point(case: MigrationCase, libvirt_hosts, agents, image_pool, instances, request,
                                     kube_api):
    a, b = libvirt_hosts(2)
    before_b = domain_uuids(b.uri)
    sides = {}
    try:
        for role, host in (("source", a), ("target", b)):
            node = unique_node()
            sides[role] = Side(host, node, image_pool, agents.workdir / f"state-{node}")

        def start(role: str, first: bool):
            side = sides[role]
            return agents.start(side.node, crash_at=case.crash_of(role, first), stop_timeout=STOP_TIMEOUT,
                                extra_args=["--libvirt-uri", side.host.uri, "--image-pool", str(image_pool),
                                            "--migration-socket-dir", f"/run/novalet/{side.node}"])

        source, target = sides["source"], sides["target"]
        started = {role: start(role, first=True) for role in ("source", "target")}
        doomed = started[case.side]
        agents.start_controller()
        # pinned for the setup (the source is known), then unpinned: a pinned instance does not move
        await instances.create("vm", {"flavor": FLAVOR, "image": "", "nodeName": source.node})
        body = await instances.wait_idle("vm", "active", agents=agents)
        uid = body["metadata"]["uid"]
        await instances.patch_spec("vm", {"nodeName": None})

        await wait_hypervisors(kube_api, source.node, target.node)
        await instances.request("vm", {"name": "Migrate", "id": "m-1", "live": case.live, "targetNode": target.node})
        await wait_dead(doomed)
        crashed_in = status_of(await instances.get("vm")).get("taskState")
        started[case.side] = start(case.side, first=False)
        if case.then:  # killed again on the way back, then started for good
            await wait_dead(started[case.then[0]])
            agents.start(sides[case.then[0]].node, stop_timeout=STOP_TIMEOUT,
                         extra_args=["--libvirt-uri", sides[case.then[0]].host.uri, "--image-pool", str(image_pool),
                                     "--migration-socket-dir", f"/run/novalet/{sides[case.then[0]].node}"])
        record = await instances.wait_done("vm", "m-1", timeout=RECOVERY_BOUND_S, agents=agents)
        body = await instances.wait_idle("vm", "active", timeout=RECOVERY_BOUND_S, agents=agents)
        status = status_of(body)

        # exactly once: running where status says, nothing of it on the other side
        moved = status["node"] == target.node
        here, there = (target, source) if moved else (source, target)
        assert status["node"] in (source.node, target.node)
        assert here.power(uid) == "running" and status["powerState"] == "running"
        assert there.power(uid) is None, f"a domain is left on the {'source' if moved else 'target'}"
        assert not there.files(uid), f"instance files are left on the {'source' if moved else 'target'}"
        assert record["result"] == ("Succeeded" if moved else "Failed"), record
        # the watches' label follows (written right after the task's end)
        await instances.wait("vm", lambda b: b["metadata"]["labels"]["novalet.io/node"] == status["node"],
                             10, "the node label", agents)
        message = record["message"].replace(f"node {source.node}", "the source").replace(f"node {target.node}", "the target")
        outcome = (f"{crashed_in or 'ended by the other agent meanwhile'} -> Migrate {record['result']}"
                   + (f": {message}" if message else "")
                   + f"; runs on the {'target' if moved else 'source'} only")
        index = ROW_BASE + CASES.index(case)
        request.node.user_properties.append((MATRIX_PROPERTY, (index, *case.row, outcome)))

        # it takes new work where it rests
        await instances.request("vm", {"name": "Reboot", "id": "after-1", "type": "Hard"})
        assert (await instances.wait_done("vm", "after-1", agents=agents))["result"] == "Succeeded"
    finally:
        remove_domains(b.uri, domain_uuids(b.uri) - before_b)
        await asyncio.sleep(0)
