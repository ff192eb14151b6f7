"""docs/benchmarks.png from bench/results/*.json (matplotlib, Agg backend).

Left: each storm's throughput (instances/s) against the instance count. Middle: the agent's
VirtualInstance writes/s per storm against the count, the apiserver's limit (write_limit in
storms.json) and half of it as lines beside them. Right: spec-patch-to-libvirt latency p50/p99
against the instance count, idle and during the storms (latency.json), if measured.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen
from common import RESULTS

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.png"
LABELS = {"create": "create", "reboot_hard": "hard reboot", "pause": "pause", "delete": "delete"}


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def plot(results: Path = RESULTS, out: Path = OUT) -> Path:
    storms, lat = load(results, "storms"), load(results, "latency")
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    thr, wr, la = axes
    if storms:
        for kind, label in LABELS.items():
            rows = sorted((r for r in storms["storms"] if r["storm"] == kind), key=lambda r: r["instances"])
            if not rows:
                continue
            xs = [r["instances"] for r in rows]
            thr.plot(xs, [r["instances_per_s"] for r in rows], marker="o", label=label)
            wr.plot(xs, [r["instance_writes_per_s"] for r in rows], marker="o", label=label)
        limit = storms["limit"]["writes_per_s"]
        wr.axhline(limit, color="black", linestyle="--", label=f"apiserver limit {limit:g}/s")
        wr.axhline(limit / 2, color="grey", linestyle=":", label="50% of the limit (goal)")
        host = storms.get("host", {})
        fig.suptitle(f"novalet agent, one node, libvirt test driver; {storms['machine']['cpus']} CPUs "
                     f"{host.get('cpu_model', '')}, load average at start {host.get('loadavg_at_start', ['?'])[0]}",
                     fontsize=10)
    for ax, title, ylabel in ((thr, "storm throughput", "instances/s"),
                              (wr, "agent's VirtualInstance writes", "writes/s")):
        ax.set(title=title, xlabel="instances", ylabel=ylabel, xscale="log")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    measured = [r for r in (lat or {}).get("counts", ()) if any((r.get(ph) or {}).get("n") for ph in
                                                               ("idle", "during_create_storm", "during_pause_storm"))]
    if measured:
        rows = sorted(measured, key=lambda r: r["instances"])
        xs = [r["instances"] for r in rows]
        for phase, label, color in (("idle", "idle", "tab:green"), ("during_create_storm", "create storm", "tab:blue"),
                                    ("during_pause_storm", "pause storm", "tab:orange")):
            pts = [(x, r[phase]) for x, r in zip(xs, rows, strict=True) if r.get(phase) and r[phase]["n"]]
            if pts:
                la.plot([x for x, _ in pts], [s["p50_ms"] for _, s in pts], marker="o", color=color,
                        label=f"{label} p50")
                la.plot([x for x, _ in pts], [s["p99_ms"] for _, s in pts], marker="s", linestyle="--",
                        color=color, label=f"{label} p99")
        la.axhline(250, color="black", linestyle=":", label="goal: p99 < 250 ms in the storm")
        la.set(title="spec patch -> libvirt event", xlabel="instances on the node", ylabel="ms", xscale="log",
               yscale="log")
        la.grid(True, alpha=0.3)
        la.legend(fontsize=8)
    else:
        la.set_axis_off()
        la.text(0.5, 0.5, "latency: no completed measurement in\nbench/results/latency.json", ha="center",
                va="center", transform=la.transAxes)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    print(f"written to {plot(args.results, args.out)}")


if __name__ == "__main__":
    main()
