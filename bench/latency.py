"""Latency from a spec patch to the libvirt call it causes, idle and during a storm.

One agent (`novalet run`, started as bench/common.py starts it) whose libvirt is the test driver
`/default` behind the private libvirtd (`test+unix:///default?socket=...`): that driver is one
state shared by every connection to it, so the benchmark opens its own connection to the same
URI and subscribes to the domains' lifecycle events (bench/common.py LibvirtEvents). The
kubernetes side is the real local apiserver.

A probe: one of a few probe instances (a namespace of their own, running) gets
`spec.powerState: Paused` (a JSON merge patch, as `kubectl patch`), or `Running` if it is
paused. The latency is from the apiserver's response to that patch to the SUSPENDED (or
RESUMED) event libvirt reports for the domain: the agent's watch, its acknowledged dispatch
(the `pausing` status write before the call) and the libvirt call itself. Probes run one at a
time, round the probe instances; before it is patched again a probe instance must have settled
(no task, its power state as asked; not part of the figure).

Per count N (100, 300, 1000), in a namespace of its own:
- during the create storm: N instances created (bench/storms.py `storm`, 16 requests at a time)
  while probes run back to back until the storm has settled;
- idle: --idle-probes sequential probes with the N instances running and nothing else asked;
- during the pause storm: `spec.powerState: Paused` on the N instances, probes as above;
- the delete storm (no probes) empties the namespace.
Each wait has a timeout; a probe whose event does not come within --probe-timeout counts as lost.
"""
import argparse
import asyncio
import statistics
import time
from pathlib import Path

import libvirt
from common import LibvirtEvents, host_details, local_stack, stop_process, summary_ms, write_result
from kubernetes_asyncio import client
from storms import RssSampler, Tracker, log_counts, rss_mib, storm, wait_ready
from write_limit import _api

from novalet import GROUP, PLURAL, VERSION

NODE = "latency"
PROBE_NS = "latency-probes"
PROBES = 8
KEPT_LOG = Path("/tmp/novalet-latency-agent.log")
MERGE = "application/merge-patch+json"
EVENT = {"Paused": libvirt.VIR_DOMAIN_EVENT_SUSPENDED, "Running": libvirt.VIR_DOMAIN_EVENT_RESUMED}
SETTLED = {"Paused": "paused", "Running": "running"}


def instance_body(name: str, memory_mib: int = 128, image: str = "", node: str = NODE) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance", "metadata": {"name": name},
            "spec": {"flavor": {"vcpus": 1, "memoryMiB": memory_mib}, "image": image, "nodeName": node}}


