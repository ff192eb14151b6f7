"""Shared set-up for the benchmarks: a throw-away local stack and an agent process."""
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from novalet_dev.controlplane import ControlPlane, find_bin_dir
from novalet_dev.libvirtd import Libvirtd, domain_type

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Stack:
    workdir: Path
    control_plane: ControlPlane
    libvirtd: Libvirtd

    def agent(self, node: str, pool: Path, *extra: str) -> subprocess.Popen:
        env = {**os.environ, "KUBECONFIG": str(self.control_plane.kubeconfig)}
        log = (self.workdir / f"agent-{node}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "novalet.cli", "run", "--node-name", node, "--libvirt-uri",
             self.libvirtd.uri, "--image-pool", str(pool), "--state-dir", str(self.workdir / node),
             "--domain-type", domain_type(), "--stop-timeout", "5", "--soft-reboot-timeout", "5", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def local_stack() -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="novalet-bench-") as tmp:
        workdir = Path(tmp)
        cp = ControlPlane(workdir / "kube", bin_dir=find_bin_dir())
        lv = Libvirtd(workdir / "libvirt")
        cp.start()
        try:
            cp.apply_crds()
            lv.start()
            try:
                yield Stack(workdir, cp, lv)
            finally:
                lv.stop(destroy_domains=True)
        finally:
            cp.stop()


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "domain_type": domain_type()}


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path
