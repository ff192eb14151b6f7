"""Starvation: a hard reboot's latency while many guests ignore a soft reboot or an ACPI stop.

One agent (`novalet run`) on the private libvirtd's QEMU driver (real QEMU processes, domain
type qemu, TCG), the real local apiserver. The guests are diskless (no image): QEMU runs
SeaBIOS, which finds nothing to boot and never answers ACPI (docs/DESIGN.md section 4), so a
soft reboot waits the agent's --soft-reboot-timeout and then escalates to a hard reboot, and a
stop waits --stop-timeout and then destroys. Each guest has the smallest flavor the API takes
(1 vCPU, 96 MiB). How many guests: --guests (default 100), fewer if the machine's memory does
not hold them (measured on the first ten guests' QEMU RSS; the result says so).

The probe: one more diskless instance gets `spec.action` {Reboot, Hard, fresh id} (a JSON
patch). Its latency is from the apiserver's response to the patch to the libvirt events on
the benchmark's own connection to the same libvirtd: STOPPED (the destroy, the first effect of a
hard reboot) and STARTED (booted again: the hard reboot done at libvirt). Side by side, in one
run with the same agent and guests:
- quiet: --probes hard reboots one after the other, with the guests running and nothing asked;
- starved: half the guests asked for a soft reboot and half for a stop (16 requests at a time,
  all at once), then hard reboots of the probe one after the other while the guests wait,
  until --probes are done or the waits are about to end (the timeouts less a margin);
- quiet again after every guest has settled (escalated and rebooted, or destroyed).
The goal (issue 9): the hard reboot's latency grows by no more than a second.
"""
import argparse
import asyncio
import os
import time
from pathlib import Path

import libvirt
from common import (
    LibvirtEvents,
    host_details,
    local_stack,
    stop_process,
    summary_ms,
    write_result,
)
from kubernetes_asyncio import client
from latency import instance_body, wait_until
from storms import Tracker, log_counts, wait_ready
from write_limit import _api

from novalet import GROUP, PLURAL, VERSION

