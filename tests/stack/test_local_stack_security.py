"""The local stack is not an open door: the admin kubeconfig and every private key are 0600 from
the first byte (whatever the umask), the private libvirtd's sockets are not world-accessible,
and no path reaches a shell: a stack in a directory named with a space, `$(...)` and a quote
starts and works, and no subprocess it starts is handed a shell string."""
import ast
import contextlib
import itertools
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import libvirt
import pytest

from novalet import tls
from novalet.private_files import write_private
from novalet_dev.controlplane import ControlPlane, find_bin_dir, repo_root
from novalet_dev.libvirtd import Libvirtd, LibvirtdError, conf_string

pytestmark = pytest.mark.stack
HOSTILE = "a b $(touch PWNED) `touch PWNED` it's"
SHELLS = {"sh", "bash", "dash", "zsh", "ksh"}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def secrets_of(state: Path) -> list[Path]:
    """Every file of a control-plane state dir that holds a private key."""
    found = [p for p in state.rglob("*") if p.is_file() and (p.suffix == ".key" or p.name.endswith(".kubeconfig"))]
    found += [p for p in state.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()[:65536]
              and p not in found and not p.name.endswith(".log")]
    return found


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def recorded_subprocesses():
    """Every command this process starts (subprocess.run and friends go through Popen)."""
    seen: list[tuple[object, bool]] = []
    real = subprocess.Popen

    class Recording(real):
        def __init__(self, args, *rest, **kwargs):
            seen.append((args, bool(kwargs.get("shell"))))
            super().__init__(args, *rest, **kwargs)

    subprocess.Popen = Recording
    try:
        yield seen
    finally:
        subprocess.Popen = real


def assert_no_shell(seen) -> None:
    assert seen, "no subprocess was recorded"
    for args, shell in seen:
        assert not shell, f"shell=True: {args!r}"
        assert isinstance(args, list | tuple), f"a command line as one string: {args!r}"
        argv = [str(a) for a in args]
        for i, arg in enumerate(argv[:-1]):
            assert not (os.path.basename(arg) in SHELLS and argv[i + 1] == "-c"), f"a shell script: {argv!r}"


# ---- the session's stack ----------------------------------------------------------------------


def test_the_running_stack_keeps_its_secrets_0600(control_plane):
    state = control_plane.state_dir
    assert mode(control_plane.kubeconfig) == 0o600
    assert mode(state / "pki") == 0o700
    found = secrets_of(state)
    names = {p.name for p in found}
    assert {"admin.kubeconfig", "controller-manager.kubeconfig", "ca.key", "admin.key", "apiserver.key",
            "sa.key", "controller-manager.key"} <= names, names
    wide = {str(p): oct(mode(p)) for p in found if mode(p) & 0o077}
    assert not wide, f"private keys readable by others: {wide}"


def test_the_running_libvirtd_is_not_world_accessible(libvirtd):
    sockets = sorted(libvirtd.state_dir.glob("libvirt-*sock*"))
    assert {s.name for s in sockets} >= {"libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock"}
    for sock in sockets:
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert mode(sock) & 0o007 == 0, f"{sock.name} is {oct(mode(sock))}"
        assert os.lstat(sock).st_uid == 0 and os.lstat(sock).st_gid == 0


# ---- secrets are 0600 from the first byte ------------------------------------------------------


def test_private_files_are_0600_whatever_the_umask(tmp_path):
    target = tmp_path / "secret"
    target.write_text("old, world-readable")
    os.chmod(target, 0o666)
    with umask(0o000):
        write_private(target, "key material")
    assert mode(target) == 0o600 and target.read_text() == "key material"
    with umask(0o777):  # a umask that would take every bit: still exactly 0600
        write_private(target, b"again")
    assert mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temporary file left


