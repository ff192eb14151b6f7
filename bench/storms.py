"""Storms: many instances asking for the same thing at once, beside the apiserver's own limit.

One stack: the real local control plane, the private libvirtd, and one agent (`novalet run`,
started as bench/common.py starts it) whose libvirt is the test driver behind that libvirtd
(`test+unix:///<node file>?socket=<libvirtd socket>`: the agent's calls go over libvirt's RPC
as they do to a real node; the node file holds no domains). The test driver keeps its domains
only while the agent's connection lives: an agent that reconnects finds an empty node, which
the benchmark reports (the agent logs "reconnecting").

First the physical limit is measured in the same stack (write_limit.measure), before the agent
starts. Then, for each count (100, 300, then 1000 if the 300 storms project it to finish
within --gate-1000 seconds), in a namespace of its own:

- create storm: N VirtualInstances created (diskless, pinned to the agent's node); settled
  when Create is recorded in lastAction and no task is left;
- hard-reboot storm: `spec.action` {Reboot, Hard, fresh id} on each (a JSON patch, as a user's
  `kubectl patch`); settled when lastAction carries that id and no task is left;
- pause storm: `spec.powerState: Paused` (declarative); settled when lastAction is Pause and no
  task is left. (It comes after the reboot storm: a hard reboot of a paused instance ends
  active and the spec would pause it again, mixing two storms.)
- delete storm: every object deleted; settled when the watch reports it gone.

The benchmark issues the requests 16 at a time and follows one watch on the namespace. Per
storm: seconds from the first request to the last instance settled, instances per second,
the apiserver's own `apiserver_request_total` before and after (as bench/api_cost.py reads
it) minus the benchmark's own requests, so writes per instance are the agent's; the agent's
VirtualInstance write rate as a share of the limit; the agent's RSS (VmRSS of its process); and
where its workers' time went, from the agent's own /metrics (on loopback) before and after: how
busy the 16 workers were, and what share of their reconciles' time was spent waiting for the
apiserver's answers to their writes and in libvirt calls.
Every storm has a timeout; the whole script is bounded by --deadline.
"""
import argparse
import asyncio
import shutil
import statistics
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import write_limit
from api_cost import request_counts
from common import local_stack, write_result
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families
from recovery_time import node_xml

from novalet import GROUP, PLURAL, VERSION
from novalet_dev.controlplane import free_port

NODE = "storm"
WORKERS = 16  # the agent's default (--workers)
KEPT_LOG = Path("/tmp/novalet-storms-agent.log")
CONCURRENCY = 16
STORMS = ("create", "reboot_hard", "pause", "delete")
# apiserver_request_total's verb label is the HTTP method for writes here (POST, PUT, PATCH,
# DELETE); CREATE/UPDATE/APPLY are the names other versions report
WRITES = {"POST", "PUT", "PATCH", "DELETE", "CREATE", "UPDATE", "APPLY"}
OWN = {  # the benchmark's own write per instance, per storm (subtracted from the counts)
    "create": ("POST", "virtualinstances"), "reboot_hard": ("PATCH", "virtualinstances"),
    "pause": ("PATCH", "virtualinstances"), "delete": ("DELETE", "virtualinstances"),
}


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class RssSampler:
    """The agent's VmRSS every 0.5 s; `window()` gives the peak since it was last reset."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.task = pid, 0.0, None

    async def run(self) -> None:
        while True:
            value = rss_mib(self.pid)
            if value is not None:
                self.peak = max(self.peak, value)
            await asyncio.sleep(0.5)

    def reset(self) -> float:
        peak, self.peak = self.peak, rss_mib(self.pid) or 0.0
        return peak


class Tracker:
    """One watch on a namespace; calls `self.check(type, name, object)` on every change."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str):
        self.custom, self.namespace = custom, namespace
        self.objects: dict[str, dict] = {}
        self.check = lambda typ, name, obj: None
        self.events = 0

    async def relist(self) -> str:
        listing = await self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        fresh = {i["metadata"]["name"]: i for i in listing["items"]}
        for name in set(self.objects) - set(fresh):
            self.check("DELETED", name, self.objects[name])
        self.objects = fresh
        for name, obj in fresh.items():
            self.check("MODIFIED", name, obj)
        return listing["metadata"]["resourceVersion"]

    async def run(self) -> None:
        rv = await self.relist()
        while True:
            try:
                stream = watch.Watch()
                async with stream.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                         self.namespace, PLURAL, resource_version=rv, timeout_seconds=60,
                                         allow_watch_bookmarks=True) as events:
                    async for event in events:
                        obj = event["object"]
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] == "BOOKMARK":
                            continue
                        self.events += 1
                        name = obj["metadata"]["name"]
                        if event["type"] == "DELETED":
                            self.objects.pop(name, None)
                        else:
                            self.objects[name] = obj
                        self.check(event["type"], name, obj)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - 410 Gone or a dropped stream: list afresh
                if not (isinstance(error, ApiException) and error.status == 410):
                    print(f"watch on {self.namespace}: {type(error).__name__}: {error}; listing afresh", flush=True)
                    await asyncio.sleep(1)
                rv = await self.relist()


