"""The webhook's serving certificate, from each of the chart's three sources (docs/install.md,
"Webhook certificates"): your Secret (controller.tls.secretName) wins; else cert-manager when the
cluster serves cert-manager.io/v1 (controller.tls.certManager.enabled auto, or true to require
it); else a CA and a certificate made by Helm, kept across upgrades. The controller serves the
certificate mounted from that Secret and makes none of its own.

`helm template` checks the rendering (--api-versions stands for a cluster with cert-manager); on
the real local apiserver, cert-manager is two minimal CRDs created here (no network to install
it, and nothing issues certificates): `helm install` finds them through the apiserver's discovery
and creates the Certificates and Issuers.
"""

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "novalet"
CERT_MANAGER = "cert-manager.io/v1/Certificate"  # what the chart asks .Capabilities for
INJECT = "cert-manager.io/inject-ca-from"
KEY_MATERIAL = ("PRIVATE KEY", "BEGIN CERTIFICATE", "LS0tLS1CRUdJTi")  # the last: base64 of "-----BEGIN"
TRUE_WITHOUT_CERT_MANAGER = ("controller.tls.certManager.enabled is true but the cluster does not serve "
                             "cert-manager.io/v1 Certificate")


@pytest.fixture(scope="module")
def helm(control_plane, tmp_path_factory):
    """The control plane's helm, with its own cache and config: helm(*args, check=True)."""
    binary = control_plane.bin_dir / "helm"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"helm not found at {binary}: run hack/build-controlplane.sh (or sudo hack/setup.sh)",
                    pytrace=False)
    home = tmp_path_factory.mktemp("helm")
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig),
           **{var: str(home / var.lower()) for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME")}}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120, check=False)
        if check and r.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stderr}{r.stdout}", pytrace=False)
        return r

    return run


def _render(helm, *args: str) -> tuple[str, list[dict]]:
    text = helm("template", "rel", str(CHART), "-n", "nv", *args).stdout
    return text, [d for d in yaml.safe_load_all(text) if d]


