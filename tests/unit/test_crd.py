"""The CRD in crds/ is generated from the pydantic models and is a structural schema."""
import re
from pathlib import Path

import pydantic
import pytest
import yaml

from novalet.api.crd import crd_manifest, crd_yaml
from novalet.api.models import ActionRequest, VirtualInstance, VirtualInstanceSpec
from novalet.core.vocabulary import PowerState, TaskState, VmState

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "novalet.io_virtualinstances.yaml"
REGEN = ".venv/bin/novalet crd -o crds/novalet.io_virtualinstances.yaml"


@pytest.fixture(scope="module")
def crd() -> dict:
    return crd_manifest()


@pytest.fixture(scope="module")
def version(crd) -> dict:
    (v,) = crd["spec"]["versions"]
    return v


@pytest.fixture(scope="module")
def schema(version) -> dict:
    return version["schema"]["openAPIV3Schema"]


def walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def test_checked_in_crd_matches_the_models():
    assert CRD_FILE.read_text() == crd_yaml(), (
        f"{CRD_FILE.relative_to(ROOT)} is stale; regenerate it with: {REGEN}")


def test_generated_yaml_parses_back_to_the_manifest(crd):
    assert yaml.safe_load(crd_yaml()) == crd


def test_generated_yaml_has_no_anchors_or_aliases():
    """Shared lists in the pydantic schema come out as `&id001` / `*id001`: legal YAML, but a
    generated manifest that people read, diff and feed to other tools should be plain."""
    events = list(yaml.parse(crd_yaml()))
    anchored = [e for e in events if getattr(e, "anchor", None)]
    assert not anchored, (
        f"{len(anchored)} YAML anchors/aliases in the CRD (e.g. &{anchored[0].anchor}); dump with a "
        "Dumper whose ignore_aliases() returns True")


def test_schema_is_structural(schema):
    for path, node in walk(schema):
        if not isinstance(node, dict):
            continue
        assert "$ref" not in node, path
        assert "$defs" not in node, path
        assert "title" not in node or path.endswith(".properties"), path
        assert "const" not in node, path
        for option in node.get("anyOf", []):
            assert option.get("type") != "null", path
        if "properties" in node and not path.endswith(".properties"):
            assert node.get("type") == "object", path
        # every schema node (not a properties map) declares its type
        if not path.endswith(".properties") and path != "$" and (
                "properties" in node or "enum" in node or "pattern" in node):
            assert "type" in node, path


def test_metadata(crd, version):
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "virtualinstances.novalet.io"
    assert crd["spec"]["group"] == "novalet.io"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == "VirtualInstance"
    assert "vinst" in crd["spec"]["names"]["shortNames"]
    assert version["name"] == "v1alpha1"
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns(version):
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["VM State", "Task", "Power", "Node", "Age", "IP"]
    # the first address, in `kubectl get -o wide` only
    assert columns["IP"] == {"name": "IP", "type": "string", "jsonPath": ".status.interfaces[0].ipAddresses[0]",
                             "priority": 1}
    assert columns["VM State"]["jsonPath"] == ".status.vmState"
    assert columns["Task"]["jsonPath"] == ".status.taskState"
    assert columns["Power"]["jsonPath"] == ".status.powerState"
    assert columns["Node"]["jsonPath"] == ".status.node"
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def test_enums(schema):
    spec = schema["properties"]["spec"]["properties"]
    assert spec["powerState"]["enum"] == ["Running", "Stopped", "Paused", "Suspended"]
    assert spec["powerState"]["default"] == "Running"
    status = schema["properties"]["status"]["properties"]
    assert status["vmState"]["enum"] == [v.value for v in VmState]
    assert status["taskState"]["enum"] == [t.value for t in TaskState]
    assert status["powerState"]["enum"] == [p.value for p in PowerState]
    assert status["taskState"]["nullable"] is True  # null = no task


def test_spec_required_and_status_is_open_to_the_operator_only(schema):
    assert schema["required"] == ["spec"]
    assert "flavor" in schema["properties"]["spec"]["required"]


def test_cel_rules_for_action(schema):
    action = schema["properties"]["spec"]["properties"]["action"]
    rules = {r["rule"]: r["message"] for r in action["x-kubernetes-validations"]}
    assert rules["self.name != 'Reboot' || has(self.type)"] == "Reboot needs type: Soft or Hard"
    assert "self.name != 'Snapshot' || has(self.snapshotName)" in rules
    assert "self.name != 'SetPassword' || has(self.secretRef)" in rules
    assert action["properties"]["type"]["enum"] == ["Soft", "Hard"]


