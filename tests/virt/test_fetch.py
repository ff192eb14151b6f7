"""novalet.virt.fetch against a loopback HTTP server and the real qemu-img.

The server (http.server on 127.0.0.1, an ephemeral port, in a thread) serves a tmp directory and
counts every request; a few paths change how a file is sent: ``/slow/F`` in small timed chunks,
``/nolength/F`` without Content-Length, ``/stall/F`` a first chunk then 2 s of silence,
``/short/F`` with a Content-Length 1000 bytes too long, ``/redirect?to=URL`` a 302. Images are
made with ``qemu-img create``. Every refusal must leave the cache directory empty.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import random
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from novalet.virt.fetch import (
    FetchError,
    _check_info,
    fetch_boot_files,
    fetch_file,
    fetch_image,
)
from novalet.virt.images import ImageError, ImagePool

pytestmark = pytest.mark.stack  # qemu-img (qemu-utils, installed by hack/setup.sh)

MIB = 2**20
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in PROXY_VARIABLES:  # the loopback server only, never a proxy
        monkeypatch.delenv(name, raising=False)


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.slow_chunk = 64 * 1024
        self.slow_delay_s = 0.04
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server.requests.append(self.path)
                parts = urllib.parse.urlsplit(self.path)
                if parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", urllib.parse.parse_qs(parts.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                mode, _, rel = parts.path.lstrip("/").partition("/")
                if mode not in ("slow", "nolength", "stall", "short"):
                    mode, rel = "", parts.path.lstrip("/")
                path = server.root / rel
                if "/" in rel or not rel or not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if mode != "nolength":
                    self.send_header("Content-Length", str(len(body) + (1000 if mode == "short" else 0)))
                self.end_headers()
                if mode == "slow":
                    for i in range(0, len(body), server.slow_chunk):
                        self.wfile.write(body[i:i + server.slow_chunk])
                        self.wfile.flush()
                        time.sleep(server.slow_delay_s)
                elif mode == "stall":  # a first chunk, then silence
                    self.wfile.write(body[:server.slow_chunk])
                    self.wfile.flush()
                    time.sleep(2)
                else:
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "serve"
    root.mkdir()
    s = Server(root)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def cache(tmp_path) -> Path:
    d = tmp_path / "cache"
    d.mkdir()
    return d


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def make_qcow2(root: Path, name: str = "disk.qcow2", size: str = "16M") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", str(root / name), size)
    return root / name


def make_raw(root: Path, name: str = "disk.raw", size: str = "4M") -> Path:
    qemu_img("create", "-q", "-f", "raw", str(root / name), size)
    return root / name


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------------------- accepted


def test_qcow2_is_fetched_verified_and_placed(server, cache):
    src = make_qcow2(server.root)
    got = fetch_image(server.url(src.name), sha(src), cache, "cirros")
    assert got.path == cache / "cirros.qcow2" and got.format == "qcow2" and not got.cached
    assert got.virtual_size == 16 * MIB and got.bytes == src.stat().st_size
    assert got.path.read_bytes() == src.read_bytes()
    assert names(cache) == ["cirros.qcow2", "cirros.sha256"]  # no partial file left
    # the sidecar is sha256sum's format
    subprocess.run(["sha256sum", "--quiet", "-c", "cirros.sha256"], cwd=cache, check=True)
    # the node's pool sees it as an image
    image = ImagePool(cache, cache.parent / "state").get("cirros")
    assert image.format == "qcow2" and image.path == got.path


def test_raw_is_fetched_verified_and_placed(server, cache):
    src = make_raw(server.root)
    got = fetch_image(server.url(src.name), sha(src).upper(), cache, "blank")
    assert (got.path, got.format, got.virtual_size, got.bytes) == (cache / "blank.raw", "raw", 4 * MIB, 4 * MIB)
    assert names(cache) == ["blank.raw", "blank.sha256"]


def test_redirect_within_http_is_followed(server, cache):
    src = make_raw(server.root)
    got = fetch_image(f"{server.base}/redirect?to=/{src.name}", sha(src), cache, "moved")
    assert got.format == "raw" and server.requests == [f"/redirect?to=/{src.name}", f"/{src.name}"]


# ---------------------------------------------------------------------------- refused


def _wrong_checksum(server):
    src = make_qcow2(server.root)
    return server.url(src.name), "0" * 64, {"max_bytes": 10 * MIB}, ["checksum mismatch", "0" * 64, sha(src)]


def _backing_file(server):
    base = make_qcow2(server.root, "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(server.root / "overlay.qcow2"))
    src = server.root / "overlay.qcow2"
    return server.url(src.name), sha(src), {}, ["has a backing file", "qemu-img convert"]


def _data_file(server):
    src = server.root / "external.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={server.root / 'external.data'}", str(src), "1M")
    return server.url(src.name), sha(src), {}, ["external data file"]


def _text(server):
    src = server.root / "index.html"
    src.write_text("<!DOCTYPE html>\n<html><body>Please log in</body></html>\n" * 20)
    return server.url(src.name), sha(src), {}, ["text, not a disk image", "<!DOCTYPE html>"]


def _gzip(server):
    src = server.root / "disk.raw.gz"
    src.write_bytes(gzip.compress(make_raw(server.root).read_bytes()))
    return server.url(src.name), sha(src), {}, ["gzip-compressed", "decompress"]


def _vmdk(server):
    src = server.root / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(src), "1M")
    return server.url(src.name), sha(src), {}, ["vmdk format", "only qcow2 and raw"]


def _not_found(server):
    return server.url("missing.qcow2"), "0" * 64, {}, ["HTTP 404", "missing.qcow2"]


def _too_big(server):
    src = make_raw(server.root)
    return server.url(src.name), sha(src), {"max_bytes": MIB}, [f"{4 * MIB} bytes", f"limit of {MIB} bytes"]


def _too_big_no_length(server):
    src = make_raw(server.root)
    return server.url(f"nolength/{src.name}"), sha(src), {"max_bytes": MIB}, [f"more than the limit of {MIB}"]


def _short_body(server):
    src = make_raw(server.root)
    return server.url(f"short/{src.name}"), sha(src), {}, [f"closed after {4 * MIB} of {4 * MIB + 1000} bytes"]


def _ftp(server):
    return "ftp://127.0.0.1/disk.qcow2", "0" * 64, {}, ["unsupported URL scheme ftp:", "http:// and https://"]


def _file(server):
    return "file:///etc/passwd", "0" * 64, {}, ["unsupported URL scheme file:"]


def _redirect_to_file(server):
    return f"{server.base}/redirect?to=file:///etc/passwd", "0" * 64, {}, ["redirects (HTTP 302) to a file: URL"]


REFUSALS = {
    "wrong-checksum": _wrong_checksum, "backing-file": _backing_file, "data-file": _data_file, "text": _text,
    "gzip": _gzip, "vmdk": _vmdk, "404": _not_found, "over-size": _too_big,
    "over-size-no-length": _too_big_no_length, "short-body": _short_body, "ftp": _ftp, "file": _file,
    "redirect-to-file": _redirect_to_file,
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_with_a_clear_message_and_nothing_left(server, cache, case):
    url, digest, kwargs, expected = REFUSALS[case](server)
    with pytest.raises(FetchError) as e:
        fetch_image(url, digest, cache, "img", **kwargs)
    message = str(e.value)
    for part in expected:
        assert part in message, message
    assert message.startswith("image 'img'") or "URL scheme" in message, message
    assert isinstance(e.value, ImageError)  # the agent's image-error handling catches it
    assert names(cache) == []
    if case in ("ftp", "file"):
        assert server.requests == []  # refused before any traffic


def test_url_credentials_refused_and_query_left_out_of_messages(server, cache):
    port = server.httpd.server_address[1]
    with pytest.raises(FetchError, match="credentials") as e:
        fetch_image(f"http://user:s3cret@127.0.0.1:{port}/disk.raw", "0" * 64, cache, "img")
    assert "s3cret" not in str(e.value) and server.requests == []
    with pytest.raises(FetchError, match="HTTP 404") as e:
        fetch_image(f"http://127.0.0.1:{port}/missing.raw?token=t0ken", "0" * 64, cache, "img")
    assert "t0ken" not in str(e.value) and "missing.raw?..." in str(e.value)
    assert names(cache) == []


@pytest.mark.parametrize("name", ["a.b", "a_b", "../x", "UPPER", "", "-x", "x" * 64])
def test_name_must_be_a_dns_label(server, cache, name):
    with pytest.raises(FetchError, match="invalid image name"):
        fetch_image(server.url("x.raw"), "0" * 64, cache, name)
    assert server.requests == []


def test_bad_sha256_refused_before_any_request(server, cache):
    with pytest.raises(FetchError, match="invalid sha256"):
        fetch_image(server.url("x.raw"), "abc", cache, "img")
    assert server.requests == []


def test_qemu_img_json_checks():
    """What the header check already refuses, qemu-img's JSON is checked for too (belt and braces)."""
    qcow2 = {"format": "qcow2", "virtual-size": MIB, "format-specific": {"type": "qcow2", "data": {}}}
    assert _check_info(qcow2, "qcow2", 1000) == ("qcow2", MIB)
    for extra, message in (({"backing-filename": "b.qcow2"}, "backing file"), ({"encrypted": True}, "encrypted"),
                           ({"dirty-flag": True}, "dirty"), ({"virtual-size": 0}, "virtual size"),
                           ({"format": "vmdk"}, "vmdk format"), ({"format": "raw"}, "header says qcow2")):
        with pytest.raises(FetchError, match=message):
            _check_info({**qcow2, **extra}, "qcow2", 1000)
    for data, message in (({"data-file": "/dev/sda"}, "external data file"), ({"corrupt": True}, "corrupt")):
        with pytest.raises(FetchError, match=message):
            _check_info({**qcow2, "format-specific": {"type": "qcow2", "data": data}}, "qcow2", 1000)
    with pytest.raises(FetchError, match="virtual size of 4096 for a raw file of 512"):
        _check_info({"format": "raw", "virtual-size": 4096}, "raw", 512)


