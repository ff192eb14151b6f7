"""The Helm chart (charts/novalet) against the real local control plane.

`helm lint` and `helm template` check the chart itself; `helm install` puts it on the real
apiserver (no kubelet: pods never run, the objects must exist and pass admission); then each
component's RBAC is exercised with a real ServiceAccount token: every call the process makes is
allowed, the calls it must not make are refused. helm comes from the control plane's bin dir
(hack/build-controlplane.sh); missing, the test fails, never skips.
"""

import base64
import json
import os
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "novalet"
CRD_FILE = "novalet.io_virtualinstances.yaml"
GROUP, VERSION, PLURAL = "novalet.io", "v1alpha1", "virtualinstances"
LEASE_NS = "kube-node-lease"
WEBHOOK = "validate.virtualinstances.novalet.io"
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

def test_chart_crd_is_the_repo_crd():
    chart_crd = CHART / "crds" / CRD_FILE
    repo_crd = REPO / "crds" / CRD_FILE
    assert not chart_crd.is_symlink(), "Helm does not follow symlinks out of a chart: keep a copy"
    assert chart_crd.read_bytes() == repo_crd.read_bytes(), (
        f"{chart_crd} differs from {repo_crd}: cp crds/{CRD_FILE} charts/novalet/crds/")
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(p.name for p in (REPO / "crds").glob("*.yaml"))


def test_helm_lint(helm):
    r = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in r.stdout
    helm("lint", "--strict", str(CHART), "--set", "controller.service.clusterIP=10.96.0.200",
         "--set", "agent.imagePool=/srv/images", "--set", "controller.tls.secretName=novalet-tls",
         "--set", "agent.readSecrets=false", "--set", "rbac.observeCRDs=false")


