"""A real local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.

The binaries are the ones ``hack/build-controlplane.sh`` builds from the Go module proxy (the
same components controller-runtime's envtest runs). Everything binds to 127.0.0.1 on free ports
and lives in a state directory the caller chooses: a self-made CA, serving and client
certificates, service-account keys, etcd data, kubeconfigs, logs and pid files. RBAC is on; the
admin kubeconfig authenticates as O=system:masters. No kubelet runs, so no pod ever runs.
"""

from __future__ import annotations

import base64
import datetime
import functools
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from novalet.private_files import private_dir, write_private

from .processes import log_tail, pid_alive, proc_cmdline, stop_group

__all__ = ["TOOLS", "ControlPlane", "ControlPlaneError", "find_bin_dir", "repo_root"]

TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"


class ControlPlaneError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------
# binaries


def repo_root() -> Path | None:
    """The source checkout this package runs from (editable install), if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "hack" / "build-controlplane.sh").is_file() and (parent / "pyproject.toml").is_file():
            return parent
    return None


def _missing_tools(bin_dir: Path) -> list[str]:
    return [t for t in TOOLS if not os.access(bin_dir / t, os.X_OK)]


def find_bin_dir() -> Path:
    """The directory holding etcd, kube-apiserver, kube-controller-manager, kubectl and helm.

    $NOVALET_CONTROLPLANE_BIN wins; else ``hack/build-controlplane.sh`` of the checkout prints it
    (building into the user cache on first use, which takes a long while; instant when cached).
    """
    env = os.environ.get("NOVALET_CONTROLPLANE_BIN")
    if env:
        bin_dir = Path(env)
        missing = _missing_tools(bin_dir)
        if missing:
            raise ControlPlaneError(f"NOVALET_CONTROLPLANE_BIN={env} lacks {', '.join(missing)}; "
                                    "unset it to use hack/build-controlplane.sh")
        return bin_dir
    root = repo_root()
    if root is None:
        raise ControlPlaneError("cannot find hack/build-controlplane.sh (novalet is not installed from a "
                                "checkout); set NOVALET_CONTROLPLANE_BIN to a dir with " + ", ".join(TOOLS))
    script = root / "hack" / "build-controlplane.sh"
    try:
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=root, check=False)
    except OSError as e:
        raise ControlPlaneError(f"cannot run {script}: {e}") from e
    if r.returncode != 0:
        raise ControlPlaneError(f"{script} failed (exit {r.returncode}); run it by hand or `sudo hack/setup.sh`:\n"
                                + "\n".join(r.stderr.splitlines()[-20:]))
    lines = r.stdout.strip().splitlines()
    bin_dir = Path(lines[-1]) if lines else Path()
    missing = _missing_tools(bin_dir)
    if missing:
        raise ControlPlaneError(f"{script} printed {bin_dir!s} which lacks {', '.join(missing)}")
    return bin_dir


# ---------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Free to listen on, as the Go servers do (SO_REUSEADDR: connections of a process that
    just exited, in TIME_WAIT, do not block a restart on the same port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# ---------------------------------------------------------------------------------------
# PKI


def _write_private(path: Path, data: bytes) -> None:
    write_private(path, data)  # 0600 from the first byte, whatever the umask


class _PKI:
    """CA, serving and client certificates, service-account key pair (kept across restarts)."""

    def __init__(self, directory: Path):
        self.dir = directory

    def path(self, name: str) -> Path:
        return self.dir / name

    def ensure(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        private_dir(self.dir)
        needed = ["ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "admin.crt", "admin.key",
                  "controller-manager.crt", "controller-manager.key", "sa.key", "sa.pub"]
        if all(self.path(n).exists() for n in needed):
            for key in (n for n in needed if n.endswith(".key")):  # narrow keys of older runs
                os.chmod(self.path(key), 0o600)
            return

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _sign(ca_key, _name("novalet-dev-ca"), ca_key.public_key(), ca=True)
        issue = functools.partial(_issue, self, ca_key, ca)
        issue("apiserver", _name("kube-apiserver"), server=True, sans=[
            x509.DNSName("localhost"), x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"), x509.DNSName("kubernetes.default.svc.cluster.local"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address(SERVICE_IP)),
        ])
        issue("admin", _name("novalet-admin", "system:masters"))
        issue("controller-manager", _name("system:kube-controller-manager"))
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(self.path("sa.key"), sa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        self.path("sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        # the CA last: its presence marks a complete set
        _write_private(self.path("ca.key"), _key_pem(ca_key))
        self.path("ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def client(self, base: str, common_name: str, org: str | None = None) -> tuple[Path, Path]:
        """A client certificate signed by the stack's CA (made once, kept): (crt, key)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        if not (self.path(f"{base}.crt").exists() and self.path(f"{base}.key").exists()):
            ca_key = serialization.load_pem_private_key(self.path("ca.key").read_bytes(), None)
            ca = x509.load_pem_x509_certificate(self.path("ca.crt").read_bytes())
            _issue(self, ca_key, ca, base, _name(common_name, org))
        return self.path(f"{base}.crt"), self.path(f"{base}.key")


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str, org: str | None = None):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _sign(signer, subject, public_key, *, issuer=None, ca: bool = False, server: bool = False, sans=()):
    """A certificate for ``public_key`` signed by ``signer`` (ten years; self-signed when ca)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
         .public_key(public_key).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=3650))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                                      content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False,
                                      encipher_only=False, decipher_only=False), critical=True))
    if ca:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    else:
        b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                    else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                            critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(signer, hashes.SHA256())


def _issue(pki: _PKI, ca_key, ca, base: str, subject, *, server: bool = False, sans=()) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign(ca_key, subject, key.public_key(), issuer=ca.subject, server=server, sans=sans)
    _write_private(pki.path(f"{base}.key"), _key_pem(key))
    pki.path(f"{base}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> str:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "novalet-dev", "cluster": {"server": server,
                                                          "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": "novalet-dev", "context": {"cluster": "novalet-dev", "user": user}}],
        "current-context": "novalet-dev",
        "preferences": {},
    }, indent=2) + "\n"


# ---------------------------------------------------------------------------------------
# processes


COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback, state in ``state_dir``.

    Each process runs in its own new session (process group), logs to ``<state>/<name>.log``
    and has its pid in ``<state>/<name>.pid``, so another ``ControlPlane(state_dir)`` (e.g. a later
    ``novalet dev down``) finds and stops exactly these processes.
    """

    def __init__(self, state_dir: str | os.PathLike, bin_dir: str | os.PathLike | None = None):
        self.state_dir = Path(state_dir).absolute()
        self._bin_dir = Path(bin_dir) if bin_dir else None
        self._procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self._load_info()

    # paths / info -----------------------------------------------------------------------
    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = find_bin_dir()
        return self._bin_dir

    @property
    def known_bin_dir(self) -> Path | None:
        """The bin dir given or recorded in the state dir, without building."""
        return self._bin_dir

    @property
    def pki(self) -> _PKI:
        return _PKI(self.state_dir / "pki")

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (O=system:masters)."""
        return self.state_dir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def ca_file(self) -> Path:
        return self.pki.path("ca.crt")

    @property
    def info_file(self) -> Path:
        return self.state_dir / "controlplane.json"

    def log_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def _load_info(self) -> None:
        try:
            info = json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return
        self.ports = {k: int(v) for k, v in info.get("ports", {}).items()}
        if self._bin_dir is None and info.get("bin_dir"):
            self._bin_dir = Path(info["bin_dir"])

    def _save_info(self) -> None:
        self.info_file.write_text(json.dumps({"ports": self.ports, "bin_dir": str(self.bin_dir),
                                              "server": self.server, "kubeconfig": str(self.kubeconfig)},
                                             indent=2) + "\n")

    def pid(self, name: str) -> int | None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is None:
            return proc.pid
        try:
            pid = int(self.pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        cmd = proc_cmdline(pid)
        # guard against pid reuse: our binary, with our state dir in its arguments
        if not cmd or os.path.basename(cmd[0]) != name or not any(str(self.state_dir) in a for a in cmd):
            return None
        return pid

    def is_running(self) -> bool:
        return any(self.pid(n) is not None for n in COMPONENTS)

    # health -----------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.pki.path("admin.crt")), str(self.pki.path("admin.key")))
        return ctx

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.server + path, context=self._ssl_context(), timeout=timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (OSError, ValueError) as e:
            return 0, str(e)

    def _kcm_healthy(self) -> bool:
        port = self.ports.get("controller-manager")
        if not port:
            return False
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert made by the controller manager
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=2) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def _etcd_healthy(self) -> bool:
        port = self.ports.get("etcd")
        if not port:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def ready(self) -> bool:
        if not self.ports.get("apiserver") or not self.ca_file.exists():
            return False
        code, body = self._get("/readyz")
        if code != 200 or body.strip() != "ok":
            return False
        code, _ = self._get("/api/v1/namespaces/default")
        return code == 200

    def status(self) -> dict:
        comps = {}
        for name in COMPONENTS:
            pid = self.pid(name)
            comps[name] = {"pid": pid, "running": pid is not None, "log": str(self.log_file(name))}
        if comps["etcd"]["running"]:
            comps["etcd"].update(port=self.ports.get("etcd"), healthy=self._etcd_healthy())
        if comps["kube-apiserver"]["running"]:
            comps["kube-apiserver"].update(port=self.ports.get("apiserver"), healthy=self.ready())
        if comps["kube-controller-manager"]["running"]:
            comps["kube-controller-manager"].update(port=self.ports.get("controller-manager"),
                                                    healthy=self._kcm_healthy())
        return {"server": self.server if self.ports.get("apiserver") else None,
                "kubeconfig": str(self.kubeconfig), "bin_dir": str(self._bin_dir or ""), "components": comps}

    # lifecycle --------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        binary = self.bin_dir / name
        log = self.log_file(name)
        with open(log, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n".encode())
            out.flush()
            proc = subprocess.Popen([str(binary), *args], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                    cwd=self.state_dir)
        self._procs[name] = proc
        self.pid_file(name).write_text(f"{proc.pid}\n")
        return proc

    def _wait(self, name: str, check, timeout: float, what: str) -> None:
        proc = self._procs[name]
        deadline = time.monotonic() + timeout
        while not check():
            if proc.poll() is not None:
                raise ControlPlaneError(self._failure(name, f"{name} exited with {proc.returncode}"))
            if time.monotonic() > deadline:
                raise ControlPlaneError(self._failure(name, f"{name} not {what} within {timeout:.0f}s"))
            time.sleep(0.05)

    def _failure(self, name: str, what: str) -> str:
        log = self.log_file(name)
        tail = log_tail(log, 400).splitlines()
        # klog error lines ("E1124 ...") and etcd/zap errors first: the info noise is long
        errors = [line for line in tail if line[:1] == "E" and line[1:5].isdigit()
                  or '"level":"error"' in line or '"level":"fatal"' in line]
        parts = [f"{what} (state {self.state_dir})"]
        if errors:
            parts += [f"--- errors in {log} ---", *errors[-10:]]
        parts += [f"--- tail of {log} ---", *tail[-15:]]
        return "\n".join(parts)

    def start(self, timeout: float = 90.0) -> ControlPlane:
        """Start (or attach to) the control plane; returns when /readyz is ok and `default` exists."""
        if self.is_running():
            if all(self.pid(n) for n in COMPONENTS) and self.ready():
                return self
            raise ControlPlaneError(f"a partial control plane runs on {self.state_dir} "
                                    f"({self.status()['components']}); stop it first")
        missing = _missing_tools(self.bin_dir)
        if missing:
            raise ControlPlaneError(f"{self.bin_dir} lacks {', '.join(missing)}: run hack/build-controlplane.sh")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pki.ensure()
        last: Exception | None = None
        for attempt in range(3):  # a free port can be taken between probing and binding
            try:
                self._start_once(timeout, reuse_ports=attempt == 0)
                return self
            except ControlPlaneError as e:
                self.stop()
                last = e
                if "address already in use" not in str(e):
                    raise
        assert last is not None
        raise last

    @property
    def egress_socket(self) -> Path:
        """Where the apiserver sends its traffic for the cluster (pods, Services, kubelets): an
        HTTP CONNECT proxy in the node's network namespace listens here while a node runs."""
        return self.state_dir / "egress.sock"

    def _egress_config(self) -> Path:
        path = self.state_dir / "egress-selector.json"
        path.write_text(json.dumps({
            "apiVersion": "apiserver.k8s.io/v1beta1", "kind": "EgressSelectorConfiguration",
            "egressSelections": [{"name": "cluster", "connection": {
                "proxyProtocol": "HTTPConnect", "transport": {"uds": {"udsName": str(self.egress_socket)}}}}],
        }))
        return path

    def _start_once(self, timeout: float, reuse_ports: bool = True) -> None:
        deadline = time.monotonic() + timeout
        # keep the previous ports when free, so kubeconfigs copied elsewhere stay valid
        old = self.ports if reuse_ports else {}
        self.ports = {k: old[k] if old.get(k) and port_free(old[k]) else free_port()
                      for k in ("etcd", "etcd-peer", "apiserver", "controller-manager")}
        self._save_info()
        pki = self.pki
        etcd_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        (self.state_dir / "etcd").mkdir(exist_ok=True, mode=0o700)
        self._spawn("etcd", [
            "--name=novalet-dev", f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=novalet-dev={peer_url}", "--initial-cluster-state=new",
            "--unsafe-no-fsync=true", "--log-level=warn",
        ])
        self._wait("etcd", self._etcd_healthy, max(1.0, deadline - time.monotonic()), "healthy")

        self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={self.state_dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.path('apiserver.crt')}", f"--tls-private-key-file={pki.path('apiserver.key')}",
            f"--client-ca-file={pki.path('ca.crt')}",
            # Node: a kubelet (`dev up --kubelet`) reaches only its own pods' objects
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            # webhooks and kubelets behind Services and node addresses are reached through the
            # node's namespace (node.py): the endpoint's address, dialled by the egress proxy on
            # a unix socket; never a ClusterIP, which would route out of the machine
            "--enable-aggregator-routing=true", f"--egress-selector-config-file={self._egress_config()}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki.client('apiserver-kubelet', 'kube-apiserver-kubelet-client', 'system:masters')[0]}",
            f"--kubelet-client-key={pki.path('apiserver-kubelet.key')}",
            f"--service-account-issuer=https://127.0.0.1:{self.ports['apiserver']}",
            f"--service-account-key-file={pki.path('sa.pub')}",
            f"--service-account-signing-key-file={pki.path('sa.key')}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # no endpoints for the kubernetes Service: a loopback advertise address is refused there
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ])
        # kubeconfigs before waiting: they only need the port and the PKI
        write_private(self.kubeconfig, _kubeconfig(self.server, pki.path("ca.crt"), pki.path("admin.crt"),
                                                   pki.path("admin.key"), "novalet-admin"))
        kcm_kubeconfig = self.state_dir / "controller-manager.kubeconfig"
        write_private(kcm_kubeconfig, _kubeconfig(self.server, pki.path("ca.crt"), pki.path("controller-manager.crt"),
                                                  pki.path("controller-manager.key"), "system:kube-controller-manager"))
        self._wait("kube-apiserver", self.ready, max(1.0, deadline - time.monotonic()), "ready")

        self._spawn("kube-controller-manager", [
            f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}", f"--authorization-kubeconfig={kcm_kubeconfig}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.path('sa.key')}",
            f"--root-ca-file={pki.path('ca.crt')}",
            f"--cluster-signing-cert-file={pki.path('ca.crt')}", f"--cluster-signing-key-file={pki.path('ca.key')}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['controller-manager']}",
            f"--cert-dir={self.state_dir / 'controller-manager-certs'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--v=1",
        ])
        self._wait("kube-controller-manager", self._kcm_healthy, max(1.0, deadline - time.monotonic()),
                   "healthy")
        if self.kubectl("get", "crd", "virtualinstances.novalet.io", check=False).returncode == 0:
            self.wait_usable(max(1.0, deadline - time.monotonic()))  # a restart: the policies catch up

    def stop(self, timeout: float = 10.0) -> None:
        """Stop our processes (their process groups): SIGTERM, then SIGKILL after ``timeout``."""
        for name in reversed(COMPONENTS):
            pid = self.pid(name)
            if pid is None:
                self._reap(name)
                self.pid_file(name).unlink(missing_ok=True)
                continue
            stop_group(pid, timeout, lambda name=name: self._reap(name))
            self._reap(name)
            self.pid_file(name).unlink(missing_ok=True)

    def _reap(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None:
            try:
                proc.wait(timeout=0)
            except subprocess.TimeoutExpired:
                pass

    # tools ------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60.0,
                input: str | None = None) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        if check and r.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def apply_crds(self, crd_dir: Path | None = None, wait: float = 30.0) -> list[Path]:
        """``kubectl apply --server-side`` every crds/*.yaml and wait until they are Established."""
        if crd_dir is None:
            root = repo_root()
            if root is None:
                raise ControlPlaneError("no crds/ directory: not running from a checkout")
            crd_dir = root / "crds"
        files = sorted(Path(crd_dir).glob("*.yaml"))
        if not files:
            return []
        args = ["apply", "--server-side", "--force-conflicts", "--field-manager=novalet-dev"]
        for f in files:
            args += ["-f", str(f)]
        self.kubectl(*args)
        crds = [f for f in files if "kind: CustomResourceDefinition" in f.read_text()]
        for attempt in range(5):  # kubectl wait right after a create can read a status not yet written
            r = self.kubectl("wait", "--for=condition=Established", f"--timeout={int(wait)}s",
                             *[a for f in crds for a in ("-f", str(f))], check=attempt == 4)
            if r.returncode == 0:
                break
            time.sleep(0.5)
        self.wait_usable(wait)
        return files

    def wait_usable(self, wait: float = 30.0) -> None:
        """Established is not enough once a MutatingAdmissionPolicy matches the new kind: the
        apiserver answers 503 "Resource kind ... not found" until the CRD's schema reaches the
        policy's type converter (seconds, on a fresh apiserver). Wait for a server-side dry-run
        create of an instance to be admitted."""
        probe = json.dumps({"apiVersion": "novalet.io/v1alpha1", "kind": "VirtualInstance",
                            "metadata": {"name": "probe", "namespace": "default"},
                            "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}}})
        deadline = time.monotonic() + wait
        while True:
            r = self.kubectl("create", "--dry-run=server", "-f", "-", input=probe, check=False)
            if r.returncode == 0 or "ServiceUnavailable" not in r.stderr:
                return  # usable (or refused for a reason of its own: the caller's tests will say)
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"VirtualInstances not usable {wait:.0f}s after the CRD is Established: "
                                        f"{r.stderr.strip()}")
            time.sleep(0.2)
