"""The per-agent image pool and the instance disks.

Pool layout (a flat directory owned by the agent)::

    <pool>/<name>.qcow2 | <name>.raw    the image (base of instance disks)
    <pool>/<name>.kernel                optional direct kernel boot (like Nova's kernel_id)
    <pool>/<name>.initrd                optional (like Nova's ramdisk_id)
    <pool>/<name>.cmdline               optional kernel command line (one line)
    <pool>/.<name>.qcow2.partial-*      an interrupted snapshot (removed by cleanup_partial_snapshots)
    <pool>/catalog/<name>.*             the image catalog's copies (same layout), named by the agent
                                        ``catalog/<name>``: a user's image name has no '/', so no
                                        spec.image reaches them except through the catalog's rules

Images placed in ``<pool>/`` by hand (preloaded) are found by name; the catalog (VirtualImage,
ClusterVirtualImage: agent/images.py) decides which ``catalog/`` image a name means.

Instance state: ``<state>/instances/<uid>/`` holds ``disk.qcow2`` (a qcow2 overlay on the pool
image), ``disk.rescue.qcow2`` while rescued, and ``serial.log``.

An image name is a name inside the pool, never a host path: it is validated strictly before it is
joined to the pool directory. qemu-img runs with argument lists, never through a shell.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from ..core.catalog import CATALOG  # the subdirectory (and name prefix) of the catalog's copies

IMAGE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
IMAGE_FORMATS = ("qcow2", "raw")
PARTIAL_MARK = ".partial-"


class ImageError(Exception):
    """An image or instance-disk operation failed; the message says why."""


class InvalidImageName(ImageError, ValueError):
    pass


class ImageNotFound(ImageError):
    pass


def validate_image_name(name: str) -> str:
    """A name inside the pool, or ``catalog/<name>`` (the agent's own names for catalog images)."""
    stem = name[len(CATALOG) + 1:] if isinstance(name, str) and name.startswith(f"{CATALOG}/") else name
    if not isinstance(stem, str) or not IMAGE_NAME_RE.fullmatch(stem) or ".." in stem:
        raise InvalidImageName(
            f"invalid image name {name!r}: an image is a name inside the node's image pool (lowercase "
            f"letters, digits, '.', '_', '-'; 1-63 characters; starting and ending with a letter or "
            f"digit; no '/' or '..'), never a host path"
        )
    return name


def validate_uid(uid: str) -> str:
    try:
        return str(uuidlib.UUID(uid))
    except (ValueError, TypeError, AttributeError):
        raise ImageError(f"invalid instance uid {uid!r}: expected a UUID (metadata.uid)") from None


@dataclass(frozen=True)
class Image:
    name: str
    path: Path
    format: str  # qcow2 | raw
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None


def _qemu_img(args: list[str]) -> str:
    try:
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageError("qemu-img not found: install the Debian package qemu-utils") from None
    if proc.returncode != 0:
        raise ImageError(f"qemu-img {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}{PARTIAL_MARK}{uuidlib.uuid4().hex[:8]}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


class ImagePool:
    def __init__(self, pool: Path, state_dir: Path) -> None:
        self.pool = Path(pool)
        self.state_dir = Path(state_dir)

    # ---------------------------------------------------------------- images
    def locate(self, name: str) -> tuple[Path, str]:
        """The directory and file stem of image ``name`` (``catalog/x``: the catalog's copy x)."""
        validate_image_name(name)
        if name.startswith(f"{CATALOG}/"):
            return self.pool / CATALOG, name[len(CATALOG) + 1:]
        return self.pool, name

    @property
    def catalog_dir(self) -> Path:
        return self.pool / CATALOG

    def get(self, name: str) -> Image:
        directory, stem = self.locate(name)
        for fmt in IMAGE_FORMATS:
            p = directory / f"{stem}.{fmt}"
            if p.is_file():
                kernel = directory / f"{stem}.kernel"
                initrd = directory / f"{stem}.initrd"
                cmdline = directory / f"{stem}.cmdline"
                return Image(
                    name=name, path=p, format=fmt,
                    kernel=kernel if kernel.is_file() else None,
                    initrd=initrd if initrd.is_file() else None,
                    cmdline=cmdline.read_text().strip() if cmdline.is_file() else None,
                )
        raise ImageNotFound(f"image {name!r} not found in the image pool {self.pool}")

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except ImageNotFound:
            return False

    def remove(self, name: str) -> None:
        """Remove image `name` and its sidecars (a refused snapshot); idempotent."""
        directory, stem = self.locate(name)
        for suffix in (*IMAGE_FORMATS, "kernel", "initrd", "cmdline", "sha256", "kernel.sha256", "initrd.sha256"):
            (directory / f"{stem}.{suffix}").unlink(missing_ok=True)

    def list(self) -> list[str]:
        names = set()
        if self.pool.is_dir():
            for p in self.pool.iterdir():
                stem, _, ext = p.name.rpartition(".")
                if ext in IMAGE_FORMATS and IMAGE_NAME_RE.fullmatch(stem) and ".." not in stem:
                    names.add(stem)
        return sorted(names)

    # ---------------------------------------------------------------- instance dirs
    def instance_dir(self, uid: str) -> Path:
        return self.state_dir / "instances" / validate_uid(uid)

    def disk_path(self, uid: str) -> Path:
        return self.instance_dir(uid) / "disk.qcow2"

    def rescue_disk_path(self, uid: str) -> Path:
        return self.instance_dir(uid) / "disk.rescue.qcow2"

    def serial_log_path(self, uid: str) -> Path:
        return self.instance_dir(uid) / "serial.log"

    def cidata_path(self, uid: str) -> Path:
        return self.instance_dir(uid) / "cidata.iso"

    def ensure_instance_dir(self, uid: str) -> Path:
        d = self.instance_dir(uid)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def create_overlay(self, image: Image, dest: Path, *, replace: bool = False) -> Path:
        """A qcow2 overlay on the pool image; idempotent (an existing overlay is kept unless replace)."""
        if dest.exists() and not replace:
            if self._backing_file(dest) == str(image.path):
                return dest
            raise ImageError(f"{dest} exists with another backing file; refusing to overwrite")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}{PARTIAL_MARK}{uuidlib.uuid4().hex[:8]}")
        try:
            _qemu_img(["create", "-q", "-f", "qcow2", "-F", image.format, "-b", str(image.path), str(tmp)])
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _backing_file(self, disk: Path) -> str | None:
        try:
            info = json.loads(_qemu_img(["info", "--output=json", "-U", str(disk)]))
        except (ImageError, json.JSONDecodeError):
            return None
        return info.get("full-backing-filename") or info.get("backing-filename")

    def create_instance_disk(self, uid: str, image_name: str, *, replace: bool = False) -> Path:
        image = self.get(image_name)
        self.ensure_instance_dir(uid)
        return self.create_overlay(image, self.disk_path(uid), replace=replace)

    def create_rescue_disk(self, uid: str, image_name: str) -> Path:
        image = self.get(image_name)
        self.ensure_instance_dir(uid)
        return self.create_overlay(image, self.rescue_disk_path(uid), replace=True)

    def delete_rescue_disk(self, uid: str) -> None:
        self.rescue_disk_path(uid).unlink(missing_ok=True)

    def delete_instance(self, uid: str) -> None:
        """Remove the instance directory (disks, logs); idempotent."""
        shutil.rmtree(self.instance_dir(uid), ignore_errors=True)

    def instance_uids(self) -> list[str]:
        d = self.state_dir / "instances"
        out = []
        if d.is_dir():
            for p in d.iterdir():
                try:
                    out.append(validate_uid(p.name))
                except ImageError:
                    pass
        return sorted(out)

    # ---------------------------------------------------------------- snapshots
    def snapshot(self, disk: Path, snapshot_name: str, *, source_image: str | None = None,
                 force_share: bool = False) -> Image:
        """Flatten an instance disk into the pool as ``<snapshot_name>.qcow2``.

        Writes to ``.<name>.qcow2.partial-<rand>`` first and renames, so an interrupted snapshot leaves
        only a partial file that :meth:`cleanup_partial_snapshots` removes. Kernel sidecars of the
        source image are copied too. Refuses to overwrite an existing image.
        """
        directory, stem = self.locate(snapshot_name)
        if self.exists(snapshot_name):
            raise ImageError(f"image {snapshot_name!r} already exists in the pool; choose another snapshot name")
        if not disk.is_file():
            raise ImageError(f"instance disk {disk} does not exist")
        src = self.get(source_image) if source_image else None
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"{stem}.qcow2"
        tmp = directory / f".{stem}.qcow2{PARTIAL_MARK}{uuidlib.uuid4().hex[:8]}"
        try:
            args = ["convert", "-q", "-O", "qcow2"]
            if force_share:
                args.append("-U")
            _qemu_img([*args, str(disk), str(tmp)])
            if src is not None:
                for attr, ext in (("kernel", "kernel"), ("initrd", "initrd")):
                    p = getattr(src, attr)
                    if p is not None:
                        link_or_copy(p, directory / f"{stem}.{ext}")
                if src.cmdline is not None:
                    (directory / f"{stem}.cmdline").write_text(src.cmdline + "\n")
            os.rename(tmp, final)  # last: the image appears complete or not at all
        finally:
            tmp.unlink(missing_ok=True)
        return self.get(snapshot_name)

    def cleanup_partial_snapshots(self, snapshot_name: str | None = None) -> list[Path]:
        """Remove partial files left by interrupted snapshots (all, or those of one name)."""
        removed = []
        directory, stem = self.locate(snapshot_name) if snapshot_name else (self.pool, "")
        if not directory.is_dir():
            return removed
        prefix = f".{stem}." if snapshot_name else "."
        for p in directory.iterdir():
            if p.name.startswith(prefix) and PARTIAL_MARK in p.name:
                p.unlink(missing_ok=True)
                removed.append(p)
        # sidecars copied before an interruption, with no image next to them
        if snapshot_name and not self.exists(snapshot_name):
            for ext in ("kernel", "initrd", "cmdline"):
                p = directory / f"{stem}.{ext}"
                if p.exists():
                    p.unlink()
                    removed.append(p)
        return removed
