"""The cloud-init NoCloud `cidata` disk: user-data and meta-data on an ISO 9660 volume.

cloud-init (and the tiny test guest) finds it by its volume label `cidata` and reads the files
`user-data` and `meta-data` (Rock Ridge and Joliet names; the ISO 9660 names are 8.3). The disk
is attached read-only. meta-data is YAML written by a YAML library, never by string formatting:
a name or a key cannot add a field.
"""
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pycdlib
import yaml

VOLUME_LABEL = "cidata"


@dataclass(frozen=True)
class CloudInit:
    """What the cidata disk carries."""

    meta_data: bytes
    user_data: bytes | None = None


def meta_data(uid: str, name: str, ssh_authorized_keys: list[str] | None) -> bytes:
    """NoCloud meta-data: instance-id is the uid (cloud-init runs its per-instance modules once
    per id), local-hostname the object's name, public-keys the SSH keys."""
    doc: dict = {"instance-id": uid, "local-hostname": name}
    if ssh_authorized_keys:
        doc["public-keys"] = list(ssh_authorized_keys)
    return yaml.safe_dump(doc, sort_keys=False).encode()


def write_iso(path: Path, data: CloudInit) -> None:
    """Write the volume to `path` atomically (a temporary file renamed over it)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    files = [("META_DAT.;1", "meta-data", data.meta_data)]
    if data.user_data is not None:
        files.append(("USER_DAT.;1", "user-data", data.user_data))
    for iso_name, name, content in files:
        iso.add_fp(io.BytesIO(content), len(content), f"/{iso_name}", rr_name=name, joliet_path=f"/{name}")
    partial = path.with_name(f".{path.name}.partial")
    try:
        iso.write(str(partial))
    finally:
        iso.close()
    os.replace(partial, path)
