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
from .interfaces import interfaces_of
from .vocabulary import VmState

# Stamped by the admission policy novalet-requester: who asks is not a parameter of the request.
REQUESTER_FIELDS = {"requestedBy", "requesterGroups"}


def review(new: VirtualInstance, old: VirtualInstance | None,
           networks: dict[str, frozenset[str]] | None = None) -> str | None:
    """None to admit, else why not. `networks`: what each live agent's node provides."""
    if old is not None and old.spec.nodeName and new.spec.nodeName != old.spec.nodeName:
        return "spec.nodeName cannot change: live migration is not supported yet"
    if old is None:
        why = unknown_network(new, networks or {})
        if why:
            return why
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


def unknown_network(new: VirtualInstance, networks: dict[str, frozenset[str]]) -> str | None:
    """An interface on a network no live agent provides (on the pinned node, or on any node).
    With no agent heard from, the agent decides when it builds the instance."""
    if not networks:
        return None
    pinned = new.spec.nodeName
    offered = networks.get(pinned) if pinned else frozenset().union(*networks.values())
    if offered is None:
        return None  # the pinned node's agent has not said: it decides
    for iface in interfaces_of(new.spec):
        if iface.network not in offered:
            which = f"node {pinned} does not provide" if pinned else "no node provides"
            return (f"spec.interfaces: {iface.name} asks for network {iface.network}, which {which} "
                    f"(networks: {', '.join(sorted(offered)) or 'none'})")
    return None