# ---------------------------------------------------------------------------- progress, cancellation


def test_progress_grows_on_a_slow_body(server, cache):
    src = server.root / "slow.raw"
    src.write_bytes(random.Random(10).randbytes(4 * MIB))  # 64 chunks of 64 KiB, 40 ms apart: about 2.6 s
    calls: list[tuple[float, int, int | None]] = []
    got = fetch_image(server.url("slow/slow.raw"), sha(src), cache, "slow",
                      progress=lambda done, total: calls.append((time.monotonic(), done, total)))
    assert got.format == "raw" and got.bytes == 4 * MIB
    counts = [done for _, done, _ in calls]
    assert counts[0] == 0 and counts[-1] == 4 * MIB
    assert counts == sorted(counts) and len(set(counts)) >= 5, counts  # growing, several steps
    assert all(total == 4 * MIB for _, _, total in calls)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(calls[:-1])]  # the final call comes when the body ends
    assert gaps and min(gaps) >= 0.45, gaps


def test_an_exception_in_progress_aborts_and_leaves_nothing(server, cache):
    src = server.root / "slow.raw"
    src.write_bytes(random.Random(11).randbytes(2 * MIB))

    def cancel(done, total):
        if done:
            raise KeyboardInterrupt  # whatever the caller raises comes back as is

    with pytest.raises(KeyboardInterrupt):
        fetch_image(server.url("slow/slow.raw"), sha(src), cache, "slow", progress=cancel)
    assert names(cache) == []


