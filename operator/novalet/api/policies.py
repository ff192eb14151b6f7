"""The in-apiserver admission policies (crds/novalet.io_admission-policies.yaml), generated.

They hold with no webhook at all (the apiserver evaluates them itself, CEL, GA since 1.30 and
1.36), so authorization never depends on a process that may be down:

- MutatingAdmissionPolicy `novalet-requester` stamps who asks: `spec.action.requestedBy` and
  `requesterGroups` (the identity the apiserver authenticated) on a new or changed spec.action,
  and the annotation `novalet.io/requested-by` on every request that changes the spec.
- ValidatingAdmissionPolicy `novalet-requests` refuses a forged requester, ResetState unless RBAC
  allows the requester `update` on `virtualinstances/admin` (what "administrator" means), a
  SetPassword or a `spec.userDataSecretRef` naming a Secret the requester may not `get`, and, on a
  locked instance, every spec
  change and delete by anyone but its locker and administrators (Nova's lock).

The agent trusts `requestedBy` only while `novalet-requests` is in force (kube/access.py).
"""
from typing import Any

import yaml

from .. import GROUP, PLURAL, VERSION
from .crd import _NoAliases

REQUESTER_POLICY = "novalet-requester"
PLACEMENT_POLICY = "novalet-placement"
NODE_LABEL = "novalet.io/node"  # the node an instance is pinned or placed on: each agent watches its own
UNPLACED = "Unplaced"  # its value before the scheduler has placed the instance
MIGRATING = "Migrating"  # its value while a migration runs: both agents (and the scheduler) see it
REQUESTS_POLICY = "novalet-requests"
REQUESTED_BY = "novalet.io/requested-by"  # annotation: who last changed the spec
ADMIN_SUBRESOURCE = "admin"  # RBAC pseudo-subresource: `update virtualinstances/admin` = administrator
ADMIN_ROLE_HINT = "the Helm chart ClusterRole <release>-novalet-admin grants it"

ADMISSION = "admissionregistration.k8s.io/v1"


def _rules(operations: list[str]) -> dict[str, Any]:
    return {"resourceRules": [{"apiGroups": [GROUP], "apiVersions": [VERSION], "resources": [PLURAL],
                               "operations": operations}]}


def _mutating_binding(policy: str) -> dict[str, Any]:
    return {"apiVersion": ADMISSION, "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": policy}, "spec": {"policyName": policy}}


def _var(name: str, expression: str) -> dict[str, str]:
    return {"name": name, "expression": expression}


