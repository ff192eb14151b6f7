"""A real Kubernetes node beside the local control plane: kubelet, containerd (runc), kube-scheduler.

`novalet dev up --kubelet` joins it, so the Helm chart's pods run for real. The kubelet and the
scheduler are built by hack/build-controlplane.sh at the control plane's pinned version;
containerd and runc are Debian's. Everything of the node lives in a network namespace of its own
(`<state>/node/netns`), as the network rule asks: its address ``NODE_IP`` and the pods' bridge
(``POD_CIDR``, Debian's CNI bridge plugin, no masquerade, no route out) exist only there.

The two directions across the namespace boundary go through unix sockets, never an address:
- pods and the kubelet reach the apiserver at the `kubernetes` Service address (10.0.0.1:443,
  what in-cluster clients use), which is bound in the node's namespace by a forwarder to a unix
  socket, itself forwarded to the apiserver on loopback (socat, twice);
- the apiserver reaches webhooks behind Services and the kubelet through its egress selector:
  HTTP CONNECT over a unix socket to egress.py, which dials inside the node's namespace.
kubelet and containerd run in a private mount namespace (nodeexec.py) inside a cgroup of their
own, so `stop()` ends every process the node started (shims and containers included) and leaves
no mount behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from novalet.private_files import private_dir, write_private

from .controlplane import SERVICE_IP, ControlPlane, _kubeconfig, free_port
from .netns import NetworkNamespace
from .processes import log_tail, pid_alive, stop_group

NODE_IP = "10.250.0.1"
POD_CIDR = "10.250.1.0/24"
POD_GATEWAY = "10.250.1.1"
PAUSE_IMAGE = "localhost/novalet-pause:dev"
CONTAINERD = "/usr/bin/containerd"
RUNC = "/usr/sbin/runc"
CNI_BIN = "/usr/lib/cni"
# what the kubelet sets unless it finds it set (pkg/kubelet/cm: setupKernelTunables)
KUBELET_KERNEL_SETTINGS = {"vm.overcommit_memory": "1", "vm.panic_on_oom": "0", "kernel.panic": "10",
                           "kernel.panic_on_oops": "1", "kernel.keys.root_maxkeys": "1000000",
                           "kernel.keys.root_maxbytes": "25000000"}
# host directories containerd and the CNI plugins use whatever their configuration says: each is
# a private directory of the node's, bound there in the node's mount namespace only
PRIVATE_HOST_DIRS = ("/run/containerd", "/var/lib/cni")
HELPERS = ("kube-scheduler", "apiserver-forward", "service-forward", "egress")


class NodeError(RuntimeError):
    pass


class Node:
    def __init__(self, control_plane: ControlPlane, name: str):
        self.cp, self.name = control_plane, name
        self.dir = control_plane.state_dir / "node"
        self.netns = NetworkNamespace(self.dir / "netns")

    # paths ------------------------------------------------------------------------------
    @property
    def containerd_socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def cgroup_name(self) -> str:
        """The node's cgroup (and the kubelet's cgroupRoot): one per stack."""
        return "novalet-node-" + hashlib.sha256(str(self.dir).encode()).hexdigest()[:8]

    def log_file(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self.pid_file(name).read_text())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def is_running(self) -> bool:
        return self.pid("node") is not None

    # cgroups ------------------------------------------------------------------------------
    @staticmethod
    def _hierarchies() -> list[Path]:
        """The mounted cgroup v1 hierarchies (this machine has no unified one)."""
        found = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                if rest.split()[0] == "cgroup":
                    found.append(Path(fields.split()[4]))
        return found

    def _make_cgroups(self) -> list[str]:
        """The node's cgroup in every hierarchy (cpuset seeded from its parent); the
        cgroup.procs files the node's first process joins (its `system` child)."""
        procs = []
        for root in self._hierarchies():
            for path in (root / self.cgroup_name, root / self.cgroup_name / "system"):
                path.mkdir(exist_ok=True)
                for seed in ("cpuset.cpus", "cpuset.mems"):
                    if (path / seed).exists() and not (path / seed).read_text().strip():
                        (path / seed).write_text((path.parent / seed).read_text())
            procs.append(str(root / self.cgroup_name / "system" / "cgroup.procs"))
        return procs

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for root in self._hierarchies():
            base = root / self.cgroup_name
            if base.is_dir():
                for procs in base.rglob("cgroup.procs"):
                    try:
                        pids.update(int(p) for p in procs.read_text().split())
                    except OSError:
                        pass
        return pids

    def _remove_cgroups(self, timeout: float = 20.0) -> None:
        """End every process left in the node's cgroup (shims, containers), then remove it."""
        deadline = time.monotonic() + timeout
        while (pids := self._cgroup_pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for root in self._hierarchies():
            base = root / self.cgroup_name
            if base.is_dir():  # the deepest first: rmdir of a cgroup with children fails
                for path in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    path.rmdir()
                base.rmdir()

    # configuration ----------------------------------------------------------------------
    def _write_config(self) -> Path:
        d = self.dir
        for sub in ("containerd/root", "containerd/state", "containerd/opt", "cni/net.d", "cni/ipam",
                    "kubelet", "pod-logs", "kernel", *(f"private{p}" for p in PRIVATE_HOST_DIRS)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "containerd.toml").write_text(f'''version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  enable_selinux = false
  # this machine refuses to lower oom_score_adj (the kubelet asks -998 for sandboxes): cap it
  # at containerd's own
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d}/cni/net.d"
''')
        (d / "cni/net.d/10-novalet-pods.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "novalet-pods",
            "plugins": [{"type": "bridge", "bridge": "nvpods0", "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "dataDir": str(d / "cni/ipam"),
                                  "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}}],
        }, indent=2))
        (d / "resolv.conf").write_text("")  # no cluster DNS, and no name server outside
        ca = self.cp.pki.path("ca.crt")
        crt, key = self.cp.pki.client(f"node-{self.name}", f"system:node:{self.name}", "system:nodes")
        service_server = f"https://{SERVICE_IP}:443"
        write_private(d / "kubelet.kubeconfig", _kubeconfig(service_server, ca, crt, key, f"system:node:{self.name}"))
        crt, key = self.cp.pki.client("kube-scheduler", "system:kube-scheduler")
        write_private(d / "scheduler.kubeconfig", _kubeconfig(self.cp.server, ca, crt, key, "system:kube-scheduler"))
        config = d / "kubelet.json"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # this machine mounts cgroup v1 only; 1.37 refuses it unless told
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{self.cgroup_name}",
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ca)}},
            "authorization": {"mode": "Webhook"},
            "address": NODE_IP, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1",
            "resolvConf": str(d / "resolv.conf"), "podLogsDir": str(d / "pod-logs"),
            # a shared development machine: never evict the chart's pods for its disk or memory
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "maxPods": 30, "serializeImagePulls": False, "shutdownGracePeriod": "0s",
        }, indent=2))
        return config

    def _plan(self, kubelet_config: Path) -> Path:
        d = self.dir
        for path in PRIVATE_HOST_DIRS:  # a mount point on the host, removed by stop() if made here
            if not os.path.isdir(path):
                os.makedirs(path)
                (d / f"created{path.replace('/', '-')}").touch()
        plan = d / "plan.json"
        plan.write_text(json.dumps({
            "cgroup_procs": self._make_cgroups(),
            "kernel_settings": KUBELET_KERNEL_SETTINGS, "kernel_settings_dir": str(d / "kernel"),
            "private_dirs": [[str(d / f"private{p}"), p] for p in PRIVATE_HOST_DIRS],
            "containerd": [CONTAINERD, "--config", str(d / "containerd.toml")],
            "containerd_socket": str(self.containerd_socket), "containerd_log": str(self.log_file("containerd")),
            "kubelet": [str(self.cp.bin_dir / "kubelet"), f"--config={kubelet_config}",
                        f"--kubeconfig={d / 'kubelet.kubeconfig'}", f"--root-dir={d / 'kubelet'}",
                        f"--hostname-override={self.name}", f"--node-ip={NODE_IP}", "--v=1"],
            "kubelet_log": str(self.log_file("kubelet")),
        }, indent=2))
        return plan

    # lifecycle ----------------------------------------------------------------------------
    def check_prerequisites(self) -> None:
        missing = [p for p in (CONTAINERD, RUNC, f"{CNI_BIN}/bridge", f"{CNI_BIN}/host-local",
                               shutil.which("socat") or "socat", str(self.cp.bin_dir / "kubelet"),
                               str(self.cp.bin_dir / "kube-scheduler")) if not os.access(p, os.X_OK)]
        if missing:
            raise NodeError(f"the node needs {', '.join(missing)}: run `sudo hack/setup.sh` "
                            "(containerd, runc, socat, containernetworking-plugins; kubelet and "
                            "kube-scheduler from hack/build-controlplane.sh)")
        if os.geteuid() != 0:
            raise NodeError("the node needs root (network and mount namespaces, cgroups)")

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.log_file(name), "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, cwd=self.dir)
        self.pid_file(name).write_text(f"{proc.pid}\n")

    def _ensure_netns(self) -> None:
        self.netns.ensure()
        # on lo (this kernel has no dummy links): local addresses all the same, and the pods
        # reach them through their bridge's gateway
        have = self.netns.run(["ip", "-o", "addr", "show", "dev", "lo"], check=True, capture_output=True,
                              text=True).stdout
        for address in (NODE_IP, SERVICE_IP):
            if f" {address}/32 " not in have:
                self.netns.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True, capture_output=True)

    def start(self, timeout: float = 120.0) -> Node:
        """Join the node (or attach to the running one); returns when it is Ready."""
        if not self.cp.is_running():
            raise NodeError("the control plane does not run: `novalet dev up` first")
        if self.is_running() and all(self.pid(h) for h in HELPERS):
            self.wait_ready(timeout)
            return self
        self.stop()
        self.check_prerequisites()
        private_dir(self.dir)
        self._ensure_netns()
        config = self._write_config()
        here = Path(__file__).resolve().parent
        socat = shutil.which("socat") or "socat"
        self._spawn("kube-scheduler", [
            str(self.cp.bin_dir / "kube-scheduler"), f"--kubeconfig={self.dir / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={self.dir / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={self.dir / 'scheduler.kubeconfig'}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1"])
        api_socket = self.dir / "apiserver.sock"
        port = self.cp.server.rsplit(":", 1)[1]
        self._spawn("apiserver-forward", [socat, f"UNIX-LISTEN:{api_socket},fork,unlink-early,mode=600",
                                          f"TCP:127.0.0.1:{port}"])
        self._spawn("service-forward", self.netns.command([
            socat, f"TCP-LISTEN:443,bind={SERVICE_IP},fork,reuseaddr", f"UNIX-CONNECT:{api_socket}"]))
        self._spawn("egress", self.netns.command([
            sys.executable, "-I", "-S", str(here / "egress.py"), str(self.cp.egress_socket),
            f"{NODE_IP}/32", POD_CIDR]))
        self._spawn("node", self.netns.command([
            "unshare", "--mount", "--propagation", "private", "--",
            sys.executable, "-I", "-S", str(here / "nodeexec.py"), str(self._plan(config))]))
        try:
            self.wait_ready(timeout)
        except NodeError:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name in ("node", *HELPERS):
                if self.pid(name) is None:
                    raise NodeError(self._failure(f"{name} exited"))
            r = self.cp.kubectl("get", "node", self.name, "-o",
                                "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False)
            if r.returncode == 0 and r.stdout.strip() == "True":
                return
            if time.monotonic() > deadline:
                raise NodeError(self._failure(f"node {self.name} not Ready within {timeout:.0f}s"))
            time.sleep(0.5)

    def _failure(self, what: str) -> str:
        parts = [f"{what} (state {self.dir})"]
        for name in ("kubelet", "containerd", "node", *HELPERS):
            tail = log_tail(self.log_file(name), 400).splitlines()
            errors = [line for line in tail if line[:1] == "E" and line[1:5].isdigit() or "level=error" in line]
            if errors or name in ("kubelet", "node"):
                parts += [f"--- {name}: {self.log_file(name)} ---", *(errors or tail)[-8:]]
        return "\n".join(parts)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the kubelet, containerd and every pod, the helpers, and remove the namespace."""
        for name in ("node", *HELPERS):
            pid = self.pid(name)
            if pid is not None:
                stop_group(pid, timeout, lambda p=pid: _reap(p))
            self.pid_file(name).unlink(missing_ok=True)
        self._remove_cgroups()
        if self.netns.exists() and not self.netns.wait_empty(timeout):
            self.netns.unmount()
        for path in PRIVATE_HOST_DIRS:  # the mount points the node made on the host, if empty
            created = self.dir / f"created{path.replace('/', '-')}"
            if created.exists():
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError:  # not empty: something else wrote there; leftovers() says so
                    continue
                created.unlink()

    def leftovers(self) -> list[str]:
        """What of a node would outlive stop(): processes, cgroups, the namespace, mounts, the host
        directories it made. Empty after stop()."""
        found = [f"process {pid} in the node's cgroup" for pid in sorted(self._cgroup_pids())]
        found += [f"cgroup {root / self.cgroup_name}" for root in self._hierarchies()
                  if (root / self.cgroup_name).exists()]
        if self.netns.exists():
            found.append(f"network namespace {self.netns.path}")
        with open("/proc/self/mountinfo") as f:
            found += [f"mount {line.split()[4]}" for line in f if line.split()[4].startswith(str(self.dir))]
        found += [f"directory {path}" for path in PRIVATE_HOST_DIRS
                  if (self.dir / f"created{path.replace('/', '-')}").exists()]
        return found

    def status(self) -> dict:
        return {"name": self.name, "running": self.is_running(), "ip": NODE_IP, "podCIDR": POD_CIDR,
                "pids": {n: self.pid(n) for n in ("node", *HELPERS)}, "state": str(self.dir)}

    # images -------------------------------------------------------------------------------
    def load_images(self, references: list[str] | tuple[str, ...]) -> list[str]:
        for reference in references:
            self.load_image(reference)
        return list(references)

    def load_image(self, reference: str) -> None:
        """Copy an image from podman's storage into the node's containerd (no registry)."""
        ctr = ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io"]
        save = subprocess.Popen(["podman", "--runtime", RUNC, "save", "--format", "docker-archive", reference],
                                stdout=subprocess.PIPE)
        r = subprocess.run([*ctr, "images", "import", "-"], stdin=save.stdout,
                           capture_output=True, text=True, check=False)
        save.stdout.close()
        if save.wait() != 0 or r.returncode != 0:
            raise NodeError(f"loading {reference} into the node failed: {r.stderr.strip()[-500:]}")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


NODE_NAME = "host-1"  # the node is host-1: its agent pod drives host-1's libvirtd
IMAGES = ("localhost/novalet:dev", PAUSE_IMAGE)


def images_in_podman() -> list[str]:
    """Which of the images the node needs hack/build-image.sh has built."""
    return [ref for ref in IMAGES if subprocess.run(["podman", "--runtime", RUNC, "image", "exists", ref],
                                                    capture_output=True, check=False).returncode == 0]


def chart_values(state: Path, host) -> dict:
    """Helm values that point the chart at the local stack: the local image, host-1's libvirtd (its
    socket directory mounted 1:1), and directories of the stack's for the agent's pool and disks."""
    return {
        "image": {"repository": "localhost/novalet", "tag": "dev", "pullPolicy": "Never"},
        "agent": {
            "libvirt": {"uri": host.uri, "socketDir": str(host.libvirtd.socket_path.parent)},
            "imagePool": str(host.image_pool), "stateDir": str(state / "chart-agent"),
            "migration": {"socketDir": str(state / "chart-agent-migration")},
        },
    }