def test_image_pattern_in_schema_refuses_paths(schema):
    import re

    pattern = schema["properties"]["spec"]["properties"]["image"]["pattern"]
    assert re.fullmatch(pattern, "debian-12.qcow2")
    assert re.fullmatch(pattern, "")
    for bad in ("../etc", "/abs", "a/b", "UPPER", "-lead"):
        assert not re.fullmatch(pattern, bad), bad


# --- the models themselves -----------------------------------------------------------------------

FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def test_valid_spec_is_accepted():
    spec = VirtualInstanceSpec(flavor=FLAVOR, image="debian-12", powerState="Paused",
                               action={"name": "Reboot", "id": "r-1", "type": "Hard"})
    assert spec.action.type == "Hard"
    assert VirtualInstanceSpec(flavor=FLAVOR).image == ""  # diskless


@pytest.mark.parametrize("image", ["../etc", "/abs", "/var/lib/novalet/images/x", "a/b", "..",
                                   "Debian", "x" * 64, "img-"])
def test_bad_image_names_are_rejected(image):
    with pytest.raises(pydantic.ValidationError):
        VirtualInstanceSpec(flavor=FLAVOR, image=image)


@pytest.mark.parametrize("bad", [
    {"flavor": {"vcpus": 0, "memoryMiB": 128}},
    {"flavor": {"vcpus": 1, "memoryMiB": 64}},
    {"flavor": FLAVOR, "powerState": "Hibernated"},
    {"flavor": FLAVOR, "unknown": 1},
    {"flavor": FLAVOR, "nodeName": "Node_1"},
    {"flavor": FLAVOR, "action": {"name": "Shelve", "id": "x"}},
    {"flavor": FLAVOR, "action": {"name": "Migrate", "id": "x", "targetNode": "Node_B"}},
    {"flavor": FLAVOR, "action": {"name": "Migrate", "id": "x", "live": "sometimes"}},
    {"flavor": FLAVOR, "action": {"name": "Reboot", "id": "", "type": "Soft"}},
    {"flavor": FLAVOR, "action": {"name": "Reboot", "id": "x", "type": "Warm"}},
    {"flavor": FLAVOR, "action": {"name": "Snapshot", "id": "x", "snapshotName": "../snap"}},
])
def test_bad_specs_are_rejected(bad):
    with pytest.raises(pydantic.ValidationError):
        VirtualInstanceSpec(**bad)


@pytest.mark.parametrize("action", [
    {"name": "Migrate", "id": "m1"},
    {"name": "Migrate", "id": "m2", "targetNode": "node-b"},
    {"name": "Migrate", "id": "m3", "targetNode": "node-b", "live": True},
    {"name": "Migrate", "id": "m4", "live": False},
])
def test_migrate_is_a_valid_action(action):
    spec = VirtualInstanceSpec(flavor=FLAVOR, action=action)
    assert spec.action.name == "Migrate"
    assert spec.action.targetNode == action.get("targetNode")


# The CEL rules are the apiserver's to enforce (pydantic ignores them): evaluate the small subset
# of CEL the action's rules use (==, !=, has(), !, &&, ||, parentheses, 'strings') here.
CEL_SUBSET = re.compile(r"(\s+|self\.\w+|has\(self\.\w+\)|'[^']*'|==|!=|!|&&|\|\||\(|\))+")


def cel_allows(rule: str, obj: dict) -> bool:
    assert CEL_SUBSET.fullmatch(rule), f"a rule outside the subset this test evaluates: {rule}"
    expr = re.sub(r"has\(self\.(\w+)\)", r"('\1' in self)", rule)
    expr = re.sub(r"self\.(\w+)", r"self.get('\1')", expr)
    expr = re.sub(r"!(?!=)", " not ", expr.replace("&&", " and ").replace("||", " or "))
    return eval(expr, {"__builtins__": {}}, {"self": obj})  # our own rules, checked against CEL_SUBSET


def refused_by(schema: dict, action: dict) -> list[str]:
    rules = schema["properties"]["spec"]["properties"]["action"]["x-kubernetes-validations"]
    return [r["message"] for r in rules if not cel_allows(r["rule"], action)]


