"""Admission decisions (the validating webhook's logic), pure.

What depends on the current state is refused here with a message a user can act on; what is
static is already refused by the CRD schema and its CEL rules. The agent applies the same
policy again, so a request that gets past a webhook that was down is answered in status.

Who may ask for what is not decided here: the in-apiserver admission policies do that (RBAC,
through the apiserver's authorizer; api/policies.py), and they hold with no webhook running.
"""
from ..api.models import VirtualInstance
from . import policy
from .desire import imperative_action, seen_ids
from .vocabulary import VmState

# Stamped by the admission policy novalet-requester: who asks is not a parameter of the request.
REQUESTER_FIELDS = {"requestedBy", "requesterGroups"}


def review(new: VirtualInstance, old: VirtualInstance | None) -> str | None:
    """None to admit, else why not."""
    if old is not None and old.spec.nodeName and new.spec.nodeName != old.spec.nodeName:
        return "spec.nodeName cannot change: live migration is not supported yet"
    action = imperative_action(new.spec)
    if action is None:
        return None
    request = new.spec.action
    if old is not None and old.spec.action and old.spec.action.id == request.id:
        if old.spec.action.model_dump(exclude=REQUESTER_FIELDS) != request.model_dump(exclude=REQUESTER_FIELDS):
            return f"action {request.id} was already submitted with other parameters; use a new id"
        return None
    if request.id in seen_ids(new.status):
        return f"action id {request.id} was already used; commit a new id to ask again"
    status = new.status
    if status.vmState is None:
        return None  # not built yet: the agent decides when it builds it
    return policy.refusal(action, status.vmState or VmState.BUILDING, status.taskState)
