"""The in-apiserver admission policies are generated from api/policies.py and checked in."""
from pathlib import Path

import yaml

from novalet.api.policies import (
    PLACEMENT_POLICY,
    REQUESTED_BY,
    REQUESTER_POLICY,
    REQUESTS_POLICY,
    policies_yaml,
    policy_manifests,
)
from novalet.cli import GENERATED

ROOT = Path(__file__).resolve().parents[2]
REGEN = ".venv/bin/novalet crd --write"


def test_checked_in_policies_match_the_code():
    for path in GENERATED["policies"]:
        assert (ROOT / path).read_text() == policies_yaml(), f"{path} is stale; regenerate with: {REGEN}"


def test_generated_yaml_parses_back():
    assert [d for d in yaml.safe_load_all(policies_yaml()) if d] == policy_manifests()


def by_kind() -> dict[str, dict]:
    """The requester's and the requests' policies (the placement policy has its own test)."""
    return {doc["kind"]: doc for doc in policy_manifests() if doc["metadata"]["name"] != PLACEMENT_POLICY}


def test_the_placement_policy_labels_a_pinned_instance_with_its_node():
    policy, binding = [d for d in policy_manifests() if d["metadata"]["name"] == PLACEMENT_POLICY]
    assert (policy["kind"], binding["kind"]) == ("MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": PLACEMENT_POLICY}
    spec = policy["spec"]
    (condition,) = spec["matchConditions"]
    assert "object.spec.nodeName" in condition["expression"]
    (mutation,) = spec["mutations"]
    assert "jsonpatch.escapeKey('novalet.io/node')" in mutation["jsonPatch"]["expression"]
    assert "'Unplaced'" in mutation["jsonPatch"]["expression"]
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["virtualinstances"] and rule["operations"] == ["CREATE", "UPDATE"]


def test_two_policies_each_with_its_binding():
    docs = by_kind()
    assert sorted(docs) == ["MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding",
                            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    assert {d["apiVersion"] for d in docs.values()} == {"admissionregistration.k8s.io/v1"}
    assert docs["MutatingAdmissionPolicyBinding"]["spec"]["policyName"] == REQUESTER_POLICY
    binding = docs["ValidatingAdmissionPolicyBinding"]["spec"]
    assert binding == {"policyName": REQUESTS_POLICY, "validationActions": ["Deny"]}


def test_they_match_the_main_resource_only():
    """The status subresource (the agent's writes) never reaches either policy."""
    docs = by_kind()
    for kind, operations in (("MutatingAdmissionPolicy", ["CREATE", "UPDATE"]),
                             ("ValidatingAdmissionPolicy", ["CREATE", "UPDATE", "DELETE"])):
        spec = docs[kind]["spec"]
        assert spec["failurePolicy"] == "Fail"
        (rule,) = spec["matchConstraints"]["resourceRules"]
        assert rule == {"apiGroups": ["novalet.io"], "apiVersions": ["v1alpha1"], "resources": ["virtualinstances"],
                        "operations": operations}


def test_the_requester_policy_stamps_who_asks():
    spec = by_kind()["MutatingAdmissionPolicy"]["spec"]
    assert [c["expression"] for c in spec["matchConditions"]] == [
        "request.operation == 'CREATE' || object.spec != oldObject.spec"]
    patch, apply = (m["jsonPatch"]["expression"] if m["patchType"] == "JSONPatch"
                    else m["applyConfiguration"]["expression"] for m in spec["mutations"])
    assert "/spec/action/requestedBy" in patch and "request.userInfo.username" in patch
    assert "/spec/action/requesterGroups" in patch
    assert f"'{REQUESTED_BY}': request.userInfo.username" in apply


def test_every_refusal_says_what_to_do():
    validations = by_kind()["ValidatingAdmissionPolicy"]["spec"]["validations"]
    assert len(validations) == 8
    for v in validations:
        assert v["messageExpression"] and v["reason"] == "Forbidden"
    text = " ".join(v["messageExpression"] for v in validations)
    for hint in ("leave requestedBy out", "virtualinstances/admin", "may not get Secret", "may unlock it",
                 "to unlock it", "cannot be set or changed by hand", "only names a Secret its author may read"):
        assert hint in text, hint


def test_administrator_means_rbac_allows_update_on_the_admin_subresource():
    variables = {v["name"]: v["expression"] for v in by_kind()["ValidatingAdmissionPolicy"]["spec"]["variables"]}
    assert variables["admin"] == ("authorizer.group('novalet.io').resource('virtualinstances').subresource('admin')"
                                  ".namespace(request.namespace).name(request.name).check('update').allowed()")
    assert "system:masters" not in policies_yaml()  # no group name decides