def _named(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _hook(docs: list[dict]) -> tuple[dict, dict]:
    """(the webhook configuration's metadata, its one webhook's clientConfig)."""
    (config,) = _named(docs, "ValidatingWebhookConfiguration").values()
    return config["metadata"], config["webhooks"][0]["clientConfig"]


def _mounted(docs: list[dict]) -> str:
    """The Secret the controller's pod mounts at /etc/novalet/tls."""
    (deployment,) = _named(docs, "Deployment").values()
    return next(v["secret"]["secretName"] for v in deployment["spec"]["template"]["spec"]["volumes"]
                if v["name"] == "tls")


# --- helm template -------------------------------------------------------------------------

def test_template_with_cert_manager_makes_certificates_and_injects_their_ca(helm):
    """cert-manager present, auto: the bootstrap chain (self-signed Issuer -> CA Certificate -> CA
    Issuer) and a Certificate for the webhook host into the Secret the controller mounts; the
    webhook configuration names that Certificate for the CA injector and carries no caBundle;
    the chart generates no key material at all."""
    text, docs = _render(helm, "--api-versions", CERT_MANAGER)
    issuers, certificates = _named(docs, "Issuer"), _named(docs, "Certificate")
    assert sorted(issuers) == ["rel-novalet-webhook-ca", "rel-novalet-webhook-selfsigned"]
    assert sorted(certificates) == ["rel-novalet-webhook", "rel-novalet-webhook-ca"]
    assert all(d["metadata"]["namespace"] == "nv" for d in [*issuers.values(), *certificates.values()])

    serving = certificates["rel-novalet-webhook"]["spec"]
    assert serving["dnsNames"] == ["rel-novalet-controller.nv.svc"]  # what the apiserver checks
    assert "ipAddresses" not in serving and "isCA" not in serving
    assert serving["secretName"] == _mounted(docs) == "rel-novalet-webhook-tls"
    assert (serving["duration"], serving["renewBefore"]) == ("2160h", "720h")
    assert serving["issuerRef"] == {"name": "rel-novalet-webhook-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert issuers["rel-novalet-webhook-ca"]["spec"] == {"ca": {"secretName": "rel-novalet-webhook-ca"}}
    ca = certificates["rel-novalet-webhook-ca"]["spec"]
    assert ca["isCA"] is True and ca["secretName"] == "rel-novalet-webhook-ca"
    assert ca["issuerRef"] == {"name": "rel-novalet-webhook-selfsigned", "kind": "Issuer", "group": "cert-manager.io"}
    assert issuers["rel-novalet-webhook-selfsigned"]["spec"] == {"selfSigned": {}}

    metadata, client_config = _hook(docs)
    assert metadata["annotations"] == {INJECT: "nv/rel-novalet-webhook"}
    assert "caBundle" not in client_config
    assert not _named(docs, "Secret")
    assert not [m for m in KEY_MATERIAL if m in text]

    # enabled: true with cert-manager present renders the same objects
    assert _render(helm, "--api-versions", CERT_MANAGER, "--set", "controller.tls.certManager.enabled=true")[1] == docs


def test_template_with_your_issuer_makes_only_the_serving_certificate(helm):
    _, docs = _render(helm, "--api-versions", CERT_MANAGER,
                      "--set", "controller.tls.certManager.issuerRef.name=corp-ca",
                      "--set", "controller.tls.certManager.issuerRef.kind=ClusterIssuer",
                      "--set", "controller.tls.certManager.duration=8760h",
                      "--set", "controller.tls.certManager.renewBefore=", "--set", "controller.webhook.host=10.96.0.9")
    assert not _named(docs, "Issuer")
    (serving,) = _named(docs, "Certificate").values()
    spec = serving["spec"]
    assert spec["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert spec["ipAddresses"] == ["10.96.0.9"] and "dnsNames" not in spec  # an IP is an IP SAN
    assert spec["duration"] == "8760h" and "renewBefore" not in spec  # "": cert-manager's default
    assert _hook(docs)[0]["annotations"] == {INJECT: "nv/rel-novalet-webhook"}


@pytest.mark.parametrize("args", [[], ["--set", "controller.tls.certManager.enabled=false", "--api-versions",
                                       CERT_MANAGER]], ids=["auto-without-cert-manager", "false-with-cert-manager"])
def test_template_without_cert_manager_the_chart_makes_the_certificate(helm, args):
    """auto on a cluster without cert-manager (and false on one with it): today's CA and
    certificate made by Helm, inline in the webhook's caBundle; no cert-manager object."""
    _, docs = _render(helm, *args)
    assert not _named(docs, "Certificate") and not _named(docs, "Issuer")
    secret = _named(docs, "Secret")["rel-novalet-webhook-tls"]
    assert _mounted(docs) == "rel-novalet-webhook-tls"
    metadata, client_config = _hook(docs)
    assert INJECT not in metadata.get("annotations", {})
    assert client_config["caBundle"] == secret["data"]["ca.crt"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"])))
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["rel-novalet-controller.nv.svc"]


def test_template_true_without_cert_manager_fails_saying_so(helm):
    r = helm("template", "rel", str(CHART), "--set", "controller.tls.certManager.enabled=true", check=False)
    assert r.returncode != 0 and TRUE_WITHOUT_CERT_MANAGER in r.stderr, r.stderr
    assert "--api-versions cert-manager.io/v1/Certificate" in r.stderr  # the way out for helm template
    assert not r.stdout.strip()


@pytest.mark.parametrize("enabled", ["auto", "true"])
def test_template_your_secret_wins_over_cert_manager(helm, enabled):
    """secretName set: the controller mounts your Secret, the webhook trusts the CA you name,
    and the chart makes neither a certificate nor a cert-manager object (nor fails for true)."""
    text, docs = _render(helm, "--api-versions", CERT_MANAGER, "--set", f"controller.tls.certManager.enabled={enabled}",
                         "--set", "controller.tls.secretName=my-tls", "--set", "controller.tls.caBundle=Zm9v")
    assert not _named(docs, "Certificate") and not _named(docs, "Issuer") and not _named(docs, "Secret")
    assert _mounted(docs) == "my-tls"
    metadata, client_config = _hook(docs)
    assert client_config["caBundle"] == "Zm9v" and INJECT not in metadata.get("annotations", {})
    assert not [m for m in KEY_MATERIAL if m in text]


# --- the controller serves the mounted certificate -----------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _served(port: int, ca_pem: bytes, host: str, process: subprocess.Popen, log: Path) -> bytes:
    """The DER certificate the webhook serves on 127.0.0.1:port, verified against ca_pem for host."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                    context.wrap_socket(raw, server_hostname=host) as tls:
                return tls.getpeercert(binary_form=True)
        except (ConnectionRefusedError, TimeoutError):
            assert process.poll() is None, f"the controller exited ({process.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the webhook never listened:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)


def test_controller_serves_the_mounted_certificate_and_makes_none(control_plane, crds, helm, tmp_path):
    """The controller's arguments as the chart renders them, the Secret's files where the pod
    mounts them: it serves that certificate (valid for the host under the Secret's CA) and
    writes no certificate of its own, on its first start and on a restart. Without --tls-cert
    (a run outside a cluster) it makes a self-signed one in its state directory instead."""
    _, docs = _render(helm)
    secret = _named(docs, "Secret")["rel-novalet-webhook-tls"]
    mounted = tmp_path / "tls"
    mounted.mkdir()
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (mounted / name).write_bytes(base64.b64decode(secret["data"][name]))
    (deployment,) = _named(docs, "Deployment").values()
    chart_args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    host = next(a.split("=", 1)[1] for a in chart_args if a.startswith("--webhook-host="))
    assert host == "rel-novalet-controller.nv.svc"
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}

    def start(args: list[str], state: Path, port: int) -> tuple[subprocess.Popen, Path]:
        # as in the pod, but on loopback, on free ports, and not competing for the scheduler's Lease
        args = [a.replace("/etc/novalet/tls/", f"{mounted}/") for a in args
                if not a.startswith(("--webhook-port=", "--webhook-addr=", "--state-dir=", "--health-port=",
                                     "--metrics-address="))]
        log = state.with_suffix(".log")
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "novalet.cli", *args, f"--webhook-port={port}", "--webhook-addr=127.0.0.1",
                 f"--state-dir={state}", "--no-scheduler"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return process, log

    def stop(process: subprocess.Popen) -> None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    mounted_der = x509.load_pem_x509_certificate((mounted / "tls.crt").read_bytes()).public_bytes(
        serialization.Encoding.DER)
    state = tmp_path / "state"
    for _ in ("first start", "restart"):
        process, log = start(chart_args, state, port := _free_port())
        try:
            assert _served(port, (mounted / "ca.crt").read_bytes(), host, process, log) == mounted_der
        finally:
            stop(process)
        assert not (state / "webhook-tls").exists(), sorted(p.name for p in state.rglob("*"))
    assert (mounted / "tls.crt").read_bytes() == base64.b64decode(secret["data"]["tls.crt"])  # left as mounted

    outside = tmp_path / "outside"
    process, log = start([a for a in chart_args if not a.startswith(("--tls-cert=", "--tls-key="))], outside,
                         port := _free_port())
    try:
        deadline = time.monotonic() + 60
        while not (outside / "webhook-tls" / "cert.pem").exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        made = (outside / "webhook-tls" / "cert.pem").read_bytes()
        assert _served(port, made, host, process, log) == x509.load_pem_x509_certificate(made).public_bytes(
            serialization.Encoding.DER)
    finally:
        stop(process)


# --- on the real apiserver -------------------------------------------------------------------

def _crd(plural: str, kind: str) -> dict:
    """A stand-in for one of cert-manager's CRDs: its group, version and names, any content."""
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.cert-manager.io"},
            "spec": {"group": "cert-manager.io", "scope": "Namespaced",
                     "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


CERT_MANAGER_CRDS = [_crd("certificates", "Certificate"), _crd("issuers", "Issuer")]


def _served_resources(control_plane) -> set[str]:
    """cert-manager.io resources in the apiserver's discovery (what helm's .Capabilities reads)."""
    r = control_plane.kubectl("api-resources", "--api-group=cert-manager.io", "-o", "name", check=False)
    return set(r.stdout.split())


def _wait_served(control_plane, expected: set[str]) -> None:
    deadline = time.monotonic() + 30
    while (served := _served_resources(control_plane)) != expected:
        assert time.monotonic() < deadline, f"discovery serves {served}, not {expected}"
        time.sleep(0.3)


@pytest.fixture
def cert_manager_crds(control_plane):
    """certificates and issuers.cert-manager.io for one test, then gone again from discovery (so
    the other chart tests see a cluster without cert-manager)."""
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(CERT_MANAGER_CRDS))
    names = [f"crd/{c['metadata']['name']}" for c in CERT_MANAGER_CRDS]
    try:
        control_plane.kubectl("wait", "--for=condition=Established", "--timeout=30s", *names)
        _wait_served(control_plane, {"certificates.cert-manager.io", "issuers.cert-manager.io"})
        yield
    finally:
        control_plane.kubectl("delete", "--ignore-not-found", "--timeout=60s", *names, check=False)
        _wait_served(control_plane, set())


def _get(control_plane, kind: str, name: str, namespace: str | None = None, check: bool = True) -> dict | None:
    r = control_plane.kubectl("get", kind, name, *(["-n", namespace] if namespace else []), "-o", "json",
                              check=check)
    return json.loads(r.stdout) if r.returncode == 0 else None


@pytest.fixture
def install(control_plane, crds, helm):
    """install(*args) -> (release, namespace, helm install's output): a release in a fresh
    namespace, uninstalled afterwards. Its webhook covers no namespace (no controller runs here)
    and the admission policies stay the session's (one set per cluster)."""
    releases: list[tuple[str, str]] = []

    def run(*args: str) -> tuple[str, str, str]:
        name, ns = f"nv{uuid.uuid4().hex[:6]}", f"certs-{uuid.uuid4().hex[:6]}"
        releases.append((name, ns))
        out = helm("install", name, str(CHART), "--namespace", ns, "--create-namespace", "--set", "image.tag=test",
                   "--set", "admissionPolicies.create=false", "--set-json",
                   'controller.webhook.namespaceSelector={"matchLabels":{"novalet.io/webhook-test":"none"}}',
                   *args).stdout
        return name, ns, out

    yield run
    for name, ns in releases:
        helm("uninstall", name, "--namespace", ns, "--wait", check=False)
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def test_helm_install_finds_cert_manager_and_creates_the_certificates(control_plane, helm, cert_manager_crds,
                                                                       install):
    """enabled: auto, and the apiserver serves cert-manager.io/v1: helm install creates the
    Issuers and Certificates (nothing issues them here), no Secret of its own, and a webhook
    configuration left for the CA injector. An upgrade with enabled: false goes back to the
    chart's own certificate and removes the cert-manager objects."""
    name, ns, out = install()
    fullname = f"{name}-novalet"
    serving = _get(control_plane, "certificates.cert-manager.io", f"{fullname}-webhook", ns)["spec"]
    assert serving["dnsNames"] == [f"{fullname}-controller.{ns}.svc"]
    assert serving["secretName"] == f"{fullname}-webhook-tls"
    assert serving["issuerRef"] == {"name": f"{fullname}-webhook-ca", "kind": "Issuer", "group": "cert-manager.io"}
    ca = _get(control_plane, "certificates.cert-manager.io", f"{fullname}-webhook-ca", ns)["spec"]
    assert ca["isCA"] is True and ca["issuerRef"]["name"] == f"{fullname}-webhook-selfsigned"
    assert _get(control_plane, "issuers.cert-manager.io", f"{fullname}-webhook-ca", ns)["spec"] == {
        "ca": {"secretName": f"{fullname}-webhook-ca"}}
    assert _get(control_plane, "issuers.cert-manager.io", f"{fullname}-webhook-selfsigned", ns)["spec"] == {
        "selfSigned": {}}
    assert _get(control_plane, "secret", f"{fullname}-webhook-tls", ns, check=False) is None  # cert-manager's to make
    webhook = _get(control_plane, "validatingwebhookconfiguration", f"{fullname}-validate")
    assert webhook["metadata"]["annotations"][INJECT] == f"{ns}/{fullname}-webhook"
    assert "caBundle" not in webhook["webhooks"][0]["clientConfig"]
    deployment = _get(control_plane, "deployment", f"{fullname}-controller", ns)
    assert {"name": "tls", "secret": {"secretName": f"{fullname}-webhook-tls", "defaultMode": 420}} in \
        deployment["spec"]["template"]["spec"]["volumes"]
    assert f"cert-manager's Certificate {fullname}-webhook" in out  # NOTES

    out = helm("upgrade", name, str(CHART), "-n", ns, "--reuse-values",
               "--set", "controller.tls.certManager.enabled=false").stdout
    for kind, obj in [("certificates.cert-manager.io", "webhook"), ("certificates.cert-manager.io", "webhook-ca"),
                      ("issuers.cert-manager.io", "webhook-ca"), ("issuers.cert-manager.io", "webhook-selfsigned")]:
        assert _get(control_plane, kind, f"{fullname}-{obj}", ns, check=False) is None, (kind, obj)
    secret = _get(control_plane, "secret", f"{fullname}-webhook-tls", ns)
    webhook = _get(control_plane, "validatingwebhookconfiguration", f"{fullname}-validate")
    assert webhook["webhooks"][0]["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    assert INJECT not in (webhook["metadata"].get("annotations") or {})
    assert f"made by the chart into Secret {fullname}-webhook-tls" in out


def test_helm_install_true_without_cert_manager_fails_before_creating_anything(control_plane, crds, helm):
    assert not _served_resources(control_plane)
    name, ns = f"nv{uuid.uuid4().hex[:6]}", f"certs-{uuid.uuid4().hex[:6]}"
    r = helm("install", name, str(CHART), "--namespace", ns, "--create-namespace",
             "--set", "controller.tls.certManager.enabled=true", check=False)
    assert r.returncode != 0 and TRUE_WITHOUT_CERT_MANAGER in r.stderr, r.stderr
    assert helm("status", name, "-n", ns, check=False).returncode != 0
    control_plane.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def test_helm_upgrade_keeps_the_chart_made_certificate_until_the_host_changes(control_plane, helm, install):
    """Without cert-manager: `helm upgrade` keeps the CA, the certificate and its key (the
    running controllers' certificate stays the one the webhook trusts); a new webhook host, or
    a deleted Secret, makes a new pair, and the webhook trusts the new CA."""
    assert not _served_resources(control_plane)  # auto: the chart makes the certificate
    name, ns, out = install()
    fullname = f"{name}-novalet"
    assert f"made by the chart into Secret {fullname}-webhook-tls" in out

    def current() -> tuple[dict[str, str], str, str]:
        secret = _get(control_plane, "secret", f"{fullname}-webhook-tls", ns)
        webhook = _get(control_plane, "validatingwebhookconfiguration", f"{fullname}-validate")
        assert webhook["webhooks"][0]["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
        cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"])))
        (san,) = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        return ({k: secret["data"][k] for k in ("ca.crt", "tls.crt", "tls.key")},
                secret["metadata"]["annotations"]["novalet.io/webhook-host"], san)

    first = current()
    assert first[1:] == (f"{fullname}-controller.{ns}.svc",) * 2
    helm("upgrade", name, str(CHART), "-n", ns, "--reuse-values")
    helm("upgrade", name, str(CHART), "-n", ns, "--reuse-values", "--set", "controller.replicas=1")
    assert current() == first  # not remade

    helm("upgrade", name, str(CHART), "-n", ns, "--reuse-values", "--set", "controller.webhook.host=webhook.example")
    moved = current()
    assert moved[1:] == ("webhook.example", "webhook.example")
    assert all(moved[0][k] != first[0][k] for k in first[0]), "a new host, a new CA, certificate and key"
    helm("upgrade", name, str(CHART), "-n", ns, "--reuse-values")
    assert current() == moved

    control_plane.kubectl("delete", "secret", f"{fullname}-webhook-tls", "-n", ns)
    helm("upgrade", name, str(CHART), "-n", ns, "--reuse-values")
    remade = current()
    assert remade[1:] == moved[1:] and all(remade[0][k] != moved[0][k] for k in moved[0])
