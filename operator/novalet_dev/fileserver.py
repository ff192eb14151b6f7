"""A loopback HTTP file server: what the dev stack serves images from, and what tests fetch from.

Serves the regular files of one directory (no listing, no subdirectories) on 127.0.0.1, with an
optional rate limit so that a test can watch a download's progress. `python -m
novalet_dev.fileserver --root DIR [--port N]` runs it in the foreground (the dev stack starts it
so); :class:`FileServer` runs it on a thread.
"""
from __future__ import annotations

import argparse
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

CHUNK = 64 * 1024


class FileServer:
    def __init__(self, root: Path, port: int = 0, rate_bytes_per_s: float | None = None) -> None:
        self.root = Path(root)
        self.rate = rate_bytes_per_s
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server.requests.append(self.path)
                name = self.path.lstrip("/")
                path = server.root / name
                if not name or "/" in name or name.startswith(".") or not path.is_file():
                    self.send_error(404)
                    return
                size = path.stat().st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                started, sent = time.monotonic(), 0
                with path.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        if server.rate:
                            ahead = sent / server.rate - (time.monotonic() - started)
                            if ahead > 0:
                                time.sleep(ahead)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread: threading.Thread | None = None

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def start(self) -> FileServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="serve a directory's files on 127.0.0.1")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = FileServer(args.root, args.port)
    print(f"serving {args.root} on {server.base}", flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
