"""Fetch an image (or a kernel / initrd) over HTTP(S) into a node's image cache and verify it.

The first brick of the image catalog (issue 10): the agent calls :func:`fetch_image` when an
instance needs an image its node does not have yet, and :func:`fetch_boot_files` for a direct
kernel boot pair (Nova's kernel_id / ramdisk_id). Both are synchronous and blocking; the agent runs
them in a thread (``asyncio.to_thread``).

What lands in the cache (the pool layout of :mod:`novalet.virt.images`)::

    <cache>/<name>.qcow2 | <name>.raw    the verified image
    <cache>/<name>.sha256                its checksum, in ``sha256sum`` format (``sha256sum -c`` works)
    <cache>/<name>.kernel[.sha256]       from fetch_boot_files
    <cache>/<name>.initrd[.sha256]
    <cache>/.<name>[.kernel|.initrd].download.partial-<rand>
                                         only while a fetch runs (after a crash, the pool's
                                         cleanup_partial_snapshots(name) removes it)

The rules:

- Only ``http://`` and ``https://`` URLs, and redirects only to those (urllib would follow one to
  ``ftp://``); no ``file:``/``data:``/``ftp:`` handler is even installed. Proxy variables of the
  environment are honoured (a node behind a proxy can fetch). A path is never built from a URL:
  files are named after ``name``, which must be a DNS label.
- The body streams to a partial file in the cache directory, hashed as it goes; it is refused
  on an HTTP error, a body over ``max_bytes`` (from Content-Length before anything is written, or
  while streaming), a stall, the overall ``timeout_s``, a short body, or a sha256 that differs.
- An image is then checked before ``qemu-img`` opens it: text (an HTML error page), a compressed
  or archived file, a known format other than qcow2/raw, and a qcow2 whose header names a backing
  file, an external data file, encryption or corruption are refused from the bytes themselves, so
  qemu-img never follows a path named by an untrusted image. ``qemu-img info --output=json`` (an
  argv list, under ``prlimit`` like Nova does: 1 GiB of address space, 30 s of CPU) then probes the
  format (no ``-f``) and the JSON is checked again: qcow2 or raw only, no backing file, no data
  file, not encrypted, not corrupt or dirty, a positive virtual size.
- Only a verified file is moved into place: ``os.link`` of the partial file (atomic, and it never
  replaces an image someone else placed meanwhile), then the sidecar, then the partial is
  removed. Every refusal removes the partial file: nothing is left in the cache.
- An image already in the cache is never replaced: images back instance disks (qcow2 overlays), so
  changing the bytes under a name would corrupt them. The same name with the same checksum is a
  cache hit (no request); another checksum is refused with a message that says to use a new name.

Why a sidecar rather than re-hashing: re-reading a multi-GB image on every use costs minutes of
I/O on a busy node; the sidecar is written only after a verified fetch. A file with no sidecar (a
hand-placed image, or a crash between the link and the sidecar) is re-hashed once and, when it
matches, gets its sidecar then.

Every refusal raises :class:`FetchError`, whose message says what was wrong and what to do; it ends
up in an instance's ``status.lastAction.message``. Userinfo and query strings of URLs are left out
of messages (they may carry credentials).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import ssl
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead
from pathlib import Path

from .images import PARTIAL_MARK, ImageError, validate_image_name

DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SCHEMES = ("http", "https")

DEFAULT_TIMEOUT_S = 3600.0  # the whole transfer
DEFAULT_STALL_S = 60.0  # no byte for this long (connect or read) ends it
DEFAULT_MAX_BYTES = 64 * 2**30  # an image
DEFAULT_MAX_FILE_BYTES = 1 * 2**30  # a kernel or an initrd
PROGRESS_INTERVAL_S = 0.5
CHUNK = 1 << 20
QEMU_IMG_TIMEOUT_S = 60
# Nova's limits for qemu-img on untrusted images (nova/virt/images.py QEMU_IMG_LIMITS)
QEMU_IMG_LIMITS = ("--as=1073741824", "--cpu=30")

Progress = Callable[[int, "int | None"], None]


class FetchError(ImageError):
    """A fetch was refused or failed; the message says why and what to do. Nothing was left behind."""


@dataclass(frozen=True)
class FetchedImage:
    name: str
    path: Path
    format: str  # qcow2 | raw
    virtual_size: int  # bytes the guest sees
    bytes: int  # bytes of the file
    sha256: str
    cached: bool  # True: it was already in the cache, nothing was downloaded


@dataclass(frozen=True)
class FetchedFile:
    path: Path
    bytes: int
    sha256: str
    cached: bool


@dataclass(frozen=True)
class BootFiles:
    kernel: FetchedFile
    initrd: FetchedFile | None


# ---------------------------------------------------------------------------- validation


def validate_fetch_name(name: str) -> str:
    """An image name in the cache: the pool's rules (:func:`validate_image_name`) and a DNS label
    (no '.' or '_'), so ``<name>.<ext>`` never collides with another name's file (``a.kernel.sha256``
    would otherwise be both the sidecar of image ``a.kernel`` and of image ``a``'s kernel)."""
    try:
        validate_image_name(name)
    except ImageError as e:
        raise FetchError(str(e)) from None
    if not DNS_LABEL_RE.fullmatch(name):
        raise FetchError(
            f"invalid image name {name!r}: a fetched image's name must be a DNS label (lowercase letters, "
            f"digits and '-', 1-63 characters, starting and ending with a letter or digit)"
        )
    return name