def outcome_of(storm: str, typ: str, obj: dict, request_id: str | None) -> str | None:
    """The instance's outcome once the storm's request is settled, else None."""
    if storm == "delete":
        return "deleted" if typ == "DELETED" else None
    status = obj.get("status") or {}
    last = status.get("lastAction") or {}
    if status.get("taskState") is not None or not last:
        return None
    wanted = {"create": last.get("name") == "Create", "pause": last.get("name") == "Pause",
              "reboot_hard": last.get("id") == request_id}[storm]
    if not wanted:
        return None
    return f"{last.get('name')} {last.get('result')} -> {status.get('vmState')}/{status.get('powerState')}"


EXPECTED = {"create": "Create Succeeded -> active/running", "reboot_hard": "RebootHard Succeeded -> active/running",
            "pause": "Pause Succeeded -> paused/paused", "delete": "deleted"}


def agent_writes(before: Counter, after: Counter, own: Counter) -> dict:
    diff = {k: after[k] - before[k] - own[k] for k in after}
    requests = {f"{verb} {res}": n for (verb, res), n in sorted(diff.items()) if n > 0}
    status = sum(n for (verb, res), n in diff.items() if res == "virtualinstances/status" and verb in WRITES)
    obj = sum(n for (verb, res), n in diff.items() if res == "virtualinstances" and verb in WRITES)
    events = sum(n for (verb, res), n in diff.items() if res == "events" and verb in WRITES)
    reads = sum(n for (verb, res), n in diff.items()
                if res.startswith("virtualinstances") and verb in ("GET", "LIST"))
    return {"status_writes": status, "object_writes": obj, "event_writes": events, "instance_reads": reads,
            "requests": requests}


# the agent's histograms whose sums say where its workers' time went (docs/operations.md)
TIME_SUMS = {"novalet_reconcile_duration_seconds_sum": "reconciles",
             "novalet_apiserver_write_duration_seconds_sum": "apiserver_writes",
             "novalet_libvirt_call_duration_seconds_sum": "libvirt_calls"}