async def wait_until(predicate, timeout_s: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(step)


def is_settled(obj: dict | None, power: str) -> bool:
    status = (obj or {}).get("status") or {}
    return status.get("taskState") is None and status.get("powerState") == power and bool(status.get("domainUUID"))


class Prober:
    """Probe instances patched one at a time; each probe's latency to its libvirt event."""

    def __init__(self, custom, events: LibvirtEvents, tracker: Tracker, timeout_s: float):
        self.custom, self.events, self.tracker, self.timeout_s = custom, events, tracker, timeout_s
        self.names = [f"probe-{i}" for i in range(PROBES)]
        self.power = dict.fromkeys(self.names, "Running")
        self.turn = 0

    async def create(self) -> None:
        for name in self.names:
            await self.custom.create_namespaced_custom_object(GROUP, VERSION, PROBE_NS, PLURAL, instance_body(name))
        await wait_until(lambda: all(is_settled(self.tracker.objects.get(n), "running") for n in self.names),
                         120, "the probe instances running")

    async def probe(self) -> dict:
        name = self.names[self.turn % len(self.names)]
        self.turn += 1
        try:
            await wait_until(lambda: is_settled(self.tracker.objects.get(name), SETTLED[self.power[name]]),
                             self.timeout_s, f"probe {name} settled")
        except TimeoutError:  # the previous probe of this instance never finished: lost, go on
            return {"to": None, "patch_s": None, "latency_s": None, "from_send_s": None, "not_settled": name}
        uuid = self.tracker.objects[name]["status"]["domainUUID"]
        target = "Running" if self.power[name] == "Paused" else "Paused"
        sent = time.monotonic()
        await self.custom.patch_namespaced_custom_object(GROUP, VERSION, PROBE_NS, PLURAL, name,
                                                         {"spec": {"powerState": target}}, _content_type=MERGE)
        answered = time.monotonic()
        self.power[name] = target
        stamp = await self.events.wait(uuid, EVENT[target], sent, self.timeout_s)
        return {"to": target, "patch_s": answered - sent,
                "latency_s": None if stamp is None else stamp - answered,
                "from_send_s": None if stamp is None else stamp - sent}

    async def run(self, until: asyncio.Event | None = None, count: int | None = None) -> list[dict]:
        rows: list[dict] = []
        while (count is None or len(rows) < count) and not (until is not None and until.is_set()):
            rows.append(await self.probe())
        return rows


def summarize(rows: list[dict]) -> dict:
    got = [r["latency_s"] for r in rows if r["latency_s"] is not None]
    return {**summary_ms(got), "lost": sum(1 for r in rows if r["latency_s"] is None),
            "probes": len(rows),
            "from_send_p50_ms": round(1000 * statistics.median([r["from_send_s"] for r in rows
                                                                   if r["from_send_s"] is not None]), 1)
            if got else None,
            "patch_response_p50_ms": round(1000 * statistics.median([r["patch_s"] for r in rows
                                                                     if r["patch_s"] is not None]), 1)
            if got else None,
            "not_settled": sum(1 for r in rows if r.get("not_settled"))}


async def during(storm_call, prober: Prober) -> tuple[dict, dict]:
    """Probes back to back while the storm runs; the storm's row and the probes' summary."""
    over = asyncio.Event()
    task = asyncio.create_task(storm_call)
    task.add_done_callback(lambda _t: over.set())
    try:
        rows = await prober.run(until=over)
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    row = await task
    return row, summarize(rows)


def settle_or_stop(row: dict, count: int) -> None:
    """A storm that did not settle stops the benchmark: later phases would measure a stuck agent."""
    if row["timed_out"]:
        raise TimeoutError(f"the {row['storm']} storm of {count}: {row['instances'] - row['settled']} of "
                           f"{row['instances']} instances not settled within {row['seconds']:.0f} s")


def show(count: int, phase: str, s: dict) -> None:
    print(f"  {count:5d} {phase:<14} {s['probes']:4d} probes  p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  "
          f"max {s['max_ms']} ms  lost {s['lost']}", flush=True)


async def measure(stack, counts: list[int], idle_probes: int = 200, probe_timeout: float = 30.0,
                  storm_timeout: float = 300.0, deadline_s: float = 1200.0) -> dict:
    """The whole benchmark on a running stack (bench/run_all.py calls this too)."""
    deadline = time.monotonic() + deadline_s
    pool = stack.workdir / "pool"
    pool.mkdir(exist_ok=True)
    log = stack.workdir / f"agent-{NODE}.log"
    uri = stack.test_driver_uri("/default")
    events = LibvirtEvents(uri)  # holds the shared test driver's state for the agent's lifetime
    agent = stack.agent(NODE, pool, "--libvirt-uri", uri)
    sampler = RssSampler(agent.pid)
    sampling = asyncio.create_task(sampler.run())
    per_count: list[dict] = []
    error = None
    watchers: list[asyncio.Task] = []
    try:
        await wait_ready(log, agent)
        async with await _api(stack.control_plane.kubeconfig, 64) as api:
            custom = client.CustomObjectsApi(api)
            stack.control_plane.kubectl("create", "namespace", PROBE_NS)
            probe_tracker = Tracker(custom, PROBE_NS)
            watchers.append(asyncio.create_task(probe_tracker.run()))
            prober = Prober(custom, events, probe_tracker, probe_timeout)
            await prober.create()
            for count in counts:
                if time.monotonic() + 60 > deadline:
                    print(f"  {count}: skipped, past the deadline", flush=True)
                    continue
                ns = f"latency-{count}"
                stack.control_plane.kubectl("create", "namespace", ns)
                tracker = Tracker(custom, ns)
                watchers.append(asyncio.create_task(tracker.run()))
                await asyncio.sleep(0.5)
                names = [f"vm-{i:04d}" for i in range(count)]
                budget = min(storm_timeout, max(60.0, deadline - time.monotonic()))
                entry: dict = {"instances": count}
                per_count.append(entry)
                create_row, entry["during_create_storm"] = await during(
                    storm(stack, custom, tracker, sampler, "create", names, count, budget, NODE), prober)
                show(count, "create storm", entry["during_create_storm"])
                settle_or_stop(create_row, count)
                entry["idle"] = summarize(await prober.run(count=idle_probes))
                show(count, "idle", entry["idle"])
                pause_row, entry["during_pause_storm"] = await during(
                    storm(stack, custom, tracker, sampler, "pause", names, count, budget, NODE), prober)
                show(count, "pause storm", entry["during_pause_storm"])
                settle_or_stop(pause_row, count)
                delete_row = await storm(stack, custom, tracker, sampler, "delete", names, count, budget, NODE)
                for row in (create_row, pause_row, delete_row):
                    row.pop("settled_names", None)
                    row.pop("requests", None)
                entry["storms"] = [create_row, pause_row, delete_row]
                entry["agent_rss_mib"] = rss_mib(agent.pid)
                settle_or_stop(delete_row, count)
    except Exception as failure:  # noqa: BLE001 - keep what was measured, say what stopped it
        error = f"{type(failure).__name__}: {failure}"
        print(f"stopped: {error}", flush=True)
    finally:
        sampling.cancel()
        for w in watchers:
            w.cancel()
        await asyncio.gather(sampling, *watchers, return_exceptions=True)
        stop_process(agent)
        events.close()
        if log.exists():
            KEPT_LOG.write_bytes(log.read_bytes())
    return {"node": NODE, "libvirt": "test driver /default behind the private libvirtd",
            "probe": "merge patch spec.powerState Paused/Running of a running/paused probe instance; latency "
                     "from the patch's response to the SUSPENDED/RESUMED event on the benchmark's own "
                     "libvirt connection", "probe_instances": PROBES, "idle_probes": idle_probes,
            "counts": per_count, "error": error, "agent_log": log_counts(log), "agent_exit_code": agent.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--idle-probes", type=int, default=200)
    parser.add_argument("--probe-timeout", type=float, default=30.0)
    parser.add_argument("--storm-timeout", type=float, default=300.0)
    parser.add_argument("--deadline", type=float, default=1200.0, help="seconds for the whole benchmark")
    args = parser.parse_args()
    details = host_details()
    with local_stack() as stack:
        out = asyncio.run(measure(stack, args.counts, args.idle_probes, args.probe_timeout,
                                  args.storm_timeout, args.deadline))
    print(f"written to {write_result('latency', {'host': details, **out})}")


if __name__ == "__main__":
    main()
