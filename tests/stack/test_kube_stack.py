"""The local control plane is a real Kubernetes API: CRDs, status subresource, optimistic
concurrency, RBAC and a running controller manager."""

import asyncio
import time

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

pytestmark = pytest.mark.stack

GROUP, VERSION, PLURAL = "novalet.io", "v1alpha1", "virtualinstances"


def _instance(name: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualInstance",
        "metadata": {"name": name},
        "spec": {"flavor": {"vcpus": 1, "memoryMiB": 128}, "powerState": "Running"},
    }


async def test_apiserver_ready_and_rbac_on(control_plane, kube_api):
    assert control_plane.server.startswith("https://127.0.0.1:")
    assert control_plane.ready()
    # anonymous requests are authenticated as system:anonymous and refused by RBAC
    cfg = client.Configuration(host=control_plane.server)
    cfg.ssl_ca_cert = str(control_plane.ca_file)
    async with client.ApiClient(cfg) as anon:
        with pytest.raises(ApiException) as exc:
            await client.CoreV1Api(anon).list_namespace()
        assert exc.value.status == 403
    # the admin is in system:masters
    names = {ns.metadata.name for ns in (await client.CoreV1Api(kube_api).list_namespace()).items}
    assert {"default", "kube-system"} <= names
    # RBAC authorizer is on: a SelfSubjectAccessReview answers through it
    review = await client.AuthorizationV1Api(kube_api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(verb="delete", resource="namespaces"))))
    assert review.status.allowed


async def test_virtualinstance_create_read_patch_status_conflict(crds, namespace, kube_api):
    api = client.CustomObjectsApi(kube_api)
    created = await api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _instance("vm1"))
    assert created["metadata"]["uid"]
    assert created["spec"]["image"] == ""  # defaulted by the structural schema

    got = await api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "vm1")
    assert got["spec"]["flavor"] == {"vcpus": 1, "memoryMiB": 128}
    stale_rv = got["metadata"]["resourceVersion"]

    # spec merge patch bumps generation
    patched = await api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "vm1", {"spec": {"powerState": "Stopped"}},
        _content_type="application/merge-patch+json")
    assert patched["spec"]["powerState"] == "Stopped"
    assert patched["metadata"]["generation"] == got["metadata"]["generation"] + 1

    # status goes through the subresource, with optimistic locking on resourceVersion
    current_rv = patched["metadata"]["resourceVersion"]
    ok = await api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "vm1",
        {"metadata": {"resourceVersion": current_rv}, "status": {"vmState": "building", "phase": "Building"}},
        _content_type="application/merge-patch+json")
    assert ok["status"]["vmState"] == "building"
    assert ok["spec"]["powerState"] == "Stopped"

    with pytest.raises(ApiException) as exc:
        await api.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "vm1",
            {"metadata": {"resourceVersion": stale_rv}, "status": {"vmState": "active"}},
            _content_type="application/merge-patch+json")
    assert exc.value.status == 409
    final = await api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "vm1")
    assert final["status"]["vmState"] == "building"

    # the main resource ignores status; the status subresource ignores spec
    await api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "vm1",
                                             {"status": {"vmState": "error"}},
                                             _content_type="application/merge-patch+json")
    await api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "vm1",
                                                    {"spec": {"powerState": "Paused"}},
                                                    _content_type="application/merge-patch+json")
    final = await api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "vm1")
    assert final["status"]["vmState"] == "building"
    assert final["spec"]["powerState"] == "Stopped"


async def test_schema_rejects_bad_spec(crds, namespace, kube_api):
    api = client.CustomObjectsApi(kube_api)
    bad = _instance("bad")
    bad["spec"]["flavor"]["memoryMiB"] = 1
    with pytest.raises(ApiException) as exc:
        await api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, bad)
    assert exc.value.status == 422
    assert "memoryMiB" in exc.value.body


async def test_namespace_deletion_completes(crds, control_plane, kube_api):
    """Needs the controller manager's namespace controller (and its RBAC) to finalize."""
    core = client.CoreV1Api(kube_api)
    name = f"doomed-{int(time.time() * 1000) % 10**8}"
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    await client.CoreV1Api(kube_api).create_namespaced_config_map(
        name, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"), data={"a": "b"}))
    await client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, name, PLURAL, _instance("vm"))
    await core.delete_namespace(name)
    deadline = time.monotonic() + 30
    while True:
        try:
            ns = await core.read_namespace(name)
        except ApiException as e:
            assert e.status == 404
            break
        assert ns.status.phase == "Terminating"
        assert time.monotonic() < deadline, f"namespace {name} still there: {ns.status}"
        await asyncio.sleep(0.2)


async def test_controller_manager_creates_service_account_and_root_ca(namespace, kube_api):
    core = client.CoreV1Api(kube_api)
    deadline = time.monotonic() + 20
    while True:
        sas = {sa.metadata.name for sa in (await core.list_namespaced_service_account(namespace)).items}
        cms = {cm.metadata.name for cm in (await core.list_namespaced_config_map(namespace)).items}
        if "default" in sas and "kube-root-ca.crt" in cms:
            break
        assert time.monotonic() < deadline, f"controllers did not run: sa={sas} cm={cms}"
        await asyncio.sleep(0.2)


async def test_the_store_lists_every_instance_a_page_at_a_time(crds, namespace, kube_api, monkeypatch):
    from novalet.kube import instances

    api = client.CustomObjectsApi(kube_api)
    names = {f"paged-{n}" for n in range(5)}
    for name in names:
        await api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _instance(name))
    pages = []
    listing = api.list_cluster_custom_object

    async def counted(*args, **kwargs):
        pages.append(kwargs.get("limit"))
        return await listing(*args, **kwargs)

    monkeypatch.setattr(instances, "LIST_PAGE", 2)
    store = instances.InstanceStore(kube_api)
    monkeypatch.setattr(store.custom, "list_cluster_custom_object", counted)
    listed = {b["metadata"]["name"] async for b in store.list_all() if b["metadata"]["namespace"] == namespace}
    assert listed == names
    assert len(pages) >= 3 and set(pages) == {2}