def agent_seconds(metrics_url: str) -> dict[str, float]:
    """Seconds the agent's workers have spent so far in reconciles, waiting for the apiserver's
    answers to their writes, and in libvirt calls (its /metrics, on loopback)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    sums = dict.fromkeys(TIME_SUMS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in TIME_SUMS:
                sums[TIME_SUMS[sample.name]] += sample.value
    return sums


def time_split(before: dict[str, float], after: dict[str, float], seconds: float, workers: int) -> dict:
    """How busy the workers were during a storm, and what share of their reconciles' time went to
    the apiserver's answers and to libvirt (the rest: the agent's own CPU and its event loop)."""
    spent = {k: after[k] - before[k] for k in after}
    total = spent["reconciles"] or 1.0
    return {"worker_seconds": round(spent["reconciles"], 1),
            "workers_busy": round(spent["reconciles"] / (seconds * workers), 3),
            "share_in_apiserver_writes": round(spent["apiserver_writes"] / total, 3),
            "share_in_libvirt_calls": round(spent["libvirt_calls"] / total, 3)}


async def storm(stack, custom, tracker: Tracker, sampler: RssSampler, kind: str, names: list[str],
                count: int, timeout_s: float, node: str = NODE, metrics_url: str | None = None) -> dict:
    ns = tracker.namespace
    ids = {name: f"hard-{count}-{i}" for i, name in enumerate(names)} if kind == "reboot_hard" else {}
    pending = set(names)
    settled: dict[str, float] = {}
    outcomes: Counter = Counter()
    done = asyncio.Event()
    started = 0.0

    def check(typ: str, name: str, obj: dict) -> None:
        if name not in pending:
            return
        outcome = outcome_of(kind, typ, obj, ids.get(name))
        if outcome is None:
            return
        pending.discard(name)
        settled[name] = time.monotonic() - started
        outcomes[outcome] += 1
        if not pending:
            done.set()

    async def request(i: int, name: str) -> None:
        if kind == "create":
            await custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance", "metadata": {"name": name},
                "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}, "image": "", "nodeName": node}})
        elif kind == "reboot_hard":
            await custom.patch_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name,
                [{"op": "add", "path": "/spec/action", "value": {"name": "Reboot", "type": "Hard", "id": ids[name]}}],
                _content_type="application/json-patch+json")
        elif kind == "pause":
            await custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                        {"spec": {"powerState": "Paused"}},
                                                        _content_type="application/merge-patch+json")
        else:
            await custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    gate = asyncio.Semaphore(CONCURRENCY)
    issued_at: list[float] = []

    refused: Counter = Counter()

    async def gated(i: int, name: str) -> None:
        async with gate:
            try:
                await request(i, name)
            except ApiException as error:  # counted, and not waited for
                refused[f"{error.status} {error.reason}"] += 1
                pending.discard(name)
                if not pending:
                    done.set()
                return
            issued_at.append(time.monotonic() - started)

    before = await asyncio.to_thread(request_counts, stack.control_plane)
    spent_before = await asyncio.to_thread(agent_seconds, metrics_url) if metrics_url else None
    sampler.reset()
    started = time.monotonic()
    tracker.check = check
    await asyncio.gather(*(gated(i, n) for i, n in enumerate(names)))
    timed_out = False
    try:
        await asyncio.wait_for(done.wait(), timeout=max(1.0, timeout_s - (time.monotonic() - started)))
    except TimeoutError:
        timed_out = True
    elapsed = time.monotonic() - started
    tracker.check = lambda typ, name, obj: None
    rss_peak = sampler.reset()
    rss_end = rss_mib(sampler.pid)
    spent_after = await asyncio.to_thread(agent_seconds, metrics_url) if metrics_url else None
    await asyncio.sleep(1.0)  # trailing writes (the last Events, a power-state sync) land in the counts
    after = await asyncio.to_thread(request_counts, stack.control_plane)
    own = Counter({OWN[kind]: len(names)})
    writes = agent_writes(before, after, own)
    n = len(names)
    instance_writes = writes["status_writes"] + writes["object_writes"]
    times = sorted(settled.values())
    return {
        "storm": kind, "instances": n, "settled": len(settled), "timed_out": timed_out,
        "seconds": round(elapsed, 2), "requests_issued_in_s": round(max(issued_at), 2) if issued_at else None,
        "instances_per_s": round(len(settled) / elapsed, 1),
        "settle_s_p50": round(statistics.median(times), 2) if times else None,
        "settle_s_p99": round(write_limit.percentile(times, 0.99), 2) if times else None,
        "status_writes_per_instance": round(writes["status_writes"] / n, 2),
        "object_writes_per_instance": round(writes["object_writes"] / n, 2),
        "instance_writes_per_instance": round(instance_writes / n, 2),
        "event_writes_per_instance": round(writes["event_writes"] / n, 2),
        "instance_reads_per_instance": round(writes["instance_reads"] / n, 2),
        "instance_writes_per_s": round(instance_writes / elapsed, 1),
        "all_writes_per_s": round((instance_writes + writes["event_writes"]) / elapsed, 1),
        "outcomes": dict(outcomes), "expected_outcome": EXPECTED[kind], "requests_refused": dict(refused),
        "unexpected_outcomes": sum(v for k, v in outcomes.items() if k != EXPECTED[kind]) + sum(refused.values()),
        "agent_rss_mib_peak": rss_peak, "agent_rss_mib_end": rss_end,
        "agent_time": time_split(spent_before, spent_after, elapsed, WORKERS) if metrics_url else None,
        "requests": writes["requests"], "settled_names": sorted(settled),
    }


def log_counts(log: Path) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    return {"reconnects": text.count("reconnecting"), "tracebacks": text.count("Traceback"),
            "lease_renewals_failed": text.count("lease renewal failed"), "fenced": text.count("fenced: lost the lease"),
            "recovery_sweeps_started": text.count(": recovery sweep\n"),
            "recovery_sweeps_done": text.count("recovery sweep done"),
            "abandoned_libvirt_calls": text.count("the call is abandoned"),
            "errors": sum(1 for line in text.splitlines() if " ERROR " in line),
            "warnings": sum(1 for line in text.splitlines() if " WARNING " in line)}


def _since(log: Path, offset: int) -> str:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def wait_ready(log: Path, agent, timeout_s: float = 90) -> float:
    """Seconds until this agent (not an earlier one of the same node and log) finished its start."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited ({agent.returncode}); see {log}")
        if log.exists() and "recovery sweep done" in _since(log, getattr(agent, "log_offset", 0)):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the agent did not finish its start within {timeout_s} s; see {log}")


