"""Every benchmark of issue 9 in one stack and one run, in sequence, so their ratios hold.

Stages, in this order (`--only` / `--skip` pick a subset):
  write_limit  the apiserver's conditional-write limit (bench/write_limit.py)
  storms       create, hard-reboot, pause, delete storms over --counts, agent RSS (bench/storms.py),
               against that limit; the limit once more at the end of the stage
  latency      spec patch -> libvirt event, idle and during storms, per count (bench/latency.py)
  starvation   a hard reboot beside guests ignoring ACPI (bench/starvation.py)
  tiny_guest   create -> ready marker, novalet vs bare libvirt (bench/tiny_guest.py)
  recovery     --recovery-counts instances left in task states by a dead agent (bench/recovery_time.py);
               last, because its instances stay behind (their agent is gone) and every later
               agent would list them
  plot         docs/benchmarks.png from the results (bench/plot.py)
Each stage writes the result file its own script writes (bench/results/<name>.json); this script
also writes results/run_all.json (which stages ran, how long, what stopped them). Every stage
has a timeout (--stage-timeout, and the whole run --deadline): a stage past it is cancelled, its
agent stopped by pid, and the run goes on with the next; at the end every agent the run started
is stopped by pid and the stack (apiserver, etcd, libvirtd and its guests) is torn down.
"""
import argparse
import asyncio
import time
import traceback

import latency
import plot
import recovery_time
import starvation
import storms
import tiny_guest
import write_limit
from common import host_details, local_stack, write_result

STAGES = ("write_limit", "storms", "latency", "starvation", "tiny_guest", "recovery", "plot")


async def run(stack, args, details: dict) -> dict:
    limit: dict | None = None
    summary: dict = {"host": details, "stages": {}}
    deadline = time.monotonic() + args.deadline
    wanted = [s for s in STAGES if (not args.only or s in args.only) and s not in (args.skip or [])]

    async def stage_write_limit() -> None:
        nonlocal limit
        limit = await write_limit.measure(stack.control_plane.kubeconfig, count=args.limit_count)
        write_limit.print_limit(limit)
        write_result("write_limit", {"host": details, "measured_by": "bench/run_all.py", **limit})

    async def stage_storms() -> None:
        nonlocal limit
        if limit is None:
            await stage_write_limit()
        ns = argparse.Namespace(counts=args.counts, storm_timeout=args.storm_timeout, gate_1000=args.gate_1000,
                                deadline=max(60.0, min(args.stage_timeout, deadline - time.monotonic()) - 120))
        out = await storms.run_storms(stack, ns, limit)
        after = await write_limit.measure(stack.control_plane.kubeconfig, writers=(32,), objects=64, warmup=200,
                                          count=min(args.limit_count, 2000))
        storms.print_table(limit, out)
        print(f"limit after the storms (32 writers): {after['writes_per_s']} writes/s", flush=True)
        write_result("storms", {"host": details, "measured_by": "bench/run_all.py", "limit": limit,
                                "limit_after_storms": after, **out})
        if storms.failures(out):
            raise RuntimeError("storms that did not end as asked: " + "; ".join(storms.failures(out)))

    async def stage_latency() -> None:
        out = await latency.measure(stack, args.counts, args.idle_probes, storm_timeout=args.storm_timeout,
                                    deadline_s=max(60.0, min(args.stage_timeout, deadline - time.monotonic()) - 60))
        write_result("latency", {"host": details, "measured_by": "bench/run_all.py", **out})

    async def stage_starvation() -> None:
        out = await starvation.measure(stack, args.guests, args.probes, args.wait)
        write_result("starvation", {"host": details, "measured_by": "bench/run_all.py", **out})

    async def stage_tiny_guest() -> None:
        out = await tiny_guest.measure(stack, args.tiny_runs)
        write_result("tiny_guest", {"host": details, "measured_by": "bench/run_all.py", **out})

    async def stage_recovery() -> None:
        for i, count in enumerate(args.recovery_counts):
            out = await recovery_time.measure(stack, count, runs=1, timeout_s=args.stage_timeout,
                                              first_index=100 + i)
            recovery_time.report(out)
            write_result(recovery_time.result_name(count), {"host": details, "measured_by": "bench/run_all.py",
                                                            **out})

    async def stage_plot() -> None:
        print(f"plot: {plot.plot()}", flush=True)

    stages = {"write_limit": stage_write_limit, "storms": stage_storms, "latency": stage_latency,
              "starvation": stage_starvation, "tiny_guest": stage_tiny_guest, "recovery": stage_recovery,
              "plot": stage_plot}
    for name in wanted:
        left = deadline - time.monotonic()
        if left < 30 and name != "plot":
            summary["stages"][name] = {"skipped": f"past the run's deadline ({args.deadline:g} s)"}
            print(f"== {name}: skipped, past the deadline", flush=True)
            continue
        print(f"== {name}", flush=True)
        started = time.monotonic()
        entry: dict = {}
        try:
            await asyncio.wait_for(stages[name](), timeout=max(30.0, min(args.stage_timeout, left)))
        except TimeoutError:
            entry["error"] = f"stage timed out after {time.monotonic() - started:.0f} s"
        except Exception as failure:  # noqa: BLE001 - the next stages still run
            entry["error"] = f"{type(failure).__name__}: {failure}"
            traceback.print_exc()
        finally:
            stack.stop_agents()  # whatever the stage left running
        entry["seconds"] = round(time.monotonic() - started, 1)
        summary["stages"][name] = entry
        print(f"== {name}: {entry}", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    parser.add_argument("--skip", nargs="+", choices=STAGES, help="skip these stages")
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 300, 1000],
                        help="instance counts of the storms and of the latency benchmark")
    parser.add_argument("--deadline", type=float, default=4800.0, help="seconds for the whole run")
    parser.add_argument("--stage-timeout", type=float, default=1800.0, help="seconds per stage at most")
    parser.add_argument("--storm-timeout", type=float, default=300.0, help="seconds per storm")
    parser.add_argument("--gate-1000", type=float, default=900.0,
                        help="storms of >= 1000 run only if the smaller ones project them under this")
    parser.add_argument("--limit-count", type=int, default=3000, help="timed writes per writer count")
    parser.add_argument("--idle-probes", type=int, default=200, help="latency: sequential probes per count")
    parser.add_argument("--guests", type=int, default=100, help="starvation: guests ignoring ACPI")
    parser.add_argument("--probes", type=int, default=5, help="starvation: hard reboots per phase")
    parser.add_argument("--wait", type=float, default=30.0, help="starvation: the agent's ACPI timeouts, s")
    parser.add_argument("--tiny-runs", type=int, default=5, help="tiny guest: pairs of runs")
    parser.add_argument("--recovery-counts", type=int, nargs="+", default=[1000])
    args = parser.parse_args()
    details = host_details()
    started = time.monotonic()
    with local_stack() as stack:
        summary = asyncio.run(run(stack, args, details))
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["arguments"] = vars(args)
    print(f"written to {write_result('run_all', summary)}")


if __name__ == "__main__":
    main()
