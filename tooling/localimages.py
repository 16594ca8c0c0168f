"""A loopback HTTP server that serves fixed image bytes by path and counts requests (demo and benchmarks)."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LoopbackImageServer:
    """Serves `files` ({path: (body, content type)}) on 127.0.0.1; the query string is ignored, so
    `/p1.jpg?run=2` is a new URL to caches but the same photo. `hits` counts requests per path."""

    def __init__(self, files: dict[str, tuple[bytes, str]]) -> None:
        self.files = files
        self.hits: Counter[str] = Counter()
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle's algorithm on, the body's last segment waits for
            # the client's delayed ACK (40 ms on Linux): 22 photos, 8 at a time, took 104-110 ms instead of 27-33
            # (`scripts/loopback_fetch.py server`, BENCHMARKS.md, 2026-12-07). Image servers and CDNs send with
            # TCP_NODELAY; so does this stand-in.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                path = self.path.split("?", 1)[0]
                hits[path] += 1
                found = files.get(path)
                body, kind, status = (found[0], found[1], 200) if found else (b"not found", "text/plain", 404)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.handler = Handler  # its settings apply to connections accepted after a change
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def requests(self) -> int:
        return sum(self.hits.values())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LoopbackImageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