async def run_storms(stack, args, limit: dict) -> dict:
    driver_file = stack.workdir / "storm-node.xml"
    driver_file.write_text(node_xml([]))
    socket = urllib.parse.quote(str(stack.libvirtd.socket_path), safe="/")
    uri = f"test+unix://{driver_file}?socket={socket}"
    pool = stack.workdir / "pool"
    pool.mkdir(exist_ok=True)
    log = stack.workdir / f"agent-{NODE}.log"
    deadline = time.monotonic() + args.deadline
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    agent = stack.agent(NODE, pool, "--libvirt-uri", uri, "--metrics-port", str(metrics_port),
                        "--workers", str(WORKERS))
    sampler = RssSampler(agent.pid)
    sampling = asyncio.create_task(sampler.run())
    results: list[dict] = []
    skipped: list[str] = []
    error = None
    start_s = rss_idle = rss_idle_after = None
    try:
        start_s = await wait_ready(log, agent)
        await asyncio.sleep(5)
        samples = []
        for _ in range(5):
            samples.append(rss_mib(agent.pid))
            await asyncio.sleep(0.2)
        rss_idle = max(v for v in samples if v is not None)
        print(f"agent up in {start_s:.1f} s, RSS idle {rss_idle} MiB; limit {limit['writes_per_s']} writes/s",
              flush=True)
        async with await write_limit._api(stack.control_plane.kubeconfig, 64) as api:
            custom = client.CustomObjectsApi(api)
            for count in args.counts:
                reason = skip_reason(count, results, args, deadline)
                if reason:
                    skipped.append(reason)
                    continue
                await storms_of(stack, custom, sampler, agent, log, count, args, deadline, limit, results, skipped,
                                metrics_url)
        await asyncio.sleep(3)
        rss_idle_after = rss_mib(agent.pid)
    except Exception as failure:  # noqa: BLE001 - keep what was measured, say what stopped it
        error = f"{type(failure).__name__}: {failure}"
        print(f"stopped: {error}", flush=True)
    finally:
        sampling.cancel()
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        if log.exists():  # the stack's directory goes with the stack
            shutil.copyfile(log, KEPT_LOG)
    largest = max((r["instances"] for r in results), default=0)
    at_largest = [r for r in results if r["instances"] == largest and r["storm"] != "delete"]
    return {"agent_start_s": start_s and round(start_s, 2), "agent_rss_mib_idle": rss_idle,
            "agent_rss_mib_idle_after_storms": rss_idle_after, "largest_count": largest,
            "agent_rss_mib_peak_at_largest": max((r["agent_rss_mib_peak"] for r in at_largest), default=None),
            "agent_rss_mib_after_create_at_largest": next(
                (r["agent_rss_mib_end"] for r in at_largest if r["storm"] == "create"), None),
            "storms": results, "skipped": skipped, "error": error, "agent_log": log_counts(log),
            "agent_exit_code": agent.returncode,
            "libvirt": "test driver behind the private libvirtd (test+unix:///<node file>?socket=...)"}