@pytest.mark.parametrize("action", [
    {"name": "Migrate", "id": "m"},
    {"name": "Migrate", "id": "m", "targetNode": "node-b", "live": True},
    {"name": "Migrate", "id": "m", "live": False},
    {"name": "Reboot", "id": "r", "type": "Soft"},
    {"name": "Snapshot", "id": "s", "snapshotName": "snap"},
    {"name": "SetPassword", "id": "p", "secretRef": {"name": "pw"}},
    {"name": "ResetState", "id": "x", "state": "active"},
    {"name": "Lock", "id": "l", "reason": "audit"},
    {"name": "Unlock", "id": "u"},
    {"name": "Rebuild", "id": "b"},
])
def test_cel_rules_accept_valid_actions(schema, action):
    assert refused_by(schema, action) == []


@pytest.mark.parametrize("action", [
    {"name": "Reboot", "id": "x", "type": "Soft", "live": True},
    {"name": "Reboot", "id": "x", "type": "Hard", "live": False},  # has(): present, even false
    {"name": "Rebuild", "id": "x", "targetNode": "node-b"},
    {"name": "Lock", "id": "x", "targetNode": "node-b", "live": True},
])
def test_cel_rules_refuse_target_node_and_live_outside_migrate(schema, action):
    refused = refused_by(schema, action)
    assert refused and all("Migrate" in why for why in refused), refused
    for field in ("targetNode", "live"):
        if field in action:
            assert any(field in why for why in refused), (field, refused)


def test_cel_evaluation_here_can_refuse_the_other_rules_too(schema):
    assert refused_by(schema, {"name": "Reboot", "id": "x"}) == ["Reboot needs type: Soft or Hard"]
    typed = {"name": "Migrate", "id": "x", "type": "Hard"}
    assert refused_by(schema, typed) == ["type applies to Reboot only"]


def test_action_request_model_carries_the_cel_rules():
    rules = ActionRequest.model_json_schema()["x-kubernetes-validations"]
    assert any("Reboot" in r["rule"] for r in rules)


def test_virtual_instance_round_trips_unknown_metadata():
    obj = VirtualInstance(metadata={"name": "vm1", "labels": {"a": "b"}}, spec={"flavor": FLAVOR})
    assert obj.metadata.name == "vm1"
    assert obj.status.vmState is None and obj.status.history == []


# --- the image catalog's CRDs -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ClusterVirtualImage", "VirtualImage"])
def test_checked_in_image_crds_match_the_models(kind):
    from novalet.api.crd import IMAGE_KINDS, image_crd_yaml

    path = ROOT / "crds" / f"novalet.io_{IMAGE_KINDS[kind][0]}.yaml"
    assert path.read_text() == image_crd_yaml(kind), (
        f"{path.relative_to(ROOT)} is stale; regenerate it with: .venv/bin/novalet crd --write")
    assert not [e for e in yaml.parse(image_crd_yaml(kind)) if getattr(e, "anchor", None)]


def test_image_scopes_and_required_checksum():
    from novalet.api.crd import image_crd_manifest
    from novalet.api.models import ClusterVirtualImageSpec, VirtualImageSpec

    assert image_crd_manifest("ClusterVirtualImage")["spec"]["scope"] == "Cluster"
    assert image_crd_manifest("VirtualImage")["spec"]["scope"] == "Namespaced"
    with pytest.raises(pydantic.ValidationError, match="sha256"):
        VirtualImageSpec.model_validate({"source": {"http": {"url": "http://127.0.0.1/x.qcow2"}}})
    for bad in ("file:///etc/shadow", "ftp://h/x", "http://h/a b"):
        with pytest.raises(pydantic.ValidationError, match="url"):
            ClusterVirtualImageSpec.model_validate({"source": {"http": {"url": bad, "sha256": "0" * 64}}})


def test_checked_in_hypervisor_crd_matches_the_models():
    from novalet.api.crd import hypervisor_crd_manifest, hypervisor_crd_yaml

    path = ROOT / "crds" / "novalet.io_hypervisors.yaml"
    assert path.read_text() == hypervisor_crd_yaml(), f"{path.relative_to(ROOT)} is stale: novalet crd --write"
    assert hypervisor_crd_manifest()["spec"]["scope"] == "Cluster"
