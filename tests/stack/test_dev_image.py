"""`novalet dev image --name NAME` publishes the tiny guest on the stack as a ClusterVirtualImage:
the stack's loopback image server serves exactly the bytes whose sha256s the image records,
publishing the same bytes again touches nothing, a name taken by another spec is a clear error
that leaves that image and its files alone, and `dev down`'s stop ends the server."""
import hashlib
import json
import subprocess
import sys
import urllib.request
import uuid

import pytest

from novalet.api.models import ClusterVirtualImageSpec
from novalet_dev.guest import ensure_guest_artifacts
from novalet_dev.images import RESOURCE, ImagePublishError, ImageServer, publish_tiny
from novalet_dev.processes import pid_alive

pytestmark = pytest.mark.stack


def fetch_sha256(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    h = hashlib.sha256()
    with opener.open(url, timeout=10) as r:
        while chunk := r.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def get_image(control_plane, name: str) -> dict:
    return json.loads(control_plane.kubectl("get", RESOURCE, name, "-o", "json").stdout)


def dev_image(stack_dir, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "novalet.cli", "dev", "image", "--state-dir", str(stack_dir),
                           "--name", name], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def image_server(stack_dir):
    """The stack's image server as `novalet dev image` finds it (<stack dir>/fileserver.*),
    stopped afterwards as `novalet dev down` does."""
    server = ImageServer(stack_dir)
    yield server
    pid = server.pid
    assert ImageServer(stack_dir).stop() == (pid is not None)
    assert pid is None or not pid_alive(pid)
    assert not server.is_running()


def test_dev_image_publishes_the_served_bytes_and_again_is_a_no_op(control_plane, crds, stack_dir, image_server):
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    try:
        first = dev_image(stack_dir, name)
        assert first.returncode == 0, first.stderr
        assert f"ClusterVirtualImage {name} created" in first.stdout

        server = ImageServer(stack_dir)  # what a later command finds in the state dir
        assert server.is_running() and server.healthy()
        assert server.root == stack_dir / "images-http"
        image = get_image(control_plane, name)
        spec = image["spec"]
        ClusterVirtualImageSpec.model_validate(spec)
        files = {"qcow2": spec["source"]["http"], "kernel": spec["kernelBoot"]["kernel"],
                 "initrd": spec["kernelBoot"]["initrd"]}
        for suffix, http in files.items():
            assert http["url"] == f"http://127.0.0.1:{server.port}/{name}.{suffix}"
            assert fetch_sha256(http["url"]) == http["sha256"], suffix
            assert (server.root / f"{name}.{suffix}").is_file()
        art = ensure_guest_artifacts()
        assert spec["kernelBoot"]["cmdline"] == art.cmdline
        assert files["kernel"]["sha256"] == hashlib.sha256(art.kernel.read_bytes()).hexdigest()
        assert files["initrd"]["sha256"] == hashlib.sha256(art.initrd.read_bytes()).hexdigest()

        stats = {s: (server.root / f"{name}.{s}").stat() for s in files}
        again = dev_image(stack_dir, name)
        assert again.returncode == 0, again.stderr
        assert f"ClusterVirtualImage {name} unchanged" in again.stdout
        after = get_image(control_plane, name)
        assert after["metadata"]["resourceVersion"] == image["metadata"]["resourceVersion"]
        assert after["spec"] == spec
        for s, st in stats.items():
            now = (server.root / f"{name}.{s}").stat()
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), s
        assert ImageServer(stack_dir).pid == server.pid  # the running server was reused
    finally:
        control_plane.kubectl("delete", RESOURCE, name, "--ignore-not-found", check=False)


def test_a_name_taken_by_another_spec_is_a_clear_error(control_plane, crds, stack_dir, image_server):
    name = f"taken-{uuid.uuid4().hex[:6]}"
    other = {"apiVersion": "novalet.io/v1alpha1", "kind": "ClusterVirtualImage", "metadata": {"name": name},
             "spec": {"source": {"http": {"url": "http://127.0.0.1:9/other.qcow2", "sha256": "0" * 64}}}}
    control_plane.kubectl("create", "-f", "-", input=json.dumps(other))
    try:
        before = get_image(control_plane, name)
        with pytest.raises(ImagePublishError) as refused:
            publish_tiny(control_plane, image_server, name)
        message = str(refused.value)
        assert f"ClusterVirtualImage {name} already exists with another spec" in message
        assert "source.http.sha256" in message and "kernelBoot" in message
        assert f"kubectl delete clustervirtualimage {name}" in message
        assert get_image(control_plane, name)["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
        assert not list(image_server.root.glob(f"{name}.*"))  # nothing placed under the taken name
        assert not list(image_server.root.glob(".*"))  # no staging left behind
    finally:
        control_plane.kubectl("delete", RESOURCE, name, "--ignore-not-found", check=False)
