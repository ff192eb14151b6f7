"""The Helm chart (charts/novalet) against the real local control plane.

`helm lint` and `helm template` check the chart itself; `helm install` puts it on the real
apiserver (no kubelet: pods never run, the objects must exist and pass admission); then each
component's RBAC is exercised with a real ServiceAccount token: every call the process makes is
allowed, the calls it must not make are refused. helm comes from the control plane's bin dir
(hack/build-controlplane.sh); missing, the test fails, never skips.
"""

import asyncio
import base64
import json
import os
import re
import shlex
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from novalet.agent.metrics import AgentMetrics
from novalet.api.policies import REQUESTS_POLICY, policy_manifests
from novalet.cli import GENERATED
from novalet.controller.main import webhook_configuration
from novalet.controller.metrics import ControllerMetrics

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "novalet"
CRD_FILE = "novalet.io_virtualinstances.yaml"
GROUP, VERSION, PLURAL = "novalet.io", "v1alpha1", "virtualinstances"
LEASE_NS = "kube-node-lease"
WEBHOOK = "validate.virtualinstances.novalet.io"  # the webhook's name inside the configuration
POLICY_KINDS = ["MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding", "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding", "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding"]
MERGE = "application/merge-patch+json"


# --- helpers -------------------------------------------------------------------------------

