"""core/catalog.py: which image a name means, where its copy lives, the snapshot quota. Pure."""
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novalet.api.models import VirtualImageSpec, VirtualInstanceStatus
from novalet.core import catalog
from novalet.core.presentation import with_presentation
from novalet.virt.images import IMAGE_NAME_RE, validate_image_name

SHA = "a" * 64
UID = "0f0e0d0c-0b0a-0908-0706-050403020100"


def http_image(sha: str = SHA, kernel: str | None = None, cmdline: str = "") -> VirtualImageSpec:
    spec = {"source": {"http": {"url": "http://127.0.0.1:8080/disk.qcow2", "sha256": sha}}}
    if kernel:
        spec["kernelBoot"] = {"kernel": {"url": "http://127.0.0.1:8080/k", "sha256": kernel}, "cmdline": cmdline}
    return VirtualImageSpec.model_validate(spec)


def snapshot_image(uid: str = UID, action: str = "snap-1", node: str = "n1") -> VirtualImageSpec:
    return VirtualImageSpec.model_validate({"source": {"snapshot": {
        "instanceName": "vm", "instanceUID": uid, "actionId": action, "node": node}}})


MINE, CLUSTER = http_image("b" * 64), http_image("c" * 64)


@pytest.mark.parametrize("namespaced,cluster,preloaded,scope", [
    (MINE, CLUSTER, True, "VirtualImage"),      # the namespace's own first
    (None, CLUSTER, True, "ClusterVirtualImage"),
    (None, None, True, "preloaded"),
    (None, None, False, None),
])
def test_a_name_means_the_namespace_image_then_the_cluster_image_then_a_preloaded_one(
        namespaced, cluster, preloaded, scope):
    resolved = catalog.resolve("img", "team-a", namespaced, cluster, preloaded)
    assert (resolved.scope if resolved else None) == scope
    if scope == "preloaded":
        assert resolved.pool_name == "img"
    elif scope:
        assert resolved.pool_name.startswith("catalog/i-")


def test_not_found_says_where_it_looked():
    assert catalog.not_found("img", "team-a", "n1") == (
        "image img not found: no VirtualImage img in namespace team-a, no ClusterVirtualImage img, and node n1 "
        "has no preloaded image img (kubectl get vimg,cvimg)")


def test_a_copy_is_named_by_its_bytes_not_its_name():
    assert catalog.pool_name(http_image(), None) == catalog.pool_name(http_image(), "team-a")  # same bytes, shared
    assert catalog.pool_name(http_image(), None) != catalog.pool_name(http_image("b" * 64), None)
    assert catalog.pool_name(http_image(kernel=SHA), None) != catalog.pool_name(http_image(), None)
    assert catalog.pool_name(http_image(kernel=SHA, cmdline="quiet"), None) != catalog.pool_name(
        http_image(kernel=SHA), None)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63),
       st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63))
def test_a_snapshot_named_from_another_namespace_is_another_file(mine, theirs):
    """A VirtualImage copying another namespace's snapshot source computes another pool name."""
    same = catalog.pool_name(snapshot_image(), mine) == catalog.pool_name(snapshot_image(), theirs)
    assert same == (mine == theirs)


def test_catalog_names_are_pool_names_no_user_image_name_can_be():
    for name in (catalog.pool_name(http_image(), None), catalog.pool_name(snapshot_image(), "ns"),
                 catalog.snapshot_pool_name("ns", UID, "snap-1")):
        assert validate_image_name(name) == name and "/" in name  # the pool takes it
        assert not IMAGE_NAME_RE.fullmatch(name)  # spec.image's pattern never does
    assert catalog.snapshot_pool_name("ns", UID, "snap-1") == catalog.pool_name(snapshot_image(), "ns")


def test_a_snapshot_lives_on_the_node_that_took_it():
    resolved = catalog.resolve("golden", "ns", snapshot_image(node="n1"), None, False)
    assert catalog.elsewhere(resolved, "n1") is None
    assert "kept on node n1; this instance runs on node n2" in catalog.elsewhere(resolved, "n2")


@pytest.mark.parametrize("count,used,new,refused", [
    (0, 0, 0, None), (1, 0, 0, "1 snapshots, the limit is 1"),
    (0, 900, 100, None), (0, 900, 101, "1001 bytes with this one, the limit is 1000"),
])
def test_snapshot_quota(count, used, new, refused):
    said = catalog.SnapshotQuota(count=1, bytes=1000).refusal("ns", count, used, new)
    assert (said is None) if refused is None else (refused in said), said


def test_progress_is_a_percentage_when_the_size_is_known():
    assert catalog.progress(0, None) is None
    assert [catalog.progress(d, 200) for d in (0, 99, 200, 300)] == ["0%", "49%", "100%", "100%"]


def test_waiting_for_an_image_is_reconciling_not_ready_nor_stalled():
    now = datetime(2026, 12, 5, tzinfo=UTC)
    status = VirtualInstanceStatus(node="n1")
    waiting = with_presentation(catalog.image_condition(status, "img", catalog.DOWNLOADING, "waiting for x", now), now)
    conditions = {c.type: (c.status, c.reason, c.message) for c in waiting.conditions}
    assert conditions["ImageReady"] == ("False", "Downloading", "waiting for x")
    assert conditions["Reconciling"] == ("True", "WaitingForImage", "waiting for x")
    assert conditions["Ready"] == ("False", "WaitingForImage", "waiting for x")
    assert conditions["Stalled"][0] == "False"
    present = catalog.image_condition(waiting, "img", catalog.PRESENT, "image img is on node n1", now)
    assert {c.type: c.status for c in with_presentation(present, now).conditions}["Reconciling"] == "False"
    assert catalog.image_condition(status, "", catalog.PRESENT, "", now) == status  # diskless: no condition