def _validate_sha256(sha256: str) -> str:
    value = sha256.strip().lower() if isinstance(sha256, str) else ""
    if not SHA256_RE.fullmatch(value):
        raise FetchError(f"invalid sha256 {sha256!r}: expected 64 hexadecimal digits (the output of sha256sum)")
    return value


def display_url(url: str) -> str:
    """The URL for a message: no userinfo, no query or fragment (they may carry credentials)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        query = "?..." if parts.query else ""
        return f"{parts.scheme}://{host}{port}{parts.path}{query}"
    except ValueError:
        return "<unparsable URL>"


def _validate_url(url: str) -> str:
    if not isinstance(url, str) or not url:
        raise FetchError("no URL given: expected an http:// or https:// URL")
    if len(url) > 4096 or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise FetchError(f"invalid URL {display_url(url)!r}: too long, or it contains spaces or control "
                         f"characters (percent-encode them)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise FetchError(f"invalid URL {display_url(url)!r}: {e}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise FetchError(f"unsupported URL scheme {parts.scheme + ':' if parts.scheme else '(none)'} in "
                         f"{display_url(url)!r}: only http:// and https:// URLs can be fetched")
    if not parts.hostname:
        raise FetchError(f"invalid URL {display_url(url)!r}: no host")
    if "@" in parts.netloc:
        raise FetchError(f"URL {display_url(url)!r} has credentials (user:password@) in it, which are not "
                         f"supported: serve the image without them, or with a token in the query string")
    return url


# ---------------------------------------------------------------------------- HTTP


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http:// and https:// (urllib's own also follows one to ftp://)."""

    max_redirections = 5

    def http_error_302(self, req, fp, code, msg, headers):
        # checked before urllib's own check, whose error would quote the whole target URL
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, location))
            scheme = target.scheme.lower()
            if scheme not in SCHEMES:
                fp.close()
                raise FetchError(f"{display_url(req.full_url)!r} redirects (HTTP {code}) to a {scheme}: URL; "
                                 f"only redirects to http:// or https:// are followed")
            if "@" in target.netloc:
                fp.close()
                raise FetchError(f"{display_url(req.full_url)!r} redirects (HTTP {code}) to a URL with "
                                 f"credentials (user:password@) in it, which are not supported")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener() -> urllib.request.OpenerDirector:
    # build_opener() would add file:, ftp: and data: handlers: install only what HTTP(S) needs
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(context=ssl.create_default_context()),
                    urllib.request.HTTPDefaultErrorHandler(), _RedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _download(url: str, sha256: str, tmp: Path, *, what: str, progress: Progress | None, timeout_s: float,
              max_bytes: int, stall_s: float) -> int:
    """Stream ``url`` into ``tmp`` (created exclusively), hashing; return the byte count once the
    digest matches ``sha256``. Raises FetchError; the caller removes ``tmp``."""
    shown = display_url(url)
    deadline = time.monotonic() + timeout_s
    req = urllib.request.Request(url, headers={"User-Agent": "novalet-fetch/1", "Accept-Encoding": "identity"})
    try:
        resp = _opener().open(req, timeout=min(stall_s, timeout_s))
    except FetchError as e:  # from the redirect handler
        raise FetchError(f"{what}: {e}") from None
    except urllib.error.HTTPError as e:
        e.close()
        raise FetchError(f"{what}: HTTP {e.code} {e.reason} from {shown!r}; check the URL") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise FetchError(f"{what}: TLS certificate of {shown!r} not trusted: {reason.verify_message}") from None
        raise FetchError(f"{what}: cannot reach {shown!r}: {reason}") from None
    except TimeoutError:
        raise FetchError(f"{what}: no answer from {shown!r} within {min(stall_s, timeout_s):g} s") from None
    except (OSError, HTTPException, ValueError) as e:
        raise FetchError(f"{what}: request to {shown!r} failed: {e}") from None
    with resp:
        final = resp.geturl()
        if urllib.parse.urlsplit(final).scheme.lower() not in SCHEMES:  # belt and braces
            raise FetchError(f"{what}: {shown!r} ended at a non-HTTP URL; refusing it")
        if resp.status != 200:
            raise FetchError(f"{what}: HTTP {resp.status} {resp.reason} from {shown!r}: expected 200 with the "
                             f"whole file")
        encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", ""):
            raise FetchError(f"{what}: {shown!r} was sent with Content-Encoding {encoding}; serve the file as is")
        total: int | None = None
        length = resp.headers.get("Content-Length")
        if length is not None and length.strip().isdigit():
            total = int(length)
            if total > max_bytes:
                raise FetchError(f"{what}: {shown!r} is {total} bytes, over the limit of {max_bytes} bytes")
            free = shutil.disk_usage(tmp.parent).free
            if total > free:
                raise FetchError(f"{what}: {shown!r} is {total} bytes but the cache {tmp.parent} has only "
                                 f"{free} bytes free")
        digest = hashlib.sha256()
        done = 0
        last_report = time.monotonic()
        if progress is not None:
            progress(0, total)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise FetchError(f"{what}: cannot write to the cache {tmp.parent}: {e.strerror}") from None
        with os.fdopen(fd, "wb") as out:
            while True:
                try:
                    chunk = resp.read1(CHUNK)
                except IncompleteRead as e:
                    raise FetchError(f"{what}: connection to {shown!r} closed after {done + len(e.partial)} of "
                                     f"{total} bytes; try again") from None
                except TimeoutError:
                    raise FetchError(f"{what}: {shown!r} sent nothing for {stall_s:g} s after {done} bytes; "
                                     f"try again") from None
                except (OSError, HTTPException) as e:
                    raise FetchError(f"{what}: reading {shown!r} failed after {done} bytes: {e}") from None
                if not chunk:
                    break
                done += len(chunk)
                if done > max_bytes:
                    raise FetchError(f"{what}: {shown!r} is more than the limit of {max_bytes} bytes")
                digest.update(chunk)
                try:
                    out.write(chunk)
                except OSError as e:
                    raise FetchError(f"{what}: writing to the cache {tmp.parent} failed after {done} bytes: "
                                     f"{e.strerror}") from None
                now = time.monotonic()
                if now > deadline:
                    raise FetchError(f"{what}: {shown!r} took longer than {timeout_s:g} s ({done} bytes so far)")
                if progress is not None and now - last_report >= PROGRESS_INTERVAL_S:
                    last_report = now
                    progress(done, total)
            if total is not None and done != total:
                raise FetchError(f"{what}: connection to {shown!r} closed after {done} of {total} bytes; try again")
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as e:
                raise FetchError(f"{what}: writing to the cache {tmp.parent} failed: {e.strerror}") from None
    if progress is not None:
        progress(done, total)
    actual = digest.hexdigest()
    if actual != sha256:
        raise FetchError(f"{what}: checksum mismatch for {shown!r}: expected sha256 {sha256}, got {actual} "
                         f"({done} bytes); check the URL and the sha256")
    return done


