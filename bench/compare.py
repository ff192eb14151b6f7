"""Agent variants side by side in one stack: the same storms (or recovery) for each, alternating.

The machines are shared and their speed drifts by a factor of two within minutes (the
apiserver's limit measured before and after one storm run has moved that much), so a change
to the agent is judged by running it and the agent without it in one stack, one after the
other, in the order A B ... then reversed (ABBA), `--rounds` times, and comparing the pairs.

A variant is NAME=FLAGS: extra `novalet run` flags (`gate8=--write-concurrency 8`), or
NAME=@DIR: the agent of another source tree (`old=@/tmp/old`, a `git worktree` of an older
commit; its `operator/` goes first on the agent's PYTHONPATH). What runs:

- storms: bench/storms.py's create, hard-reboot, pause and delete storms of --count instances
  (each variant's in a namespace of its own), with the agent's time split;
- recovery: bench/recovery_time.py's --count instances in 13 task states, agent start to the
  last instance without a task.

Prints one line per storm or recovery and writes results/compare_<what>.json (rows in the order
they ran, the limit measured first, the variants and the machine).
"""
import argparse
import asyncio
import os
import shlex

import recovery_time
import storms
import write_limit
from common import host_details, local_stack, write_result


def variants(texts: list[str]) -> dict[str, dict[str, str]]:
    """NAME=FLAGS or NAME=@DIR -> the environment the agent of that variant starts with."""
    out = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise SystemExit(f"a variant is NAME=FLAGS or NAME=@DIR, got {text!r}")
        if value.startswith("@"):
            out[name] = {"PYTHONPATH": os.path.join(value[1:], "operator"), "NOVALET_BENCH_AGENT_ARGS": ""}
        else:
            shlex.split(value)  # refuse unbalanced quotes here, not in the agent
            out[name] = {"NOVALET_BENCH_AGENT_ARGS": value}
    return out


def order(names: list[str], rounds: int) -> list[str]:
    """A B C C B A, repeated: every variant runs early and late alike."""
    return [n for _ in range(rounds) for n in (*names, *reversed(names))]


def restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


async def compare(stack, args, envs: dict[str, dict[str, str]]) -> dict:
    limit = await write_limit.measure(stack.control_plane.kubeconfig, writers=(16,), count=args.limit_count)
    write_limit.print_limit(limit)
    rows: list[dict] = []
    saved = {k: os.environ.get(k) for env in envs.values() for k in env}
    try:
        for index, name in enumerate(order(list(envs), args.rounds)):
            restore(saved)  # a variant's environment, and nothing left of the one before
            os.environ.update(envs[name])
            if args.what == "storms":
                run = argparse.Namespace(counts=[args.count + index], storm_timeout=args.storm_timeout,
                                         gate_1000=1e9, deadline=args.storm_timeout * 5)
                out = await storms.run_storms(stack, run, limit)
                if out["error"]:
                    raise RuntimeError(f"{name}: {out['error']}")
                for row in out["storms"]:
                    rows.append({"variant": name, "run": index, **{k: row[k] for k in (
                        "storm", "instances", "seconds", "instances_per_s", "instance_writes_per_instance",
                        "event_writes_per_instance", "share_of_limit", "unexpected_outcomes", "agent_rss_mib_peak",
                        "agent_time")}})
                    print(f"{name:>10} {row['storm']:<12}{row['seconds']:8.2f} s {row['instances_per_s']:7.1f}/s "
                          f"{100 * row['share_of_limit']:6.1f}% of limit", flush=True)
            else:
                out = await recovery_time.run(stack, 300 + index, args.count, args.storm_timeout)
                rows.append({"variant": name, "run": index, "recovery_s": out["seconds_to_last"],
                             "agent_writes": out["agent_writes"], "outcomes": out["outcomes"]})
                print(f"{name:>10} recovery of {args.count}: {out['seconds_to_last']} s", flush=True)
    finally:
        restore(saved)
    return {"limit": limit, "variants": envs, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", nargs="+", help="NAME=FLAGS or NAME=@DIR (two or more)")
    parser.add_argument("--what", choices=("storms", "recovery"), default="storms")
    parser.add_argument("--count", type=int, default=1000, help="instances per storm or recovery")
    parser.add_argument("--rounds", type=int, default=1, help="times the ABBA order runs")
    parser.add_argument("--storm-timeout", type=float, default=300.0, help="seconds per storm or recovery")
    parser.add_argument("--limit-count", type=int, default=1500, help="timed writes of the limit measured first")
    args = parser.parse_args()
    envs = variants(args.variant)
    if len(envs) < 2:
        raise SystemExit("compare needs two variants or more")
    details = host_details()
    with local_stack() as stack:
        out = asyncio.run(compare(stack, args, envs))
    print(f"written to {write_result(f'compare_{args.what}', {'host': details, 'arguments': vars(args), **out})}")


if __name__ == "__main__":
    main()