def test_no_moment_with_a_wider_mode(tmp_path):
    """Watch the directory while keys are written: every file that ever appears is 0600."""
    seen: dict[str, int] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for entry in os.scandir(tmp_path):
                with contextlib.suppress(FileNotFoundError):
                    seen.setdefault(entry.name, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
                    seen[entry.name] |= stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with umask(0o000):
            for i in range(200):
                write_private(tmp_path / f"k{i % 3}", os.urandom(4096))
    finally:
        stop.set()
        watcher.join()
    assert seen and all(m == 0o600 for m in seen.values()), {n: oct(m) for n, m in seen.items()}


def test_the_webhook_key_is_0600(tmp_path):
    with umask(0o000):
        cert, key = tls.self_signed(["127.0.0.1"], tmp_path / "tls")
    assert mode(key) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"CERTIFICATE" in cert.read_bytes()


def test_libvirt_config_strings_are_quoted_or_refused():
    assert conf_string("/a b/$(x)") == '"/a b/$(x)"'
    assert conf_string("/it's") == '"/it\'s"'
    assert conf_string('/say "hi"') == "'/say \"hi\"'"
    with pytest.raises(LibvirtdError):
        conf_string("/both ' and \"")


# ---- no path reaches a shell -------------------------------------------------------------------


def test_no_shell_script_in_the_stacks_code():
    """A static look at novalet_dev/: no shell=True, no [sh, -c, ...], no os.system."""
    root = repo_root()
    offenders = []
    for path in sorted((root / "operator" / "novalet_dev").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "shell" and \
                    not (isinstance(node.value, ast.Constant) and node.value.value is False):
                offenders.append(f"{path.name}:{node.value.lineno} shell=")
            if isinstance(node, ast.Attribute) and node.attr in ("system", "popen") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                offenders.append(f"{path.name}:{node.lineno} os.{node.attr}")
            if isinstance(node, ast.List | ast.Tuple):
                items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                for a, b in itertools.pairwise(items):
                    if a in SHELLS and b == "-c":
                        offenders.append(f"{path.name}:{node.lineno} [{a}, -c, ...]")
    assert not offenders, offenders
    for script in sorted((root / "hack").glob("*.sh")):
        text = script.read_text()
        assert "sh -c" not in text and "bash -c" not in text, script


@pytest.fixture
def hostile_dir():
    """/tmp/<random>/<a name with a space, $(...), backticks and a quote>, reachable by anyone
    (so a refusal below is the socket's own mode, not a closed parent directory)."""
    base = Path(tempfile.mkdtemp(prefix="nv-", dir="/tmp"))
    os.chmod(base, 0o755)
    weird = base / HOSTILE
    weird.mkdir(mode=0o755)
    try:
        yield weird
    finally:
        shutil.rmtree(base, ignore_errors=True)


def connect_as_nobody(path: Path) -> str:
    """Try to connect to a unix socket as uid/gid 65534; returns "connected" or the error."""
    import socket

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            answer = "connected"
        except OSError as error:
            answer = type(error).__name__
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return f.read()


def test_a_stack_in_a_hostile_directory_works_and_runs_no_shell(hostile_dir):
    """The whole local stack (control plane and libvirtd) in a directory whose name a shell
    would split, substitute and unquote: it starts, answers, and nothing ran `$(...)`."""
    cp = ControlPlane(hostile_dir / "kube", bin_dir=find_bin_dir())
    lv = Libvirtd(hostile_dir / "libvirt")
    try:
        with recorded_subprocesses() as seen, umask(0o002):
            lv.start()
            cp.start()
            assert_no_shell(seen)
        conn = libvirt.open(lv.uri)
        try:
            assert conn.getLibVersion() > 0
        finally:
            conn.close()
        assert lv.log_file.exists() and HOSTILE in str(lv.log_file)
        ro = lv.state_dir / "libvirt-sock-ro"
        assert mode(ro) & 0o007 == 0
        assert connect_as_nobody(ro) == "PermissionError"  # the read-only socket, as anyone
        assert connect_as_nobody(lv.socket_path) == "PermissionError"
        result = cp.kubectl("get", "--raw", "/readyz")
        assert result.stdout.strip() == "ok"
        assert mode(cp.kubeconfig) == 0o600
        wide = {str(p): oct(mode(p)) for p in secrets_of(cp.state_dir) if mode(p) & 0o077}
        assert not wide, wide
    finally:
        lv.stop()
        cp.stop()
    pwned = [p for p in (hostile_dir.parent / "PWNED", hostile_dir / "PWNED", Path.cwd() / "PWNED",
                         Path("/PWNED"), Path("/tmp/PWNED")) if p.exists()]
    assert not pwned, f"a shell ran part of the directory's name: {pwned}"
