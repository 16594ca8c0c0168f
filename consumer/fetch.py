"""Fetch one image URL written by a stranger, safely: `ImageFetcher.fetch(url) -> FetchResult`, never raising.

How the dangerous parts are handled, and why:

* Server-side request forgery: every URL (and every redirect hop) goes through `AddressPolicy`; the host is
  resolved here, in a thread, and *every* address it resolves to is checked. The HTTP client (aiohttp) then
  connects to one of those checked addresses: its only resolver is `PinnedResolver`, which answers with them and
  refuses any other name, so a second DNS answer (rebinding) can never be used.
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
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import urljoin

import aiohttp
import aiohttp.abc
import certifi
import structlog
import tenacity
import yarl
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


# The addresses the current task may connect to. A contextvar, because aiohttp resolves (without its DNS cache)
# inside the task that sends the request, and concurrent fetches must not see each other's pins.
_PIN: contextvars.ContextVar[_Pin | None] = contextvars.ContextVar("mmsent_fetch_pin", default=None)


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower().rstrip(".") == b.lower().rstrip(".")


class PinnedResolver(aiohttp.abc.AbstractResolver):
    """The HTTP client's resolver: it answers only for the pinned host, with the addresses already checked, and
    refuses any other lookup (fail closed), so the client never resolves a name itself.

    TLS still uses the URL's host name for SNI and certificate checks (aiohttp takes it from the answer's
    "hostname"), and the Host header comes from the URL, so only the address lookup is replaced. An address
    literal never reaches a resolver: the policy checked it in the URL, and `_check_url` makes sure aiohttp reads
    the same host from the URL."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[aiohttp.abc.ResolveResult]:
        pin = _PIN.get()
        if pin is None or port != pin.port or not _same_host(host, pin.host):
            raise OSError(f"refusing an unpinned connection to {host}:{port}")
        return [
            {"hostname": host, "host": address, "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
             "family": socket.AF_INET6 if ":" in address else socket.AF_INET}
            for address in pin.addresses
        ]

    async def close(self) -> None:
        return None


@contextlib.contextmanager
def pinned(target: Target, addresses: Sequence[str]) -> Iterator[None]:
    """Within this block (this task and what it starts), `PinnedResolver` answers `target`'s host and port with
    `addresses`, which the caller has checked, and nothing else."""
    token = _PIN.set(_Pin(target.host, target.port, tuple(addresses)))
    try:
        yield
    finally:
        _PIN.reset(token)


def _new_session(settings: Settings, ssl_context: ssl.SSLContext | None) -> aiohttp.ClientSession:
    """aiohttp's client over a pool whose only resolver is the pinned one. aiohttp rather than httpx: the I/O
    thread's CPU per 50 KB loopback photo, this fetcher 0.36-0.45 ms on aiohttp against 1.2-1.3 on httpx (the bare
    clients 0.16-0.20 against 1.03-1.23; `scripts/loopback_fetch.py clients`, BENCHMARKS.md, 2026-12-07)."""
    connector = aiohttp.TCPConnector(
        limit=settings.fetch_concurrency,
        limit_per_host=0,  # `_HostLimiter` holds the per-host limit, before the pool
        ssl=ssl_context or ssl.create_default_context(cafile=certifi.where()),
        resolver=PinnedResolver(),
        use_dns_cache=False,  # the pin is per request: nothing may answer from an earlier lookup
        keepalive_timeout=30.0,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # What a stranger's server sends must not travel on: no cookies kept, no proxy from the environment, and
        # the body exactly as sent (identity asked for; anything else is refused, never inflated).
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(
            total=None,  # the fetch's own deadline (`_fetch_and_record`) covers waiting for the pool too
            sock_connect=settings.fetch_connect_timeout_s,
            sock_read=settings.fetch_read_timeout_s,
        ),
    )


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
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None  # made on the loop that first fetches (aiohttp's rule)
        self._all = asyncio.Semaphore(settings.fetch_concurrency)
        self._hosts = _HostLimiter(settings.fetch_per_host_concurrency)
        self._negative = _NegativeCache(settings.fetch_negative_cache_s, negative_cache_size)
        self._in_flight: dict[str, asyncio.Future[FetchResult]] = {}
        self._decode = decode or image_decoder(settings)

    @property
    def policy(self) -> AddressPolicy:
        return self._policy

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
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
        # The policy rebuilt the URL; make sure aiohttp reads the same host and port from it (no parser gaps): an
        # address literal goes to the socket without a resolver to refuse it.
        try:
            parsed = yarl.URL(target.url)
        except ValueError:
            raise _Failure(FetchResult.blocked("ambiguous_url"), detail=target.url) from None
        if not _same_host(parsed.raw_host or "", target.host) or parsed.port != target.port:
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
        with pinned(target, addresses):
            try:
                response = await self._client().get(
                    target.url, allow_redirects=False,
                    headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": USER_AGENT})
            except TimeoutError as exc:  # aiohttp's connect and read timeouts are TimeoutErrors
                raise _Failure(FetchResult.unavailable("timeout"), retryable=True, detail=repr(exc)) from None
            except aiohttp.ClientError as exc:
                raise _Failure(FetchResult.unavailable("connect_error"), True, detail=repr(exc)) from None
            try:
                return await self._handle_response(target, response)
            except TimeoutError as exc:
                raise _Failure(FetchResult.unavailable("timeout"), retryable=True, detail=repr(exc)) from None
            except aiohttp.ClientError as exc:
                raise _Failure(FetchResult.unavailable("read_error"), True, detail=repr(exc)) from None
            finally:
                response.release()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = _new_session(self._settings, self._ssl_context)
        return self._session

    async def _handle_response(self, target: Target, response: aiohttp.ClientResponse) -> FetchResult | str:
        status = response.status
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

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self._settings.fetch_max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _Failure(FetchResult.unavailable("too_large"), detail=f"declared {declared}")
        body = bytearray()
        sniffed = False
        async for chunk in response.content.iter_any():
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