def _helm_env(home: Path, kubeconfig: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


@pytest.fixture(scope="module")
def helm(control_plane, tmp_path_factory):
    """Run the control plane's helm: helm(*args, check=True) -> CompletedProcess."""
    binary = control_plane.bin_dir / "helm"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"helm not found at {binary}: run hack/build-controlplane.sh (or sudo hack/setup.sh)",
                    pytrace=False)
    env = _helm_env(tmp_path_factory.mktemp("helm"), control_plane.kubeconfig)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120,
                           check=False)
        if check and r.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stderr}{r.stdout}", pytrace=False)
        return r

    return run


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def _rules(role: dict) -> set[tuple[str, str, str, str]]:
    """(group, resource, verb, resourceName or "") for every rule of a (Cluster)Role."""
    return {(g, r, v, n) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"] for n in (rule.get("resourceNames") or [""])}


# --- the chart itself ----------------------------------------------------------------------

def test_chart_copies_are_the_repo_files():
    """The CRD (crds/, installed once) and the admission policies (files/, rendered by a template,
    so upgrades update them) are copies of the generated files in the repository's crds/."""
    for repo_path, chart_path in GENERATED.values():
        assert not (REPO / chart_path).is_symlink(), "Helm does not follow symlinks out of a chart: keep a copy"
        assert (REPO / chart_path).read_bytes() == (REPO / repo_path).read_bytes(), (
            f"{chart_path} differs from {repo_path}: .venv/bin/novalet crd --write")
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(
        Path(chart_path).name for kind, (_, chart_path) in GENERATED.items() if kind != "policies")


def test_helm_lint(helm):
    r = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in r.stdout
    helm("lint", "--strict", str(CHART), "--set", "controller.service.clusterIP=10.96.0.200",
         "--set", "agent.imagePool=/srv/images", "--set", "controller.tls.secretName=novalet-tls",
         "--set", "controller.tls.caBundle=Zm9v", "--set", "agent.setPassword.namespaces={team-a}",
         "--set", "rbac.observeCRDs=false", "--set", "admissionPolicies.create=false",
         "--set", "controller.webhook.failurePolicy=Ignore", "--set", "rbac.adminRole.aggregateTo={admin}",
         "--set", "agent.migration.uri=qemu+tls://$(NODE_NAME)/system", "--set", "controller.evacuateAfterSeconds=120")


def test_helm_template_renders(helm):
    docs = _docs(helm("template", "rel", str(CHART), "--namespace", "nv", "--include-crds").stdout)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["CustomResourceDefinition"] * 4 + ["ServiceAccount", "ServiceAccount", "ClusterRole",
                            "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
                            "Role", "Role", "RoleBinding", "RoleBinding", "DaemonSet", "Deployment", "Service",
                            "Secret", "ValidatingWebhookConfiguration", "Lease", "PodDisruptionBudget",
                            *POLICY_KINDS]), kinds
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    for plural in ("virtualinstances", "virtualimages", "clustervirtualimages", "hypervisors"):
        assert crds[f"{plural}.novalet.io"] == yaml.safe_load((REPO / "crds" / f"novalet.io_{plural}.yaml").read_text())

    # the agent: one per node, its node from the downward API, unprivileged, host paths 1:1
    ds = _one(docs, "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    assert agent["command"] == ["novalet"] and agent["args"][0] == "run"
    assert "--node-name=$(NODE_NAME)" in agent["args"]
    assert "--lease-namespace=kube-node-lease" in agent["args"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert agent["securityContext"]["privileged"] is False
    assert agent["securityContext"]["allowPrivilegeEscalation"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in agent["volumeMounts"]:
        if "hostPath" in volumes[mount["name"]]:
            assert volumes[mount["name"]]["hostPath"]["path"] == mount["mountPath"]
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert host_paths == {"/run/libvirt", "/var/lib/novalet",  # the image pool is inside the state dir
                          "/run/novalet/migration"}
    assert pod["serviceAccountName"] == "rel-novalet-agent"

    # the controller: the webhook on 0.0.0.0:9443, registered by Service reference (the apiserver
    # reaches a Service even where it cannot resolve *.svc names), the DNS name in its certificate
    dep = _one(docs, "Deployment", "-controller")
    (ctl,) = dep["spec"]["template"]["spec"]["containers"]
    assert ctl["args"][:8] == ["controller", "--webhook-port=9443", "--webhook-addr=0.0.0.0",
                               "--webhook-host=rel-novalet-controller.nv.svc",
                               "--webhook-service=nv/rel-novalet-controller", "--no-register-webhook",
                               "--tls-cert=/etc/novalet/tls/tls.crt", "--tls-key=/etc/novalet/tls/tls.key"]
    tls = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "rel-novalet-webhook-tls"
    assert dep["spec"]["replicas"] == 2  # every replica serves the webhook with the same Secret
    svc = _one(docs, "Service", "-controller")
    assert svc["spec"]["ports"][0]["port"] == 9443
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]

    # values: a separate image pool gets its own mount; a fixed ClusterIP is the Service's
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv", "--set", "agent.imagePool=/srv/images",
                      "--set", "controller.service.clusterIP=10.96.0.200",
                      "--set", "controller.tls.secretName=novalet-tls",
                      "--set", "controller.tls.caBundle=Zm9v").stdout)
    pod = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v} == \
        {"/run/libvirt", "/var/lib/novalet", "/srv/images", "/run/novalet/migration"}
    assert "--image-pool=/srv/images" in pod["containers"][0]["args"]
    ctl = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--webhook-host=rel-novalet-controller.nv.svc" in ctl["args"]  # what a Service call verifies
    assert "--tls-cert=/etc/novalet/tls/tls.crt" in ctl["args"]
    assert _one(docs, "Service")["spec"]["clusterIP"] == "10.96.0.200"
    # your own certificate: mounted, its CA in the webhook configuration, no Secret generated
    tls = next(v for v in _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "novalet-tls"
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert _one(docs, "ValidatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"] == "Zm9v"
    no_ca = helm("template", "rel", str(CHART), "--set", "controller.tls.secretName=novalet-tls", check=False)
    assert no_ca.returncode != 0 and "controller.tls.caBundle is required" in no_ca.stderr

    # the chart refuses a cluster without the v1 admission policies (Kubernetes < 1.36)
    old = helm("template", "rel", str(CHART), "--kube-version", "1.35.0", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr


def test_helm_template_passes_the_nodes_networks_to_the_agent(helm, tmp_path):
    values = tmp_path / "networks.yaml"
    values.write_text(yaml.safe_dump({"agent": {"networks": [{"name": "default", "network": "default"},
                                                             {"name": "ext", "bridge": "br-ext"}]}}))
    args = _one(_docs(helm("template", "rel", str(CHART), "-f", str(values)).stdout),
                "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--network")] == ["--network=default=network:default",
                                                              "--network=ext=bridge:br-ext"]
    from novalet.cli import build_parser  # what the agent makes of them
    parsed = build_parser().parse_args(["run", "--node-name", "n", *[a for a in args if a.startswith("--network")]])
    assert dict(parsed.network) == {"default": ("network", "default"), "ext": ("bridge", "br-ext")}
    # none given: no flag, the agent's default (default=network:default)
    plain = _one(_docs(helm("template", "rel", str(CHART)).stdout), "DaemonSet")
    assert not [a for a in plain["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--network")]
    values.write_text(yaml.safe_dump({"agent": {"networks": [{"name": "x", "network": "a", "bridge": "b"}]}}))
    both = helm("template", "rel", str(CHART), "-f", str(values), check=False)
    assert both.returncode != 0 and "x names both a network and a bridge" in both.stderr


def _migration_flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--migration-")]


def test_helm_template_passes_migration_and_evacuation_flags(helm, tmp_path):
    """agent.migration.* become the agent's --migration-* flags (the socket directory a hostPath
    at the same path, where the host's QEMU takes the streams), controller.evacuateAfterSeconds
    the controller's --evacuate-after; the real parser takes what the chart renders."""
    from novalet.cli import build_parser

    def rendered(*args: str) -> tuple[dict, dict]:
        docs = _docs(helm("template", "rel", str(CHART), *args).stdout)
        return (_one(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"],
                _one(docs, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0])

    def migration_volume(pod: dict) -> tuple[dict | None, dict | None]:
        (agent,) = pod["containers"]
        return (next((v for v in pod["volumes"] if v["name"] == "migration"), None),
                next((m for m in agent["volumeMounts"] if m["name"] == "migration"), None))

    # defaults: no --migration-uri (the agent uses --libvirt-uri), the socket directory mounted 1:1
    pod, ctl = rendered()
    args = pod["containers"][0]["args"]
    assert _migration_flags(args) == ["--migration-socket-dir=/run/novalet/migration", "--migration-timeout=300",
                                      "--migration-peer-dead-after=60"]
    volume, mount = migration_volume(pod)
    assert volume["hostPath"] == {"path": "/run/novalet/migration", "type": "DirectoryOrCreate"}
    assert mount["mountPath"] == "/run/novalet/migration" and not mount.get("readOnly")
    parsed = build_parser().parse_args(["run", "--node-name", "n", *_migration_flags(args)])
    assert (parsed.migration_uri, parsed.migration_socket_dir, parsed.migration_timeout,
            parsed.migration_peer_dead_after) == (None, Path("/run/novalet/migration"), 300.0, 60.0)
    assert [a for a in ctl["args"] if a.startswith("--evacuate-after")] == ["--evacuate-after=60"]
    parsed = build_parser().parse_args(ctl["args"])
    assert parsed.evacuate_after == 60.0

    # overridden: the URI per node through the downward API's $(NODE_NAME), another directory
    values = tmp_path / "migration.yaml"
    values.write_text(yaml.safe_dump({
        "agent": {"migration": {"uri": "qemu+tls://$(NODE_NAME)/system", "socketDir": "/srv/migration/",
                                "timeoutSeconds": 900, "peerDeadAfterSeconds": 120}},
        "controller": {"evacuateAfterSeconds": 180}}))
    pod, ctl = rendered("-f", str(values))
    args = pod["containers"][0]["args"]
    assert _migration_flags(args) == ["--migration-uri=qemu+tls://$(NODE_NAME)/system",
                                      "--migration-socket-dir=/srv/migration", "--migration-timeout=900",
                                      "--migration-peer-dead-after=120"]
    assert "NODE_NAME" in {e["name"] for e in pod["containers"][0]["env"]}  # what $(NODE_NAME) expands from
    volume, mount = migration_volume(pod)
    assert volume["hostPath"] == {"path": "/srv/migration", "type": "DirectoryOrCreate"}
    assert mount["mountPath"] == "/srv/migration"
    parsed = build_parser().parse_args(["run", "--node-name", "n", *_migration_flags(args)])
    assert (parsed.migration_uri, parsed.migration_socket_dir, parsed.migration_timeout,
            parsed.migration_peer_dead_after) == ("qemu+tls://$(NODE_NAME)/system", Path("/srv/migration"), 900.0, 120.0)
    assert [a for a in ctl["args"] if a.startswith("--evacuate-after")] == ["--evacuate-after=180"]
    assert build_parser().parse_args(ctl["args"]).evacuate_after == 180.0

    # inside a directory the pod mounts already (the state dir): the flag, no second mount
    pod, _ = rendered("--set", "agent.migration.socketDir=/var/lib/novalet/migration")
    assert "--migration-socket-dir=/var/lib/novalet/migration" in pod["containers"][0]["args"]
    assert migration_volume(pod) == (None, None)
    assert {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v} == {"/run/libvirt", "/var/lib/novalet"}

    # no directory: refused at render time (the agent always needs one)
    empty = helm("template", "rel", str(CHART), "--set", "agent.migration.socketDir=", check=False)
    assert empty.returncode != 0 and "agent.migration.socketDir is required" in empty.stderr


def test_helm_template_rbac_is_least_privilege(helm):
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv").stdout)
    agent = _rules(_one(docs, "ClusterRole", "-agent"))
    events = {r for r in agent if r[:2] == ("events.k8s.io", "events")}
    assert ("events.k8s.io", "events", "create", "") in events and {r[2] for r in events} <= {"create", "patch"}
    assert agent - events == {
        ("novalet.io", "virtualinstances", v, "") for v in ("get", "list", "watch", "patch")
    } | {("novalet.io", "virtualinstances/status", v, "") for v in ("get", "patch")} | {
        ("novalet.io", kind, "get", "") for kind in ("virtualimages", "clustervirtualimages")} | {
        ("novalet.io", "virtualimages", v, "") for v in ("list", "create")} | {
        ("novalet.io", f"{kind}/status", v, "") for kind in ("virtualimages", "clustervirtualimages")
        for v in ("get", "patch")} | {
        ("novalet.io", "hypervisors", "create", ""), ("novalet.io", "hypervisors/status", "patch", "")} | {
        ("authorization.k8s.io", "subjectaccessreviews", "create", ""),
        ("admissionregistration.k8s.io", "validatingadmissionpolicies", "get", REQUESTS_POLICY),
        ("admissionregistration.k8s.io", "validatingadmissionpolicybindings", "get", REQUESTS_POLICY),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch", "")}
    assert not any(r[1] == "secrets" for r in agent)  # no Secret anywhere unless a namespace opts in
    setpassword = _one(docs, "ClusterRole", "-setpassword")
    assert _rules(setpassword) == {("", "secrets", "get", "")}
    assert not [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and d["roleRef"]["name"] == setpassword["metadata"]["name"]]  # bound nowhere by default
    admin = _one(docs, "ClusterRole", "-admin")
    assert _rules(admin) == {("novalet.io", "virtualinstances/admin", "update", "")}
    assert not any(k.startswith("rbac.authorization.k8s.io/aggregate-to") for k in admin["metadata"]["labels"])
    agent_lease = _one(docs, "Role", "-agent")
    assert agent_lease["metadata"]["namespace"] == LEASE_NS
    assert _rules(agent_lease) == {("coordination.k8s.io", "leases", v, "") for v in ("get", "create", "update")}
    controller = _rules(_one(docs, "ClusterRole", "-controller"))
    assert controller == {("novalet.io", "virtualinstances", v, "") for v in ("get", "list", "watch")} | {
        ("novalet.io", "virtualinstances/status", "patch", ""), ("novalet.io", "hypervisors", "list", ""),
        ("novalet.io", "virtualimages", "get", ""), ("novalet.io", "clustervirtualimages", "get", ""),
        # Evacuate: the scheduler authorizes its requester as the agents do ResetState
        ("authorization.k8s.io", "subjectaccessreviews", "create", ""),
        ("admissionregistration.k8s.io", "validatingadmissionpolicies", "get", REQUESTS_POLICY),
        ("admissionregistration.k8s.io", "validatingadmissionpolicybindings", "get", REQUESTS_POLICY),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch", "")}  # reads the policy, writes none
    assert _rules(_one(docs, "Role", "-controller")) == {  # its own Lease: the one active scheduler
        ("coordination.k8s.io", "leases", "list", ""), ("coordination.k8s.io", "leases", "get", "rel-novalet-scheduler"),
        ("coordination.k8s.io", "leases", "update", "rel-novalet-scheduler")}

    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv", "--set", "agent.setPassword.namespaces={team-a,team-b}",
                      "--set", "rbac.adminRole.aggregateTo={admin}").stdout)
    bindings = [d for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == "rel-novalet-setpassword"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "rel-novalet-agent", "namespace": "nv"}]
               for b in bindings)
    labels = _one(docs, "ClusterRole", "-admin")["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"


def test_helm_template_webhook_configuration_and_policies(helm):
    """The chart installs the webhook configuration (the controller only serves it) with a CA it
    generated, and the two admission policies exactly as generated in crds/."""
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv").stdout)
    webhook = _one(docs, "ValidatingWebhookConfiguration")
    assert webhook["metadata"]["name"] == "rel-novalet-validate"
    (hook,) = webhook["webhooks"]
    (local,) = webhook_configuration({})["webhooks"]  # what `novalet controller` registers locally
    for key in ("name", "admissionReviewVersions", "sideEffects", "failurePolicy", "timeoutSeconds", "rules",
                "matchConditions"):
        assert hook[key] == local[key], key
    assert hook["failurePolicy"] == "Fail" and "namespaceSelector" not in hook
    assert hook["clientConfig"]["service"] == {"namespace": "nv", "name": "rel-novalet-controller", "port": 9443,
                                               "path": "/validate"}
    secret = _one(docs, "Secret", "-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["rel-novalet-controller.nv.svc"]  # what the apiserver checks

    rendered = [d for d in docs if d["kind"] in POLICY_KINDS]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # helm orders the documents by kind
    assert sorted(({**d, "metadata": {"name": d["metadata"]["name"]}} for d in rendered), key=key) == sorted(
        policy_manifests(), key=key)
    assert all(d["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm" for d in rendered)

    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv", "--set", "controller.webhook.enabled=false",
                      "--set", "controller.webhook.failurePolicy=Ignore").stdout)
    assert not [d for d in docs if d["kind"] in ("ValidatingWebhookConfiguration", "Secret", "Service")]
    assert sorted(d["kind"] for d in docs if d["kind"] in POLICY_KINDS) == sorted(POLICY_KINDS)  # they need no process
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv", "--set", "admissionPolicies.create=false",
                      "--set", "controller.webhook.failurePolicy=Ignore",
                      "--set-json", 'controller.webhook.namespaceSelector={"matchLabels":{"team":"a"}}').stdout)
    assert not [d for d in docs if d["kind"] in POLICY_KINDS]
    (hook,) = _one(docs, "ValidatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore" and hook["namespaceSelector"] == {"matchLabels": {"team": "a"}}


# --- values.schema.json: a wrong value fails with the key's name --------------------------

SCHEMA = CHART / "values.schema.json"
SCHEMA_ERROR = "values don't meet the specifications of the schema(s)"


def test_values_schema_covers_every_value():
    """Every key of values.yaml has a schema with a description, and every object of the chart's
    own (not a Kubernetes object passed through, like securityContext) refuses unknown keys."""
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict, value, path: str) -> None:
        assert node.get("description") or not path, f"{path}: no description"
        if "properties" in node:
            assert node["type"] == "object" and node["additionalProperties"] is False, path
            assert set(node.get("required", [])) <= set(node["properties"]), path
            for key, sub in node["properties"].items():
                walk(sub, (value or {}).get(key), f"{path}.{key}".lstrip("."))
            if isinstance(value, dict):
                assert set(value) <= set(node["properties"]), f"{path}: {set(value) - set(node['properties'])}"
        if isinstance(node.get("items"), dict) and "properties" in node["items"]:
            walk({**node["items"], "description": "item"}, None, f"{path}[]")

    walk(schema, values, "")