def skip_reason(count: int, results: list[dict], args, deadline: float) -> str | None:
    if count >= 1000 and results:
        largest = max(r["instances"] for r in results)
        seconds = sum(r["seconds"] for r in results if r["instances"] == largest)
        projected = seconds / largest * count
        if projected > args.gate_1000:
            return (f"{count}: the {largest} storms took {seconds:.0f} s, projecting {projected:.0f} s "
                    f"(> --gate-1000 {args.gate_1000:g} s)")
    if time.monotonic() + 60 > deadline:
        return f"{count}: past the script's deadline ({args.deadline:g} s)"
    return None


async def storms_of(stack, custom, sampler, agent, log, count, args, deadline, limit, results, skipped,
                    metrics_url: str | None = None) -> None:
    ns = f"storm-{count}"
    stack.control_plane.kubectl("create", "namespace", ns)
    tracker = Tracker(custom, ns)
    watching = asyncio.create_task(tracker.run())
    await asyncio.sleep(0.5)
    names = [f"vm-{i:04d}" for i in range(count)]
    try:
        for kind in STORMS:
            remaining = deadline - time.monotonic()
            if kind != "delete" and remaining < 60:
                skipped.append(f"{count} {kind}: past the script's deadline")
                continue
            row = await storm(stack, custom, tracker, sampler, kind, names, count,
                              min(args.storm_timeout, max(60.0, remaining)), metrics_url=metrics_url)
            row["share_of_limit"] = round(row["instance_writes_per_s"] / limit["writes_per_s"], 3)
            row["all_writes_share_of_limit"] = round(row["all_writes_per_s"] / limit["writes_per_s"], 3)
            row["agent_log"] = log_counts(log)
            results.append(row)
            print(f"  {count:5d} {kind:<12}{row['seconds']:8.2f} s {row['instances_per_s']:7.1f}/s  "
                  f"{row['instance_writes_per_instance']:5.2f} VI writes/inst  "
                  f"{row['share_of_limit']:6.1%} of limit  RSS peak {row['agent_rss_mib_peak']} MiB"
                  f"{'  TIMED OUT' if row['timed_out'] else ''}", flush=True)
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited ({agent.returncode}) during {count} {kind}")
            unsettled = set(names) - set(row.pop("settled_names"))
            if row["timed_out"]:
                row["unsettled_states"] = dict(Counter(
                    f"taskState={(o.get('status') or {}).get('taskState')} "
                    f"lastAction={((o.get('status') or {}).get('lastAction') or {}).get('name')}"
                    for name, o in tracker.objects.items() if name in unsettled))
                raise TimeoutError(f"{count} {kind} storm: {row['instances'] - row['settled']} of "
                                   f"{row['instances']} instances not settled within the storm's timeout; "
                                   "later storms would measure a stuck agent")
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


