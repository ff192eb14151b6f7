"""Fixtures for end-to-end tests: real apiserver, real libvirtd, agents as OS processes."""
import fcntl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt
import pytest
from kubernetes_asyncio import client

from novalet import GROUP, PLURAL, VERSION
from novalet_dev.processes import cache_root
from novalet_dev.testing import TINY  # noqa: F401  (re-exported for the tests)

from .harness import MERGE, Agents, Instances

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def machine_dirs_lock() -> Iterator[None]:
    """One at a time, across test workers: the kubelet node (novalet_dev.node) and the kind
    cluster (hack/kind-up.sh) both make and remove the machine's /var/lib/cni, and each checks
    that it leaves nothing there."""
    path = cache_root() / "machine-dirs.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
async def agents(control_plane, crds, libvirt_uri, libvirt_domain_type, image_pool, namespace, tmp_path, request,
                 kube_api):
    before = domain_uuids(libvirt_uri)
    fleet = Agents(control_plane.kubeconfig, libvirt_uri, image_pool, tmp_path, namespace, libvirt_domain_type)
    yield fleet
    fleet.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for agent in fleet.started:
            print(f"--- {agent.log}\n{agent.tail(80)}")
    # the test's guests, once its agents are gone: left running, each would take its share of
    # the CPU (a guest under TCG) until the session's libvirtd stops
    remove_domains(libvirt_uri, domain_uuids(libvirt_uri) - before)
    # and its objects' finalizers: no agent is left to take them off, so the namespace would stay
    # Terminating, and kube-controller-manager would sweep every such namespace again and again
    # (about 60 API calls a sweep: the apiserver's load grew with every test of the session)
    await release_instances(kube_api, namespace)


async def release_instances(api, namespace: str) -> None:
    custom = client.CustomObjectsApi(api)
    listed = await custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    for item in listed.get("items", []):
        if item["metadata"].get("finalizers"):
            try:
                await custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, item["metadata"]["name"],
                    {"metadata": {"finalizers": None}}, _content_type=MERGE)
            except client.exceptions.ApiException as error:
                if error.status != 404:
                    raise


def domain_uuids(uri: str) -> set[str]:
    conn = libvirt.open(uri)
    try:
        return {dom.UUIDString() for dom in conn.listAllDomains()}
    finally:
        conn.close()


def remove_domains(uri: str, uuids: set[str]) -> None:
    """Destroy and undefine these domains (the test's own; its files go with its tmp_path)."""
    conn = libvirt.open(uri)
    try:
        for uuid in uuids:
            try:
                dom = conn.lookupByUUIDString(uuid)
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            except libvirt.libvirtError as error:  # gone meanwhile, or libvirtd restarting: report, go on
                print(f"removing domain {uuid} after the test: {error}")
    finally:
        conn.close()


@pytest.fixture
async def instances(kube_api, namespace) -> Instances:
    return Instances(kube_api, namespace)


@pytest.fixture
def libvirt_view(libvirt_uri):
    """libvirt's own view of the domains (a connection of the test's, not the agent's)."""
    from novalet.virt.hypervisor import ensure_event_loop

    ensure_event_loop()  # before opening: this connection can then deliver events to counters
    conn = libvirt.open(libvirt_uri)
    yield conn
    conn.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def novalet_image() -> str:
    """localhost/novalet:dev, built by hack/build-image.sh (cached; loaded into a running node)."""
    built = subprocess.run(["bash", str(ROOT / "hack/build-image.sh")], capture_output=True, text=True,
                           timeout=900, stdin=subprocess.DEVNULL)
    if built.returncode != 0:
        pytest.fail(f"hack/build-image.sh failed ({built.returncode}):\n{built.stderr[-3000:]}", pytrace=False)
    return built.stdout.strip().splitlines()[-1]
