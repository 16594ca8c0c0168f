"""A real, threaded HTTP server on loopback that records every connection and request, for fetcher tests.

    server.route("/cat.jpg", image(sample_image("JPEG")))
    server.route("/slow", slow(2.0, image(...)))
    url = server.url("/cat.jpg")              # http://127.0.0.1:PORT/cat.jpg
    assert server.count("/cat.jpg") == 1

One `ImageServer` may listen on several loopback addresses with the *same* port (127.0.0.1, 127.0.0.2, ::1),
sharing one route table and one record, so a test can spell one destination many ways and check that none of
them was reached. Responders are plain functions of the request handler: `image`, `body`, `slow`, `drip`,
`endless`, `redirect`, `status`, `drop`, `garbage`, `sequence`.

Fixtures: `image_server` (127.0.0.1), `loopback_servers` (every loopback address that can be bound, one port).
"""

from __future__ import annotations

import contextlib
import io
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

Responder = Callable[["RecordingHandler"], None]


@dataclass(frozen=True)
class RecordedRequest:
    local: tuple[str, int]
    method: str
    path: str
    headers: dict[str, str]


# -- sample content ------------------------------------------------------------------------------------


def sample_image(
    fmt: str = "JPEG", size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 40, 40)
) -> bytes:
    """A small real image in `fmt` (JPEG, PNG, WEBP, GIF, BMP); GIF is animated (two frames)."""
    image = Image.new("RGB", size, color)
    for x in range(size[0]):
        image.putpixel((x, x % size[1]), (0, 0, 255))
    out = io.BytesIO()
    if fmt == "GIF":
        second = Image.new("RGB", size, (0, 255, 0))
        image.save(out, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    else:
        image.save(out, format=fmt)
    return out.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few KB of valid PNG that declares width x height RGB pixels (30 GB at the defaults)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # The start of the (all-zero) pixel stream; a decoder that trusted the header would allocate it all.
    pixels = zlib.compress(b"\x00" * (1 << 20), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# -- responders --------------------------------------------------------------------------------------


def body(
    data: bytes,
    content_type: str = "application/octet-stream",
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Responder:
    def respond(handler: RecordingHandler) -> None:
        handler.send_response(status_code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.write(data)

    return respond


def image(data: bytes, content_type: str = "image/jpeg") -> Responder:
    return body(data, content_type)


def slow(delay_s: float, then: Responder) -> Responder:
    """Wait before answering at all (a server that accepted the connection but hangs)."""

    def respond(handler: RecordingHandler) -> None:
        handler.server.stopping.wait(delay_s)
        then(handler)

    return respond


def drip(data: bytes, interval_s: float, content_type: str = "image/jpeg") -> Responder:
    """Send the headers, then one byte every `interval_s`: each read is quick, the whole is very slow."""

    def respond(handler: RecordingHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        for index in range(len(data)):
            if handler.server.stopping.wait(interval_s) or not handler.write(data[index : index + 1]):
                return

    return respond


def endless(content_type: str = "image/jpeg", first: bytes = b"\xff\xd8\xff\xe0", limit: int = 1 << 30) -> Responder:
    """A body with no length that never ends (until the client hangs up, or `limit` bytes)."""

    def respond(handler: RecordingHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        chunk = b"\x00" * 65536
        sent = 0
        if not handler.write(first):
            return
        while sent < limit and not handler.server.stopping.is_set():
            if not handler.write(chunk):
                return
            sent += len(chunk)
            handler.server.record_sent(len(chunk))

    return respond


def redirect(location: str, status_code: int = 302) -> Responder:
    def respond(handler: RecordingHandler) -> None:
        handler.send_response(status_code)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


def status(code: int, text: bytes = b"") -> Responder:
    return body(text, "text/plain", status_code=code)


def drop() -> Responder:
    """Close the connection without a reply."""

    def respond(handler: RecordingHandler) -> None:
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)

    return respond


def garbage(data: bytes = b"\x00\x13\x37 not HTTP at all \xff\xfe\r\n\r\n") -> Responder:
    """Bytes that are not an HTTP response, then close."""

    def respond(handler: RecordingHandler) -> None:
        handler.close_connection = True
        handler.write(data)

    return respond


def sequence(*responders: Responder) -> Responder:
    """The n-th request gets the n-th responder; the last one answers every request after that."""
    lock = threading.Lock()
    calls = [0]

    def respond(handler: RecordingHandler) -> None:
        with lock:
            index = min(calls[0], len(responders) - 1)
            calls[0] += 1
        responders[index](handler)

    return respond


# -- the server ----------------------------------------------------------------------------------------


class RecordingHandler(BaseHTTPRequestHandler):
    server: _LoopbackHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet: the record is the log
        pass

    def write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:
            self.close_connection = True
            return False

    def _dispatch(self) -> None:
        state = self.server.state
        local = self.connection.getsockname()[:2]
        state.record(RecordedRequest((str(local[0]), int(local[1])), self.command, self.path, dict(self.headers)))
        responder = state.routes.get(self.path.split("?", 1)[0]) or status(404, b"no such path")
        responder(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = _dispatch


@dataclass
class _State:
    routes: dict[str, Responder] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    connections: list[tuple[str, int]] = field(default_factory=list)
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: RecordedRequest) -> None:
        with self.lock:
            self.requests.append(request)


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False

    def __init__(
        self, host: str, port: int, state: _State, stopping: threading.Event, tls: ssl.SSLContext | None = None
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.state = state
        self.stopping = stopping
        super().__init__((host, port), RecordingHandler)
        if tls is not None:
            # The handshake happens in the handler thread, on first read, so a failed one never blocks accept().
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: object) -> None:  # type: ignore[override]
        local = request.getsockname() if isinstance(request, socket.socket) else ("?", 0)
        with self.state.lock:
            self.state.connections.append((str(local[0]), int(local[1])))
        super().process_request(request, client_address)  # type: ignore[arg-type]

    def record_sent(self, count: int) -> None:
        with self.state.lock:
            self.state.bytes_sent += count


class ImageServer:
    """HTTP servers on one port of one or more loopback addresses, sharing routes and a record."""

    def __init__(self, hosts: Sequence[str] = ("127.0.0.1",), tls: ssl.SSLContext | None = None) -> None:
        self.scheme = "https" if tls is not None else "http"
        self._tls = tls
        self._state = _State()
        self._stopping = threading.Event()
        self._servers: list[_LoopbackHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.port = self._bind_all(list(hosts))
        self.hosts = [server.server_address[0] for server in self._servers]

    def _bind_all(self, hosts: list[str], attempts: int = 20) -> int:
        for _ in range(attempts):
            first = _LoopbackHTTPServer(hosts[0], 0, self._state, self._stopping, self._tls)
            port = int(first.server_address[1])
            servers = [first]
            try:
                servers += [
                    _LoopbackHTTPServer(host, port, self._state, self._stopping, self._tls) for host in hosts[1:]
                ]
            except OSError:  # that port is taken on another address: try another port
                for server in servers:
                    server.server_close()
                continue
            self._servers = servers
            for server in servers:
                thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                thread.start()
                self._threads.append(thread)
            return port
        raise RuntimeError(f"could not bind one port on all of {hosts}")

    # -- configuration -------------------------------------------------------------------------------

    def route(self, path: str, responder: Responder) -> str:
        """Serve `path` with `responder`; returns its URL on the first host."""
        self._state.routes[path] = responder
        return self.url(path)

    def url(self, path: str = "/", host: str | None = None) -> str:
        host = host or self.hosts[0]
        authority = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{authority}:{self.port}{path}"

    # -- the record ----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    @property
    def connections(self) -> list[tuple[str, int]]:
        with self._state.lock:
            return list(self._state.connections)

    @property
    def bytes_sent(self) -> int:
        with self._state.lock:
            return self._state.bytes_sent

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r.path.split("?", 1)[0] == path)

    def clear(self) -> None:
        with self._state.lock:
            self._state.requests.clear()
            self._state.connections.clear()
            self._state.bytes_sent = 0

    def close(self) -> None:
        self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> ImageServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class SelfSignedCert:
    """A self-signed certificate (its own CA) for `names`, made with the openssl command line."""

    cert: str
    key: str

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """Trusts only this certificate; host name checks stay on."""
        return ssl.create_default_context(cafile=self.cert)


def make_certificate(directory: str, names: Sequence[str]) -> SelfSignedCert:
    cert, key = f"{directory}/cert.pem", f"{directory}/key.pem"
    san = ",".join(f"DNS:{name}" for name in names)
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", key, "-out", cert, "-subj", f"/CN={names[0]}"),
            *("-addext", f"subjectAltName={san}", "-addext", "basicConstraints=critical,CA:TRUE"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return SelfSignedCert(cert, key)


def bindable(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
        return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    """A recording HTTP server on 127.0.0.1 (a fresh one per test)."""
    with ImageServer(("127.0.0.1",)) as server:
        yield server


@pytest.fixture
def loopback_servers() -> Iterator[ImageServer]:
    """Recording servers on one port of 127.0.0.1 and, where they can be bound, 127.0.0.2 and ::1."""
    hosts = ["127.0.0.1"] + [host for host in ("127.0.0.2", "::1") if bindable(host)]
    with ImageServer(hosts) as server:
        yield server
