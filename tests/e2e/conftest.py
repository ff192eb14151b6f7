"""Fixtures for end-to-end tests: real apiserver, real libvirtd, agents as OS processes."""
import libvirt
import pytest

from novalet_dev.testing import TINY  # noqa: F401  (re-exported for the tests)

from .harness import Agents, Instances


@pytest.fixture
def agents(control_plane, crds, libvirt_uri, libvirt_domain_type, image_pool, namespace, tmp_path, request):
    fleet = Agents(control_plane.kubeconfig, libvirt_uri, image_pool, tmp_path, namespace, libvirt_domain_type)
    yield fleet
    fleet.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for agent in fleet.started:
            print(f"--- {agent.log}\n{agent.tail(80)}")


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


def pytest_terminal_summary(terminalreporter):
    from .test_crash_recovery import matrix_rows, matrix_table

    rows = matrix_rows(report for reports in terminalreporter.stats.values() for report in reports)
    if rows:
        terminalreporter.write_sep("=", "crash-point matrix")
        terminalreporter.write_line(matrix_table(rows))