def _q(text: str) -> str:
    """A CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# spec.action is new or changed by this request (CREATE, UPDATE; never DELETE)
ACTION_CHANGED = ("request.operation != 'DELETE' && has(object.spec.action) && (request.operation == 'CREATE'"
                  " || !has(oldObject.spec.action) || object.spec.action != oldObject.spec.action)")
SPEC_CHANGED = "request.operation == 'CREATE' || (request.operation == 'UPDATE' && object.spec != oldObject.spec)"
ADMIN_CHECK = (f"authorizer.group({_q(GROUP)}).resource({_q(PLURAL)}).subresource({_q(ADMIN_SUBRESOURCE)})"
               ".namespace(request.namespace).name(request.name).check('update').allowed()")


def _annotation(obj: str) -> str:
    return (f"has({obj}.metadata.annotations) && {_q(REQUESTED_BY)} in {obj}.metadata.annotations"
            f" ? {obj}.metadata.annotations[{_q(REQUESTED_BY)}] : ''")


def requester_policy() -> list[dict[str, Any]]:
    """Stamps the requester. A requestedBy the request sets to someone else is left for
    `novalet-requests` to refuse (a forgery is refused, not silently corrected); one carried
    over from the previous request (a merge patch, a PUT of the old object) is replaced."""
    stamp_action = (
        "variables.actionChanged && (!has(object.spec.action.requestedBy)"
        " || object.spec.action.requestedBy == request.userInfo.username"
        " || (request.operation == 'UPDATE' && has(oldObject.spec.action)"
        " && has(oldObject.spec.action.requestedBy)"
        " && object.spec.action.requestedBy == oldObject.spec.action.requestedBy))")
    policy = {
        "apiVersion": ADMISSION, "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": REQUESTER_POLICY},
        "spec": {
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "matchConstraints": _rules(["CREATE", "UPDATE"]),
            # spec changes only: status writes (a subresource) and metadata writes never match
            "matchConditions": [{"name": "spec-changed",
                                 "expression": "request.operation == 'CREATE' || object.spec != oldObject.spec"}],
            "variables": [
                _var("actionChanged", ACTION_CHANGED),
                _var("stampAction", stamp_action),
            ],
            "mutations": [
                {"patchType": "JSONPatch", "jsonPatch": {"expression": (
                    "variables.stampAction ? ["
                    "JSONPatch{op: 'add', path: '/spec/action/requestedBy', value: request.userInfo.username},"
                    " JSONPatch{op: 'add', path: '/spec/action/requesterGroups',"
                    " value: request.userInfo.groups.map(g, string(g))}"
                    "] : []")}},
                # JSONPatch, not ApplyConfiguration: that needs the CRD's OpenAPI schema, which
                # the apiserver publishes a while after the CRD is Established
                {"patchType": "JSONPatch", "jsonPatch": {"expression": (
                    "has(object.metadata.annotations) ? [JSONPatch{op: 'add', path: '/metadata/annotations/'"
                    f" + jsonpatch.escapeKey({_q(REQUESTED_BY)}), value: request.userInfo.username}}]"
                    " : [JSONPatch{op: 'add', path: '/metadata/annotations',"
                    f" value: {{{_q(REQUESTED_BY)}: request.userInfo.username}}}}]")}},
            ],
        },
    }
    return [policy, _mutating_binding(REQUESTER_POLICY)]


def placement_policy() -> list[dict[str, Any]]:
    """The label `novalet.io/node` each agent watches its instances by: a pinned instance's node
    (`spec.nodeName`), else `Unplaced` (no node name has a capital letter) until the node the
    scheduler placed it on takes it and labels it with its name. Every agent watches its own
    name and `Unplaced`, so it sees its pinned instances at once, and an unplaced one until it is
    placed. A write that drops the label, or gives a pinned instance another, gets it back."""
    labels = "object.metadata.labels"
    has_label = f"has({labels}) && {_q(NODE_LABEL)} in {labels}"
    wanted = f"has(object.spec.nodeName) ? object.spec.nodeName : {_q(UNPLACED)}"
    policy = {
        "apiVersion": ADMISSION, "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": PLACEMENT_POLICY},
        "spec": {
            "failurePolicy": "Fail",
            "reinvocationPolicy": "IfNeeded",
            "matchConstraints": _rules(["CREATE", "UPDATE"]),
            "matchConditions": [{"name": "label-missing-or-not-the-pinned-node", "expression": (
                f"!({has_label}) || (has(object.spec.nodeName)"
                f" && {labels}[{_q(NODE_LABEL)}] != object.spec.nodeName)")}],
            "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": (
                f"has({labels}) ? [JSONPatch{{op: 'add', path: '/metadata/labels/'"
                f" + jsonpatch.escapeKey({_q(NODE_LABEL)}), value: {wanted}}}]"
                " : [JSONPatch{op: 'add', path: '/metadata/labels',"
                f" value: {{{_q(NODE_LABEL)}: {wanted}}}}}]")}}],
        },
    }
    return [policy, _mutating_binding(PLACEMENT_POLICY)]


def _validation(expression: str, message: str, reason: str = "Forbidden") -> dict[str, str]:
    return {"expression": expression, "messageExpression": message, "reason": reason}


def requests_policy() -> list[dict[str, Any]]:
    lock = "oldObject.status.lock"
    validations = [
        _validation(
            "!variables.actionChanged || !has(object.spec.action.requestedBy)"
            " || object.spec.action.requestedBy == request.userInfo.username",
            "'spec.action.requestedBy is ' + object.spec.action.requestedBy + ' but you are '"
            " + request.userInfo.username + ': the apiserver records who asks; leave requestedBy out"
            f" (the admission policy {REQUESTER_POLICY} sets it)'"),
        _validation(
            "!variables.actionChanged || !has(object.spec.action.requesterGroups)"
            " || object.spec.action.requesterGroups == (has(request.userInfo.groups) ? request.userInfo.groups : [])",
            "'spec.action.requesterGroups must be the groups the apiserver authenticated '"
            f" + request.userInfo.username + ' with; leave it out (the admission policy {REQUESTER_POLICY} sets it)'"),
        _validation(
            "request.operation == 'DELETE' || (variables.specChanged"
            " ? (variables.annotation == '' || variables.annotation == request.userInfo.username)"
            " : variables.annotation == variables.oldAnnotation)",
            f"'metadata.annotations[{REQUESTED_BY}] records who last changed the spec; the apiserver sets it"
            f" (admission policy {REQUESTER_POLICY}) and it cannot be set or changed by hand'"),
        _validation(
            "!(variables.actionName in ['ResetState', 'Migrate', 'Evacuate']) || variables.admin",
            "variables.actionName + ' is for administrators: RBAC does not allow ' + request.userInfo.username"
            f" + ' to update virtualinstances/{ADMIN_SUBRESOURCE} ({GROUP}) in namespace ' + request.namespace"
            f" + '; ask a cluster administrator ({ADMIN_ROLE_HINT})'"),
        _validation(
            "variables.actionName != 'SetPassword' || authorizer.group('').resource('secrets')"
            ".namespace(request.namespace).name(object.spec.action.secretRef.name).check('get').allowed()",
            "request.userInfo.username + ' may not get Secret ' + object.spec.action.secretRef.name"
            " + ' in namespace ' + request.namespace + ': SetPassword only uses a Secret its requester may read;"
            " name a Secret you can read (kubectl auth can-i get secret/' + object.spec.action.secretRef.name"
            " + ')'"),
        _validation(
            "!variables.userDataSecretChanged || authorizer.group('').resource('secrets')"
            ".namespace(request.namespace).name(object.spec.userDataSecretRef.name).check('get').allowed()",
            "request.userInfo.username + ' may not get Secret ' + object.spec.userDataSecretRef.name"
            " + ' in namespace ' + request.namespace + ': spec.userDataSecretRef only names a Secret its author"
            " may read (kubectl auth can-i get secret/' + object.spec.userDataSecretRef.name + ')'"),
        _validation(
            "!variables.locked || variables.actionName != 'Unlock' || variables.isLocker || variables.admin",
            "variables.lockText + ': only ' + variables.locker + ' or an administrator may unlock it'"),
        _validation(
            "!variables.locked || variables.actionName == 'Unlock' || variables.isLocker"
            " || !(variables.specChanged || variables.ownersChanged || variables.deleted) || variables.admin",
            "variables.lockText + ': only ' + variables.locker + ' or an administrator may '"
            " + (request.operation == 'DELETE' ? 'delete it' : variables.ownersChanged"
            " ? 'change its ownerReferences' : 'change its spec')"
            " + '; ask ' + variables.locker + ' to unlock it (spec.action: {name: Unlock})'"),
    ]
    policy = {
        "apiVersion": ADMISSION, "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": REQUESTS_POLICY},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": _rules(["CREATE", "UPDATE", "DELETE"]),
            "variables": [
                _var("specChanged", SPEC_CHANGED),
                _var("actionChanged", ACTION_CHANGED),
                _var("actionName", "variables.actionChanged ? object.spec.action.name : ''"),
                _var("userDataSecretChanged", (
                    "request.operation != 'DELETE' && has(object.spec.userDataSecretRef)"
                    " && (request.operation == 'CREATE' || !has(oldObject.spec.userDataSecretRef)"
                    " || object.spec.userDataSecretRef != oldObject.spec.userDataSecretRef)")),
                _var("annotation", "request.operation == 'DELETE' ? '' : " + _annotation("object")),
                _var("oldAnnotation", "request.operation == 'CREATE' ? '' : " + _annotation("oldObject")),
                _var("admin", ADMIN_CHECK),
                _var("locked", f"request.operation != 'CREATE' && has(oldObject.status) && has({lock})"),
                _var("locker", f"variables.locked ? {lock}.lockedBy : ''"),
                _var("isLocker", "variables.locked && request.userInfo.username == variables.locker"),
                _var("lockText", (
                    f"variables.locked ? 'instance ' + request.namespace + '/' + request.name + ' is locked by '"
                    f" + {lock}.lockedBy + (has({lock}.reason) && {lock}.reason != ''"
                    f" ? ' (reason: ' + {lock}.reason + ')' : '') : ''")),
                _var("ownersChanged", (
                    "request.operation == 'UPDATE' && (has(object.metadata.ownerReferences)"
                    " != has(oldObject.metadata.ownerReferences) || (has(object.metadata.ownerReferences)"
                    " && object.metadata.ownerReferences != oldObject.metadata.ownerReferences))")),
                # whoever may delete a namespace may delete everything in it: the lock does not
                # hold a terminating namespace hostage
                _var("deleted", ("request.operation == 'DELETE' && !(namespaceObject != null"
                                 " && has(namespaceObject.metadata.deletionTimestamp))")),
            ],
            "validations": validations,
        },
    }
    binding = {
        "apiVersion": ADMISSION, "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": REQUESTS_POLICY},
        "spec": {"policyName": REQUESTS_POLICY, "validationActions": ["Deny"]},
    }
    return [policy, binding]


def policy_manifests() -> list[dict[str, Any]]:
    return [*requester_policy(), *requests_policy(), *placement_policy()]


def policies_yaml() -> str:
    header = ("# Generated from operator/novalet/api/policies.py by `novalet crd --write`. Do not edit.\n"
              "# In-apiserver admission policies (Kubernetes >= 1.36): who asked, ResetState for RBAC\n"
              "# administrators, SetPassword only with a readable Secret, Nova's lock, a pinned instance's\n"
              "# node label. No webhook needed.\n")
    return header + "---\n".join(yaml.dump(doc, Dumper=_NoAliases, sort_keys=False, width=100)
                                 for doc in policy_manifests())
