"""Generates the CustomResourceDefinition from the pydantic models.

Kubernetes wants a structural schema: no $ref, no titles, `nullable` instead of anyOf-null.
"""
from typing import Any

import yaml

from .. import GROUP, KIND, PLURAL, VERSION
from .models import VirtualInstanceSpec, VirtualInstanceStatus

DROP = {"title"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    any_of = node.get("anyOf")
    if any_of and any(o.get("type") == "null" for o in any_of):
        rest = [o for o in any_of if o.get("type") != "null"]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        inner = rest[0] if len(rest) == 1 else {"anyOf": rest}
        return _structural({**inner, **outer, "nullable": True}, defs)
    out = {}
    for key, value in node.items():
        if key in DROP or key == "$defs" or (key == "default" and value is None):
            continue
        if key == "format" and value == "date-time":
            out[key] = value
            continue
        out[key] = value if key in ("enum", "required", "pattern", "default") else _structural(value, defs)
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if "additionalProperties" in out and isinstance(out["additionalProperties"], bool):
        del out["additionalProperties"]  # forbid/allow: the CRD prunes what its schema lacks
    return out


def schema_of(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(mode="validation")
    return _structural(raw, raw.get("$defs", {}))


# Rules on the whole object (they compare spec with the status on record), enforced by the
# apiserver itself: they hold with no webhook installed.
OBJECT_RULES = [
    {"rule": "!has(self.spec.action) || !has(oldSelf.status) || !has(oldSelf.status.handledAction)"
             " || self.spec.action.id != oldSelf.status.handledAction.id"
             " || (has(oldSelf.spec.action) && oldSelf.spec.action.id == self.spec.action.id)",
     "messageExpression": "'action id ' + self.spec.action.id + ' was already handled; "
                          "commit a new id to ask again'",
     "reason": "FieldValueInvalid", "fieldPath": ".spec.action.id"},
    {"rule": "!has(self.spec.nodeName) || !has(oldSelf.status) || !has(oldSelf.status.node)"
             " || self.spec.nodeName == oldSelf.status.node",
     "messageExpression": "'spec.nodeName cannot move an instance placed on node ' + oldSelf.status.node"
                          " + ': moving an instance is a migration (the Migrate action, not available yet)'",
     "reason": "FieldValueForbidden", "fieldPath": ".spec.nodeName"},
    {"rule": "has(self.spec.interfaces) == has(oldSelf.spec.interfaces)"
             " && (!has(self.spec.interfaces) || self.spec.interfaces == oldSelf.spec.interfaces)",
     "message": "spec.interfaces cannot change after creation: interfaces are not hot-plugged "
                "(create the instance again with the interfaces it needs)",
     "reason": "FieldValueForbidden", "fieldPath": ".spec.interfaces"},
]


def crd_manifest() -> dict[str, Any]:
    columns = [
        ("VM State", ".status.vmState"), ("Task", ".status.taskState"),
        ("Power", ".status.powerState"), ("Node", ".status.node"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": KIND.lower(),
                      "listKind": f"{KIND}List", "shortNames": ["vinst"], "categories": ["all", "novalet"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    *({"name": n, "type": "string", "jsonPath": p} for n, p in columns),
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    {"name": "IP", "type": "string", "jsonPath": ".status.interfaces[0].ipAddresses[0]",
                     "priority": 1},  # kubectl get -o wide
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A virtual machine run through libvirt with Nova's lifecycle.",
                    "properties": {
                        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": schema_of(VirtualInstanceSpec),
                        "status": schema_of(VirtualInstanceStatus),
                    },
                    "required": ["spec"],
                    "x-kubernetes-validations": OBJECT_RULES,
                }},
            }],
        },
    }


def crd_yaml() -> str:
    header = "# Generated from operator/novalet/api/models.py by `novalet crd`. Do not edit.\n"
    return header + yaml.dump(crd_manifest(), Dumper=_NoAliases, sort_keys=False, width=100)


class _NoAliases(yaml.SafeDumper):
    """Generated manifests repeat shared lists in full rather than as YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
