"""The agent's own authorization decision (core/authorization.py): identity first, then RBAC."""
from datetime import UTC, datetime

import pytest

from novalet.api.models import InstanceLock
from novalet.core.authorization import Asking, admin_check, checks, needs_identity, refusal, secret_check
from novalet.core.vocabulary import Action

A = Action
LOCK = InstanceLock(lockedBy="alice", reason="maintenance", lockedAt=datetime(2026, 1, 1, tzinfo=UTC))


def asking(action=A.RESET_STATE, who="alice", trusted=True, imperative=True, **kw) -> Asking:
    return Asking(action, imperative, who, trusted, "ns", "vm", **kw)


@pytest.mark.parametrize("action", [A.RESET_STATE, A.SET_PASSWORD, A.LOCK, A.UNLOCK])
def test_identity_actions_need_a_requester(action):
    why = refusal(asking(action, who=None, secret="pw"), {})
    assert why.startswith(f"{action.value} needs to know who asked, and spec.action.requestedBy is empty")
    assert "crds/novalet.io_admission-policies.yaml" in why


@pytest.mark.parametrize("action", [A.RESET_STATE, A.SET_PASSWORD, A.LOCK, A.UNLOCK])
def test_a_requester_is_not_trusted_without_the_policy(action):
    why = refusal(asking(action, trusted=False, secret="pw"), {})
    assert "does not vouch for spec.action.requestedBy (alice)" in why
    assert checks(asking(action, trusted=False, secret="pw")) == []  # nothing asked on a claim


@pytest.mark.parametrize("action", [A.REBOOT_HARD, A.REBUILD, A.SNAPSHOT, A.START, A.DELETE])
def test_other_actions_need_nobody(action):
    assert not needs_identity(asking(action, who=None, trusted=False))
    assert refusal(asking(action, who=None, trusted=False), {}) is None


def test_reset_state_asks_rbac_about_the_admin_subresource():
    a = asking(A.RESET_STATE)
    assert checks(a) == [admin_check("ns", "vm")]
    assert admin_check("ns", "vm").describe() == "update virtualinstances/admin (novalet.io) vm in namespace ns"
    assert refusal(a, {admin_check("ns", "vm"): True}) is None
    assert "ResetState is for administrators: RBAC does not allow alice" in refusal(a, {admin_check("ns", "vm"): False})
    assert "could not confirm" in refusal(a, {admin_check("ns", "vm"): None})  # fail closed
    assert "could not confirm" in refusal(a, {})


def test_set_password_asks_whether_the_requester_may_read_the_secret():
    a = asking(A.SET_PASSWORD, secret="pw")
    assert checks(a) == [secret_check("ns", "pw")]
    assert refusal(a, {secret_check("ns", "pw"): True}) is None
    assert refusal(a, {secret_check("ns", "pw"): False}) == (
        "alice may not get Secret pw in namespace ns: SetPassword only uses a Secret its requester may read")


def test_lock_and_unlock_need_only_the_identity_when_not_locked():
    for action in (A.LOCK, A.UNLOCK):
        assert checks(asking(action)) == []
        assert refusal(asking(action), {}) is None


def test_a_locked_instance_takes_imperative_requests_from_its_locker():
    assert checks(asking(A.REBOOT_HARD, lock=LOCK)) == []
    assert refusal(asking(A.UNLOCK, lock=LOCK), {}) is None


def test_others_need_an_administrator_on_a_locked_instance():
    for action in (A.REBOOT_HARD, A.UNLOCK, A.LOCK):
        a = asking(action, who="bob", lock=LOCK)
        assert checks(a) == [admin_check("ns", "vm")]
        assert refusal(a, {admin_check("ns", "vm"): True}) is None
        why = refusal(a, {admin_check("ns", "vm"): False})
        assert why == ("instance ns/vm is locked by alice (reason: maintenance): only alice or an administrator "
                       "may act on it; ask alice to unlock it")
    assert "needs to know who asked" in refusal(asking(A.REBOOT_HARD, who=None, lock=LOCK), {})


def test_declarative_steps_are_left_to_the_apiserver_policy():
    a = asking(A.STOP, who="bob", imperative=False, lock=LOCK)
    assert not needs_identity(a) and refusal(a, {}) is None
