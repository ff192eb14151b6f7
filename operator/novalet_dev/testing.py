"""pytest fixtures over the real local stack (load with ``pytest_plugins = ["novalet_dev.testing"]``).

Session-scoped: one control plane (``control_plane``) and one private libvirtd (``libvirtd``,
``libvirt_uri``) per test session, in a temporary directory, stopped at session end (its network
namespace, guest network and guests with it); ``guest_netns`` runs commands inside that network
namespace, the only place the guests' network ``default`` is reachable from; the CRDs
from ``crds/`` installed once (``crds``). ``libvirt_hosts(n)`` gives n hypervisor hosts
(novalet_dev.hosts: host-1 is the session libvirtd, the others started on first demand, each with
its own host UUID, network namespace and guest network, stopped at session end). Per test: a fresh ``namespace`` (deleted afterwards) and
a kubernetes_asyncio ``kube_api`` client. A missing prerequisite fails the test with what to do;
these fixtures never skip.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from .controlplane import ControlPlane, ControlPlaneError, find_bin_dir, repo_root
from .hosts import MAX_HOSTS, Host, Hosts
from .libvirtd import Libvirtd, LibvirtdError, domain_type

__all__ = ["control_plane", "crds", "guest_netns", "image_pool", "kube_api", "libvirt_domain_type", "libvirt_hosts",
           "libvirt_uri", "libvirtd", "namespace"]

TINY = "tiny"  # the tiny test guest's image name in `image_pool`


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory) -> Path:
    # short: unix socket paths are limited to 108 bytes
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def control_plane(stack_dir):
    """A running etcd + kube-apiserver + kube-controller-manager: ``.kubeconfig`` (admin),
    ``.server``, ``.bin_dir``, ``.kubectl(...)``."""
    error = None
    try:
        bin_dir = find_bin_dir()
    except ControlPlaneError as e:
        error = (f"control-plane binaries unavailable: {e}\n"
                 "fix: run `hack/build-controlplane.sh` (or `sudo hack/setup.sh`), or set NOVALET_CONTROLPLANE_BIN")
    if error:
        pytest.fail(error, pytrace=False)
    cp = ControlPlane(stack_dir / "kube", bin_dir=bin_dir)
    try:
        cp.start()
    except ControlPlaneError as e:
        cp.stop()
        error = f"control plane failed to start: {e}"
    if error:
        pytest.fail(error, pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def crds(control_plane) -> list[Path]:
    """The CRDs from <repo>/crds/*.yaml, applied server-side and Established (once per session)."""
    root = repo_root()
    crd_dir = Path(os.environ.get("NOVALET_CRD_DIR") or (root / "crds" if root else "crds"))
    error = files = None
    try:
        files = control_plane.apply_crds(crd_dir)
    except ControlPlaneError as e:
        error = f"installing the CRDs from {crd_dir} failed: {e}"
    if error:
        pytest.fail(error, pytrace=False)
    if not files:
        pytest.fail(f"no CRDs in {crd_dir}: generate them with `novalet crd -o crds/novalet.io_virtualinstances.yaml`",
                    pytrace=False)
    return files


@pytest.fixture(scope="session")
def libvirtd(stack_dir):
    """A running private libvirtd (QEMU driver): ``.uri``, ``.restart()``, ``.qemu_pid(name)``."""
    daemon = Libvirtd(stack_dir / "libvirt")
    error = None
    try:
        daemon.start()
    except LibvirtdError as e:
        daemon.stop()
        error = f"private libvirtd failed to start: {e}"
    if error:
        pytest.fail(error, pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop(destroy_domains=True)


@pytest.fixture(scope="session")
def libvirt_hosts(stack_dir, libvirtd):
    """``hosts(n=2)`` -> [Host] for host-1 ... host-n of the session's stack: ``.name``, ``.uri``,
    ``.host_uuid``, ``.network`` (bridge, gateway, subnet), ``.image_pool`` (a directory for
    that host's agent) and ``.libvirtd`` (``exec_in_netns``, ``restart``, ``qemu_pid``, ...).
    host-1 is the session's ``libvirtd``; host-2 ... are started the first time a test asks for
    them (``<stack_dir>/hosts/host-K``) and kept for the session, then stopped with their guests,
    networks and network namespaces."""
    hosts = Hosts(stack_dir)
    extra: dict[int, Host] = {}

    def get(n: int = 2) -> list[Host]:
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"libvirt_hosts: 1 ... {MAX_HOSTS} hosts, not {n}")
        error = None
        for index in range(2, n + 1):
            if index in extra:
                continue
            host = hosts.host(index)
            host.image_pool.mkdir(parents=True, exist_ok=True)
            try:
                host.libvirtd.start()
            except LibvirtdError as e:
                host.libvirtd.stop(destroy_domains=True)
                error = f"the private libvirtd of {host.name} failed to start: {e}"
                break
            extra[index] = host
        if error:
            pytest.fail(error, pytrace=False)
        return [hosts.host(1, libvirtd=libvirtd)] + [extra[i] for i in range(2, n + 1)]

    try:
        yield get
    finally:
        for index in sorted(extra, reverse=True):
            extra[index].libvirtd.stop(destroy_domains=True)


@pytest.fixture(scope="session")
def libvirt_uri(libvirtd) -> str:
    return libvirtd.uri


@pytest.fixture(scope="session")
def guest_netns(libvirtd):
    """``run(*argv, timeout=30, check=False)`` -> CompletedProcess (text, stdout and stderr
    captured): ``argv`` run inside the session libvirtd's network namespace, where the guests'
    bridge (``novalet_dev.libvirtd.BRIDGE``, 192.168.177.1/24) and their DHCP server are.
    ``run.path`` is the namespace's file."""

    def run(*argv: str, timeout: float = 30, check: bool = False):
        return libvirtd.exec_in_netns([str(a) for a in argv], capture_output=True, text=True,
                                      stdin=subprocess.DEVNULL, timeout=timeout, check=check)

    run.path = libvirtd.netns_path  # type: ignore[attr-defined]
    return run


@pytest.fixture(scope="session")
def libvirt_domain_type() -> str:
    """"qemu" (TCG) unless a probe proved KVM boots guests here (see novalet_dev.libvirtd)."""
    return domain_type()


@pytest.fixture
def namespace(control_plane, request) -> str:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-") or "t"
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture
async def kube_api(control_plane):
    """A kubernetes_asyncio ApiClient authenticated as the admin (system:masters)."""
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(control_plane.kubeconfig), client_configuration=cfg)
    async with client.ApiClient(cfg) as api:
        yield api


@pytest.fixture(scope="session")
def image_pool(tmp_path_factory) -> Path:
    """A pool holding the tiny guest image ``tiny`` (kernel + initrd + empty 16 MiB qcow2)."""
    from .guest import GuestBuildError, build_tiny_image

    pool = tmp_path_factory.mktemp("pool")
    try:
        build_tiny_image(pool, TINY)
    except GuestBuildError as e:
        pytest.fail(f"cannot build the tiny test guest: {e}\nfix: install apt, dpkg-deb, qemu-utils and "
                    f"busybox-static (sudo hack/setup.sh) and make sure `apt-get download "
                    f"linux-image-amd64` works (run apt-get update)", pytrace=False)
    return pool
