"""Generates the CustomResourceDefinition from the pydantic models.

Kubernetes wants a structural schema: no $ref, no titles, `nullable` instead of anyOf-null.
"""
from typing import Any

import yaml

from .. import GROUP, KIND, PLURAL, VERSION
from .models import (
    ClusterVirtualImageSpec,
    HypervisorStatus,
    VirtualImageSpec,
    VirtualImageStatus,
    VirtualInstanceSpec,
    VirtualInstanceStatus,
)

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
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), (int, float)) and not isinstance(out[bound], bool):
            out[limit], out[bound] = out[bound], True  # OpenAPI 3.0 (the CRD's): a flag beside the bound
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


def _column(name: str, path: str, type_: str = "string", wide: bool = False) -> dict[str, Any]:
    """A printer column; `wide`: only with `kubectl get -o wide`."""
    return {"name": name, "type": type_, "jsonPath": path, **({"priority": 1} if wide else {})}


AGE = _column("Age", ".metadata.creationTimestamp", "date")


def _crd(kind: str, plural: str, scope: str, short_names: list[str], categories: list[str],
         columns: list[dict[str, Any]], description: str, spec: type | None, status: type,
         rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A CustomResourceDefinition of one served version with a status subresource."""
    properties = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                  **({"spec": schema_of(spec)} if spec else {}), "status": schema_of(status)}
    schema = {"type": "object", "description": description, "properties": properties,
              **({"required": ["spec"]} if spec else {}), **({"x-kubernetes-validations": rules} if rules else {})}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List",
                      "shortNames": short_names, "categories": categories},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def crd_manifest() -> dict[str, Any]:
    columns = [_column("VM State", ".status.vmState"), _column("Task", ".status.taskState"),
               _column("Power", ".status.powerState"), _column("Node", ".status.node"), AGE,
               _column("IP", ".status.interfaces[0].ipAddresses[0]", wide=True)]
    return _crd(KIND, PLURAL, "Namespaced", ["vinst"], ["all", "novalet"], columns,
                "A virtual machine run through libvirt with Nova's lifecycle.", VirtualInstanceSpec,
                VirtualInstanceStatus, OBJECT_RULES)


# The image catalog: admins publish ClusterVirtualImages, tenants own VirtualImages (their
# snapshots land there); an instance's spec.image names one of its namespace first.
IMAGE_KINDS = {
    "ClusterVirtualImage": ("clustervirtualimages", "Cluster", ["cvimg"], ClusterVirtualImageSpec,
                            "A disk image (and optional kernel + initrd) published for every namespace."),
    "VirtualImage": ("virtualimages", "Namespaced", ["vimg"], VirtualImageSpec,
                     "A disk image (and optional kernel + initrd) of one namespace: its own or its snapshots."),
}


def image_crd_manifest(kind: str) -> dict[str, Any]:
    plural, scope, short, spec, description = IMAGE_KINDS[kind]
    columns = [_column("Source", ".spec.source.http.url", wide=True),
               _column("Snapshot Of", ".spec.source.snapshot.instanceName", wide=True),
               _column("Node", ".status.nodes[0].node"), _column("Phase", ".status.nodes[0].phase"),
               _column("Progress", ".status.nodes[0].progress"), AGE]
    return _crd(kind, plural, scope, short, ["novalet"], columns, description, spec, VirtualImageStatus)


def hypervisor_crd_manifest() -> dict[str, Any]:
    """One per node, written by its agent: `kubectl get hypervisors` reads like `openstack
    hypervisor list` (capacity, what is placed, what is free)."""
    columns = [_column("Type", ".status.domainType"), _column("vCPUs", ".status.allocatable.vcpus", "integer"),
               _column("vCPUs Used", ".status.allocated.vcpus", "integer"),
               _column("Memory MiB", ".status.allocatable.memoryMiB", "integer"),
               _column("Memory MiB Used", ".status.allocated.memoryMiB", "integer"),
               _column("Instances", ".status.instances", "integer"),
               _column("Version", ".status.agentVersion", wide=True),
               _column("Agent", ".status.agentIdentity", wide=True),
               _column("Heartbeat", ".status.heartbeatTime", "date"), AGE]
    return _crd("Hypervisor", "hypervisors", "Cluster", ["hv"], ["novalet"], columns,
                "A hypervisor node as its agent reports it: capacity, allocation, images.", None, HypervisorStatus)


def hypervisor_crd_yaml() -> str:
    return _dump(hypervisor_crd_manifest())


HEADER = "# Generated from operator/novalet/api/models.py by `novalet crd`. Do not edit.\n"


def _dump(manifest: dict[str, Any]) -> str:
    return HEADER + yaml.dump(manifest, Dumper=_NoAliases, sort_keys=False, width=100)


def crd_yaml() -> str:
    return _dump(crd_manifest())


def image_crd_yaml(kind: str) -> str:
    return _dump(image_crd_manifest(kind))


class _NoAliases(yaml.SafeDumper):
    """Generated manifests repeat shared lists in full rather than as YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
