"""A private libvirtd with the QEMU driver, for development and tests.

Why a mount namespace
---------------------
Run as root, libvirtd uses the *privileged* QEMU driver, whose paths are compiled in and
cannot be moved by configuration: it reads ``/etc/libvirt/qemu.conf`` and keeps domain state in
``/run/libvirt/qemu``, ``/var/lib/libvirt/qemu``, ``/var/cache/libvirt/qemu`` and
``/var/log/libvirt/qemu`` (only the daemon's own config file, pid file, sockets and log output can
be redirected, with ``--config``, ``--pid-file``, ``unix_sock_dir`` and ``log_outputs``). To run
a daemon next to a system libvirtd without reading or clobbering its state, we start libvirtd in a
private mount namespace (``unshare --mount --propagation private``) whose bind mounts put this
daemon's own directories over those five system paths. Nothing is visible outside the namespace;
the client socket lives in the state directory, outside the bind-mounted paths, so clients in the
host namespace reach it through ``qemu+unix:///system?socket=<state>/libvirt-sock``. The
namespace lives as long as any process in it: QEMU guests inherit it and keep it alive across a
libvirtd restart, and a restarted libvirtd gets a new namespace with the same bind mounts, so it
finds the same monitor sockets and pid files and reconnects to the running guests.
(The mount points are created empty on the host when missing: ``mkdir`` is not namespaced.
An empty directory does not disturb a system libvirtd installed later.)

Also inside the namespace, ``/sys/fs/cgroup`` is unmounted (lazily; the host keeps it). With
``cgroup_controllers = [ ]`` libvirt 9.0 starts guests fine, but when a restarted daemon
reconnects to a running guest it insists on finding its cgroup ("At least one cgroup controller
is required") and *kills the guest* (``shutting down, reason=daemon``). With no cgroup file
system mounted, ``virCgroupAvailable()`` is false and libvirt skips cgroups on both paths.

Why a network namespace
-----------------------
Guests need a network with DHCP, and these machines allow no bridge, route, NAT or firewall rule
in their own network namespace. So libvirtd runs in a network namespace of its own as well, and
its network driver builds the guest network there: a libvirt network ``default`` (bridge
``virbr-nv0``, 192.168.177.0/24, DHCP from libvirt's dnsmasq); the namespace's other interfaces
are ``lo`` and the guests' taps on that bridge. Forward mode ``open``: libvirt adds no firewall rule at all and nothing needs one, since
there is no uplink for traffic to leave by; DNS is off, so dnsmasq never looks for an upstream
server. Guest-to-guest traffic crosses the bridge, and processes in the namespace reach guests
through the bridge's address (``exec_in_netns``, ``novalet dev exec -- CMD``).

The namespace is persistent, ``ip netns``-style: ``unshare --net=<state>/netns`` binds it to a
file in the state directory (and brings ``lo`` up), and libvirtd is started by ``nsenter
--net=<that file>``, so a restarted libvirtd joins the same namespace and finds its bridge,
dnsmasq and the guests' tap devices (QEMU and dnsmasq inherit the namespace and outlive
libvirtd, like the mount namespace). Inside the mount namespace sysfs is mounted afresh, so
``/sys/class/net`` shows this namespace's devices, and the copies of other namespace files
(another stack's netns) are unmounted. ``stop()`` removes the namespace when no guest runs any
more: it destroys the networks through libvirt (dnsmasq ends, the bridge goes), ends what is
left of our own processes in it by pid (guests' and dnsmasq's pid files in the private /run),
and unmounts the file; with nothing holding it the kernel frees the namespace and every device
in it. With guests still running (``restart()``, ``dev down --keep-guests``) it stays.

The daemon's sockets are for root only (``unix_sock_*_perms`` 0770/0700, group root): even the
read-only socket, with ``auth_unix_ro = "none"``, shows every guest's definition and state.
No path is ever put into a shell script: the namespace's first process is ``nsexec.py``, which
gets the paths as argv entries and execs libvirtd; paths in libvirtd.conf are quoted for its
parser, and a path it cannot quote is refused.

Each daemon has a libvirt host UUID of its own (``host_uuid`` in libvirtd.conf, made once and
kept in ``<state>/host-uuid``) instead of the machine's SMBIOS one, so several private daemons on
one machine (``novalet dev up --hosts N``, novalet_dev.hosts) are distinct hosts to libvirt, as a
migration between them needs. Each also has its own network namespace and guest network
(``GuestNetwork``: the same name ``default``, another bridge and subnet per host).

Other choices: ``security_driver = "none"``, QEMU runs as root, no QEMU mount namespace
(``namespaces = [ ]``), ``stdio_handler = "file"`` (no virtlogd, whose socket would sit in the
private /run/libvirt), and the Debian build refuses to initialise the QEMU driver unless the user
``libvirt-qemu`` exists, so it is created (``useradd --system``) when missing. libvirtd does not
stop QEMU guests when it exits (that is the job of the separate libvirt-guests service), so
``restart()`` keeps guests running.

Probing QEMU's capabilities takes several seconds on a cold cache; each daemon has its own cache
directory, seeded from (and saved to) a shared copy in the user cache so that starts are fast.
libvirt checks each cached entry against the QEMU binary and re-probes when stale.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

from novalet.virt.kvm import cache_root, domain_type, kvm_probe_file

from .netns import NetworkNamespace, NetworkNamespaceError
from .processes import log_tail, pid_alive, proc_cmdline, stop_group

__all__ = [
    "BRIDGE",
    "DEFAULT_NETWORK",
    "GATEWAY",
    "NETWORK_NAME",
    "NETWORK_XML",
    "GuestNetwork",
    "Libvirtd",
    "LibvirtdError",
    "cache_root",
    "domain_type",
    "kvm_probe_file",
    "record_kvm_probe",
]

# system path -> name of our private directory under the state dir
BIND_MOUNTS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}


# The guest network, built by libvirt's network driver inside the stack's network namespace
# (module docstring). Forward mode "open": no firewall rule anywhere, and nothing to forward to,
# since the namespace has no interface but lo and this bridge (no uplink, no veth to the host).
# Each host of a several-host stack (novalet_dev.hosts) has one of its own, in its own namespace:
# the same name, another bridge and subnet.
NETWORK_NAME = "default"


@dataclass(frozen=True)
class GuestNetwork:
    """A libvirt network with DHCP on a /24: ``<prefix>.1`` the bridge's address, leases from
    ``<prefix>.10``."""

    bridge: str
    prefix: str  # the first three octets, e.g. "192.168.177"
    name: str = NETWORK_NAME

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    @property
    def subnet(self) -> str:
        return f"{self.prefix}.0/24"

    def xml(self) -> str:
        return f"""<network>
  <name>{self.name}</name>
  <forward mode='open'/>
  <bridge name='{self.bridge}' stp='off' delay='0'/>
  <dns enable='no'/>
  <ip address='{self.gateway}' netmask='255.255.255.0'>
    <dhcp>
      <range start='{self.prefix}.10' end='{self.prefix}.254'/>
    </dhcp>
  </ip>