def test_a_stalled_or_too_slow_body_is_refused(server, cache):
    src = server.root / "slow.raw"
    src.write_bytes(random.Random(12).randbytes(2 * MIB))
    with pytest.raises(FetchError, match=r"sent nothing for 0.3 s after 65536 bytes; try again"):
        fetch_image(server.url("stall/slow.raw"), sha(src), cache, "img", stall_s=0.3)
    assert names(cache) == []
    with pytest.raises(FetchError, match=r"took longer than 0.5 s \(\d+ bytes so far\)"):
        fetch_image(server.url("slow/slow.raw"), sha(src), cache, "img", timeout_s=0.5)
    assert names(cache) == []


# ---------------------------------------------------------------------------- the cache


def test_second_fetch_is_a_cache_hit_without_a_request(server, cache):
    src = make_qcow2(server.root)
    first = fetch_image(server.url(src.name), sha(src), cache, "img")
    assert len(server.requests) == 1
    src.write_bytes(b"changed on the server")  # would fail every check if it were fetched again
    second = fetch_image(server.url(src.name), first.sha256, cache, "img")
    assert len(server.requests) == 1
    assert second.cached and (second.path, second.format, second.virtual_size) == (
        first.path, first.format, first.virtual_size)


def test_a_cached_name_is_never_replaced(server, cache):
    src = make_qcow2(server.root)
    first = fetch_image(server.url(src.name), sha(src), cache, "img")
    before = first.path.read_bytes()
    other = make_raw(server.root)
    with pytest.raises(FetchError, match="already in the cache .* never replaced .* another name") as e:
        fetch_image(server.url(other.name), sha(other), cache, "img")
    assert sha(other) in str(e.value) and first.sha256 in str(e.value)
    assert len(server.requests) == 1 and first.path.read_bytes() == before
    assert names(cache) == ["img.qcow2", "img.sha256"]


