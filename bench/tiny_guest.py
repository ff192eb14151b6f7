"""A real tiny guest: create to ready marker through novalet, against bare `virsh define` + `start`.

The guest is novalet_dev.guest's tiny guest (Debian's kernel, a busybox initramfs that prints
NOVALET-GUEST-READY on the serial console), under QEMU with TCG, 1 vCPU and 128 MiB, behind the
private libvirtd; one agent (`novalet run`) and the real local apiserver.

- novalet: the clock starts before the VirtualInstance is created (as `kubectl create` would)
  and stops when the marker appears in the instance's serial log (polled every 20 ms). Then the
  instance is deleted and the benchmark waits for it to be gone.
- bare: the domain XML novalet defined (the inactive XML, as `virsh dumpxml --inactive` gives it,
  of the first, warm-up instance), renamed, without its uuid (libvirt makes one) and novalet's
  metadata, its paths pointing to a copy of that instance's directory (kernel, initrd, disk,
  serial log). The clock starts before the define and stops at the same marker after the start;
  then destroy + undefine. virsh is not installed on these machines (Debian's libvirt-clients),
  so the benchmark makes virsh's two calls itself through libvirt's Python binding on a
  connection opened beforehand (`virDomainDefineXML`, `virDomainCreate`): the bare path pays no
  process start, which only makes the baseline faster.
After one warm-up novalet run (which gives the XML), --runs pairs, the order alternating within
each pair; the figures are the medians and their ratio. Goal (issue 9): at most 1.2x.
"""
import argparse
import asyncio
import shutil
import statistics
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
from common import host_details, local_stack, stop_process, write_result
from kubernetes_asyncio import client
from latency import instance_body, wait_until
from storms import Tracker, log_counts, wait_ready
from write_limit import _api

from novalet import GROUP, PLURAL, VERSION
from novalet_dev.guest import GUEST_MEMORY_MIB, MARKER, build_tiny_image

NODE = "tiny"
NS = "tiny-guest"
BARE = "bench-bare-tiny"
KEPT_LOG = Path("/tmp/novalet-tiny-guest-agent.log")


