"""Files that hold secrets (private keys, kubeconfigs with client keys): 0600 from the first byte.

`write_private` never writes into a file someone else could already have open: it creates a new
file next to the target with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600, sets the mode again on
the open descriptor (the umask can only take bits away, so a mode of exactly 0600 is set
whatever the umask), writes and syncs, and renames it over the target. There is no moment at
which the data sits in a file with a wider mode: not a chmod after the write, not a file left
by an earlier run with a wider mode (rename replaces it; it never follows a symlink).
"""
import os
import secrets
from pathlib import Path

MODE = 0o600
DIR_MODE = 0o700


def write_private(path: str | os.PathLike, data: bytes | str) -> Path:
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, MODE)
    try:
        os.fchmod(fd, MODE)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def private_dir(path: str | os.PathLike) -> Path:
    """A directory only its owner may enter (created 0700; an existing one is narrowed)."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path