def test_a_placed_image_without_sidecar_is_hashed_once(server, cache):
    src = make_qcow2(server.root)
    (cache / "tiny.qcow2").write_bytes(src.read_bytes())  # put there by hand, like the dev stack's pool
    got = fetch_image(server.url(src.name), sha(src), cache, "tiny")
    assert got.cached and server.requests == []
    assert (cache / "tiny.sha256").read_text() == f"{sha(src)}  tiny.qcow2\n"


# ---------------------------------------------------------------------------- kernel and initrd


def test_kernel_and_initrd_are_fetched_next_to_the_image(server, cache):
    kernel, initrd = server.root / "vmlinuz", server.root / "initrd.img"
    kernel.write_bytes(random.Random(1).randbytes(300_000))
    initrd.write_bytes(gzip.compress(b"070701" + bytes(1000)))  # compressed is fine for a file
    pair = fetch_boot_files(cache, "tiny", (server.url("vmlinuz"), sha(kernel)),
                            (server.url("initrd.img"), sha(initrd)))
    assert pair.kernel.path == cache / "tiny.kernel" and pair.initrd.path == cache / "tiny.initrd"
    assert pair.kernel.path.read_bytes() == kernel.read_bytes() and pair.initrd.bytes == initrd.stat().st_size
    assert names(cache) == ["tiny.initrd", "tiny.initrd.sha256", "tiny.kernel", "tiny.kernel.sha256"]
    again = fetch_boot_files(cache, "tiny", (server.url("vmlinuz"), sha(kernel)),
                             (server.url("initrd.img"), sha(initrd)))
    assert again.kernel.cached and again.initrd.cached and len(server.requests) == 2
    # and the pool boots the image with them once the image is there
    src = make_raw(server.root)
    fetch_image(server.url(src.name), sha(src), cache, "tiny")
    image = ImagePool(cache, cache.parent / "state").get("tiny")
    assert (image.kernel, image.initrd) == (pair.kernel.path, pair.initrd.path)


def test_a_refused_initrd_leaves_no_kernel_either(server, cache):
    kernel, initrd = server.root / "vmlinuz", server.root / "initrd.img"
    kernel.write_bytes(b"k" * 1000)
    initrd.write_bytes(b"i" * 1000)
    with pytest.raises(FetchError, match="initrd of image 'tiny': checksum mismatch"):
        fetch_boot_files(cache, "tiny", (server.url("vmlinuz"), sha(kernel)), (server.url("initrd.img"), sha(kernel)))
    assert names(cache) == []


@pytest.mark.parametrize("case", ["checksum", "size", "404", "scheme"])
def test_fetch_file_refusals_leave_nothing(server, cache, case):
    f = server.root / "vmlinuz"
    f.write_bytes(b"k" * 5000)
    url, digest, kwargs, message = {
        "checksum": (server.url("vmlinuz"), "1" * 64, {}, "checksum mismatch"),
        "size": (server.url("nolength/vmlinuz"), sha(f), {"max_bytes": 4096}, "more than the limit of 4096"),
        "404": (server.url("nope"), sha(f), {}, "HTTP 404"),
        "scheme": ("gopher://127.0.0.1/vmlinuz", sha(f), {}, "unsupported URL scheme gopher:"),
    }[case]
    with pytest.raises(FetchError, match=message):
        fetch_file(url, digest, cache / "x.kernel", **kwargs)
    assert names(cache) == []
