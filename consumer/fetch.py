"""Fetch one image URL written by a stranger, safely: `ImageFetcher.fetch(url) -> FetchResult`, never raising.

How the dangerous parts are handled, and why:

* Server-side request forgery: every URL (and every redirect hop) goes through `AddressPolicy`; the host is
  resolved here, in a thread, and *every* address it resolves to is checked. The connection is then made to one
  of those checked addresses by `PinnedNetworkBackend`, which refuses any connect it was not told about, so a
  second DNS answer (rebinding) can never be used.
* Resource exhaustion: connect/read timeouts per request, a total deadline per fetch, a byte limit while
  streaming, `Accept-Encoding: identity` (no compression bombs at the HTTP layer), per-host and global
  concurrency limits, concurrent fetches of one URL share a single download, and failures are remembered for a
  short while (negative cache) so a dead URL is not hammered by every repost.
* Content: judged by its magic bytes, never by the server's Content-Type; decoding (`image_decoder`, in
  `fetch_image`) checks the declared dimensions before a single pixel is allocated, then waits for room in the
  process's pixel budget and gives up after a deadline (consumer/decoding.py).
* What needs no network is answered first: `refuses(url)` is the policy's verdict on the URL alone (scheme,
  length, characters, user-info, port, a literal address), which the image stage asks before it reads the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ipaddress
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urljoin

import httpcore
import httpx
import structlog
import tenacity
from cachetools import TTLCache
from prometheus_client import Counter, Histogram

from consumer.decoding import DECODE_MIN_SIDE, BoundedDecoder, counted, process_budget
from consumer.netpolicy import AddressPolicy, Refused, Target
from mmsent import ImageDecodeError, open_checked, sniff_format

if TYPE_CHECKING:
    from PIL import Image

    from consumer.settings import Settings

log = structlog.get_logger(__name__)

FetchStatus = Literal["ok", "blocked", "unavailable"]

FETCH_RESULTS = Counter(
    "mmsent_image_fetch_total",
    "Image fetches by outcome: status is ok, blocked or unavailable; reason is a short bounded label.",
    ["status", "reason"],
)
FETCH_NEGATIVE_CACHE_HITS = Counter(
    "mmsent_image_fetch_negative_cache_hits_total",
    "Fetches answered from the short-lived cache of failures, without touching the network.",
)
FETCH_BYTES = Counter("mmsent_image_fetch_bytes_total", "Image bytes downloaded.")
FETCH_SECONDS = Histogram(
    "mmsent_image_fetch_seconds",
    "Time to fetch one image URL (all hops and retries).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "mmsent-image-fetcher/1"


@dataclass(frozen=True)
class FetchResult:
    """The outcome of one fetch. `data` is set only when `status` is "ok"; `content_type` is the sniffed type."""

    status: FetchStatus
    data: bytes | None = field(repr=False)
    reason: str
    content_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def blocked(cls, reason: str) -> FetchResult:
        return cls("blocked", None, reason)

    @classmethod
    def unavailable(cls, reason: str) -> FetchResult:
        return cls("unavailable", None, reason)


class _Failure(Exception):
    """Internal: ends one fetch with a result; `retryable` failures are tried again after a backoff."""

    def __init__(self, result: FetchResult, retryable: bool = False, detail: str = "") -> None:
        super().__init__(result.reason)
        self.result = result
        self.retryable = retryable
        self.detail = detail


# -- content sniffing ------------------------------------------------------------------------------

SNIFF_BYTES = 12


def sniff_image_type(head: bytes) -> str | None:
    """The image MIME type from the first bytes (`mmsent.sniff_format`), or None when they are not an image the
    model accepts (JPEG, PNG, WebP, GIF, BMP)."""
    image_format = sniff_format(head)
    return None if image_format is None else f"image/{image_format.lower()}"


def image_decoder(settings: Settings, *, keep_bytes: bool = False, min_side: int = DECODE_MIN_SIDE
                  ) -> Callable[[bytes], Image.Image | bytes]:
    """The one decoder of fetched and cached bytes: `mmsent`'s safe decoder (header checked before any pixel is
    allocated, EXIF orientation, first frame, RGB, no larger than the model needs: a shorter side of at least
    `min_side`, `decode_side(scorer)`, and below twice it) under this service's limits, the process's pixel budget
    and the decode deadline (`BoundedDecoder`). `keep_bytes` (a scorer that decodes in batches on its GPU): the
    header checked the same way (`mmsent.open_checked`), and the bytes kept, whole."""
    if keep_bytes:
        return functools.partial(counted, functools.partial(
            _checked_bytes, max_pixels=settings.fetch_max_pixels, max_side=settings.fetch_max_side))
    return BoundedDecoder(max_pixels=settings.fetch_max_pixels, max_side=settings.fetch_max_side,
                          budget=process_budget(settings.decode_pixel_budget), timeout_s=settings.decode_timeout_s,
                          min_side=min_side)


def _checked_bytes(data: bytes, *, max_pixels: int, max_side: int) -> bytes:
    open_checked(data, max_pixels=max_pixels, max_side=max_side)  # ImageDecodeError, as decode_image would raise
    return data


# -- connecting only to checked addresses ------------------------------------------------------------


@dataclass(frozen=True)
class _Pin:
    host: str
    port: int
    addresses: tuple[str, ...]


# The addresses the current task may connect to. A contextvar, because httpcore opens the connection inside the
# task that sends the request, and concurrent fetches must not see each other's pins.
_PIN: contextvars.ContextVar[_Pin | None] = contextvars.ContextVar("mmsent_fetch_pin", default=None)


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower().rstrip(".") == b.lower().rstrip(".")


class PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Connects to the checked addresses of the pinned host instead of resolving the name again.

    TLS still uses the URL's host name for SNI and certificate checks (httpcore passes it to start_tls), and the
    Host header comes from the URL, so only the address lookup is replaced. Anything not pinned is refused:
    fail closed.
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pin = _PIN.get()
        if pin is None or port != pin.port or not _same_host(host, pin.host):
            raise httpcore.ConnectError(f"refusing an unpinned connection to {host}:{port}")
        error: Exception | None = None
        for address in pin.addresses:
            try:
                return PolledStream(
                    await self._inner.connect_tcp(address, port, timeout, local_address, socket_options))
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error or httpcore.ConnectError("no address to connect to")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are never used for image fetches")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PolledStream(httpcore.AsyncNetworkStream):
    """A connection's stream, answering httpcore's pool's "is_readable" from the socket found once.

    httpcore's pool asks every pooled connection whether it has expired at every request and at every response's
    close, and anyio answers `get_extra_info("is_readable")` by building all of the socket's attributes, a
    `getpeername` among them: 4.8 µs a call against 0.8 through this stream, and 24% of the I/O thread under an int8
    backlog (BENCHMARKS.md, 2026-12-06; upstream: encode/httpcore#928, open). The answer is anyio's: whether the raw
    socket has something to read (on an idle HTTP/1.1 connection, that the server closed it), a closed socket
    counting as readable."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 - httpcore's
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109 - httpcore's
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> httpcore.AsyncNetworkStream:
        return PolledStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._socket is not None:
            return _readable(self._socket)
        return self._inner.get_extra_info(info)


def _readable(sock: socket.socket) -> bool:
    # httpcore's own `is_socket_readable` is in its private `_utils`: these lines, not an import that may move
    if sock.fileno() < 0:
        return True
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))