NODE = "starve"
NS = "starvation"
KEPT_LOG = Path("/tmp/novalet-starvation-agent.log")
MEMORY_MIB = 96  # the smallest the API accepts
MERGE, JSON_PATCH = "application/merge-patch+json", "application/json-patch+json"


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def qemu_rss_mib(uuids: set[str]) -> list[float]:
    """VmRSS of the QEMU processes of these domains (found by their -uuid argument)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"-uuid" not in cmd or cmd[cmd.index(b"-uuid") + 1].decode() not in uuids:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024)
        except (OSError, IndexError, ValueError):
            continue
    return out


def running(obj: dict | None) -> bool:
    status = (obj or {}).get("status") or {}
    return status.get("taskState") is None and status.get("vmState") == "active" and bool(status.get("domainUUID"))


async def create_all(custom, tracker: Tracker, names: list[str], timeout_s: float) -> None:
    gate = asyncio.Semaphore(16)

    async def one(name: str) -> None:
        async with gate:
            await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                                         instance_body(name, MEMORY_MIB, node=NODE))

    await asyncio.gather(*(one(n) for n in names if n not in tracker.objects))
    await wait_until(lambda: all(running(tracker.objects.get(n)) for n in names), timeout_s,
                     f"{len(names)} guests running", step=0.2)


class HardProbe:
    def __init__(self, custom, events: LibvirtEvents, tracker: Tracker, timeout_s: float):
        self.custom, self.events, self.tracker, self.timeout_s = custom, events, tracker, timeout_s
        self.serial = 0

    async def once(self, busy) -> dict:
        self.serial += 1
        rid = f"probe-hard-{self.serial}"
        uuid = self.tracker.objects["probe"]["status"]["domainUUID"]
        waiting = busy()
        sent = time.monotonic()
        await self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, "probe",
            [{"op": "add", "path": "/spec/action", "value": {"name": "Reboot", "type": "Hard", "id": rid}}],
            _content_type=JSON_PATCH)
        answered = time.monotonic()
        stopped = await self.events.wait(uuid, libvirt.VIR_DOMAIN_EVENT_STOPPED, sent, self.timeout_s)
        started = await self.events.wait(uuid, libvirt.VIR_DOMAIN_EVENT_STARTED, stopped or sent, self.timeout_s)

        def done() -> bool:
            status = (self.tracker.objects.get("probe") or {}).get("status") or {}
            return status.get("taskState") is None and (status.get("lastAction") or {}).get("id") == rid

        await wait_until(done, self.timeout_s, f"hard reboot {rid} recorded")
        return {"id": rid, "guests_in_a_task_at_patch": waiting,
                "to_stopped_s": None if stopped is None else stopped - answered,
                "to_started_s": None if started is None else started - answered,
                "to_recorded_s": time.monotonic() - answered}


def summarize(rows: list[dict]) -> dict:
    return {"to_stopped": summary_ms([r["to_stopped_s"] for r in rows if r["to_stopped_s"] is not None]),
            "to_started": summary_ms([r["to_started_s"] for r in rows if r["to_started_s"] is not None]),
            "to_recorded": summary_ms([r["to_recorded_s"] for r in rows]),
            "lost": sum(1 for r in rows if r["to_started_s"] is None), "probes": rows}


def show(phase: str, s: dict) -> None:
    print(f"  {phase:<14} {len(s['probes'])} probes: to STOPPED p50 {s['to_stopped']['p50_ms']} ms "
          f"max {s['to_stopped']['max_ms']} ms; to STARTED p50 {s['to_started']['p50_ms']} ms "
          f"max {s['to_started']['max_ms']} ms; recorded p50 {s['to_recorded']['p50_ms']} ms; "
          f"lost {s['lost']}", flush=True)


async def measure(stack, guests: int = 100, probes: int = 5, wait_s: float = 30.0,
                  create_timeout: float = 600.0, probe_timeout: float = 60.0) -> dict:
    """The whole benchmark on a running stack (bench/run_all.py calls this too)."""
    pool = stack.workdir / "pool"
    pool.mkdir(exist_ok=True)
    log = stack.workdir / f"agent-{NODE}.log"
    uri = stack.libvirtd.uri
    events = LibvirtEvents(uri)
    agent = stack.agent(NODE, pool, "--libvirt-uri", uri, "--soft-reboot-timeout", f"{wait_s:g}",
                        "--stop-timeout", f"{wait_s:g}")
    out: dict = {"node": NODE, "libvirt": "QEMU driver of the private libvirtd (real QEMU, TCG)",
                 "guest": f"diskless, 1 vCPU, {MEMORY_MIB} MiB: never answers ACPI",
                 "guests_asked": guests, "soft_reboot_timeout_s": wait_s, "stop_timeout_s": wait_s,
                 "mem_available_mib_at_start": round(mem_available_mib())}
    watching = None
    uuids: set[str] = set()
    try:
        await wait_ready(log, agent)
        async with await _api(stack.control_plane.kubeconfig, 32) as api:
            custom = client.CustomObjectsApi(api)
            stack.control_plane.kubectl("create", "namespace", NS)
            tracker = Tracker(custom, NS)
            watching = asyncio.create_task(tracker.run())
            await asyncio.sleep(0.5)
            started = time.monotonic()
            first = ["probe"] + [f"guest-{i:03d}" for i in range(min(10, guests))]
            await create_all(custom, tracker, first, create_timeout)
            uuids |= {tracker.objects[n]["status"]["domainUUID"] for n in first}
            sample = qemu_rss_mib(uuids)
            per_guest = max(sample) if sample else 250.0
            fits = int((mem_available_mib() - 3072) / (1.3 * per_guest)) + len(first) - 1
            count = max(len(first) - 1, min(guests, fits))
            out.update({"qemu_rss_mib_first_guests": [round(x) for x in sample], "guests": count,
                        "guests_memory_limited": count < guests})
            names = [f"guest-{i:03d}" for i in range(count)]
            await create_all(custom, tracker, names, create_timeout)
            uuids |= {tracker.objects[n]["status"]["domainUUID"] for n in names}
            out["guests_running_after_s"] = round(time.monotonic() - started, 1)
            out["qemu_rss_mib_all_guests"] = round(sum(qemu_rss_mib(uuids)))
            print(f"{count} guests + the probe running after {out['guests_running_after_s']} s "
                  f"(QEMU RSS {out['qemu_rss_mib_all_guests']} MiB in all)", flush=True)
            soft, stop = names[: count // 2], names[count // 2:]
            out.update({"ignoring_soft_reboot": len(soft), "ignoring_stop": len(stop)})

            def busy() -> int:
                return sum(1 for n in names if ((tracker.objects.get(n) or {}).get("status") or {}).get("taskState"))

            probe = HardProbe(custom, events, tracker, probe_timeout)
            out["quiet"] = summarize([await probe.once(busy) for _ in range(probes)])
            show("quiet", out["quiet"])

            gate = asyncio.Semaphore(16)

            async def ask(name: str) -> None:
                async with gate:
                    if name in soft:
                        await custom.patch_namespaced_custom_object(
                            GROUP, VERSION, NS, PLURAL, name,
                            [{"op": "add", "path": "/spec/action",
                              "value": {"name": "Reboot", "type": "Soft", "id": f"soft-{name}"}}],
                            _content_type=JSON_PATCH)
                    else:
                        await custom.patch_namespaced_custom_object(
                            GROUP, VERSION, NS, PLURAL, name, {"spec": {"powerState": "Stopped"}}, _content_type=MERGE)

            asked = time.monotonic()
            await asyncio.gather(*(ask(n) for n in names))
            out["requests_issued_in_s"] = round(time.monotonic() - asked, 2)
            rows = []
            margin = 5.0
            while len(rows) < probes and time.monotonic() - asked < wait_s - margin:
                rows.append(await probe.once(busy))
                rows[-1]["s_after_the_requests"] = round(time.monotonic() - asked, 2)
            out["starved"] = summarize(rows)
            show("starved", out["starved"])

            def settled(name: str) -> bool:
                status = (tracker.objects.get(name) or {}).get("status") or {}
                if status.get("taskState") is not None:
                    return False
                if name in soft:
                    return (status.get("lastAction") or {}).get("id") == f"soft-{name}"
                return status.get("vmState") == "stopped"

            await wait_until(lambda: all(settled(n) for n in names), 3 * wait_s + 300,
                             "the guests settled after the soft reboots and stops", step=0.5)
            out["guests_settled_after_s"] = round(time.monotonic() - asked, 1)
            out["soft_reboot_outcomes"] = sorted({
                f"{(tracker.objects[n]['status'].get('lastAction') or {}).get('name')} "
                f"{(tracker.objects[n]['status'].get('lastAction') or {}).get('result')}" for n in soft})
            out["soft_reboots_escalated"] = sum(
                1 for n in soft if "escalated" in ((tracker.objects[n]["status"].get("lastAction") or {})
                                                   .get("message") or ""))
            out["quiet_after"] = summarize([await probe.once(busy) for _ in range(probes)])
            show("quiet after", out["quiet_after"])
            q, s = out["quiet"]["to_started"]["p50_ms"], out["starved"]["to_started"]["p50_ms"]
            out["starved_minus_quiet_p50_ms"] = None if q is None or s is None else round(s - q, 1)
            smax = out["starved"]["to_started"]["max_ms"]
            out["starved_max_minus_quiet_p50_ms"] = None if q is None or smax is None else round(smax - q, 1)
    except Exception as failure:  # noqa: BLE001 - keep what was measured, say what stopped it
        out["error"] = f"{type(failure).__name__}: {failure}"
        print(f"stopped: {out['error']}", flush=True)
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        stop_process(agent)
        out["agent_exit_code"] = agent.returncode
        out["agent_log"] = log_counts(log)
        out["stops_destroyed_after_the_wait"] = (
            log.read_text(errors="replace").count("ignored ACPI shutdown") if log.exists() else 0)
        remove_domains(events.conn, uuids | domain_uuids_of(events.conn, stack.workdir / NODE))
        events.close()
        if log.exists():
            KEPT_LOG.write_bytes(log.read_bytes())
    return out


def domain_uuids_of(conn, state_dir: Path) -> set[str]:
    """The domains whose instance directories this agent made (also those not yet seen running)."""
    instances = state_dir / "instances"
    return {d.name for d in instances.iterdir()} if instances.exists() else set()


def remove_domains(conn, uuids: set[str]) -> None:
    """Destroy and undefine the benchmark's guests (the agent is stopped: nothing recreates them)."""
    for uuid in uuids:
        try:
            dom = conn.lookupByUUIDString(uuid)
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        except libvirt.libvirtError:
            continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=100, help="guests ignoring ACPI (half soft reboot, half stop)")
    parser.add_argument("--probes", type=int, default=5, help="hard reboots per phase")
    parser.add_argument("--wait", type=float, default=30.0, help="the agent's soft-reboot and stop timeouts, s")
    args = parser.parse_args()
    details = host_details()
    with local_stack() as stack:
        out = asyncio.run(measure(stack, args.guests, args.probes, args.wait))
    print(f"written to {write_result('starvation', {'host': details, **out})}")


if __name__ == "__main__":
    main()
