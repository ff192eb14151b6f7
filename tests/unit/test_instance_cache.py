"""The store's newest-body cache (kube/instances.py): a reconcile starts from it without a GET,
an older version never replaces a newer one, the watch's echo of an own write is recognised."""
import pytest

from novalet.kube.instances import InstanceStore


def body(rv: str, uid: str = "u1", name: str = "vm") -> dict:
    return {"metadata": {"namespace": "ns", "name": name, "uid": uid, "resourceVersion": rv}}


class NoApi:
    """Any call to the apiserver fails the test: the cache must answer."""

    def __getattr__(self, name):
        raise AssertionError(f"the apiserver was asked ({name})")


@pytest.fixture
def store():
    s = InstanceStore(object())  # never used: NoApi below answers every call
    s.custom = NoApi()
    return s


async def test_a_remembered_body_is_read_without_the_apiserver(store):
    store.remember(body("10"))
    assert (await store.read("ns", "vm"))["metadata"]["resourceVersion"] == "10"


def test_an_older_version_never_replaces_a_newer_one(store):
    store.remember(body("12"))
    store.remember(body("11"))  # a watch event that was in flight when the agent wrote 12
    assert store.seen(body("12")) and not store.seen(body("11"))


def test_a_recreated_object_replaces_the_old_one_whatever_its_version(store):
    store.remember(body("50", uid="old"))
    store.remember(body("7", uid="new"))
    assert store.seen(body("7", uid="new"))


def test_forget_drops_the_body(store):
    store.remember(body("3"))
    store.forget("ns", "vm")
    assert not store.seen(body("3"))


async def test_each_read_is_a_fresh_copy_no_caller_changes_what_another_reads(store):
    store.remember(body("10"))
    first = await store.read("ns", "vm")
    first["metadata"]["resourceVersion"] = "changed by a caller"
    assert (await store.read("ns", "vm"))["metadata"]["resourceVersion"] == "10"
