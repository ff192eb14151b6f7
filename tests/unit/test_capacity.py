"""core/capacity.py: allocatable, what an instance holds, allocated, free. Pure, table-driven."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from novalet.api.models import AllocationRatios, Flavor, Resources
from novalet.core import capacity


def inst(node: str | None, vcpus: int, mem: int, **status) -> dict:
    return {"spec": {"flavor": {"vcpus": vcpus, "memoryMiB": mem}}, "status": {"node": node, **status}}


@pytest.mark.parametrize("cap,ratios,expected", [
    ((4, 1024), (1.0, 1.0), (4, 1024)),
    ((4, 1024), (16.0, 1.5), (64, 1536)),  # Nova's defaults before Stein: cpu 16, ram 1.5
    ((3, 1000), (0.5, 0.333), (1, 333)),
])
def test_allocatable_is_capacity_times_the_ratio(cap, ratios, expected):
    got = capacity.allocatable(Resources(vcpus=cap[0], memoryMiB=cap[1]),
                               AllocationRatios(cpu=ratios[0], memory=ratios[1]))
    assert (got.vcpus, got.memoryMiB) == expected


@pytest.mark.parametrize("body,expected", [
    (inst("n1", 2, 256), (2, 256)),  # placed, not built yet: the spec's flavor
    (inst("n1", 2, 256, flavor={"vcpus": 1, "memoryMiB": 128}), (1, 128)),  # the domain's
    (inst("n1", 1, 128, flavor={"vcpus": 1, "memoryMiB": 128},  # a resize running: the larger of each
          currentTask={"targetFlavor": {"vcpus": 2, "memoryMiB": 96}}), (2, 128)),
    (inst("n1", 1, 512, flavor={"vcpus": 1, "memoryMiB": 512},  # resized, not confirmed: the origin too
          resizedFrom={"flavor": {"vcpus": 4, "memoryMiB": 128}}), (4, 512)),
])
def test_what_an_instance_holds(body, expected):
    got = capacity.held(body)
    assert (got.vcpus, got.memoryMiB) == expected


def test_allocated_counts_only_the_nodes_instances_whatever_their_state():
    bodies = [inst("n1", 1, 128, vmState="stopped"), inst("n1", 2, 256, vmState="error"), inst("n2", 8, 8192),
              inst(None, 4, 4096)]
    used, count = capacity.allocated(bodies, "n1")
    assert (used.vcpus, used.memoryMiB, count) == (3, 384, 2)


@given(st.integers(0, 64), st.integers(0, 65536), st.integers(0, 128), st.integers(0, 131072))
def test_free_is_never_negative_and_fits_agrees(a_cpu, a_mem, u_cpu, u_mem):
    free = capacity.free(Resources(vcpus=a_cpu, memoryMiB=a_mem), Resources(vcpus=u_cpu, memoryMiB=u_mem))
    assert free.vcpus == max(0, a_cpu - u_cpu) and free.memoryMiB == max(0, a_mem - u_mem)
    flavor = Flavor(vcpus=1, memoryMiB=96)
    assert capacity.fits(free, flavor) == (free.vcpus >= 1 and free.memoryMiB >= 96)