# (id, --set arguments or a values file's content, what helm's error must say)
WRONG_VALUES = [
    ("misspelled-key", ["--set", "agent.wokers=4"], "at '/agent': additional properties 'wokers' not allowed"),
    ("misspelled-key-in-a-file", {"controller": {"webhook": {"failurPolicy": "Ignore"}}},
     "at '/controller/webhook': additional properties 'failurPolicy' not allowed"),
    ("misspelled-top-level-key", {"agnet": {"workers": 4}}, "at '': additional properties 'agnet' not allowed"),
    ("string-for-a-number", ["--set", "agent.workers=many"], "at '/agent/workers': got string, want integer"),
    ("string-for-seconds", {"agent": {"stopTimeout": "60s"}}, "at '/agent/stopTimeout': got string, want number"),
    ("negative-timeout", ["--set", "agent.libvirtTimeout=-5"],
     "at '/agent/libvirtTimeout': exclusiveMinimum: got -5, want 0"),
    ("zero-lease", ["--set", "agent.lease.durationSeconds=0"],
     "at '/agent/lease/durationSeconds': exclusiveMinimum: got 0, want 0"),
    ("negative-migration-timeout", {"agent": {"migration": {"timeoutSeconds": -1.5}}},
     "at '/agent/migration/timeoutSeconds': exclusiveMinimum: got -1.5, want 0"),
    ("bad-pull-policy", ["--set", "image.pullPolicy=Sometimes"],
     "at '/image/pullPolicy': value must be one of 'IfNotPresent', 'Always', 'Never'"),
    ("bad-failure-policy", ["--set", "controller.webhook.failurePolicy=fail"],
     "at '/controller/webhook/failurePolicy': value must be one of 'Fail', 'Ignore'"),
    ("bad-domain-type", ["--set", "agent.domainType=xen"],
     "at '/agent/domainType': value must be one of 'auto', 'qemu', 'kvm'"),
    ("zero-probe-timeout", ["--set", "agent.domainTypeProbeTimeoutSeconds=0"],
     "at '/agent/domainTypeProbeTimeoutSeconds': exclusiveMinimum: got 0, want 0"),
    ("port-out-of-range", ["--set", "controller.webhook.port=70000"],
     "at '/controller/webhook/port': maximum: got 70,000, want 65,535"),
    ("webhook-port-0", ["--set", "controller.webhook.port=0"], "at '/controller/webhook/port': minimum: got 0, want 1"),
    ("metrics-port-out-of-range", ["--set", "agent.metricsPort=65536"],
     "at '/agent/metricsPort': maximum: got 65,536, want 65,535"),
    ("negative-metrics-port", ["--set", "controller.metricsPort=-1"],
     "at '/controller/metricsPort': minimum: got -1, want 0"),
    ("webhook-timeout-over-30", ["--set", "controller.webhook.timeoutSeconds=31"],
     "at '/controller/webhook/timeoutSeconds': maximum: got 31, want 30"),
    ("no-workers", ["--set", "agent.workers=0"], "at '/agent/workers': minimum: got 0, want 1"),
    ("zero-ratio", ["--set", "agent.allocationRatios.memory=0"],
     "at '/agent/allocationRatios/memory': exclusiveMinimum: got 0, want 0"),
    ("ratio-not-a-number", ["--set", "agent.allocationRatios.cpu=lots"],
     "at '/agent/allocationRatios/cpu': 'lots' does not match pattern"),
    ("bad-size", ["--set", "agent.snapshotQuota.bytes=50GB"],
     "at '/agent/snapshotQuota/bytes': '50GB' does not match pattern"),
    ("relative-path", ["--set", "agent.stateDir=var/lib/novalet"],
     "at '/agent/stateDir': 'var/lib/novalet' does not match pattern '^/'"),
    ("boolean-node-selector", ["--set", "agent.nodeSelector.novalet\\.io/hypervisor=true"],
     "at '/agent/nodeSelector/novalet.io~1hypervisor': got boolean, want string"),
    ("numeric-image-tag", ["--set", "image.tag=2"], "at '/image/tag': got number, want string"),
    ("unknown-network-key", {"agent": {"networks": [{"name": "ext", "brige": "br-ext"}]}},
     "at '/agent/networks/0': additional properties 'brige' not allowed"),
    ("removed-section", ["--set", "agent.lease=null"], "at '/agent': missing property 'lease'"),
]


@pytest.mark.parametrize("values, message", [case[1:] for case in WRONG_VALUES], ids=[c[0] for c in WRONG_VALUES])
def test_helm_template_refuses_a_wrong_value_naming_it(helm, tmp_path, values, message):
    if isinstance(values, dict):
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        values = ["-f", str(tmp_path / "values.yaml")]
    r = helm("template", "rel", str(CHART), *values, check=False)
    assert r.returncode != 0 and SCHEMA_ERROR in r.stderr and message in r.stderr, r.stderr
    assert not r.stdout.strip()  # nothing rendered


def test_helm_lint_refuses_a_wrong_value(helm):
    r = helm("lint", "--strict", str(CHART), "--set", "agent.workers=0", "--set", "agent.stopTimout=5", check=False)
    assert r.returncode != 0 and "1 chart(s) failed" in r.stdout + r.stderr
    assert "at '/agent/workers': minimum: got 0, want 1" in r.stdout
    assert "at '/agent': additional properties 'stopTimout' not allowed" in r.stdout