</network>
"""

    def describe(self) -> dict:
        return {"name": self.name, "bridge": self.bridge, "address": f"{self.gateway}/24", "subnet": self.subnet}


DEFAULT_NETWORK = GuestNetwork(bridge="virbr-nv0", prefix="192.168.177")
BRIDGE = DEFAULT_NETWORK.bridge
GATEWAY = DEFAULT_NETWORK.gateway
NETWORK_XML = DEFAULT_NETWORK.xml()


class LibvirtdError(RuntimeError):
    pass


# Not world-accessible: libvirt's Debian default leaves the read-only socket 0777.
SOCKET_GROUP = "root"
SOCKET_PERMS = {"unix_sock_ro_perms": "0770", "unix_sock_rw_perms": "0770", "unix_sock_admin_perms": "0700"}


def conf_string(value: str | os.PathLike) -> str:
    """A string for libvirtd.conf / qemu.conf. Their parser knows no escapes: a string runs to
    the next quote of the kind it began with. A value holding both quote kinds (or a line
    break) cannot be written, and is refused rather than mangled."""
    text = str(value)
    if "\n" in text or "\r" in text or ('"' in text and "'" in text):
        raise LibvirtdError(f"libvirt's configuration cannot hold the path {text!r} (it has both quote "
                            "characters or a line break): use another state directory")
    return f"'{text}'" if '"' in text else f'"{text}"'


def record_kvm_probe(kvm_boots: bool, **detail) -> Path:
    """Record whether a real guest finished booting under KVM on this machine."""
    path = kvm_probe_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"kvm_boots": bool(kvm_boots), "time": time.time(), **detail}))
    tmp.replace(path)
    return path


def ensure_libvirt_qemu_user() -> None:
    """Debian's libvirtd refuses to initialise the QEMU driver without this user."""
    import pwd

    try:
        pwd.getpwnam("libvirt-qemu")
        return
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise LibvirtdError("user libvirt-qemu is missing; create it as root: "
                            "useradd --system --no-create-home --shell /usr/sbin/nologin libvirt-qemu")
    r = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/var/lib/libvirt",
                        "--shell", "/usr/sbin/nologin", "libvirt-qemu"], capture_output=True, text=True, check=False)
    if r.returncode not in (0, 9):  # 9: exists (created concurrently)
        raise LibvirtdError(f"useradd libvirt-qemu failed: {r.stderr.strip()}")


