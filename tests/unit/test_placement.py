"""core/placement.py: the scheduler's filters, weighers and its sequence. Pure."""
from hypothesis import given, settings
from hypothesis import strategies as st

from novalet.api.models import Flavor, Resources
from novalet.core.placement import Demand, Host, choose, schedule

TINY = Flavor(vcpus=1, memoryMiB=128)


def host(name: str, vcpus: int = 4, mem: int = 1024, **kw) -> Host:
    kw.setdefault("networks", frozenset({"default"}))
    return Host(name=name, allocatable=Resources(vcpus=vcpus, memoryMiB=mem), **kw)


def used(vcpus: int = 0, mem: int = 0) -> Resources:
    return Resources(vcpus=vcpus, memoryMiB=mem)


def test_each_filter_says_why():
    hdd = {"disk": "hdd"}
    hosts = [host("a", alive=False, labels=hdd), host("b", labels=hdd), host("c", networks=frozenset(), labels=hdd),
             host("d", labels=hdd), host("e", labels=hdd), host("f")]
    demand = Demand(flavor=Flavor(vcpus=2, memoryMiB=512), node_selector=hdd, networks=frozenset({"default"}),
                    image="snap", image_nodes=frozenset({"b", "c", "e", "f"}))
    node, message = choose(demand, hosts, {"b": used(3, 0), "e": used(0, 768)})
    assert node is None
    assert message == (
        "0/6 nodes can take it: a: its agent is not running (Lease expired); b: not enough vCPUs (needs 2, 1 free); "
        "c: no network default; d: image snap is not there; e: not enough memory MiB (needs 512, 256 free); "
        "f: labels do not match nodeSelector disk=hdd")
    assert choose(demand, hosts, {"b": used(3, 0)})[0] == "e"


def test_spread_takes_the_emptiest_pack_the_fullest():
    hosts = [host("a"), host("b"), host("c")]
    load = {"a": used(1, 512), "b": used(1, 128), "c": used(3, 896)}
    assert choose(Demand(flavor=TINY), hosts, load, "spread")[0] == "b"
    assert choose(Demand(flavor=TINY), hosts, load, "pack")[0] == "c"
    assert choose(Demand(flavor=TINY), hosts, {}, "spread") == ("a", "placed on node a (spread)")  # ties: name


def test_twelve_at_once_on_two_hosts_of_five():
    hosts = [host("host-1", vcpus=5, mem=4096), host("host-2", vcpus=5, mem=4096)]
    decisions = schedule(((f"vm-{i}", Demand(flavor=TINY)) for i in range(12)), hosts, {})
    placed = [node for _, node, _ in decisions if node]
    assert sorted(placed) == ["host-1"] * 5 + ["host-2"] * 5
    assert [key for key, node, _ in decisions if node is None] == ["vm-10", "vm-11"]  # the newest wait
    assert decisions[-1][2] == "0/2 nodes can take it: host-1, host-2: not enough vCPUs (needs 1, 0 free)"


def test_many_nodes_with_one_reason_are_counted_not_named():
    hosts = [host(f"gone-{i}", alive=False) for i in range(5)] + [host("full", vcpus=0)]
    node, message = choose(Demand(flavor=TINY), hosts, {})
    assert (node, message) == (None, ("0/6 nodes can take it: full: not enough vCPUs (needs 1, 0 free); "
                                     "5 nodes: its agent is not running (Lease expired)"))


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(96, 2048)), max_size=40),
       st.lists(st.tuples(st.integers(0, 16), st.integers(0, 8192)), min_size=1, max_size=4),
       st.sampled_from(["spread", "pack"]))
def test_no_node_is_ever_given_more_than_it_holds(flavors, sizes, policy):
    hosts = [host(f"h{i}", vcpus=v, mem=m) for i, (v, m) in enumerate(sizes)]
    demands = [(str(i), Demand(flavor=Flavor(vcpus=v, memoryMiB=m))) for i, (v, m) in enumerate(flavors)]
    given_to: dict[str, list[Flavor]] = {}
    for key, node, _ in schedule(demands, hosts, {}, policy):
        if node:
            given_to.setdefault(node, []).append(dict(demands)[key].flavor)
    for h in hosts:
        got = given_to.get(h.name, [])
        assert sum(f.vcpus for f in got) <= h.allocatable.vcpus
        assert sum(f.memoryMiB for f in got) <= h.allocatable.memoryMiB