def test_helm_template_accepts_values_at_their_limits(helm, tmp_path):
    """What the schema lets through, the agent's and the controller's parsers take: a fraction
    given with --set (a string to helm), sizes in bytes, ports at the ends of their range, a
    percentage, seconds with a fraction from a values file, Helm's `global` of a parent chart."""
    from novalet.cli import build_parser

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "agent": {"stopTimeout": 2.5, "softRebootTimeout": 0.5, "orphans": {"graceSeconds": 0},
                  "migration": {"peerDeadAfterSeconds": 0},
                  "extraEnv": [{"name": "A", "value": "1"}], "resources": {"limits": {"memory": "256Mi", "cpu": 1}},
                  "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}},
        "controller": {"webhook": {"namespaceSelector": {"matchExpressions": [
            {"key": "team", "operator": "In", "values": ["a"]}]}}}}))
    docs = _docs(helm("template", "rel", str(CHART), "-f", str(values),
                      "--set", "agent.allocationRatios.cpu=1.5", "--set", "agent.allocationRatios.memory=.75",
                      "--set", "agent.snapshotQuota.bytes=1073741824", "--set", "agent.metricsPort=65535",
                      "--set", "controller.metricsPort=1", "--set", "controller.webhook.port=65535",
                      "--set", "controller.webhook.timeoutSeconds=30", "--set-string", "image.tag=2",
                      "--set", "global.anything=1", "--set", "agent.workers=1").stdout)
    agent = _one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert agent["image"] == "novalet:2"
    args = build_parser().parse_args(agent["args"])
    assert (args.cpu_allocation_ratio, args.memory_allocation_ratio, args.snapshot_quota_bytes, args.metrics_port,
            args.stop_timeout, args.soft_reboot_timeout, args.workers, args.orphan_grace_seconds,
            args.migration_peer_dead_after) == (1.5, 0.75, 2**30, 65535, 2.5, 0.5, 1, 0.0, 0.0)
    controller = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert build_parser().parse_args(controller["args"]).webhook_port == 65535
    assert _one(docs, "ValidatingWebhookConfiguration")["webhooks"][0]["timeoutSeconds"] == 30


# --- the docs' values examples render --------------------------------------------------------

VALUE_FLAGS = ("--set", "--set-string", "--set-json")
DOC_FILES = [REPO / "README.md", CHART / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _value_flags(words: list[str]) -> list[str]:
    """The --set/--set-string/--set-json arguments among a command's words (-f names a file the
    docs do not ship)."""
    flags = []
    for i, word in enumerate(words):
        if word in VALUE_FLAGS and i + 1 < len(words):
            flags += [word, words[i + 1]]
        elif word.split("=", 1)[0] in VALUE_FLAGS and "=" in word:
            flags += word.split("=", 1)
    return flags


def _doc_value_examples() -> list[tuple[str, list[str] | str]]:
    """(where, values) for every example of the chart's values in the docs: the value flags of
    each `helm install|upgrade|template ... charts/novalet` command and of each `--set ...` code
    span (split as the shell splits them), each `key=value` code span whose key is one of the
    chart's, and each YAML block made of the chart's top-level keys (a values file)."""
    top = set(yaml.safe_load((CHART / "values.yaml").read_text()))
    examples: list[tuple[str, list[str] | str]] = []
    for doc in DOC_FILES:
        if not doc.exists():
            continue
        where, text = str(doc.relative_to(REPO)), doc.read_text()
        fence = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
        for lang, body in fence.findall(text):
            if lang == "yaml":
                try:
                    data = yaml.safe_load(body)
                except yaml.YAMLError:  # an illustration, not a manifest or values
                    continue
                if isinstance(data, dict) and data and set(data) <= top:
                    examples.append((f"{where}: values {sorted(data)}", body))
            lines = re.sub(r"\\\n", " ", body).splitlines()  # continuation lines joined
            for command in [line for line in lines if re.match(r"\s*helm (install|upgrade|template) ", line)]:
                if "charts/novalet" in command:
                    examples.append((f"{where}: {command.strip()}", _value_flags(shlex.split(command))))
        for span in re.findall(r"`([^`\n]+)`", fence.sub("", text)):
            if re.match(r"helm (install|upgrade|template) .*charts/novalet", span) or span.startswith("--set"):
                examples.append((f"{where}: `{span}`", _value_flags(shlex.split(span))))
            elif re.fullmatch(r"[A-Za-z][\w.\\/-]*=\S+", span) and span.split(".", 1)[0] in top:
                examples.append((f"{where}: `{span}`", ["--set", span]))
    return [(where, values) for where, values in examples if values]


DOC_EXAMPLES = _doc_value_examples()


def test_the_docs_have_values_examples():
    wheres = " ".join(where for where, _ in DOC_EXAMPLES)
    for doc in ("docs/install.md", "charts/novalet/README.md", "docs/operations.md", "docs/networks.md"):
        assert doc in wheres, doc
    assert len(DOC_EXAMPLES) >= 8, DOC_EXAMPLES


@pytest.mark.parametrize("values", [v for _, v in DOC_EXAMPLES], ids=[w for w, _ in DOC_EXAMPLES])
def test_helm_template_renders_the_docs_values_examples(helm, tmp_path, values):
    if isinstance(values, str):
        (tmp_path / "values.yaml").write_text(values)
        values = ["-f", str(tmp_path / "values.yaml")]
    helm("template", "rel", str(CHART), "-n", "nv", *values)


def test_the_docs_node_selector_example_selects_the_label(helm):
    """install.md's placement example: a label value that reads as a boolean goes in as a string."""
    (span,) = [v for w, v in DOC_EXAMPLES if w.startswith("docs/install.md") and "nodeSelector" in " ".join(v)]
    docs = _docs(helm("template", "rel", str(CHART), *span).stdout)
    assert _one(docs, "DaemonSet")["spec"]["template"]["spec"]["nodeSelector"] == {"novalet.io/hypervisor": "true"}


# --- Prometheus Operator objects and the Grafana dashboard -------------------------------

MONITORS = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "agent.metricsPort=9100",
            "--set", "controller.metricsPort=9101", "--set", "metrics.serviceMonitor.labels.release=prom"]
NO_MONITORS = "metrics.serviceMonitor.enabled is true but nothing serves metrics"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
DASHBOARD_DS = {"type": "prometheus", "uid": "${datasource}"}


def _selects(selector: dict, labels: dict | None) -> bool:
    """Does a LabelSelector (matchLabels only: the chart writes no matchExpressions) select these labels?"""
    assert set(selector) == {"matchLabels"} and selector["matchLabels"], selector
    return selector["matchLabels"].items() <= (labels or {}).items()


def _container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def _monitoring(docs: list[dict]) -> list[str]:
    return sorted(f'{d["kind"]}/{d["metadata"]["name"]}' for d in docs
                  if d["kind"] in ("ServiceMonitor", "PodMonitor") or d["metadata"]["name"].endswith("-metrics"))


def test_helm_template_monitors_select_what_serves_metrics(helm):
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv", *MONITORS).stdout)
    pods = {"agent": _one(docs, "DaemonSet")["spec"]["template"],
            "controller": _one(docs, "Deployment")["spec"]["template"]}

    # the agents: a PodMonitor (each agent is its own target, on its pod's IP: no hostNetwork)
    pm = _one(docs, "PodMonitor", "-agent")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["namespace"] == "nv" and pm["spec"]["namespaceSelector"] == {"matchNames": ["nv"]}
    assert pm["metadata"]["labels"]["release"] == "prom"  # what a Prometheus' podMonitorSelector asks for
    assert pm["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
    assert [c for c, t in pods.items() if _selects(pm["spec"]["selector"], t["metadata"]["labels"])] == ["agent"]
    assert not pods["agent"]["spec"].get("hostNetwork")
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and _container_ports(pods["agent"])["metrics"] == 9100
    assert "--metrics-port=9100" in pods["agent"]["spec"]["containers"][0]["args"]
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
            "action": "replace"} in endpoint["relabelings"]  # the dashboard's `node` variable

    # the controller: a ServiceMonitor through a Service of its own, never the webhook's
    sm = _one(docs, "ServiceMonitor", "-controller")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == "nv" and sm["spec"]["namespaceSelector"] == {"matchNames": ["nv"]}
    assert sm["metadata"]["labels"]["release"] == "prom"
    services = [d for d in docs if d["kind"] == "Service"]
    assert len(services) == 2  # the webhook's and the metrics'
    selected = [s for s in services if s["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
                and _selects(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == ["rel-novalet-controller-metrics"]
    svc = selected[0]
    assert [c for c, t in pods.items()
            if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()] == ["controller"]
    (endpoint,) = sm["spec"]["endpoints"]
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert endpoint["port"] == "metrics" and svc_ports["metrics"]["port"] == 9101
    assert _container_ports(pods["controller"])[svc_ports["metrics"]["targetPort"]] == 9101
    assert "--metrics-port=9101" in pods["controller"]["spec"]["containers"][0]["args"]
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"

    helm("lint", "--strict", str(CHART), *MONITORS, "--set", "metrics.serviceMonitor.scrapeTimeout=10s",
         "--set", "metrics.grafanaDashboard.enabled=true")

    # each only where its component serves metrics
    def render(*values: str) -> list[str]:
        return _monitoring(_docs(helm("template", "rel", str(CHART), "-n", "nv",
                                      "--set", "metrics.serviceMonitor.enabled=true", *values).stdout))

    assert render("--set", "agent.metricsPort=9100") == ["PodMonitor/rel-novalet-agent"]
    assert render("--set", "controller.metricsPort=9101") == [
        "Service/rel-novalet-controller-metrics", "ServiceMonitor/rel-novalet-controller"]
    assert render("--set", "agent.metricsPort=9100", "--set", "controller.metricsPort=9101",
                  "--set", "agent.enabled=false") == [
        "Service/rel-novalet-controller-metrics", "ServiceMonitor/rel-novalet-controller"]
    # off by default, metrics ports or not
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv", "--set", "agent.metricsPort=9100",
                      "--set", "controller.metricsPort=9101").stdout)
    assert _monitoring(docs) == [] and not [d for d in docs if d["kind"] == "ConfigMap"]


@pytest.mark.parametrize("values", [
    [],
    ["--set", "agent.metricsPort=0", "--set", "controller.metricsPort=0"],
    ["--set", "agent.metricsPort=9100", "--set", "agent.enabled=false"],  # its metrics, but no agent
], ids=["defaults", "both-0", "disabled-agent"])
def test_helm_template_monitors_without_metrics_ports_fail(helm, values):
    r = helm("template", "rel", str(CHART), "--set", "metrics.serviceMonitor.enabled=true", *values, check=False)
    assert r.returncode != 0 and NO_MONITORS in r.stderr, r.stderr + r.stdout


def test_helm_template_grafana_dashboard_configmap(helm):
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv", "--set", "metrics.grafanaDashboard.enabled=true",
                      "--set", "metrics.grafanaDashboard.annotations.grafana_folder=novalet").stdout)
    cm = _one(docs, "ConfigMap", "-grafana-dashboard")
    assert cm["metadata"]["namespace"] == "nv"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "novalet"}
    assert list(cm["data"]) == ["novalet.json"]
    assert json.loads(cm["data"]["novalet.json"]) == json.loads(DASHBOARD.read_text())
    assert _monitoring(docs) == []  # independent of the monitors
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv", "--set", "metrics.grafanaDashboard.enabled=true",
                      "--set", "metrics.grafanaDashboard.namespace=monitoring").stdout)
    assert _one(docs, "ConfigMap", "-grafana-dashboard")["metadata"]["namespace"] == "monitoring"


