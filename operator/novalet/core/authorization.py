"""Who may ask for what, decided again by the agent: pure.

The apiserver decides first (the admission policies of api/policies.py, with its own
authorizer). The agent trusts a requester only as far as the apiserver vouches for it: the
`spec.action.requestedBy` the policy `novalet-requests` verified, and only while that policy
is in force. Before it acts on an identity it asks the apiserver again (SubjectAccessReviews,
kube/access.py): RBAC may have changed since admission, or the policies were absent then.

This module names the questions (`checks`) and turns the answers into a refusal (`refusal`);
it talks to nothing.
"""
from dataclasses import dataclass

from .. import GROUP, PLURAL
from ..api.models import InstanceLock
from .vocabulary import Action

A = Action

# Actions whose authorization depends on who asks: without a vouched-for requester they are refused.
IDENTITY_ACTIONS = frozenset({A.RESET_STATE, A.MIGRATE, A.EVACUATE, A.SET_PASSWORD, A.LOCK, A.UNLOCK})
# Actions for administrators only (Nova's default policy): RBAC `update` on virtualinstances/admin.
ADMIN_ACTIONS = frozenset({A.RESET_STATE, A.MIGRATE, A.EVACUATE})

POLICIES_HINT = ("install the admission policies (kubectl apply --server-side -f "
                 "crds/novalet.io_admission-policies.yaml, or the Helm chart) and request again with a new id")


@dataclass(frozen=True)
class Check:
    """One question for the apiserver's authorizer: may the requester `verb` this?"""

    verb: str
    resource: str
    group: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    def describe(self) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        group = f" ({self.group})" if self.group else ""
        return f"{self.verb} {what}{group} {self.name} in namespace {self.namespace}".replace("  ", " ")


def admin_check(namespace: str, name: str) -> Check:
    """"Administrator" means: RBAC allows `update` on the pseudo-subresource virtualinstances/admin."""
    return Check("update", PLURAL, GROUP, "admin", namespace, name)


def secret_check(namespace: str, secret: str) -> Check:
    return Check("get", "secrets", "", "", namespace, secret)


@dataclass(frozen=True)
class Asking:
    """A request as the agent sees it, with what it knows of who asked."""

    action: Action
    imperative: bool
    requested_by: str | None  # spec.action.requestedBy (imperative) or the spec annotation
    trusted: bool  # the apiserver's policy that verifies requestedBy is in force
    namespace: str
    name: str
    secret: str | None = None  # SetPassword's secretRef.name
    lock: InstanceLock | None = None


def needs_identity(asking: Asking) -> bool:
    locked_out = asking.imperative and asking.lock is not None and asking.requested_by != asking.lock.lockedBy
    return asking.action in IDENTITY_ACTIONS or locked_out


def checks(asking: Asking) -> list[Check]:
    """The authorizer's answers the decision needs (none when it is decided without)."""
    if not needs_identity(asking) or not asking.requested_by or not asking.trusted:
        return []
    wanted = []
    locked_out = asking.lock is not None and asking.requested_by != asking.lock.lockedBy
    if asking.action in ADMIN_ACTIONS or (asking.imperative and locked_out):
        wanted.append(admin_check(asking.namespace, asking.name))
    if asking.action == A.SET_PASSWORD and asking.secret:
        wanted.append(secret_check(asking.namespace, asking.secret))
    return wanted


def refusal(asking: Asking, answers: dict[Check, bool | None]) -> str | None:
    """None to go ahead, else why not (for lastAction, result Rejected). `answers[check]`:
    True/False from the authorizer, None when the review could not be made (refused: fail closed)."""
    if not needs_identity(asking):
        return None
    what = asking.action.value
    if not asking.requested_by:
        return (f"{what} needs to know who asked, and spec.action.requestedBy is empty: the apiserver's "
                f"admission policies record it; {POLICIES_HINT}")
    if not asking.trusted:
        return (f"{what} needs to know who asked, and the apiserver does not vouch for spec.action.requestedBy "
                f"({asking.requested_by}): the admission policy novalet-requests that verifies it is not in "
                f"force; {POLICIES_HINT}")
    user = asking.requested_by
    for check in checks(asking):
        answer = answers.get(check)
        if answer is None:
            return (f"{what}: could not confirm with the apiserver that {user} may {check.describe()} "
                    "(SubjectAccessReview failed); request again with a new id")
        if answer:
            continue
        if check.resource == "secrets":
            return (f"{user} may not get Secret {check.name} in namespace {check.namespace}: SetPassword only "
                    "uses a Secret its requester may read")
        if asking.action in ADMIN_ACTIONS:
            return (f"{what} is for administrators: RBAC does not allow {user} to update "
                    f"virtualinstances/admin ({GROUP}) in namespace {check.namespace}")
        lock = asking.lock
        reason = f" (reason: {lock.reason})" if lock.reason else ""
        return (f"instance {asking.namespace}/{asking.name} is locked by {lock.lockedBy}{reason}: only "
                f"{lock.lockedBy} or an administrator may act on it; ask {lock.lockedBy} to unlock it")
    return None
