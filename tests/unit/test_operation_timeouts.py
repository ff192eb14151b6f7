"""The deadline of each kind of libvirt call an operation makes (Operations._call), with a fake
hypervisor whose calls block: an operation fails cleanly with LibvirtTimeout, a resize's
power-off gets its wait on top, pressing a guest's ACPI button does not, queries have the
shorter deadline."""
import threading
import time

import pytest

from novalet.agent.libvirt_calls import LibvirtCalls
from novalet.agent.operations import LibvirtTimeout, LibvirtTimeouts, OperationError, Operations
from novalet.virt.hypervisor import HypervisorError


@pytest.fixture
def release():
    event = threading.Event()
    yield event
    event.set()


class FakeHypervisor:
    """Blocks in the calls the test names until released."""

    uri = "test:///default"  # Operations' default MigrationEndpoint is this libvirt's URI

    def __init__(self, release: threading.Event, hang: set[str]):
        self.release, self.hang, self.calls = release, hang, []

    def _maybe_hang(self, name: str):
        self.calls.append(name)
        if name in self.hang:
            self.release.wait(10)

    def stop(self, uid, graceful, timeout_s):
        self._maybe_hang("stop")
        return True

    def press_reboot(self, uid):
        self._maybe_hang("press_reboot")
        return 0

    def start(self, uid):
        self._maybe_hang("start")

    def facts(self, uid):
        self._maybe_hang("facts")

    def pause(self, uid):
        raise HypervisorError("pause: domain is shut off")


def operations(hv, **timeouts) -> Operations:
    return Operations(hv, object(), "node-a", soft_reboot_timeout=0.3, stop_timeout=0.3,
                      timeouts=LibvirtTimeouts(**timeouts), calls=LibvirtCalls(threads=2, wait_threads=2))


class Inst:
    class metadata:  # the shape of VirtualInstance.metadata
        uid = "u1"

    class status:
        currentTask = None


async def test_an_operation_fails_cleanly_with_the_deadline_in_the_message(release):
    ops = operations(FakeHypervisor(release, {"start"}), call_s=0.2)
    with pytest.raises(LibvirtTimeout) as caught:
        await ops.op_start(Inst)
    assert isinstance(caught.value, OperationError)  # the task fails like any libvirt error
    assert str(caught.value) == "libvirt did not answer start within 0.2 s"
    assert caught.value.what == "start" and caught.value.timeout_s == 0.2


async def test_a_resize_power_off_gets_its_own_wait_on_top(release):
    ops = operations(FakeHypervisor(release, {"stop"}), call_s=0.2)
    with pytest.raises(LibvirtTimeout) as caught:
        await ops.op_resize_power_off(Inst)
    assert str(caught.value) == "libvirt did not answer stop within 0.5 s"  # call deadline + stop_timeout


async def test_pressing_the_reboot_button_has_no_wait_on_top(release):
    """The soft reboot's wait is the engine's deadline, not a call's: the press itself is an
    ordinary call with an ordinary deadline."""
    ops = operations(FakeHypervisor(release, {"press_reboot"}), call_s=0.2)
    with pytest.raises(LibvirtTimeout) as caught:
        await ops.press("reboot_soft", Inst)
    assert str(caught.value) == "libvirt did not answer press reboot within 0.2 s"


async def test_queries_have_the_shorter_deadline(release):
    ops = operations(FakeHypervisor(release, {"facts"}), call_s=5, query_s=0.1)
    started = time.monotonic()
    with pytest.raises(LibvirtTimeout, match="facts within 0.1 s"):
        await ops._query(ops.hv.facts, "u1")
    assert time.monotonic() - started < 1


async def test_libvirt_errors_stay_operation_errors(release):
    ops = operations(FakeHypervisor(release, set()))
    with pytest.raises(OperationError, match="domain is shut off") as caught:
        await ops.op_pause(Inst)
    assert not isinstance(caught.value, LibvirtTimeout)


def test_the_default_migration_endpoint_is_the_agents_own_libvirt(release):
    assert operations(FakeHypervisor(release, set())).migration.libvirt_uri == "test:///default"


def test_budgets():
    timeouts = LibvirtTimeouts(call_s=120, query_s=30)
    assert timeouts.for_call() == 120 and timeouts.for_call(wait_s=60) == 180
    with pytest.raises(ValueError):
        LibvirtTimeouts(call_s=0)