def _exported_series() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """What the agent and the controller export: {sample name: its label names} (with the
    _total, _bucket, _count, _sum suffixes) and {family name: its sample names}."""
    agent_registry, controller_registry = CollectorRegistry(), CollectorRegistry()
    agent, controller = AgentMetrics(agent_registry), ControllerMetrics(controller_registry)
    agent.count_instances(lambda: [{"vmState": "active", "taskState": "spawning"}])
    for metric in [*vars(agent).values(), *vars(controller).values()]:
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))  # a child: a labelled family has no sample without
    series: dict[str, set[str]] = {}
    families: dict[str, set[str]] = {}
    for registry in (agent_registry, controller_registry):
        for family in registry.collect():
            assert family.samples, family.name
            for sample in family.samples:
                series.setdefault(sample.name, set()).update(sample.labels)
                families.setdefault(family.name, set()).add(sample.name)
    return series, families


# Labels a scrape adds: the PodMonitor's `node`, Prometheus' own target labels.
TARGET_LABELS = {"node", "instance", "job", "namespace", "pod", "container", "service", "endpoint"}
PROMQL_FUNCTIONS = {"sum", "avg", "min", "max", "count", "topk", "rate", "irate", "increase", "delta",
                    "histogram_quantile", "vector", "clamp_min", "clamp_max", "abs", "time"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset"}
PROMQL_TOKENS = re.compile(r'(?P<string>"(?:[^"\\]|\\.)*")|(?P<range>\[[^\]]*\])'
                           r'|\b(?:by|without|on|ignoring|group_left|group_right)\s*\((?P<grouping>[^)]*)\)'
                           r'|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\(|\s+(?=(?:by|without)\s*\())?'
                           r'(?:\s*\{(?P<matchers>[^}]*)\})?'
                           r'|(?P<brace>\{)')
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')


def _promql(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """A series selector's metric name -> the label names its matchers use; and the labels of
    its by/without/on clauses. Enough of PromQL for the dashboard's expressions, and it refuses
    what it does not know (a function not listed, a selector without a metric name)."""
    selectors: dict[str, set[str]] = {}
    grouping: set[str] = set()
    for token in PROMQL_TOKENS.finditer(expr):
        assert not token["brace"], f"a selector without a metric name in {expr!r}"
        if token["grouping"] is not None:
            grouping |= {label.strip() for label in token["grouping"].split(",") if label.strip()}
        elif token["name"] and token["call"]:
            assert token["name"] in PROMQL_FUNCTIONS, f"unknown function {token['name']} in {expr!r}"
        elif token["name"] and token["name"] not in PROMQL_WORDS:
            matchers = token["matchers"] or ""
            labels = set(MATCHER.findall(matchers))
            assert len(labels) == len([m for m in matchers.split(",") if m.strip()]), matchers
            selectors.setdefault(token["name"], set()).update(labels)
    return selectors, grouping


def test_dashboard_queries_only_what_the_code_exports():
    """Every series the dashboard's PromQL reads is one AgentMetrics or ControllerMetrics
    registers (suffix included), every label it filters or groups by is one the series has
    (or the scrape adds), and every metric the code exports has a panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    series, families = _exported_series()
    used: set[str] = set()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        selectors, grouping = _promql(expr)
        assert selectors, expr
        for name, labels in selectors.items():
            assert name in series, f"{name} (in {expr!r}) is not exported; exported: {sorted(series)}"
            assert labels <= series[name] | TARGET_LABELS, f"{name} has no label {labels - series[name] - TARGET_LABELS}: {expr!r}"
        known = set().union(*(series[name] for name in selectors)) | TARGET_LABELS
        assert grouping <= known, f"grouping by {grouping - known}, which {sorted(selectors)} lack: {expr!r}"
        used |= set(selectors)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            _, grouping = _promql(target["expr"])
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend <= grouping, f"legend {legend - grouping} not in the result's labels: {target['expr']!r}"
    # the `node` variable reads a label the PodMonitor adds, from an exported series
    (node,) = [v for v in dashboard["templating"]["list"] if v["name"] == "node"]
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", node["query"]["query"]).groups()
    assert metric in series and label == "node" and node["datasource"] == DASHBOARD_DS
    assert node["includeAll"] and node["allValue"] == ".*"  # All also matches series without a node label
    missing = sorted(family for family, names in families.items() if not names & used)
    assert not missing, f"exported but on no panel: {missing}"


def test_dashboard_panels_have_a_datasource_and_targets():
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] == "novalet"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "__inputs" not in dashboard  # the sidecar loads it as is: no import-time inputs to fill
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(not p.get("targets") and not p.get("panels") for p in dashboard["panels"]
                          if p["type"] == "row")  # rows only lay out, none is collapsed around hidden panels
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        assert panel.get("datasource") == DASHBOARD_DS, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target.get("expr", "").strip() and target.get("refId"), where
            assert target.get("datasource", DASHBOARD_DS) == DASHBOARD_DS, where
        assert panel["title"] and panel["type"] in ("timeseries", "stat"), where
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, where


# --- installed on the real apiserver -------------------------------------------------------

class Release:
    def __init__(self, name: str, namespace: str):
        self.name, self.namespace = name, namespace
        self.agent_sa, self.controller_sa = f"{name}-novalet-agent", f"{name}-novalet-controller"
        self.fullname = f"{name}-novalet"
        # No controller pod ever runs here (no kubelet), so the chart's webhook, failing closed,
        # would refuse every instance's spec change in the cluster: this release's webhook
        # covers only namespaces carrying this label (test_webhook_down_*).
        self.webhook_label = ("novalet.io/webhook-test", name)


@pytest.fixture(scope="module")
def release(control_plane, crds, helm):
    """The chart installed into a fresh namespace whose Pod Security level is `restricted`. The
    session's stack installed the admission policies from crds/ already: the release takes
    them over (they have fixed names), and they are put back after it is uninstalled."""
    rel = Release(f"nv{uuid.uuid4().hex[:6]}", f"chart-{uuid.uuid4().hex[:6]}")
    control_plane.kubectl("create", "namespace", rel.namespace)
    control_plane.kubectl("label", "namespace", rel.namespace, "pod-security.kubernetes.io/enforce=restricted")
    key, value = rel.webhook_label
    try:
        helm("install", rel.name, str(CHART), "--namespace", rel.namespace, "--set", "image.tag=test",
             "--take-ownership", "--set-json",
             f'controller.webhook.namespaceSelector={{"matchLabels":{{"{key}":"{value}"}}}}')
        yield rel
    finally:
        helm("uninstall", rel.name, "--namespace", rel.namespace, check=False)
        control_plane.kubectl("delete", "namespace", rel.namespace, "--wait=false", "--ignore-not-found",
                              check=False)
        control_plane.apply_crds()


def _token_kubeconfig(control_plane, namespace: str, sa: str, path: Path) -> Path:
    token = control_plane.kubectl("create", "token", sa, "-n", namespace, "--duration=20m").stdout.strip()
    assert token.count(".") == 2, token  # a JWT
    ca = base64.b64encode(Path(control_plane.ca_file).read_bytes()).decode()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": sa,
        "clusters": [{"name": "local", "cluster": {"server": control_plane.server,
                                                    "certificate-authority-data": ca}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "local", "user": sa}}]}))
    path.chmod(0o600)
    return path


async def _client(kubeconfig: Path) -> client.ApiClient:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return client.ApiClient(cfg)


async def _allowed(call) -> None:
    try:
        await call
    except ApiException as e:
        assert e.status != 403, f"refused: {e.status} {e.reason}: {e.body}"


async def _refused(call) -> None:
    with pytest.raises(ApiException) as exc:
        await call
    assert exc.value.status == 403, f"{exc.value.status} {exc.value.reason}: {exc.value.body}"


async def _can(api: client.ApiClient, verb: str, resource: str, group: str = "", namespace: str | None = None,
               name: str | None = None, subresource: str | None = None) -> bool:
    """A SelfSubjectAccessReview: the authorizer's answer for the token's own identity."""
    review = await client.AuthorizationV1Api(api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, resource=resource, group=group, namespace=namespace, name=name,
                subresource=subresource))))
    return bool(review.status.allowed)


def _whoami(control_plane, kubeconfig: Path) -> str:
    r = subprocess.run([str(control_plane.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", "auth", "whoami",
                        "-o", "json"], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(r.stdout)["status"]["userInfo"]["username"]


def test_helm_install_creates_the_objects(control_plane, release, helm):
    ns = release.namespace
    status = json.loads(helm("status", release.name, "-n", ns, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    for kind, name in [("serviceaccount", release.agent_sa), ("serviceaccount", release.controller_sa),
                       ("daemonset", release.agent_sa), ("deployment", release.controller_sa),
                       ("service", release.controller_sa), ("secret", f"{release.fullname}-webhook-tls")]:
        control_plane.kubectl("get", kind, name, "-n", ns)
    for kind, name in [("clusterrole", release.agent_sa), ("clusterrolebinding", release.agent_sa),
                       ("clusterrole", release.controller_sa), ("clusterrolebinding", release.controller_sa),
                       ("clusterrole", f"{release.fullname}-setpassword"), ("clusterrole", f"{release.fullname}-admin"),
                       ("validatingwebhookconfiguration", f"{release.fullname}-validate"),
                       ("crd", "virtualinstances.novalet.io")]:
        control_plane.kubectl("get", kind, name)
    # the admission policies belong to the release now, and the apiserver type-checked them clean
    for kind in ("mutatingadmissionpolicy", "mutatingadmissionpolicybinding", "validatingadmissionpolicy",
                 "validatingadmissionpolicybinding"):
        name = "novalet-requester" if kind.startswith("mutating") else "novalet-requests"
        got = json.loads(control_plane.kubectl("get", kind, name, "-o", "json").stdout)
        assert got["metadata"]["annotations"]["meta.helm.sh/release-name"] == release.name, kind
    vap = json.loads(control_plane.kubectl("get", "validatingadmissionpolicy", "novalet-requests", "-o", "json").stdout)
    assert not (vap.get("status", {}).get("typeChecking") or {}).get("expressionWarnings"), vap["status"]
    for kind in ("role", "rolebinding"):
        for name in (release.agent_sa, release.controller_sa):
            control_plane.kubectl("get", kind, name, "-n", LEASE_NS)
    # no kubelet and no scheduler: the controller's Pod is created (so it passes admission, Pod
    # Security `restricted` included) and stays Pending
    deadline = time.monotonic() + 30
    pods: list = []
    while time.monotonic() < deadline and not pods:
        pods = json.loads(control_plane.kubectl(
            "get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=controller", "-o", "json").stdout)["items"]
        time.sleep(0.5)
    assert pods, "the controller's ReplicaSet created no Pod: " + control_plane.kubectl(
        "get", "replicasets,events", "-n", ns, "-o", "wide", check=False).stdout
    assert pods[0]["spec"]["serviceAccountName"] == release.controller_sa
    assert {"name": "tls", "secret": {"secretName": f"{release.fullname}-webhook-tls", "defaultMode": 420}} in \
        pods[0]["spec"]["volumes"]


def test_helm_upgrade_keeps_the_webhook_ca(control_plane, release, helm):
    def ca() -> tuple[str, str]:
        secret = json.loads(control_plane.kubectl("get", "secret", f"{release.fullname}-webhook-tls", "-n",
                                                  release.namespace, "-o", "json").stdout)
        webhook = json.loads(control_plane.kubectl("get", "validatingwebhookconfiguration",
                                                   f"{release.fullname}-validate", "-o", "json").stdout)
        return secret["data"]["ca.crt"], webhook["webhooks"][0]["clientConfig"]["caBundle"]

    before = ca()
    assert before[0] == before[1]
    helm("upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values")
    assert ca() == before  # the running controller's certificate stays valid across upgrades


def test_helm_install_and_upgrade_refuse_a_wrong_value(control_plane, release, helm):
    """`helm install` with a wrong value fails before anything reaches the cluster, naming the
    key (no namespace, no release); `helm upgrade` with one leaves the release as it was."""
    name, ns = f"nv{uuid.uuid4().hex[:6]}", f"chart-{uuid.uuid4().hex[:6]}"
    r = helm("install", name, str(CHART), "--namespace", ns, "--create-namespace", "--set", "agent.stopTimout=30",
             check=False)
    assert r.returncode != 0 and r.stderr.startswith(f"Error: INSTALLATION FAILED: {SCHEMA_ERROR}"), r.stderr
    assert "at '/agent': additional properties 'stopTimout' not allowed" in r.stderr
    assert control_plane.kubectl("get", "namespace", ns, check=False).returncode != 0
    assert helm("status", name, "-n", ns, check=False).returncode != 0

    def history() -> list[dict]:
        return json.loads(helm("history", release.name, "-n", release.namespace, "-o", "json").stdout)

    before = history()
    r = helm("upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values",
             "--set", "controller.webhook.failurePolicy=ignore", check=False)
    assert r.returncode != 0 and r.stderr.startswith(f"Error: UPGRADE FAILED: {SCHEMA_ERROR}"), r.stderr
    assert "at '/controller/webhook/failurePolicy': value must be one of 'Fail', 'Ignore'" in r.stderr
    assert history() == before


async def test_webhook_down_refuses_spec_changes_only_and_the_policies_hold(control_plane, release, kube_api,
                                                                             tmp_path):
    """No controller pod runs (no kubelet): the chart's webhook is down, as between `helm
    install` and the controller's first start. In a namespace it covers, spec changes fail
    closed; status writes, metadata writes and deletes never call it; and the in-apiserver
    policies still refuse what they refuse (here: deleting another user's locked instance)."""
    ns = f"down-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", ns)
    custom = client.CustomObjectsApi(kube_api)
    try:
        for name in ("vm-a", "vm-b"):  # created before the namespace is covered
            await custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance", "metadata": {"name": name},
                "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}}})
        key, value = release.webhook_label
        control_plane.kubectl("label", "namespace", ns, f"{key}={value}")
        started = time.monotonic()
        admitted, wanted = "Running", ("Stopped", "Paused")
        for attempt in range(120):  # until the apiserver's informer sees the label
            desired = wanted[attempt % 2]  # a real change each time: an unchanged spec never calls it
            try:
                await custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm-a",
                                                            {"spec": {"powerState": desired}}, _content_type=MERGE)
                admitted = desired
            except ApiException as e:
                assert e.status == 500, e.body
                message = json.loads(e.body)["message"]
                break
            await asyncio.sleep(0.25)
        else:
            pytest.fail("spec changes are still admitted with the webhook down")
        assert f'failed calling webhook "{WEBHOOK}"' in message
        assert (await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm-a"))["spec"][
            "powerState"] == admitted  # the refused change was not stored
        # what never depends on the controller
        await custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "vm-a", {"status": {
            "vmState": "active", "lock": {"lockedBy": "alice", "reason": "audit", "lockedAt": "2026-01-01T00:00:00Z"}}},
            _content_type=MERGE)
        await custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm-a",
                                                    {"metadata": {"labels": {"tier": "db"}}}, _content_type=MERGE)
        await custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm-b")
        # the policies: a namespace editor may not delete alice's locked instance
        control_plane.kubectl("-n", ns, "create", "serviceaccount", "bob")
        control_plane.kubectl("-n", ns, "create", "role", "vinst-edit", "--verb=get,patch,delete",
                              "--resource=virtualinstances.novalet.io")
        control_plane.kubectl("-n", ns, "create", "rolebinding", "bob-edit", "--role=vinst-edit",
                              f"--serviceaccount={ns}:bob")
        bob = await _client(_token_kubeconfig(control_plane, ns, "bob", tmp_path / "bob.kubeconfig"))
        try:
            for _ in range(40):  # RBAC takes effect once the apiserver's informers see the binding
                if await _can(bob, "delete", PLURAL, GROUP, namespace=ns):
                    break
                await asyncio.sleep(0.25)
            with pytest.raises(ApiException) as refused:
                await client.CustomObjectsApi(bob).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm-a")
        finally:
            await bob.close()
        body = json.loads(refused.value.body)
        assert refused.value.status == 403, body
        assert (f"instance {ns}/vm-a is locked by alice (reason: audit): only alice or an administrator may "
                "delete it") in body["message"]
        assert time.monotonic() - started < 60
    finally:
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


async def test_agent_rbac_with_its_token(control_plane, release, kube_api, tmp_path):
    ns = release.namespace
    admin = client.CustomObjectsApi(kube_api)
    await client.CoreV1Api(kube_api).create_namespaced_secret(ns, client.V1Secret(
        metadata=client.V1ObjectMeta(name="pw"), string_data={"password": "s3cret"}))
    vm = await admin.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance", "metadata": {"name": "vm1"},
        "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}, "powerState": "Running"}})
    lease_name = f"novalet-agent-{release.name}-node"

    kubeconfig = _token_kubeconfig(control_plane, ns, release.agent_sa, tmp_path / "agent.kubeconfig")
    assert _whoami(control_plane, kubeconfig) == f"system:serviceaccount:{ns}:{release.agent_sa}"
    api = await _client(kubeconfig)
    try:
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        coordination = client.CoordinationV1Api(api)
        # what the agent does
        listed = await custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        assert any(i["metadata"]["uid"] == vm["metadata"]["uid"] for i in listed["items"])
        assert await _can(api, "watch", PLURAL, GROUP)
        got = await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm1")
        got = await custom.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "vm1",
            {"metadata": {"resourceVersion": got["metadata"]["resourceVersion"], "finalizers": ["novalet.io/test"]}},
            _content_type=MERGE)
        got = await custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, "vm1",
            {"metadata": {"resourceVersion": got["metadata"]["resourceVersion"]}, "status": {"vmState": "building"}},
            _content_type=MERGE)
        assert got["status"]["vmState"] == "building"
        await custom.get_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "vm1")
        await custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm1",
                                                    {"metadata": {"finalizers": None}}, _content_type=MERGE)
        await client.EventsV1Api(api).create_namespaced_event(ns, client.EventsV1Event(
            metadata=client.V1ObjectMeta(generate_name="vm1-"), event_time=datetime.now(UTC),
            action="Reconcile", reason="Test", note="rbac check", type="Normal",
            reporting_controller="novalet.io/agent", reporting_instance="test",
            regarding=client.V1ObjectReference(api_version=f"{GROUP}/{VERSION}", kind="VirtualInstance",
                                               name="vm1", namespace=ns, uid=got["metadata"]["uid"])))
        # before ResetState / SetPassword: is the requester allowed, and is the policy in force?
        review = await client.AuthorizationV1Api(api).create_subject_access_review(client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(user="someone", groups=["system:authenticated"],
                                                  resource_attributes=client.V1ResourceAttributes(
                                                      verb="update", group=GROUP, resource=PLURAL,
                                                      subresource="admin", namespace=ns, name="vm1"))))
        assert review.status.allowed is False
        admission = client.AdmissionregistrationV1Api(api)
        await admission.read_validating_admission_policy(REQUESTS_POLICY)
        await admission.read_validating_admission_policy_binding(REQUESTS_POLICY)
        # SetPassword's Secret: refused until the namespace opts in with the one documented command
        await _refused(core.read_namespaced_secret("pw", ns))
        control_plane.kubectl("-n", ns, "create", "rolebinding", "novalet-setpassword",
                              f"--clusterrole={release.fullname}-setpassword",
                              f"--serviceaccount={ns}:{release.agent_sa}")
        for _ in range(40):
            if await _can(api, "get", "secrets", namespace=ns, name="pw"):
                break
            await asyncio.sleep(0.25)
        secret = await core.read_namespaced_secret("pw", ns)
        assert base64.b64decode(secret.data["password"]) == b"s3cret"
        lease = await coordination.create_namespaced_lease(LEASE_NS, client.V1Lease(
            metadata=client.V1ObjectMeta(name=lease_name, labels={"novalet.io/node": "n"}),
            spec=client.V1LeaseSpec(holder_identity="test", lease_duration_seconds=20)))
        lease = await coordination.read_namespaced_lease(lease_name, LEASE_NS)
        lease.spec.holder_identity = "test2"
        await coordination.replace_namespaced_lease(lease_name, LEASE_NS, lease)
        assert await _can(api, "list", "customresourcedefinitions", "apiextensions.k8s.io")

        # what it must not do
        await _refused(custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm1"))
        await _refused(custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance", "metadata": {"name": "vm2"},
            "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}}}))
        await _refused(custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm1", got))
        await _refused(core.list_secret_for_all_namespaces())
        await _refused(core.list_namespaced_secret(ns))
        assert not await _can(api, "watch", "secrets", namespace=ns)
        await _refused(core.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name="x"), spec=client.V1PodSpec(containers=[
                client.V1Container(name="x", image="x")]))))
        await _refused(core.list_pod_for_all_namespaces())
        await _refused(core.list_node())
        await _refused(coordination.delete_namespaced_lease(lease_name, LEASE_NS))
        await _refused(coordination.list_namespaced_lease(LEASE_NS))
        await _refused(coordination.create_namespaced_lease(ns, client.V1Lease(
            metadata=client.V1ObjectMeta(name=lease_name))))
        await _refused(client.CoreV1Api(api).create_namespaced_event(ns, client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="vm1-"), involved_object=client.V1ObjectReference(
                kind="VirtualInstance", name="vm1", namespace=ns))))
        await _refused(client.AdmissionregistrationV1Api(api).list_validating_webhook_configuration())
        await _refused(admission.list_validating_admission_policy())
        await _refused(admission.read_validating_admission_policy("someone-elses-policy"))
        await _refused(core.read_namespaced_secret("pw", "default"))  # other namespaces did not opt in
        assert not await _can(api, "update", PLURAL, GROUP, namespace=ns, subresource="admin")
        assert not await _can(api, "update", PLURAL, GROUP, namespace=ns, subresource="status")
        assert not await _can(api, "delete", "events", "events.k8s.io", namespace=ns)
    finally:
        await api.close()
        await client.CoordinationV1Api(kube_api).delete_namespaced_lease(lease_name, LEASE_NS)


async def test_controller_rbac_with_its_token(control_plane, release, kube_api, tmp_path):
    ns = release.namespace
    await client.CustomObjectsApi(kube_api).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualInstance", "metadata": {"name": "vm3"},
        "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}, "powerState": "Running"}})

    kubeconfig = _token_kubeconfig(control_plane, ns, release.controller_sa, tmp_path / "controller.kubeconfig")
    assert _whoami(control_plane, kubeconfig) == f"system:serviceaccount:{ns}:{release.controller_sa}"
    api = await _client(kubeconfig)
    try:
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        coordination, admission = client.CoordinationV1Api(api), client.AdmissionregistrationV1Api(api)
        # what the controller does: the heartbeat watch
        await coordination.list_namespaced_lease(LEASE_NS, label_selector="novalet.io/node")
        listed = await custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        (vm,) = [i for i in listed["items"] if i["metadata"]["namespace"] == ns and i["metadata"]["name"] == "vm3"]
        await custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm3")
        assert await _can(api, "watch", PLURAL, GROUP)
        patched = await custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, "vm3",
            {"metadata": {"resourceVersion": vm["metadata"]["resourceVersion"]},
             "status": {"conditions": [{"type": "HostAgentReady", "status": "False", "reason": "NoAgent",
                                        "message": "test", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}},
            _content_type=MERGE)
        assert patched["status"]["conditions"][0]["reason"] == "NoAgent"
        # before the scheduler takes an Evacuate: is the requester allowed, and is the policy in force?
        review = await client.AuthorizationV1Api(api).create_subject_access_review(client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(user="someone", groups=["system:authenticated"],
                                                  resource_attributes=client.V1ResourceAttributes(
                                                      verb="update", group=GROUP, resource=PLURAL,
                                                      subresource="admin", namespace=ns, name="vm3"))))
        assert review.status.allowed is False
        await admission.read_validating_admission_policy(REQUESTS_POLICY)
        await admission.read_validating_admission_policy_binding(REQUESTS_POLICY)
        # what it must not do: the chart installs the webhook configuration, the controller reads
        # the one policy and writes no admission object
        webhook = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
                   "metadata": {"name": "forged"}, "webhooks": []}
        await _refused(admission.create_validating_webhook_configuration(webhook, dry_run="All"))
        await _refused(admission.read_validating_webhook_configuration(f"{release.fullname}-validate"))
        await _refused(admission.delete_validating_webhook_configuration(f"{release.fullname}-validate"))
        await _refused(admission.delete_validating_admission_policy_binding(REQUESTS_POLICY))
        await _refused(admission.list_validating_webhook_configuration())
        await _refused(admission.list_mutating_webhook_configuration())
        await _refused(admission.list_validating_admission_policy())
        await _refused(admission.read_validating_admission_policy("someone-elses-policy"))
        await _refused(custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm3",
                                                             {"metadata": {"finalizers": ["x"]}},
                                                             _content_type=MERGE))
        await _refused(custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm3",
                                                             {"spec": {"powerState": "Stopped"}},
                                                             _content_type=MERGE))
        await _refused(custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "vm3"))
        await _refused(coordination.create_namespaced_lease(LEASE_NS, client.V1Lease(
            metadata=client.V1ObjectMeta(name="novalet-agent-forged"))))
        await _refused(coordination.read_namespaced_lease("novalet-agent-forged", LEASE_NS))
        # the scheduler's own Lease (created by the chart) it may take and renew
        scheduler_lease = f"{release.fullname}-scheduler"
        lease = await coordination.read_namespaced_lease(scheduler_lease, LEASE_NS)
        lease.spec.holder_identity = "scheduler/test/1/abc"
        await _allowed(coordination.replace_namespaced_lease(scheduler_lease, LEASE_NS, lease))
        await _refused(coordination.list_namespaced_lease(ns))
        await _refused(core.read_namespaced_secret("anything", ns))
        await _refused(core.list_secret_for_all_namespaces())
        await _refused(core.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name="x"), spec=client.V1PodSpec(containers=[
                client.V1Container(name="x", image="x")]))))
    finally:
        await api.close()


def test_helm_uninstall_removes_cluster_objects(control_plane, crds, helm, tmp_path):
    """A second, throwaway release: uninstall leaves no ClusterRole, lease Role or webhook
    configuration behind (the chart, not the controller, owns it). The admission policies are
    the first release's (one set per cluster)."""
    name, ns = f"nv{uuid.uuid4().hex[:6]}", f"chart-{uuid.uuid4().hex[:6]}"
    helm("install", name, str(CHART), "--namespace", ns, "--create-namespace", "--set", "admissionPolicies.create=false",
         "--set-json", 'controller.webhook.namespaceSelector={"matchLabels":{"novalet.io/webhook-test":"none"}}')
    try:
        control_plane.kubectl("get", "clusterrole", f"{name}-novalet-agent")
        control_plane.kubectl("get", "validatingwebhookconfiguration", f"{name}-novalet-validate")
    finally:
        helm("uninstall", name, "--namespace", ns, "--wait")
    for kind, obj in [("validatingwebhookconfiguration", "validate"), ("clusterrole", "setpassword"),
                      ("clusterrole", "admin")]:
        r = control_plane.kubectl("get", kind, f"{name}-novalet-{obj}", check=False)
        assert r.returncode != 0 and "NotFound" in r.stderr, (kind, obj, r.stdout, r.stderr)
    control_plane.kubectl("get", "validatingadmissionpolicy", "novalet-requests")  # not the throwaway's
    for kind, args in [("clusterrole", []), ("clusterrolebinding", []), ("role", ["-n", LEASE_NS]),
                       ("rolebinding", ["-n", LEASE_NS])]:
        for component in ("agent", "controller"):
            r = control_plane.kubectl("get", kind, f"{name}-novalet-{component}", *args, check=False)
            assert r.returncode != 0 and "NotFound" in r.stderr, (kind, component, r.stdout, r.stderr)
    # the CRD stays (Helm never deletes crds/): deleting it would delete every instance
    control_plane.kubectl("get", "crd", "virtualinstances.novalet.io")
    control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_helm_template_probes_ask_the_health_port(helm, tmp_path):
    """Liveness and readiness probes on kopf's liveness endpoint (--health-port) in both pods,
    listening on the pod's addresses; healthPort 0: no endpoint, no probe."""
    def pods(*args: str) -> list[dict]:
        docs = _docs(helm("template", "rel", str(CHART), *args).stdout)
        return [_one(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]["containers"][0],
                _one(docs, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0]]

    for container in pods():
        assert {"--health-port=8081", "--metrics-address=0.0.0.0"} <= set(container["args"])
        assert {"name": "health", "containerPort": 8081} in [
            {k: p[k] for k in ("name", "containerPort")} for p in container["ports"]]
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, container[probe]
    from novalet.cli import build_parser
    parsed = build_parser().parse_args(["run", "--node-name", "n", "--health-port=8081", "--metrics-address=0.0.0.0"])
    assert (parsed.health_port, parsed.metrics_address) == (8081, "0.0.0.0")

    for container in pods("--set", "agent.healthPort=0", "--set", "controller.healthPort=0"):
        assert not [a for a in container["args"] if a.startswith(("--health-port", "--metrics-address"))]
        assert "livenessProbe" not in container and "readinessProbe" not in container


def test_helm_template_two_controllers_and_their_disruption_budget(helm):
    """Two controller replicas by default, rolled one at a time (never none serving the webhook),
    and a PodDisruptionBudget that keeps one through a drain; one replica: no budget."""
    docs = _docs(helm("template", "rel", str(CHART)).stdout)
    deployment = _one(docs, "Deployment", "-controller")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    budget = _one(docs, "PodDisruptionBudget", "-controller")
    assert budget["spec"]["minAvailable"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    single = _docs(helm("template", "rel", str(CHART), "--set", "controller.replicas=1").stdout)
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget"]
    assert _one(single, "Deployment", "-controller")["spec"]["replicas"] == 1


def test_helm_template_probes_the_domain_type_before_the_agent_when_auto(helm):
    """domainType auto: an initContainer runs `novalet probe-domain-type` (same image, the same
    libvirt socket and image pool mounts as the agent) into a small emptyDir that the agent reads
    as NOVALET_CACHE; qemu or kvm: forced, no initContainer, no emptyDir, no NOVALET_CACHE."""
    from novalet.cli import build_parser

    def pod(*args: str) -> dict:
        docs = _docs(helm("template", "rel", str(CHART), *args).stdout)
        return _one(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]

    for args, pool_mount in (((), "state"), (("--set", "agent.imagePool=/srv/images",
                                              "--set", "agent.domainTypeProbeTimeoutSeconds=3"), "images")):
        spec = pod(*args)
        (probe,) = spec["initContainers"]
        (agent,) = spec["containers"]
        assert probe["name"] == "probe-domain-type"
        assert (probe["image"], probe["imagePullPolicy"], probe["command"]) == (
            agent["image"], agent["imagePullPolicy"], ["novalet"])
        assert probe["securityContext"] == agent["securityContext"]
        parsed = build_parser().parse_args(probe["args"])
        pool = "/srv/images" if pool_mount == "images" else "/var/lib/novalet/images"
        assert (parsed.command, parsed.connect, parsed.pool, parsed.timeout, parsed.domain_type, parsed.record) == (
            "probe-domain-type", "qemu:///system", Path(pool), 3.0 if args else 5.0, "kvm", None)
        assert "--domain-type=auto" in agent["args"]
        # the answer: recorded in the default place under NOVALET_CACHE, read there by the agent
        probe_env = {e["name"]: e.get("value") for e in probe["env"]}
        agent_env = {e["name"]: e.get("value") for e in agent["env"]}
        assert probe_env["NOVALET_CACHE"] == agent_env["NOVALET_CACHE"]
        mounts = {m["name"]: m for m in probe["volumeMounts"]}
        agent_mounts = {m["name"]: m for m in agent["volumeMounts"]}
        assert set(mounts) == {"libvirt-sockets", pool_mount, "domain-type"}
        for name in ("libvirt-sockets", pool_mount):
            assert mounts[name]["mountPath"] == agent_mounts[name]["mountPath"]
        assert mounts["domain-type"]["mountPath"] == agent_mounts["domain-type"]["mountPath"] == \
            probe_env["NOVALET_CACHE"]
        assert agent_mounts["domain-type"]["readOnly"] is True and not mounts["domain-type"].get("readOnly")
        assert pool.startswith(mounts[pool_mount]["mountPath"])
        volume = next(v for v in spec["volumes"] if v["name"] == "domain-type")
        assert "emptyDir" in volume and "hostPath" not in volume

    for forced in ("qemu", "kvm"):
        spec = pod("--set", f"agent.domainType={forced}")
        assert "initContainers" not in spec
        (agent,) = spec["containers"]
        assert f"--domain-type={forced}" in agent["args"]
        assert "NOVALET_CACHE" not in {e["name"] for e in agent["env"]}
        assert "domain-type" not in {v["name"] for v in spec["volumes"]}
        assert "domain-type" not in {m["name"] for m in agent["volumeMounts"]}