def failures(out: dict) -> list[str]:
    """The storms whose instances did not all end as asked: their figures measure something else."""
    return [f"{r['instances']} {r['storm']}: {r['settled']}/{r['instances']} settled, outcomes {r['outcomes']}"
            for r in out["storms"] if r["unexpected_outcomes"] or r["timed_out"]]


def _pct(row: dict, key: str) -> str:
    return f"{100 * row['agent_time'][key]:>5.0f}%" if row.get("agent_time") else f"{'-':>6}"


def print_table(limit: dict, out: dict) -> None:
    print(f"\nlimit: {limit['writes_per_s']} conditional status writes/s; agent RSS idle "
          f"{out['agent_rss_mib_idle']} MiB, peak at {out['largest_count']} instances "
          f"{out['agent_rss_mib_peak_at_largest']} MiB")
    print(f"{'count':>6} {'storm':<12}{'s':>8}{'inst/s':>8}{'VI w/inst':>10}{'ev/inst':>8}{'VI w/s':>8}"
          f"{'% limit':>8}{'p50 s':>7}{'p99 s':>7}{'RSS MiB':>8}{'busy':>6}{'api%':>6}{'virt%':>6}  outcome")
    for r in out["storms"]:
        ok = "ok" if not r["unexpected_outcomes"] and not r["timed_out"] else (
            f"{r['settled']}/{r['instances']} settled, {r['unexpected_outcomes']} unexpected")
        print(f"{r['instances']:>6} {r['storm']:<12}{r['seconds']:>8.2f}{r['instances_per_s']:>8.1f}"
              f"{r['instance_writes_per_instance']:>10.2f}{r['event_writes_per_instance']:>8.2f}"
              f"{r['instance_writes_per_s']:>8.1f}{100 * r['share_of_limit']:>7.1f}%"
              f"{r['settle_s_p50'] or 0:>7.2f}{r['settle_s_p99'] or 0:>7.2f}{r['agent_rss_mib_peak']:>8}"
              f"{_pct(r, 'workers_busy')}{_pct(r, 'share_in_apiserver_writes')}{_pct(r, 'share_in_libvirt_calls')}"
              f"  {ok}")
    for s in out["skipped"]:
        print(f"skipped: {s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--storm-timeout", type=float, default=300.0, help="seconds per storm")
    parser.add_argument("--gate-1000", type=float, default=600.0,
                        help="run a count >= 1000 only if the smaller storms project it under this many seconds")
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds for all the storms")
    parser.add_argument("--limit-count", type=int, default=3000, help="timed writes per writer count")
    args = parser.parse_args()
    details = write_limit.host_details()
    with local_stack() as stack:
        limit = asyncio.run(write_limit.measure(stack.control_plane.kubeconfig, count=args.limit_count))
        write_limit.print_limit(limit)
        out = asyncio.run(run_storms(stack, args, limit))
        # the limit once more with the agent stopped and the storms over: how much it moved
        after = asyncio.run(write_limit.measure(stack.control_plane.kubeconfig, writers=(32,), objects=64,
                                                warmup=200, count=min(args.limit_count, 2000)))
    if out["error"] or out["skipped"]:
        print(f"the agent's log: {KEPT_LOG}")
    print_table(limit, out)
    print(f"limit after the storms (32 writers): {after['writes_per_s']} writes/s")
    result = {"host": details, "limit": limit, "limit_after_storms": after, **out}
    print(f"written to {write_result('storms', result)}")
    # the limit these ratios were taken against, as bench/write_limit.py writes it
    print(f"written to {write_result('write_limit', {'host': details, 'measured_by': 'bench/storms.py', **limit})}")
    if failures(out):
        raise SystemExit("storms that did not end as asked:\n" + "\n".join(failures(out)))


if __name__ == "__main__":
    main()
