"""The local stack's image catalog: a loopback file server and `novalet dev image --name NAME`.

The stack runs ``python -m novalet_dev.fileserver`` (:class:`ImageServer`) as one of its
processes: detached in its own session like the control plane's daemons, serving the regular
files of ``<state>/images-http/`` on ``127.0.0.1`` only, its pid in ``<state>/fileserver.pid``, its
port in ``<state>/fileserver.json`` (kept across restarts while it is free, so the URLs already
published stay valid) and its output in ``<state>/fileserver.log``. `dev up` starts it, `dev
image` starts it when it is not running, `dev down` stops it.

:func:`publish_tiny` puts the tiny guest (:mod:`novalet_dev.guest`) there as ``<name>.qcow2``,
``<name>.kernel`` and ``<name>.initrd`` and creates the ClusterVirtualImage ``<name>`` naming their
URLs and sha256s, with the guest's kernel command line. An image's spec is immutable (its bytes
back instance disks), so publishing never rewrites one: the same spec again is a no-op (no file
and no object is touched), another spec under an existing name is an error that says what
differs and to delete the image first. Files are only replaced after that check, so the bytes a
published image names stay served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .controlplane import ControlPlane, ControlPlaneError, free_port, port_free
from .processes import log_tail, pid_alive, proc_cmdline, stop_group

__all__ = ["ImagePublishError", "ImageServer", "ImageServerError", "Published", "publish_tiny", "tiny_spec"]

KIND = "ClusterVirtualImage"
API_VERSION = "novalet.io/v1alpha1"
RESOURCE = "clustervirtualimages.novalet.io"
MANAGED_BY = {"app.kubernetes.io/managed-by": "novalet-dev"}
MODULE = "novalet_dev.fileserver"
# a ClusterVirtualImage's name is a DNS subdomain; an instance's spec.image is at most 63 characters
CVI_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class ImageServerError(RuntimeError):
    pass


class ImagePublishError(RuntimeError):
    """Publishing refused or failed; the message says why and what to do."""


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    # loopback only: a proxy from the environment must never see these requests
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ImageServer:
    """The stack's loopback file server over ``<state>/images-http/`` (module doc)."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.state_dir = Path(state_dir).absolute()
        self._proc: subprocess.Popen | None = None
        self.port: int | None = None
        try:
            self.port = int(json.loads(self.info_file.read_text())["port"])
        except (OSError, ValueError, KeyError, TypeError):
            pass

    # paths ------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.state_dir / "images-http"

    @property
    def info_file(self) -> Path:
        return self.state_dir / "fileserver.json"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "fileserver.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "fileserver.log"

    @property
    def base(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None

    def url(self, name: str) -> str:
        if not self.port:
            raise ImageServerError("the image server has no port yet: start it first")
        return f"{self.base}/{name}"

    # state ------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        cmd = proc_cmdline(pid)
        # guard against pid reuse: our module, serving our directory
        if MODULE not in cmd or str(self.root) not in cmd:
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid is not None

    def healthy(self, timeout: float = 2.0) -> bool:
        """The server answers on its port (``/`` is never a file: a 404 is the answer)."""
        if not self.port:
            return False
        try:
            with _no_proxy_opener().open(f"{self.base}/", timeout=timeout) as r:
                return r.status < 500
        except urllib.error.HTTPError as e:
            return e.code == 404
        except (OSError, ValueError):
            return False

    def status(self) -> dict:
        pid = self.pid
        return {"name": "image-server", "pid": pid, "running": pid is not None,
                "healthy": pid is not None and self.healthy(), "port": self.port,
                "url": f"{self.base}/" if pid is not None and self.base else None,
                "root": str(self.root), "log": str(self.log_file)}

    # lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> ImageServer:
        """Start the server detached (or attach to the one running); returns once it answers."""
        if self.is_running():
            if self.healthy():
                return self
            self.stop()  # running but not answering: start afresh
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        last = ""
        for attempt in range(3):  # a free port can be taken between probing and binding
            # keep the recorded port when free: the URLs published with it stay valid
            port = self.port if attempt == 0 and self.port and port_free(self.port) else free_port()
            if self._start_once(port, timeout):
                return self
            last = log_tail(self.log_file, 15)
            if "Address already in use" not in last:
                break
        raise ImageServerError(f"the image server (python -m {MODULE}) did not start on 127.0.0.1 "
                               f"(state {self.state_dir}); tail of {self.log_file}:\n{last}")

    def _start_once(self, port: int, timeout: float) -> bool:
        with open(self.log_file, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting the image server\n".encode())
            out.flush()
            proc = subprocess.Popen([sys.executable, "-m", MODULE, "--root", str(self.root), "--port", str(port)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, cwd=self.state_dir)
        self._proc = proc
        self.pid_file.write_text(f"{proc.pid}\n")
        self.port = port
        self.info_file.write_text(json.dumps({"port": port, "root": str(self.root), "url": f"{self.base}/"},
                                             indent=2) + "\n")
        deadline = time.monotonic() + timeout
        while not self.healthy(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop our server (its process group): SIGTERM, then SIGKILL. True if one was running."""
        pid = self.pid
        if pid is not None:
            stop_group(pid, timeout, self._reap)
        self._reap()
        self._proc = None
        self.pid_file.unlink(missing_ok=True)
        return pid is not None

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=0)
            except subprocess.TimeoutExpired:
                pass


# ---------------------------------------------------------------------------------------
# publishing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tiny_spec(name: str, url, sums: dict[str, str], cmdline: str) -> dict:
    """The ClusterVirtualImage spec of the tiny guest published as ``name`` (``url(file)`` -> URL,
    ``sums``: sha256 by suffix ``qcow2``, ``kernel``, ``initrd``)."""
    def http(suffix: str) -> dict:
        return {"url": url(f"{name}.{suffix}"), "sha256": sums[suffix]}

    return {"source": {"http": http("qcow2")},
            "kernelBoot": {"kernel": http("kernel"), "initrd": http("initrd"), "cmdline": cmdline}}


@dataclass(frozen=True)
class Published:
    name: str
    spec: dict
    action: str  # "created" | "unchanged"
    files: dict[str, Path]  # by suffix: the files the server serves


def _flatten(value, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1, "c": None}}`` -> ``{"a.b": 1}`` (an absent field and a null one alike)."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {} if value is None else {prefix: value}


def _normalized(spec: dict | None) -> dict | None:
    from novalet.api.models import ClusterVirtualImageSpec

    try:
        return ClusterVirtualImageSpec.model_validate(spec or {}).model_dump(mode="json")
    except ValueError:
        return None


def _differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(_normalized(old) or old or {}), _flatten(_normalized(new) or new)
    def shown(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(none)"

    return [f"{k}: {shown(a, k)} -> {shown(b, k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _get(cp: ControlPlane, name: str) -> dict | None:
    r = cp.kubectl("get", RESOURCE, name, "-o", "json", "--ignore-not-found", check=False)
    if r.returncode != 0:
        raise ImagePublishError(f"cannot read {KIND} {name}: {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else None


def _same_file(dst: Path, sha256: str, size: int) -> bool:
    try:
        return dst.stat().st_size == size and sha256_file(dst) == sha256
    except FileNotFoundError:
        return False


def _place(src: Path, dst: Path, sha256: str) -> None:
    """``dst`` holds ``src``'s bytes: left alone when it already does, else replaced atomically
    (the temporary name starts with '.', which the server never serves)."""
    from novalet.virt.images import link_or_copy

    if not _same_file(dst, sha256, src.stat().st_size):
        link_or_copy(src, dst)


def check_name(name: str) -> str:
    """A name both a ClusterVirtualImage and an instance's spec.image can carry."""
    if not CVI_NAME_RE.fullmatch(name) or ".." in name:
        raise ImagePublishError(f"invalid image name {name!r}: lowercase letters, digits, '.' and '-', 1-63 "
                                "characters, starting and ending with a letter or digit")
    return name


def publish_tiny(cp: ControlPlane, server: ImageServer, name: str = "tiny") -> Published:
    """Serve the tiny guest from ``server`` and create the ClusterVirtualImage ``name`` (module doc).

    Starts the server when it is not running. Raises :class:`ImagePublishError` (and leaves both
    the files and the object as they were) when ``name`` is taken by another spec."""
    from .guest import GuestBuildError, create_empty_disk, ensure_guest_artifacts

    check_name(name)
    try:
        server.start()
    except ImageServerError as e:
        raise ImagePublishError(str(e)) from e
    try:
        art = ensure_guest_artifacts()
    except GuestBuildError as e:
        raise ImagePublishError(f"cannot build the tiny guest: {e}") from e
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=server.root) as stage:
        disk = Path(stage) / f"{name}.qcow2"
        try:
            create_empty_disk(disk)
        except GuestBuildError as e:
            raise ImagePublishError(f"cannot create the tiny guest's disk: {e}") from e
        sources = {"qcow2": disk, "kernel": art.kernel, "initrd": art.initrd}
        sums = {suffix: sha256_file(path) for suffix, path in sources.items()}
        spec = tiny_spec(name, server.url, sums, art.cmdline)
        files = {suffix: server.root / f"{name}.{suffix}" for suffix in sources}

        existing = _get(cp, name)
        if existing is not None:
            _refuse_unless_same(name, existing, spec)
            for suffix, src in sources.items():  # same spec: same bytes; put back only what is missing
                _place(src, files[suffix], sums[suffix])
            return Published(name, spec, "unchanged", files)
        for suffix, src in sources.items():
            _place(src, files[suffix], sums[suffix])
    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "labels": MANAGED_BY},
            "spec": spec}
    r = cp.kubectl("create", "-f", "-", input=json.dumps(body), check=False)
    if r.returncode != 0:
        if "AlreadyExists" in r.stderr or "already exists" in r.stderr:  # created meanwhile
            existing = _get(cp, name)
            if existing is not None:
                _refuse_unless_same(name, existing, spec)
                return Published(name, spec, "unchanged", files)
        raise ImagePublishError(f"creating {KIND} {name} failed: {r.stderr.strip()}")
    return Published(name, spec, "created", files)


def _refuse_unless_same(name: str, existing: dict, spec: dict) -> None:
    if _normalized(existing.get("spec")) == _normalized(spec):
        return
    diff = _differences(existing.get("spec") or {}, spec)
    hint = ""
    if diff and all(line.split(":", 1)[0].endswith(".url") for line in diff):
        hint = ("only the URLs differ: the image server listens on another port than when it was published "
                "(its old one was taken when it restarted)\n")
    raise ImagePublishError(
        f"{KIND} {name} already exists with another spec, and an image's spec is immutable (its bytes "
        f"back instance disks):\n  " + "\n  ".join(diff) + "\n" + hint +
        f"delete it first (`kubectl delete {KIND.lower()} {name}`, once no instance uses it) or publish "
        f"under another --name")


def stack_control_plane(state_dir: Path) -> ControlPlane:
    """The stack's control plane, running and ready, or ImagePublishError saying to start it."""
    cp = ControlPlane(state_dir / "kube")
    try:
        ready = cp.is_running() and cp.ready()
    except ControlPlaneError:
        ready = False
    if not ready:
        raise ImagePublishError(f"the stack's apiserver is not running (state {state_dir}): run `novalet dev up` "
                                "(or use --pool DIR to preload an agent's pool by hand)")
    return cp