async def wait_marker(path: Path, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if MARKER.encode() in path.read_bytes():
                return time.monotonic()
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{MARKER} not in {path} within {timeout_s:g} s")
        await asyncio.sleep(0.02)


class Runs:
    def __init__(self, stack, custom, tracker: Tracker, timeout_s: float):
        self.stack, self.custom, self.tracker, self.timeout_s = stack, custom, tracker, timeout_s
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors come as exceptions
        self.conn = libvirt.open(stack.libvirtd.uri)
        self.serial = 0
        self.bare_dir = stack.workdir / "bare"
        self.bare_xml = self.bare_dir / "domain.xml"

    async def novalet(self, keep_xml: bool = False) -> float:
        self.serial += 1
        name = f"tiny-{self.serial}"
        started = time.monotonic()
        await self.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                                          instance_body(name, GUEST_MEMORY_MIB, "tiny", NODE))

        def uid() -> str | None:
            return ((self.tracker.objects.get(name) or {}).get("status") or {}).get("domainUUID")

        await wait_until(lambda: uid() is not None, self.timeout_s, f"{name} placed", step=0.02)
        instance_dir = self.stack.workdir / NODE / "instances" / uid()
        ready = await wait_marker(instance_dir / "serial.log", self.timeout_s)
        if keep_xml:
            self.keep(instance_dir)
        await self.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
        await wait_until(lambda: name not in self.tracker.objects, self.timeout_s, f"{name} deleted", step=0.1)
        return ready - started

    def keep(self, instance_dir: Path) -> None:
        """The instance's domain as novalet defined it, moved onto a copy of its directory."""
        xml = self.conn.lookupByUUIDString(instance_dir.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        shutil.copytree(instance_dir, self.bare_dir, ignore=shutil.ignore_patterns("serial.log"))
        root = ET.fromstring(xml.replace(str(instance_dir), str(self.bare_dir)))
        root.find("name").text = BARE
        for tag in ("uuid", "metadata"):
            element = root.find(tag)
            if element is not None:
                root.remove(element)
        self.bare_xml.write_text(ET.tostring(root, encoding="unicode"))

    async def bare(self) -> float:
        (self.bare_dir / "serial.log").unlink(missing_ok=True)
        xml = self.bare_xml.read_text()
        started = time.monotonic()
        dom = await asyncio.to_thread(self.conn.defineXML, xml)
        await asyncio.to_thread(dom.create)
        ready = await wait_marker(self.bare_dir / "serial.log", self.timeout_s)
        await asyncio.to_thread(dom.destroy)
        await asyncio.to_thread(dom.undefine)
        return ready - started

    def remove_bare(self) -> None:
        try:
            dom = self.conn.lookupByName(BARE)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
        self.conn.close()


async def measure(stack, runs: int = 5, timeout_s: float = 120.0) -> dict:
    """The whole benchmark on a running stack (bench/run_all.py calls this too)."""
    pool = stack.workdir / "tiny-pool"
    pool.mkdir(exist_ok=True)
    build_tiny_image(pool, "tiny")
    log = stack.workdir / f"agent-{NODE}.log"
    agent = stack.agent(NODE, pool, "--libvirt-uri", stack.libvirtd.uri)
    out: dict = {"guest": f"novalet_dev.guest tiny guest, TCG, 1 vCPU, {GUEST_MEMORY_MIB} MiB", "pairs": runs,
                 "novalet_s": [], "bare_s": [], "order": []}
    watching = None
    the_runs = None
    try:
        await wait_ready(log, agent)
        async with await _api(stack.control_plane.kubeconfig, 8) as api:
            custom = client.CustomObjectsApi(api)
            stack.control_plane.kubectl("create", "namespace", NS)
            tracker = Tracker(custom, NS)
            watching = asyncio.create_task(tracker.run())
            await asyncio.sleep(0.5)
            the_runs = Runs(stack, custom, tracker, timeout_s)
            out["warmup_novalet_s"] = round(await the_runs.novalet(keep_xml=True), 3)
            for k in range(runs):
                order = ("novalet", "bare") if k % 2 == 0 else ("bare", "novalet")
                out["order"].append("/".join(order))
                for which in order:
                    seconds = await (the_runs.novalet() if which == "novalet" else the_runs.bare())
                    out[f"{which}_s"].append(round(seconds, 3))
                print(f"  pair {k + 1}: novalet {out['novalet_s'][-1]:.2f} s, bare {out['bare_s'][-1]:.2f} s "
                      f"({out['order'][-1]})", flush=True)
    except Exception as failure:  # noqa: BLE001 - keep what was measured, say what stopped it
        out["error"] = f"{type(failure).__name__}: {failure}"
        print(f"stopped: {out['error']}", flush=True)
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        stop_process(agent)
        if the_runs is not None:
            the_runs.remove_bare()
        out["agent_exit_code"] = agent.returncode
        out["agent_log"] = log_counts(log)
        if log.exists():
            KEPT_LOG.write_bytes(log.read_bytes())
    if out["novalet_s"] and out["bare_s"]:
        out["novalet_median_s"] = round(statistics.median(out["novalet_s"]), 3)
        out["bare_median_s"] = round(statistics.median(out["bare_s"]), 3)
        out["ratio"] = round(out["novalet_median_s"] / out["bare_median_s"], 3)
        print(f"create to ready marker, medians of {len(out['novalet_s'])}: novalet {out['novalet_median_s']} s, "
              f"bare libvirt define+start {out['bare_median_s']} s, ratio {out['ratio']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="pairs of runs (novalet, bare)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per wait")
    args = parser.parse_args()
    details = host_details()
    with local_stack() as stack:
        out = asyncio.run(measure(stack, args.runs, args.timeout))
    print(f"written to {write_result('tiny_guest', {'host': details, **out})}")


if __name__ == "__main__":
    main()