@contextlib.contextmanager
def _pinned(target: Target, addresses: Sequence[str]) -> Any:
    token = _PIN.set(_Pin(target.host, target.port, tuple(addresses)))
    try:
        yield
    finally:
        _PIN.reset(token)


def _build_transport(settings: Settings, ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncHTTPTransport:
    """httpx's transport over an httpcore pool whose only way out is the pinned backend."""
    keepalive = min(settings.fetch_concurrency, 32)
    transport = httpx.AsyncHTTPTransport(trust_env=False, retries=0)
    # httpx offers no public hook for the network backend; swap the pool it built. The isinstance check makes an
    # httpx upgrade that changes this fail loudly here rather than silently resolving names again.
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise RuntimeError("httpx.AsyncHTTPTransport has no httpcore pool to replace; check the httpx version")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
        max_connections=settings.fetch_concurrency,
        max_keepalive_connections=keepalive,
        keepalive_expiry=30.0,
        http1=True,
        http2=False,
        network_backend=PinnedNetworkBackend(),
    )
    return transport


# -- small helpers -----------------------------------------------------------------------------------

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def system_resolve(host: str, port: int, executor: Executor | None = None) -> list[str]:
    """Every address the system resolver gives for `host`, in its order, without duplicates."""
    loop = asyncio.get_running_loop()
    lookup = functools.partial(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    infos = await loop.run_in_executor(executor, lookup)
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class _HostLimiter:
    """One semaphore per host, created on demand and dropped when nobody holds it (bounded memory)."""

    def __init__(self, per_host: int) -> None:
        self._per_host = per_host
        self._slots: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, host: str) -> AsyncIterator[None]:
        semaphore, users = self._slots.get(host, (asyncio.Semaphore(self._per_host), 0))
        self._slots[host] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._slots[host]
            if users <= 1:
                del self._slots[host]
            else:
                self._slots[host] = (semaphore, users - 1)


