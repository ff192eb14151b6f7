"""Image names and the pool layout (qemu-img runs for real: qemu-utils is a test prerequisite)."""

import json
import shutil
import subprocess
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novalet.virt.images import (
    IMAGE_NAME_RE,
    ImageError,
    ImageNotFound,
    ImagePool,
    InvalidImageName,
    validate_image_name,
)

UID = "0b9a3c1e-5d2f-4c1a-9e8b-7f6a5d4c3b2a"


@pytest.mark.parametrize("name", ["a", "tiny", "debian-12.5", "ubuntu_24.04-minimal", "0", "a" * 63])
def test_valid_names(name):
    assert validate_image_name(name) == name


@pytest.mark.parametrize("name", [
    "", "/etc/passwd", "../secret", "a/b", "a..b", "..", ".", ".hidden", "trailing-", "-leading", "Upper",
    "a" * 64, "space here", "tab\there", "new\nline", "nul\x00", "a\\b", "~root", "$(reboot)", "a;b", "é",
    None, 5,
])
def test_invalid_names(name):
    with pytest.raises(InvalidImageName, match="never a host path"):
        validate_image_name(name)


@given(st.text(max_size=70))
def test_valid_names_never_escape_the_pool(name):
    try:
        validate_image_name(name)
    except InvalidImageName:
        return
    assert "/" not in name and ".." not in name and not name.startswith(".") and IMAGE_NAME_RE.fullmatch(name)


def qemu_img_info(path):
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], check=True,
                                     capture_output=True, text=True).stdout)


@pytest.fixture
def pool(tmp_path):
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img not found: install the Debian package qemu-utils (hack/setup.sh)")
    p = ImagePool(tmp_path / "pool", tmp_path / "state")
    p.pool.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p.pool / "base.qcow2"), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(p.pool / "rawimg.raw"), "1M"], check=True)
    (p.pool / "base.kernel").write_bytes(b"KERNEL")
    (p.pool / "base.initrd").write_bytes(b"INITRD")
    (p.pool / "base.cmdline").write_text("console=ttyS0\n")
    return p


def test_get_and_list(pool):
    img = pool.get("base")
    assert img.format == "qcow2" and img.kernel.name == "base.kernel" and img.cmdline == "console=ttyS0"
    raw = pool.get("rawimg")
    assert raw.format == "raw" and raw.kernel is None
    assert pool.list() == ["base", "rawimg"]
    with pytest.raises(ImageNotFound):
        pool.get("missing")
    with pytest.raises(InvalidImageName):
        pool.get("../pool/base")


def test_instance_disk_is_an_idempotent_overlay(pool):
    d = pool.create_instance_disk(UID, "base")
    assert d == pool.state_dir / "instances" / UID / "disk.qcow2"
    info = qemu_img_info(d)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(pool.pool / "base.qcow2")
    assert info["backing-filename-format"] == "qcow2"
    mtime = d.stat().st_mtime_ns
    assert pool.create_instance_disk(UID, "base") == d
    assert d.stat().st_mtime_ns == mtime  # kept
    with pytest.raises(ImageError, match="another backing file"):
        pool.create_instance_disk(UID, "rawimg")
    pool.create_instance_disk(UID, "rawimg", replace=True)
    assert qemu_img_info(d)["backing-filename-format"] == "raw"
    assert [p.name for p in d.parent.iterdir()] == ["disk.qcow2"]  # no temp files left


def test_delete_instance_is_idempotent(pool):
    pool.create_instance_disk(UID, "base")
    pool.delete_instance(UID)
    assert not (pool.state_dir / "instances" / UID).exists()
    pool.delete_instance(UID)


def test_instance_uid_must_be_a_uuid(pool):
    with pytest.raises(ImageError):
        pool.instance_dir("../../etc")


def test_snapshot_flattens_into_pool_with_sidecars(pool):
    d = pool.create_instance_disk(UID, "base")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", str(d)], check=True, capture_output=True)
    img = pool.snapshot(d, "snap-1", source_image="base")
    assert img.path == pool.pool / "snap-1.qcow2"
    info = qemu_img_info(img.path)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert (pool.pool / "snap-1.kernel").read_bytes() == b"KERNEL"
    assert img.cmdline == "console=ttyS0"
    cmp = subprocess.run(["qemu-img", "compare", str(d), str(img.path)], capture_output=True, text=True,
                         check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    with pytest.raises(ImageError, match="already exists"):
        pool.snapshot(d, "snap-1", source_image="base")
    with pytest.raises(InvalidImageName):
        pool.snapshot(d, "../escape")
    assert not [p for p in pool.pool.iterdir() if p.name.startswith(".")]


def test_interrupted_snapshot_leaves_only_partial_that_cleanup_removes(pool):
    # what a crash mid-convert leaves: a partial temp file (and maybe sidecars), no image
    (pool.pool / f".snap-2.qcow2.partial-{uuid.uuid4().hex[:8]}").write_bytes(b"half")
    (pool.pool / "snap-2.kernel").write_bytes(b"KERNEL")
    assert not pool.exists("snap-2")
    assert "snap-2" not in pool.list()
    removed = pool.cleanup_partial_snapshots("snap-2")
    assert len(removed) == 2
    assert sorted(p.name for p in pool.pool.iterdir()) == sorted(
        ["base.qcow2", "base.kernel", "base.initrd", "base.cmdline", "rawimg.raw"])
    assert pool.cleanup_partial_snapshots() == []