# ---------------------------------------------------------------------------- the bytes themselves

_COMPRESSED = (
    (b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"), (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"\x04\x22\x4d\x18", "lz4"),
)
_OTHER_FORMATS = (
    (0, b"KDMV", "vmdk"), (0, b"COWD", "vmdk"), (0, b"vhdxfile", "vhdx"), (0, b"conectix", "vpc (VHD)"),
    (0, b"QED\x00", "qed"), (0, b"LUKS\xba\xbe", "luks"), (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"WithoutFreeSpace", "parallels"), (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
)
_QCOW2_MAGIC = b"QFI\xfb"
_TAR_MAGIC_AT = 257  # "ustar"


def _sniff(path: Path, size: int) -> str:
    """'qcow2' or 'raw' from the bytes, or FetchError for what qemu-img must not be asked to open."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if size == 0:
        raise FetchError("the file is empty, not a disk image")
    for magic, kind in _COMPRESSED:
        if head.startswith(magic):
            raise FetchError(f"the file is {kind}-compressed, not a disk image: decompress it and publish the "
                             f"qcow2 or raw image (with its sha256)")
    if head[_TAR_MAGIC_AT:_TAR_MAGIC_AT + 5] == b"ustar":
        raise FetchError("the file is a tar archive, not a disk image: publish the qcow2 or raw image inside it")
    for offset, magic, kind in _OTHER_FORMATS:
        if head[offset:offset + len(magic)] == magic:
            raise FetchError(f"the image is in {kind} format; only qcow2 and raw are accepted: convert it with "
                             f"`qemu-img convert -O qcow2 SOURCE IMAGE.qcow2`")
    if head.startswith(_QCOW2_MAGIC):
        _check_qcow2_header(head)
        return "qcow2"
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            text = head[:e.start].decode("utf-8") if e.start >= 64 else None
        if text is not None:
            first = text.strip().splitlines()[0][:60] if text.strip() else ""
            raise FetchError(f"the file is text, not a disk image (it starts with {first!r}); an HTML page "
                             f"usually means a wrong URL or a login page")
    if size % 512:
        raise FetchError(f"the file is {size} bytes, not a whole number of 512-byte sectors: it is not a raw "
                         f"disk image (nor a qcow2)")
    return "raw"


def _check_qcow2_header(head: bytes) -> None:
    if len(head) < 72:
        raise FetchError("the qcow2 header is truncated: the image is damaged")
    version, backing_offset = struct.unpack_from(">IQ", head, 4)
    crypt_method = struct.unpack_from(">I", head, 32)[0]
    if version not in (2, 3):
        raise FetchError(f"qcow2 version {version} is not supported (only 2 and 3): convert it with "
                         f"`qemu-img convert -O qcow2`")
    if backing_offset:
        raise FetchError("the qcow2 image has a backing file: only standalone images are accepted; flatten it "
                         "with `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`")
    if crypt_method:
        raise FetchError("the qcow2 image is encrypted: only unencrypted images are accepted")
    if version == 3:
        if len(head) < 80:
            raise FetchError("the qcow2 header is truncated: the image is damaged")
        incompatible = struct.unpack_from(">Q", head, 72)[0]
        if incompatible & 0b100:
            raise FetchError("the qcow2 image has an external data file: only standalone images are accepted; "
                             "convert it with `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`")
        if incompatible & 0b010:
            raise FetchError("the qcow2 image is marked corrupt: repair it (`qemu-img check -r all`) and "
                             "publish it again")
        if incompatible & 0b001:
            raise FetchError("the qcow2 image was not closed cleanly (dirty): run `qemu-img check -r all` on "
                             "it and publish it again")


def _qemu_img_info(path: Path) -> dict:
    argv = ["qemu-img", "info", "--output=json", str(path)]
    prlimit = shutil.which("prlimit")
    if prlimit:
        argv = [prlimit, *QEMU_IMG_LIMITS, "--", *argv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=QEMU_IMG_TIMEOUT_S,
                              env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        raise FetchError("qemu-img not found on this node: install the Debian package qemu-utils") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"qemu-img info took longer than {QEMU_IMG_TIMEOUT_S} s: the image is not usable") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()[-1]
        raise FetchError(f"qemu-img cannot read the image: {detail}")
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise FetchError("qemu-img info gave no JSON: the image is not usable") from None
    if not isinstance(info, dict):
        raise FetchError("qemu-img info gave unexpected JSON: the image is not usable")
    return info


def _check_info(info: dict, sniffed: str, size: int) -> tuple[str, int]:
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise FetchError(f"the image is in {fmt} format; only qcow2 and raw are accepted: convert it with "
                         f"`qemu-img convert -O qcow2 SOURCE IMAGE.qcow2`")
    if fmt != sniffed:
        raise FetchError(f"qemu-img sees a {fmt} image where its header says {sniffed}: the image is damaged")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise FetchError("the qcow2 image has a backing file: only standalone images are accepted; flatten it "
                         "with `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`")
    if info.get("encrypted"):
        raise FetchError("the image is encrypted: only unencrypted images are accepted")
    if info.get("dirty-flag"):
        raise FetchError("the qcow2 image was not closed cleanly (dirty): run `qemu-img check -r all` on it and "
                         "publish it again")
    specific = info.get("format-specific") or {}
    data = specific.get("data") if isinstance(specific, dict) else None
    if fmt == "qcow2":
        if not isinstance(data, dict):
            raise FetchError("qemu-img info has no qcow2 details for the image: it is not usable")
        if data.get("data-file") or data.get("data-file-raw"):
            raise FetchError("the qcow2 image has an external data file: only standalone images are accepted; "
                             "convert it with `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`")
        if data.get("corrupt"):
            raise FetchError("the qcow2 image is marked corrupt: repair it (`qemu-img check -r all`) and publish "
                             "it again")
        if data.get("encrypt"):
            raise FetchError("the qcow2 image is encrypted: only unencrypted images are accepted")
    virtual_size = info.get("virtual-size")
    if not isinstance(virtual_size, int) or isinstance(virtual_size, bool) or virtual_size <= 0:
        raise FetchError(f"qemu-img reports a virtual size of {virtual_size!r}: the image is not usable")
    if fmt == "raw" and virtual_size != size:
        raise FetchError(f"qemu-img reports a virtual size of {virtual_size} for a raw file of {size} bytes: "
                         f"the image is not usable")
    return fmt, virtual_size


def verify_image(path: Path) -> tuple[str, int]:
    """(format, virtual size) of a file that must be a standalone qcow2 or a raw image; FetchError if not."""
    size = path.stat().st_size
    sniffed = _sniff(path, size)
    return _check_info(_qemu_img_info(path), sniffed, size)


# ---------------------------------------------------------------------------- the cache


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _image_sidecar(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}.sha256"


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_sidecar(sidecar: Path) -> str | None:
    try:
        first = sidecar.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    return first[0].lower() if first and SHA256_RE.fullmatch(first[0].lower()) else None


def _write_sidecar(sidecar: Path, sha256: str, target: Path) -> None:
    tmp = sidecar.with_name(f".{sidecar.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(f"{sha256}  {target.name}\n")
        tmp.replace(sidecar)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _existing_sha256(path: Path, sidecar: Path) -> str:
    """The checksum of a file already in the cache: its sidecar's, or (none yet) hashed now and recorded."""
    recorded = _read_sidecar(sidecar)
    if recorded is not None:
        return recorded
    actual = _hash_file(path)
    _write_sidecar(sidecar, actual, path)
    return actual


def _taken(what: str, path: Path, existing: str, wanted: str) -> FetchError:
    return FetchError(f"{what}: {path.name} is already in the cache {path.parent} with sha256 {existing}, not "
                      f"{wanted}; a cached file is never replaced (instance disks may be built on it): give the "
                      f"new one another name")


def _place(tmp: Path, final: Path) -> bool:
    """Move a verified partial file to ``final`` without ever replacing a file there: True if placed,
    False if ``final`` appeared meanwhile (another fetch of the same name won)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links
        if final.exists():
            return False
        os.rename(tmp, final)
    _fsync_dir(final.parent)
    return True


def _partial(cache_dir: Path, stem: str) -> Path:
    return cache_dir / f".{stem}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}"


def fetch_image(url: str, sha256: str, cache_dir: Path, name: str, *, progress: Progress | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BYTES,
                stall_s: float = DEFAULT_STALL_S) -> FetchedImage:
    """Fetch ``url`` into ``cache_dir`` as ``<name>.qcow2`` or ``<name>.raw``, verified (module doc).

    ``progress(done_bytes, total_bytes_or_None)`` is called with 0 at the start, then at most every
    0.5 s, and once more when the body is complete; an exception it raises aborts the fetch (and is
    re-raised as is, after the partial file is removed). Blocking: run it in a thread.
    """
    validate_fetch_name(name)
    sha256 = _validate_sha256(sha256)
    _validate_url(url)
    cache_dir = Path(cache_dir)
    what = f"image {name!r}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    sidecar = _image_sidecar(cache_dir, name)

    def cached() -> FetchedImage | None:
        for fmt in ("qcow2", "raw"):
            path = cache_dir / f"{name}.{fmt}"
            if path.is_file():
                existing = _existing_sha256(path, sidecar)
                if existing != sha256:
                    raise _taken(what, path, existing, sha256)
                try:
                    found, virtual_size = verify_image(path)
                except FetchError as e:
                    raise FetchError(f"{what}: the cached {path} is not usable: {e}; remove it to fetch it "
                                     f"again") from None
                return FetchedImage(name, path, found, virtual_size, path.stat().st_size, sha256, cached=True)
        return None

    hit = cached()
    if hit is not None:
        return hit
    tmp = _partial(cache_dir, f"{name}.download")
    try:
        size = _download(url, sha256, tmp, what=what, progress=progress, timeout_s=timeout_s,
                         max_bytes=max_bytes, stall_s=stall_s)
        try:
            fmt, virtual_size = verify_image(tmp)
        except FetchError as e:
            raise FetchError(f"{what} from {display_url(url)!r}: {e}") from None
        final = cache_dir / f"{name}.{fmt}"
        other = cache_dir / f"{name}.{'raw' if fmt == 'qcow2' else 'qcow2'}"
        if other.exists() or not _place(tmp, final):
            hit = cached()  # placed meanwhile by another fetch of this name
            if hit is None:
                raise FetchError(f"{what}: {final.name} appeared in the cache while fetching; try again")
            return hit
        _write_sidecar(sidecar, sha256, final)
        return FetchedImage(name, final, fmt, virtual_size, size, sha256, cached=False)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_file(url: str, sha256: str, dest: Path, *, progress: Progress | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
               stall_s: float = DEFAULT_STALL_S, what: str | None = None) -> FetchedFile:
    """Fetch ``url`` to ``dest`` with the checksum, size and atomic-write rules of :func:`fetch_image`
    and no format check (a kernel, an initrd). ``dest`` is chosen by the caller, never from the URL
    (:func:`fetch_boot_files` names them after an image); its sidecar is ``<dest>.sha256``. A file
    already there with that checksum is not fetched again; with another, it is refused."""
    sha256 = _validate_sha256(sha256)
    _validate_url(url)
    dest = Path(dest)
    what = what or f"file {dest.name!r}"
    if dest.name.startswith(".") or PARTIAL_MARK in dest.name or dest.name.endswith(".sha256"):
        raise FetchError(f"invalid destination {dest}: hidden, partial and .sha256 names are the cache's own")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sidecar = _sidecar(dest)

    def cached() -> FetchedFile | None:
        if not dest.is_file():
            return None
        existing = _existing_sha256(dest, sidecar)
        if existing != sha256:
            raise _taken(what, dest, existing, sha256)
        return FetchedFile(dest, dest.stat().st_size, sha256, cached=True)

    hit = cached()
    if hit is not None:
        return hit
    tmp = _partial(dest.parent, f"{dest.name}.download")
    try:
        size = _download(url, sha256, tmp, what=what, progress=progress, timeout_s=timeout_s,
                         max_bytes=max_bytes, stall_s=stall_s)
        if size == 0:
            raise FetchError(f"{what}: {display_url(url)!r} is empty")
        if not _place(tmp, dest):
            hit = cached()
            if hit is None:
                raise FetchError(f"{what}: {dest.name} appeared in the cache while fetching; try again")
            return hit
        _write_sidecar(sidecar, sha256, dest)
        return FetchedFile(dest, size, sha256, cached=False)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_boot_files(cache_dir: Path, name: str, kernel: tuple[str, str],
                     initrd: tuple[str, str] | None = None, **kwargs) -> BootFiles:
    """The direct kernel boot pair of image ``name`` (Nova's kernel_id / ramdisk_id), each a
    ``(url, sha256)``, as ``<name>.kernel`` and ``<name>.initrd`` next to the image. Fetch them
    before the image: the pool uses them as soon as the image appears. If the initrd is refused,
    a kernel this call fetched is removed again, so a refusal leaves nothing."""
    validate_fetch_name(name)
    cache_dir = Path(cache_dir)
    k = fetch_file(kernel[0], kernel[1], cache_dir / f"{name}.kernel", what=f"kernel of image {name!r}", **kwargs)
    if initrd is None:
        return BootFiles(k, None)
    try:
        i = fetch_file(initrd[0], initrd[1], cache_dir / f"{name}.initrd", what=f"initrd of image {name!r}",
                       **kwargs)
    except BaseException:
        if not k.cached:
            k.path.unlink(missing_ok=True)
            _sidecar(k.path).unlink(missing_ok=True)
        raise
    return BootFiles(k, i)