class _NegativeCache:
    """Recent failures by URL, for `ttl_s` seconds, at most `max_entries`: a `cachetools.TTLCache` (expired
    entries go first, then the least recently used). A TTL of 0 remembers nothing."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        remember = ttl_s > 0 and max_entries > 0
        self._entries: TTLCache[str, FetchResult] | None = TTLCache(max_entries, ttl_s, clock) if remember else None

    def get(self, url: str) -> FetchResult | None:
        return None if self._entries is None else self._entries.get(url)

    def put(self, url: str, result: FetchResult) -> None:
        if self._entries is not None:
            self._entries[url] = result


# -- the fetcher -------------------------------------------------------------------------------------


class ImageFetcher:
    """Safe async image downloads. One per process: it owns the connection pool (`aclose()` it)."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: Resolver | None = None,
        policy: AddressPolicy | None = None,
        retry_backoff_s: float = 0.2,
        negative_cache_size: int = 10_000,
        ssl_context: ssl.SSLContext | None = None,
        decode: Callable[[bytes], Image.Image | bytes] | None = None,
    ) -> None:
        """`resolver` and `ssl_context` exist for tests (fake DNS, a private CA); production uses the defaults:
        the system resolver and certifi's roots, with certificate and host name checks on. `decode` defaults to
        `image_decoder(settings)`."""
        self._settings = settings
        self._policy = policy or AddressPolicy(settings.fetch_allow_private, settings.fetch_allow_cidrs)
        # Lookups get threads of their own: a slow DNS server must not starve the default executor, which
        # decodes images. A lookup that outlives its timeout keeps its thread until the OS gives up.
        self._dns_threads = ThreadPoolExecutor(min(32, settings.fetch_concurrency), thread_name_prefix="mmsent-dns")
        self._resolve = resolver or functools.partial(system_resolve, executor=self._dns_threads)
        self._backoff_s = retry_backoff_s
        self._timeout = httpx.Timeout(
            connect=settings.fetch_connect_timeout_s,
            read=settings.fetch_read_timeout_s,
            write=settings.fetch_read_timeout_s,
            pool=settings.fetch_total_timeout_s,
        )
        self._transport = _build_transport(settings, ssl_context)
        self._all = asyncio.Semaphore(settings.fetch_concurrency)
        self._hosts = _HostLimiter(settings.fetch_per_host_concurrency)
        self._negative = _NegativeCache(settings.fetch_negative_cache_s, negative_cache_size)
        self._in_flight: dict[str, asyncio.Future[FetchResult]] = {}
        self._decode = decode or image_decoder(settings)

    @property
    def policy(self) -> AddressPolicy:
        return self._policy

    async def aclose(self) -> None:
        await self._transport.aclose()
        self._dns_threads.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> ImageFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- public --------------------------------------------------------------------------------------

    def refuses(self, url: str) -> FetchResult | None:
        """The `blocked` result `fetch(url)` would give without touching the network (the URL itself, a literal
        address), or None when only fetching can tell. Pure: no I/O, nothing counted."""
        try:
            self._check_url(url)
        except _Failure as failure:
            return failure.result
        return None

    async def fetch(self, url: str) -> FetchResult:
        """Download `url` as image bytes. Never raises (except cancellation of the caller)."""
        cached = self._negative.get(url)
        if cached is not None:
            FETCH_NEGATIVE_CACHE_HITS.inc()
            return cached
        shared = self._in_flight.get(url)
        if shared is None:
            # Reposts of a viral image in one batch share one download.
            shared = asyncio.ensure_future(self._fetch_and_record(url))
            self._in_flight[url] = shared
            shared.add_done_callback(lambda _f: self._in_flight.pop(url, None))
        # shield: one caller being cancelled must not cancel the download the others wait for.
        return await asyncio.shield(shared)

    async def fetch_image(self, url: str) -> tuple[FetchResult, Image.Image | bytes | None]:
        """`fetch`, then a safe decode (pixel limit, max side, EXIF orientation, first frame), off the loop."""
        result = await self.fetch(url)
        if not result.ok or result.data is None:
            return result, None
        try:
            image = await asyncio.to_thread(self._decode, result.data)
        except ImageDecodeError as exc:  # counted by the decoder
            log.info("image_decode_refused", url=_short(url), reason=exc.reason, detail=exc.detail)
            failed = FetchResult("unavailable", None, exc.reason, result.content_type)
            if exc.reason != "busy":  # no room in the budget says nothing about this image: try it next time
                self._negative.put(url, failed)
            return failed, None
        return result, image

    # -- one fetch, start to end ---------------------------------------------------------------------

    async def _fetch_and_record(self, url: str) -> FetchResult:
        started = time.monotonic()
        try:
            # The deadline starts once a slot is free: waiting behind other fetches is not this URL's fault.
            async with self._all:
                async with asyncio.timeout(self._settings.fetch_total_timeout_s):
                    result = await self._follow(url)
        except _Failure as failure:
            result = failure.result
            detail = failure.detail
        except TimeoutError:
            result, detail = FetchResult.unavailable("timeout"), "total deadline"
        except Exception as exc:  # the fetcher never raises: an unforeseen error is one more "unavailable"
            log.exception("image_fetch_internal_error", url=_short(url))
            result, detail = FetchResult.unavailable("internal_error"), type(exc).__name__
        else:
            detail = ""
        elapsed = time.monotonic() - started
        FETCH_SECONDS.observe(elapsed)
        FETCH_RESULTS.labels(result.status, result.reason).inc()
        if result.ok:
            FETCH_BYTES.inc(len(result.data or b""))
            log.debug("image_fetched", url=_short(url), bytes=len(result.data or b""), seconds=round(elapsed, 3))
        else:
            self._negative.put(url, result)
            emit = log.warning if result.status == "blocked" else log.info
            emit("image_fetch_failed", url=_short(url), status=result.status, reason=result.reason, detail=detail)
        return result

    async def _follow(self, url: str) -> FetchResult:
        """Each hop: check the URL, resolve, check every address, request; redirects start a new hop."""
        current = url
        for _hop in range(self._settings.fetch_max_redirects + 1):
            target = self._check_url(current)
            addresses = await self._addresses_for(target)
            location = await self._request_with_retries(target, addresses)
            if isinstance(location, FetchResult):
                return location
            current = location
        raise _Failure(FetchResult.unavailable("too_many_redirects"), detail=f"stopped at {_short(current)}")

    def _check_url(self, url: str) -> Target:
        try:
            target = self._policy.check_url(url)
        except Refused as exc:
            raise _Failure(FetchResult.blocked(exc.reason), detail=exc.detail) from None
        # The policy rebuilt the URL; make sure httpx reads the same host and port from it (no parser gaps).
        parsed = httpx.URL(target.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if not _same_host(parsed.raw_host.decode("ascii"), target.host) or port != target.port:
            raise _Failure(FetchResult.blocked("ambiguous_url"), detail=target.url)
        return target

    async def _addresses_for(self, target: Target) -> list[str]:
        if target.ip is not None:
            return [str(target.ip)]
        try:
            async with asyncio.timeout(self._settings.fetch_connect_timeout_s):
                addresses = list(await self._resolve(target.host, target.port))
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise _Failure(FetchResult.unavailable("dns_error"), detail=f"{target.host}: {exc}") from None
        reason = self._policy.check_addresses(addresses)
        if reason is not None:
            raise _Failure(FetchResult.blocked(reason), detail=f"{target.host} -> {addresses}")
        return addresses

    async def _request_with_retries(self, target: Target, addresses: list[str]) -> FetchResult | str:
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self._settings.fetch_retries + 1),
            retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, _Failure) and exc.retryable),
            # Full jitter: reposts of one dead image must not retry in lockstep.
            wait=tenacity.wait_random_exponential(multiplier=self._backoff_s),
            reraise=True,
        )
        return await retrying(self._request_holding_host, target, addresses)

    async def _request_holding_host(self, target: Target, addresses: list[str]) -> FetchResult | str:
        async with self._hosts.hold(target.host):
            return await self._request_once(target, addresses)

    async def _request_once(self, target: Target, addresses: list[str]) -> FetchResult | str:
        """One GET: an ok result, or the next URL when redirected; raises `_Failure` otherwise."""
        request = httpx.Request(
            "GET",
            target.url,
            headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": USER_AGENT},
            extensions={"timeout": self._timeout.as_dict()},
        )
        with _pinned(target, addresses):
            try:
                response = await self._transport.handle_async_request(request)
            except httpx.TimeoutException as exc:
                raise _Failure(FetchResult.unavailable("timeout"), retryable=True, detail=repr(exc)) from None
            except httpx.TransportError as exc:
                raise _Failure(FetchResult.unavailable("connect_error"), True, detail=repr(exc)) from None
            try:
                return await self._handle_response(target, response)
            except httpx.TimeoutException as exc:
                raise _Failure(FetchResult.unavailable("timeout"), retryable=True, detail=repr(exc)) from None
            except httpx.TransportError as exc:
                raise _Failure(FetchResult.unavailable("read_error"), True, detail=repr(exc)) from None
            finally:
                await response.aclose()

    async def _handle_response(self, target: Target, response: httpx.Response) -> FetchResult | str:
        status = response.status_code
        if status in REDIRECT_STATUSES:
            location = response.headers.get("location")
            if not location:
                raise _Failure(FetchResult.unavailable("redirect_without_location"))
            return urljoin(target.url, location.strip())
        if status >= 500:
            raise _Failure(FetchResult.unavailable("http_5xx"), retryable=True, detail=str(status))
        if status >= 400:
            raise _Failure(FetchResult.unavailable("http_4xx"), detail=str(status))
        if status != 200:
            raise _Failure(FetchResult.unavailable("http_status"), detail=str(status))
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # We asked for identity; a compressed body could expand far past the byte limit while decoding.
            raise _Failure(FetchResult.unavailable("content_encoding"), detail=encoding)
        data = await self._read_body(response)
        content_type = sniff_image_type(data)
        if content_type is None:
            raise _Failure(FetchResult.unavailable("not_an_image" if data else "empty_body"))
        return FetchResult("ok", data, "ok", content_type)

    async def _read_body(self, response: httpx.Response) -> bytes:
        limit = self._settings.fetch_max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _Failure(FetchResult.unavailable("too_large"), detail=f"declared {declared}")
        body = bytearray()
        sniffed = False
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise _Failure(FetchResult.unavailable("too_large"), detail=f"over {limit} bytes")
            if not sniffed and len(body) >= SNIFF_BYTES:
                # Stop early: there is no point downloading megabytes of HTML.
                if sniff_image_type(bytes(body[:SNIFF_BYTES])) is None:
                    raise _Failure(FetchResult.unavailable("not_an_image"))
                sniffed = True
        return bytes(body)


def _short(url: str, limit: int = 200) -> str:
    """URLs for logs: attacker-controlled, so kept short, and without the query, which may hold a signature."""
    url = url.split("?", 1)[0]
    return url if len(url) <= limit else url[:limit] + "..."