class Libvirtd:
    """A private libvirtd whose whole state lives in ``state_dir``.

    ``start()`` launches it in a new session (its own process group), so it outlives the caller
    when not stopped; the pid is in ``<state_dir>/libvirtd.pid``. ``Libvirtd(state_dir)`` on the
    same directory from another process sees and controls the same daemon.
    """

    def __init__(self, state_dir: str | os.PathLike, *, shared_caps_cache: Path | None = None,
                 log_level: int = 3, network: GuestNetwork = DEFAULT_NETWORK):
        self.state_dir = Path(state_dir).absolute()
        self.network = network
        self.shared_caps_cache = shared_caps_cache or (cache_root() / "libvirt-qemu-capabilities")
        self.log_level = log_level
        self._proc: subprocess.Popen | None = None

    # paths ------------------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.state_dir / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={urllib.parse.quote(str(self.socket_path), safe='/')}"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "libvirtd.pid"

    @property
    def log_file(self) -> Path:
        """The daemon's log, in the directory bind-mounted over /var/log/libvirt: libvirtd.conf
        names it by that path (log_outputs is a space-separated list: a state directory with
        a space in its name could not be named there)."""
        return self.private_dir("/var/log/libvirt") / "libvirtd.log"

    @property
    def stdout_file(self) -> Path:
        return self.state_dir / "libvirtd.out"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "etc" / "libvirtd.conf"

    @property
    def host_uuid_file(self) -> Path:
        return self.state_dir / "host-uuid"

    @property
    def host_uuid(self) -> str | None:
        """This daemon's libvirt host UUID (libvirtd.conf ``host_uuid``; capabilities'
        ``<host><uuid>``): made once, kept in the state dir, so every private libvirtd has one of
        its own (libvirt refuses a migration between two daemons with the same host UUID) and a
        restarted one keeps it. None before the first start."""
        try:
            return str(uuid.UUID(self.host_uuid_file.read_text().strip()))
        except (OSError, ValueError):
            return None

    def _ensure_host_uuid(self) -> str:
        found = self.host_uuid
        if found is None:
            found = str(uuid.uuid4())
            tmp = self.host_uuid_file.with_name(f".host-uuid-{os.getpid()}")
            tmp.write_text(found + "\n")
            tmp.replace(self.host_uuid_file)
        return found

    @property
    def netns_path(self) -> Path:
        """The file the stack's network namespace is bound to (module docstring)."""
        return self.state_dir / "netns"

    def private_dir(self, system_path: str) -> Path:
        return self.state_dir / BIND_MOUNTS[system_path]

    @property
    def qemu_log_dir(self) -> Path:
        """Where each guest's QEMU log (<name>.log) lands."""
        return self.private_dir("/var/log/libvirt") / "qemu"

    @property
    def qemu_run_dir(self) -> Path:
        """Holds <name>.pid for each running guest."""
        return self.private_dir("/run/libvirt") / "qemu"

    def qemu_pid(self, domain_name: str) -> int | None:
        try:
            return int((self.qemu_run_dir / f"{domain_name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    # the network namespace ----------------------------------------------------------------
    @property
    def netns(self) -> NetworkNamespace:
        return NetworkNamespace(self.netns_path)

    def netns_exists(self) -> bool:
        return self.netns.exists()

    def in_netns(self, pid: int) -> bool:
        """Whether process ``pid`` lives in the stack's network namespace."""
        return self.netns.contains(pid)

    def netns_command(self, argv: list[str] | tuple[str, ...]) -> list[str]:
        """``argv`` run inside the stack's network namespace (an argv list; needs root)."""
        return self.netns.command(argv)

    def exec_in_netns(self, argv: list[str] | tuple[str, ...], **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the stack's network namespace, where the guests' bridge is:
        ``subprocess.run`` with ``kwargs`` (check, capture_output, text, timeout, ...)."""
        if not self.netns_exists():
            raise LibvirtdError(f"the stack's network namespace ({self.netns_path}) is not there: "
                                "start the stack (`novalet dev up`)")
        return self.netns.run(argv, **kwargs)

    def _ensure_netns(self) -> None:
        try:
            self.netns.ensure()
        except NetworkNamespaceError as e:
            raise LibvirtdError(str(e)) from e

    def _unmount_netns(self) -> None:
        self.netns.unmount()

    def _own_pids_in_netns(self, kind: str) -> list[int]:
        """Live pids from our pid files (``kind``: "qemu" for guests, "network" for dnsmasq)
        in the private /run/libvirt, that run in our network namespace (so not a reused pid)."""
        pids = []
        for f in sorted((self.private_dir("/run/libvirt") / kind).glob("*.pid")):
            try:
                pid = int(f.read_text().strip())
            except (OSError, ValueError):
                continue
            if pid > 1 and pid_alive(pid) and self.in_netns(pid):
                pids.append(pid)
        return pids

    def _remove_netns(self, *, kill_guests: bool, timeout: float = 10.0) -> None:
        """Take the network namespace down (module docstring), unless guests still run in it
        and ``kill_guests`` is false. Ends only processes of ours, by pid."""
        if not self.netns_exists():
            self.netns_path.unlink(missing_ok=True)  # a stale file (after a reboot)
            return
        guests = self._own_pids_in_netns("qemu")
        if guests and not kill_guests:
            return
        pids = guests + self._own_pids_in_netns("network")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                if self.in_netns(pid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + timeout
            while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.02)
            pids = [p for p in pids if pid_alive(p)]
            if not pids:
                break
        left = self.netns.wait_empty(timeout)
        if left:
            print(f"novalet: processes still in {self.netns_path}: {left}", file=sys.stderr)
        self._unmount_netns()

    def _ensure_network(self) -> None:
        """Define (once), autostart and start the guest network ``default`` (``self.network``)."""
        import libvirt

        name = self.network.name
        conn = self.connect()
        try:
            if name in conn.listNetworks() + conn.listDefinedNetworks():
                net = conn.networkLookupByName(name)
            else:
                net = conn.networkDefineXML(self.network.xml())
            if not net.autostart():
                net.setAutostart(1)
            if not net.isActive():
                try:
                    net.create()
                except libvirt.libvirtError:
                    if not net.isActive():  # not just started by libvirtd's own autostart
                        raise
        except libvirt.libvirtError as e:
            raise LibvirtdError(f"the guest network {name!r} did not start: {e}") from e
        finally:
            conn.close()

    def _destroy_networks_unless_guests(self) -> None:
        """With no guest running, stop every active network through libvirt (its dnsmasq
        ends, its bridge goes), so that the namespace can go too."""
        import libvirt

        try:
            conn = self.connect()
        except libvirt.libvirtError:
            return
        try:
            if conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                return
            for net in conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE):
                try:
                    net.destroy()
                except libvirt.libvirtError as e:
                    print(f"novalet libvirtd: stopping network {net.name()} failed: {e}", file=sys.stderr)
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()

    # state ------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The pid of our running libvirtd, or None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            if self._proc is not None and self._proc.poll() is None:
                return self._proc.pid
            return None
        if not pid_alive(pid):
            return None
        cmd = proc_cmdline(pid)
        # guard against pid reuse: it must be a libvirtd running our config
        if not cmd or "libvirtd" not in os.path.basename(cmd[0]) or str(self.config_file) not in cmd:
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid is not None

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when the daemon answers on its socket."""
        if not self._socket_accepts():
            return False
        import libvirt

        try:
            conn = self.connect()
        except libvirt.libvirtError:
            return False
        try:
            conn.getLibVersion()
            return True
        except libvirt.libvirtError:
            return False
        finally:
            conn.close()

    def connect(self):
        import libvirt

        return libvirt.open(self.uri)

    def _socket_accepts(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect(str(self.socket_path))
            return True
        except OSError:
            return False
        finally:
            s.close()

    # configuration ----------------------------------------------------------------------
    def _write_config(self) -> None:
        for name in BIND_MOUNTS.values():
            (self.state_dir / name).mkdir(parents=True, exist_ok=True)
        host_uuid = self._ensure_host_uuid()
        self.config_file.write_text(
            f"unix_sock_dir = {conf_string(self.state_dir)}\n"
            f"host_uuid = {conf_string(host_uuid)}\n"
            f"unix_sock_group = {conf_string(SOCKET_GROUP)}\n"
            + "".join(f"{key} = {conf_string(mode)}\n" for key, mode in SOCKET_PERMS.items())
            + 'auth_unix_ro = "none"\n'
            'auth_unix_rw = "none"\n'
            f"log_outputs = {conf_string(f'{self.log_level}:file:/var/log/libvirt/{self.log_file.name}')}\n"
        )
        # read by the privileged QEMU driver as /etc/libvirt/qemu.conf inside the namespace
        (self.private_dir("/etc/libvirt") / "qemu.conf").write_text(
            'user = "root"\n'
            'group = "root"\n'
            "dynamic_ownership = 0\n"
            'security_driver = "none"\n'
            "cgroup_controllers = [ ]\n"
            "namespaces = [ ]\n"
            'stdio_handler = "file"\n'
            "remember_owner = 0\n"
        )

    def _caps_dir(self) -> Path:
        return self.private_dir("/var/cache/libvirt") / "qemu" / "capabilities"

    def _seed_caps_cache(self) -> None:
        ours, shared = self._caps_dir(), self.shared_caps_cache
        if (ours.is_dir() and any(ours.iterdir())) or not shared.is_dir():
            return
        ours.mkdir(parents=True, exist_ok=True)
        for f in shared.glob("*.xml"):
            shutil.copy2(f, ours / f.name)

    def _save_caps_cache(self) -> None:
        ours, shared = self._caps_dir(), self.shared_caps_cache
        files = list(ours.glob("*.xml")) if ours.is_dir() else []
        if not files:
            return
        try:
            if shared.is_dir() and {f.name for f in shared.glob("*.xml")} == {f.name for f in files} and all(
                (shared / f.name).stat().st_mtime >= f.stat().st_mtime for f in files
            ):
                return
            shared.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".caps-", dir=shared.parent))
            for f in files:
                shutil.copy2(f, tmp / f.name)
            old = shared.with_name(shared.name + f".old-{os.getpid()}")
            if shared.exists():
                shared.rename(old)
            tmp.rename(shared)
            shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass  # only an optimisation

    # lifecycle --------------------------------------------------------------------------
    def check_prerequisites(self) -> None:
        missing = [t for t in ("libvirtd", "unshare", "nsenter", "mount", "umount", "ip", "dnsmasq")
                   if not shutil.which(t) and not os.path.exists(f"/usr/sbin/{t}")]
        if missing:
            raise LibvirtdError(f"missing {', '.join(missing)}: run `sudo hack/setup.sh` (installs "
                                "libvirt-daemon, libvirt-daemon-driver-qemu, qemu-system-x86, dnsmasq-base, iproute2)")
        if not os.path.exists("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so") \
                and not list(Path("/usr/lib").glob("*/libvirt/connection-driver/libvirt_driver_qemu.so")):
            raise LibvirtdError("libvirt's QEMU driver is missing: run `sudo hack/setup.sh` "
                                "(apt-get install libvirt-daemon-driver-qemu)")
        if not shutil.which("qemu-system-x86_64"):
            raise LibvirtdError("qemu-system-x86_64 is missing: run `sudo hack/setup.sh` "
                                "(apt-get install qemu-system-x86)")
        if os.geteuid() != 0:
            raise LibvirtdError("the private libvirtd needs root (it runs the privileged QEMU driver in "
                                "private mount and network namespaces): run the tests / `novalet dev up` as root "
                                "or via sudo")

    def _command(self) -> list[str]:
        """An argv list from end to end: no shell parses any path (see nsexec.py)."""
        libvirtd = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        mounts = [arg for target, name in BIND_MOUNTS.items() for arg in (str(self.state_dir / name), target)]
        nsexec = str(Path(__file__).with_name("nsexec.py"))
        return [*self.netns_command(["unshare", "--mount", "--propagation", "private", "--",
                                     sys.executable, "-I", "-S", nsexec,
                                     libvirtd, str(self.config_file), str(self.pid_file), *mounts])]

    def start(self, timeout: float = 20.0) -> Libvirtd:
        if self.is_running():
            if self.healthy():
                return self
            raise LibvirtdError(f"a libvirtd (pid {self.pid}) runs on {self.state_dir} but does not answer; "
                                f"log tail:\n{log_tail(self.log_file)}")
        self.check_prerequisites()
        ensure_libvirt_qemu_user()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        for target in BIND_MOUNTS:
            os.makedirs(target, exist_ok=True)  # mount points; empty, see module docstring
        self._seed_caps_cache()
        self._ensure_netns()
        self.pid_file.unlink(missing_ok=True)
        self.socket_path.unlink(missing_ok=True)
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.stdout_file, "ab") as out:
            self._proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise LibvirtdError(self._failure(f"libvirtd exited with {self._proc.returncode}", log_start))
            if self._socket_accepts() and self.healthy():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise LibvirtdError(self._failure(f"libvirtd did not answer within {timeout}s", log_start))
            time.sleep(0.02)
        try:
            self._ensure_network()
        except LibvirtdError as e:
            self.stop()
            raise LibvirtdError(self._failure(str(e), log_start)) from e
        self._save_caps_cache()
        return self

    def _failure(self, what: str, log_start: int = 0) -> str:
        log = log_tail(self.log_file, 20)
        out = log_tail(self.stdout_file, 10)
        return f"{what} (state {self.state_dir})\n--- {self.log_file} ---\n{log}\n--- {self.stdout_file} ---\n{out}"

    def destroy_all_domains(self, undefine: bool = True) -> None:
        """Destroy (and undefine) every domain of this daemon."""
        import libvirt

        conn = self.connect()
        try:
            for dom in conn.listAllDomains():
                try:
                    if dom.isActive():
                        dom.destroy()
                except libvirt.libvirtError:
                    pass
                if undefine:
                    try:
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                                          | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
                    except libvirt.libvirtError:
                        pass
        finally:
            conn.close()

    def stop(self, timeout: float = 10.0, *, destroy_domains: bool = False) -> None:
        """Stop our libvirtd: SIGTERM to its process group, SIGKILL after ``timeout``.

        Guests keep running unless ``destroy_domains`` (QEMU runs in its own session), and so do
        the guest network and the network namespace while they do; with no guest left, the
        network and the namespace go too (module docstring).
        """
        if self.is_running():
            self._save_caps_cache()
        if destroy_domains and self.is_running():
            try:
                self.destroy_all_domains()
            except Exception as e:  # noqa: BLE001 - stopping must go on
                print(f"novalet libvirtd: destroying domains failed: {e}", file=sys.stderr)
        if self.is_running() and self.healthy():
            self._destroy_networks_unless_guests()
        self._stop_daemon(timeout)
        self._remove_netns(kill_guests=destroy_domains, timeout=timeout)

    def _stop_daemon(self, timeout: float) -> None:
        pid = self.pid
        if pid is None:
            self._reap()
            return
        stop_group(pid, timeout, self._reap)
        if self._proc is not None:  # the process we spawned (unshare) may outlive libvirtd briefly
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
            self._proc = None
        self.pid_file.unlink(missing_ok=True)

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=0)
            except subprocess.TimeoutExpired:
                pass

    def restart(self, timeout: float = 20.0) -> Libvirtd:
        """Stop and start on the same state dir; running guests stay alive."""
        self.stop()
        return self.start(timeout=timeout)

    def status(self) -> dict:
        pid = self.pid
        return {"name": "libvirtd", "pid": pid, "running": pid is not None,
                "healthy": pid is not None and self.healthy(), "uri": self.uri,
                "log": str(self.log_file), "netns": str(self.netns_path) if self.netns_exists() else None,
                "network": self.network.describe(), "host_uuid": self.host_uuid}