def test_helm_template_renders(helm):
    docs = _docs(helm("template", "rel", str(CHART), "--namespace", "nv", "--include-crds").stdout)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["CustomResourceDefinition", "ServiceAccount", "ServiceAccount", "ClusterRole",
                            "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "Role", "Role",
                            "RoleBinding", "RoleBinding", "DaemonSet", "Deployment", "Service"]), kinds
    crd = _one(docs, "CustomResourceDefinition")
    assert crd == yaml.safe_load((REPO / "crds" / CRD_FILE).read_text())

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
    assert host_paths == {"/run/libvirt", "/var/lib/novalet"}  # the image pool is inside the state dir
    assert pod["serviceAccountName"] == "rel-novalet-agent"

    # the controller: the webhook on 0.0.0.0:9443, registered by Service reference (the apiserver
    # reaches a Service even where it cannot resolve *.svc names), the DNS name in its certificate
    dep = _one(docs, "Deployment", "-controller")
    (ctl,) = dep["spec"]["template"]["spec"]["containers"]
    assert ctl["args"][:5] == ["controller", "--webhook-port=9443", "--webhook-addr=0.0.0.0",
                               "--webhook-host=rel-novalet-controller.nv.svc",
                               "--webhook-service=nv/rel-novalet-controller"]
    assert dep["spec"]["replicas"] == 1
    svc = _one(docs, "Service", "-controller")
    assert svc["spec"]["ports"][0]["port"] == 9443
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]

    # values: a separate image pool gets its own mount; a fixed ClusterIP is the Service's
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv", "--set", "agent.imagePool=/srv/images",
                      "--set", "controller.service.clusterIP=10.96.0.200",
                      "--set", "controller.tls.secretName=novalet-tls", "--set", "agent.readSecrets=false").stdout)
    pod = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v} == \
        {"/run/libvirt", "/var/lib/novalet", "/srv/images"}
    assert "--image-pool=/srv/images" in pod["containers"][0]["args"]
    ctl = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--webhook-host=rel-novalet-controller.nv.svc" in ctl["args"]  # what a Service call verifies
    assert "--tls-cert=/etc/novalet/tls/tls.crt" in ctl["args"]
    assert _one(docs, "Service")["spec"]["clusterIP"] == "10.96.0.200"
    assert not any(r[1] == "secrets" for r in _rules(_one(docs, "ClusterRole", "-agent")))

    # the chart refuses a cluster without matchConditions (Kubernetes < 1.30)
    old = helm("template", "rel", str(CHART), "--kube-version", "1.29.0", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr


def test_helm_template_rbac_is_least_privilege(helm):
    docs = _docs(helm("template", "rel", str(CHART), "-n", "nv").stdout)
    agent = _rules(_one(docs, "ClusterRole", "-agent"))
    assert agent == {
        ("novalet.io", "virtualinstances", v, "") for v in ("get", "list", "watch", "patch")
    } | {("novalet.io", "virtualinstances/status", v, "") for v in ("get", "patch")} | {
        ("events.k8s.io", "events", "create", ""), ("", "secrets", "get", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch", "")}
    agent_lease = _one(docs, "Role", "-agent")
    assert agent_lease["metadata"]["namespace"] == LEASE_NS
    assert _rules(agent_lease) == {("coordination.k8s.io", "leases", v, "") for v in ("get", "create", "update")}
    controller = _rules(_one(docs, "ClusterRole", "-controller"))
    assert controller == {("novalet.io", "virtualinstances", v, "") for v in ("get", "list", "watch")} | {
        ("novalet.io", "virtualinstances/status", "patch", ""),
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "get", WEBHOOK),
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "update", WEBHOOK),
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "create", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch", "")}
    assert _rules(_one(docs, "Role", "-controller")) == {("coordination.k8s.io", "leases", "list", "")}


# --- installed on the real apiserver -------------------------------------------------------

class Release:
    def __init__(self, name: str, namespace: str):
        self.name, self.namespace = name, namespace
        self.agent_sa, self.controller_sa = f"{name}-novalet-agent", f"{name}-novalet-controller"


@pytest.fixture(scope="module")
def release(control_plane, crds, helm):
    """The chart installed into a fresh namespace whose Pod Security level is `restricted`."""
    rel = Release(f"nv{uuid.uuid4().hex[:6]}", f"chart-{uuid.uuid4().hex[:6]}")
    control_plane.kubectl("create", "namespace", rel.namespace)
    control_plane.kubectl("label", "namespace", rel.namespace, "pod-security.kubernetes.io/enforce=restricted")
    try:
        helm("install", rel.name, str(CHART), "--namespace", rel.namespace, "--set", "image.tag=test")
        yield rel
    finally:
        helm("uninstall", rel.name, "--namespace", rel.namespace, check=False)
        control_plane.kubectl("delete", "namespace", rel.namespace, "--wait=false", "--ignore-not-found",
                              check=False)


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
                       ("service", release.controller_sa)]:
        control_plane.kubectl("get", kind, name, "-n", ns)
    for kind, name in [("clusterrole", release.agent_sa), ("clusterrolebinding", release.agent_sa),
                       ("clusterrole", release.controller_sa), ("clusterrolebinding", release.controller_sa),
                       ("crd", "virtualinstances.novalet.io")]:
        control_plane.kubectl("get", kind, name)
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
        # ... and its webhook configuration: read, create (dry run: another test may own it), replace
        webhook = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
                   "metadata": {"name": WEBHOOK}, "webhooks": []}
        try:
            existing = await admission.read_validating_webhook_configuration(WEBHOOK)
        except ApiException as e:
            assert e.status == 404, f"{e.status} {e.reason}: {e.body}"
            existing = None
        if existing is None:
            await _allowed(admission.create_validating_webhook_configuration(webhook, dry_run="All"))
        else:
            await _allowed(admission.replace_validating_webhook_configuration(WEBHOOK, existing, dry_run="All"))
        for verb in ("get", "update"):
            assert await _can(api, verb, "validatingwebhookconfigurations", "admissionregistration.k8s.io",
                              name=WEBHOOK)
        assert await _can(api, "create", "validatingwebhookconfigurations", "admissionregistration.k8s.io")

        # what it must not do
        await _refused(admission.read_validating_webhook_configuration("someone-elses-webhook"))
        other = dict(webhook, metadata={"name": "someone-elses-webhook", "resourceVersion": "1"})
        await _refused(admission.replace_validating_webhook_configuration("someone-elses-webhook", other))
        await _refused(admission.delete_validating_webhook_configuration(WEBHOOK))
        await _refused(admission.list_validating_webhook_configuration())
        await _refused(admission.list_mutating_webhook_configuration())
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
        await _refused(coordination.list_namespaced_lease(ns))
        await _refused(core.read_namespaced_secret("anything", ns))
        await _refused(core.list_secret_for_all_namespaces())
        await _refused(core.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name="x"), spec=client.V1PodSpec(containers=[
                client.V1Container(name="x", image="x")]))))
    finally:
        await api.close()


def test_helm_uninstall_removes_cluster_objects(control_plane, crds, helm, tmp_path):
    """A second, throwaway release: uninstall leaves no ClusterRole or lease Role behind."""
    name, ns = f"nv{uuid.uuid4().hex[:6]}", f"chart-{uuid.uuid4().hex[:6]}"
    helm("install", name, str(CHART), "--namespace", ns, "--create-namespace")
    try:
        control_plane.kubectl("get", "clusterrole", f"{name}-novalet-agent")
    finally:
        helm("uninstall", name, "--namespace", ns, "--wait")
    for kind, args in [("clusterrole", []), ("clusterrolebinding", []), ("role", ["-n", LEASE_NS]),
                       ("rolebinding", ["-n", LEASE_NS])]:
        for component in ("agent", "controller"):
            r = control_plane.kubectl("get", kind, f"{name}-novalet-{component}", *args, check=False)
            assert r.returncode != 0 and "NotFound" in r.stderr, (kind, component, r.stdout, r.stderr)
    # the CRD stays (Helm never deletes crds/): deleting it would delete every instance
    control_plane.kubectl("get", "crd", "virtualinstances.novalet.io")
    control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
