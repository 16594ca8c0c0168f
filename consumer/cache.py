"""A Redis cache of image bytes and image embeddings, so a repost skips the download and the CNN.

* Keys come from a SHA-256 of the normalised URL (lower-case scheme and host, default port and fragment
  dropped); embedding keys also carry a digest of the model's `image_encoder_id`, so a new encoder never reads
  an old encoder's vectors.
* Every value is wrapped in a small versioned envelope with a checksum (and, for embeddings, the dtype, shape
  and encoder digest), so a corrupt, truncated or foreign value is a miss, never a wrong answer.
* Redis is an optimisation: every method returns misses (or does nothing) when Redis is down, slow or
  misbehaving, never raises. After a failure a circuit breaker skips Redis for `retry_after_s`, then lets one
  probe through; a warning is logged once per outage and a metric counts each error.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import structlog
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mmsent import sniff_format

if TYPE_CHECKING:
    from consumer.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

CACHE_HITS = Counter("mmsent_cache_hits_total", "Cache lookups answered from Redis.", ["kind"])
CACHE_MISSES = Counter(
    "mmsent_cache_misses_total", "Cache lookups not answered (absent, corrupt, or Redis unavailable).", ["kind"]
)
CACHE_ERRORS = Counter("mmsent_cache_errors_total", "Redis operations that failed or timed out.", ["op"])
CACHE_SKIPPED = Counter(
    "mmsent_cache_skipped_total", "Redis operations not attempted while the cache is backed off.", ["op"]
)
CACHE_CORRUPT = Counter(
    "mmsent_cache_corrupt_total", "Cached values that failed their checks (read as misses).", ["kind"]
)
CACHE_BYTES_SAVED = Counter("mmsent_cache_bytes_saved_total", "Image bytes not downloaded thanks to the cache.")
CACHE_CNN_PASSES_SAVED = Counter(
    "mmsent_cache_cnn_passes_saved_total", "Images whose embedding came from the cache instead of the CNN."
)
CACHE_AVAILABLE = Gauge("mmsent_cache_available", "1 while Redis answers, 0 while the cache is backed off.")

IMAGE = "image"
EMBEDDING = "embedding"


# -- keys -----------------------------------------------------------------------------------------------


def normalise_url(url: str) -> str:
    """The cache identity of a URL: scheme and host lower-cased, default port and fragment dropped."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + host
    if port is not None and port != {"http": 80, "https": 443}.get(scheme):
        netloc += f":{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _encoder_digest(encoder_id: str) -> bytes:
    return hashlib.sha256(encoder_id.encode("utf-8")).digest()[:8]


# -- value envelopes ------------------------------------------------------------------------------------

_MAGIC = b"MMSC"
_VERSION = 1
_KIND_IMAGE = 1
_KIND_EMBEDDING = 2
_HEAD = struct.Struct("<4sBB")  # magic, version, kind
_EMBEDDING_META = struct.Struct("<8sQ4sB")  # encoder digest, source image bytes, dtype ("<f4"), ndim
_DIGEST_BYTES = 16
_DTYPES = {"<f2", "<f4", "<f8"}
_MAX_DIMS = 8


class CorruptValue(ValueError):
    """A cached value that is not ours, not this version, or damaged."""


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_BYTES, person=b"mmsent-cache").digest()


def _seal(body: bytes) -> bytes:
    return body + _digest(body)


def _open(blob: bytes, kind: int) -> memoryview:
    """The body after the header, once magic, version, kind and checksum are right."""
    if len(blob) < _HEAD.size + _DIGEST_BYTES:
        raise CorruptValue("too short")
    view = memoryview(blob)
    body, digest = view[:-_DIGEST_BYTES], bytes(view[-_DIGEST_BYTES:])
    magic, version, found_kind = _HEAD.unpack_from(body)
    if magic != _MAGIC or version != _VERSION or found_kind != kind:
        raise CorruptValue("foreign value")
    if _digest(body) != digest:
        raise CorruptValue("checksum mismatch")
    return body[_HEAD.size :]


def encode_image(data: bytes) -> bytes:
    return _seal(_HEAD.pack(_MAGIC, _VERSION, _KIND_IMAGE) + data)


def decode_image_value(blob: bytes) -> bytes:
    data = bytes(_open(blob, _KIND_IMAGE))
    if sniff_format(data[:16]) is None:
        raise CorruptValue("not an image")
    return data


def encode_embedding(embedding: np.ndarray, encoder_id: str, source_bytes: int = 0) -> bytes:
    array = np.asarray(embedding, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    array = array.astype(dtype, copy=False)
    dtype_code = dtype.str.replace("=", "<").replace("|", "<")
    if dtype_code not in _DTYPES:
        raise ValueError(f"embeddings must be float16/32/64, not {array.dtype}")
    if array.ndim > _MAX_DIMS:
        raise ValueError(f"embedding has {array.ndim} dimensions")
    meta = _EMBEDDING_META.pack(_encoder_digest(encoder_id), max(0, source_bytes), dtype_code.encode(), array.ndim)
    shape = struct.pack(f"<{array.ndim}I", *array.shape)
    return _seal(_HEAD.pack(_MAGIC, _VERSION, _KIND_EMBEDDING) + meta + shape + array.tobytes())


def decode_embedding(blob: bytes, encoder_id: str) -> tuple[np.ndarray, int]:
    """(embedding, size of the image it came from) from a cached value; `CorruptValue` if anything is off."""
    body = _open(blob, _KIND_EMBEDDING)
    if len(body) < _EMBEDDING_META.size:
        raise CorruptValue("truncated header")
    encoder, source_bytes, dtype_raw, ndim = _EMBEDDING_META.unpack_from(body)
    if encoder != _encoder_digest(encoder_id):
        raise CorruptValue("another image encoder's embedding")
    dtype_code = dtype_raw.rstrip(b"\x00").decode("ascii", "replace")
    if dtype_code not in _DTYPES or ndim > _MAX_DIMS:
        raise CorruptValue("unknown dtype or shape")
    offset = _EMBEDDING_META.size
    if len(body) < offset + 4 * ndim:
        raise CorruptValue("truncated shape")
    shape = struct.unpack_from(f"<{ndim}I", body, offset)
    payload = body[offset + 4 * ndim :]
    dtype = np.dtype(dtype_code)
    if len(payload) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise CorruptValue("payload size does not match the shape")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).copy(), int(source_bytes)


# -- back-off ------------------------------------------------------------------------------------------


class CircuitBreaker:
    """Closed: use Redis. After a failure, open: skip Redis for `retry_after_s`, then let one probe through."""

    def __init__(self, retry_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if self._probing or self._clock() < self._opened_at + self.retry_after_s:
            return False
        self._probing = True  # half-open: exactly one caller finds out whether Redis is back
        return True

    def record_success(self) -> bool:
        """Returns True when this closes an outage."""
        was_open = self._opened_at is not None
        self._opened_at = None
        self._probing = False
        return was_open

    def record_failure(self) -> bool:
        """Returns True when this starts an outage (the moment to warn)."""
        was_open = self._opened_at is not None
        self._opened_at = self._clock()
        self._probing = False
        return not was_open


@dataclass
class CacheStats:
    """Counts for this cache instance (the Prometheus counters are process-wide)."""

    hits: int = 0
    misses: int = 0
    errors: int = 0
    corrupt: int = 0
    bytes_saved: int = 0
    cnn_passes_saved: int = 0


# -- the cache -------------------------------------------------------------------------------------------


class ImageCache:
    """Image bytes and embeddings by URL in Redis. Safe to use when Redis is absent (`redis_url=None`) or down."""

    def __init__(
        self,
        redis_url: str | None,
        *,
        image_ttl_s: int = 24 * 3600,
        embedding_ttl_s: int = 7 * 24 * 3600,
        max_image_bytes: int = 2 * 1024 * 1024,
        op_timeout_s: float = 0.5,
        retry_after_s: float = 5.0,
        max_connections: int = 32,
        key_prefix: str = "mmsent:",
    ) -> None:
        self.image_ttl_s = image_ttl_s
        self.embedding_ttl_s = embedding_ttl_s
        self.max_image_bytes = max_image_bytes
        self.op_timeout_s = op_timeout_s
        self.key_prefix = key_prefix
        self.stats = CacheStats()
        self._breaker = CircuitBreaker(retry_after_s)
        self._client: Redis | None = None
        if redis_url:
            # Short timeouts and a single immediate retry: the retry only replaces a pooled connection that
            # died with a restarted Redis; a Redis that is really down must cost milliseconds, not seconds.
            self._client = Redis.from_url(
                redis_url,
                socket_timeout=op_timeout_s,
                socket_connect_timeout=op_timeout_s,
                retry=Retry(NoBackoff(), 1),
                max_connections=max_connections,
                health_check_interval=0,
            )
        CACHE_AVAILABLE.set(1 if self._client is not None else 0)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ImageCache:
        options: dict[str, Any] = {
            "image_ttl_s": settings.cache_image_ttl_s,
            "embedding_ttl_s": settings.cache_embedding_ttl_s,
            "max_image_bytes": settings.cache_max_image_bytes,
        }
        options.update(overrides)
        return cls(settings.redis_url, **options)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def available(self) -> bool:
        """Configured and not backed off after a failure."""
        return self._client is not None and not self._breaker.is_open

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # -- keys ------------------------------------------------------------------------------------------

    def image_key(self, url: str) -> str:
        return f"{self.key_prefix}img:v1:{_sha256(normalise_url(url))}"

    def embedding_key(self, url: str, encoder_id: str) -> str:
        return f"{self.key_prefix}emb:v1:{_sha256(encoder_id)[:16]}:{_sha256(normalise_url(url))}"

    # -- images ----------------------------------------------------------------------------------------

    async def get_images(self, urls: Iterable[str]) -> dict[str, bytes]:
        """Cached image bytes for those of `urls` that have them (one round trip for the batch)."""
        unique = list(dict.fromkeys(urls))
        found: dict[str, bytes] = {}
        for url, blob in zip(unique, await self._mget("get_images", [self.image_key(u) for u in unique]), strict=True):
            data = self._checked(IMAGE, blob, decode_image_value)
            if data is not None:
                found[url] = data
                self.stats.bytes_saved += len(data)
                CACHE_BYTES_SAVED.inc(len(data))
        return found

    async def put_images(self, images: Mapping[str, bytes]) -> None:
        """Store image bytes (those over `max_image_bytes` are skipped: Redis is no blob store)."""
        entries = {
            self.image_key(url): encode_image(data)
            for url, data in images.items()
            if 0 < len(data) <= self.max_image_bytes
        }
        await self._mset("put_images", entries, self.image_ttl_s)

    # -- embeddings ------------------------------------------------------------------------------------

    async def get_embeddings(self, urls: Iterable[str], encoder_id: str) -> dict[str, np.ndarray]:
        """Cached embeddings of `urls` made by the encoder `encoder_id` (one round trip for the batch)."""
        unique = list(dict.fromkeys(urls))
        keys = [self.embedding_key(u, encoder_id) for u in unique]
        found: dict[str, np.ndarray] = {}
        for url, blob in zip(unique, await self._mget("get_embeddings", keys), strict=True):
            decoded = self._checked(EMBEDDING, blob, lambda b: decode_embedding(b, encoder_id))
            if decoded is not None:
                embedding, source_bytes = decoded
                found[url] = embedding
                self.stats.cnn_passes_saved += 1
                self.stats.bytes_saved += source_bytes
                CACHE_CNN_PASSES_SAVED.inc()
                CACHE_BYTES_SAVED.inc(source_bytes)
        return found

    async def put_embeddings(
        self,
        embeddings: Mapping[str, np.ndarray],
        encoder_id: str,
        image_sizes: Mapping[str, int] | None = None,
    ) -> None:
        """Store embeddings; `image_sizes` (bytes of each source image) lets later hits count bytes saved."""
        sizes = image_sizes or {}
        entries: dict[str, bytes] = {}
        for url, embedding in embeddings.items():
            try:
                value = encode_embedding(embedding, encoder_id, sizes.get(url, 0))
            except ValueError as exc:
                log.warning("cache_embedding_not_stored", reason=str(exc))
                continue
            entries[self.embedding_key(url, encoder_id)] = value
        await self._mset("put_embeddings", entries, self.embedding_ttl_s)

    # -- plumbing --------------------------------------------------------------------------------------

    def _checked(self, kind: str, blob: bytes | None, decode: Callable[[bytes], T]) -> T | None:
        if blob is None:
            self.stats.misses += 1
            CACHE_MISSES.labels(kind).inc()
            return None
        try:
            value = decode(blob)
        except (CorruptValue, ValueError, struct.error) as exc:
            self.stats.corrupt += 1
            self.stats.misses += 1
            CACHE_CORRUPT.labels(kind).inc()
            CACHE_MISSES.labels(kind).inc()
            log.info("cache_value_rejected", kind=kind, reason=str(exc))
            return None
        self.stats.hits += 1
        CACHE_HITS.labels(kind).inc()
        return value

    async def _mget(self, op: str, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        client = self._client
        values = None if client is None else await self._guarded(op, lambda: client.mget(keys))
        if not isinstance(values, list) or len(values) != len(keys):
            return [None] * len(keys)
        return [value if isinstance(value, bytes) else None for value in values]

    async def _mset(self, op: str, entries: Mapping[str, bytes], ttl_s: int) -> None:
        client = self._client
        if not entries or client is None:
            return

        async def write() -> Any:
            pipe = client.pipeline(transaction=False)
            for key, value in entries.items():
                pipe.set(key, value, ex=ttl_s)
            return await pipe.execute()

        await self._guarded(op, write)

    async def _guarded(self, op: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """Run one Redis call within the deadline, through the breaker; None on any failure."""
        if not self._breaker.allow():
            CACHE_SKIPPED.labels(op).inc()
            return None
        try:
            async with asyncio.timeout(self.op_timeout_s):
                result = await call()
        except Exception as exc:  # Redis is optional: whatever went wrong, the answer is "miss"
            self.stats.errors += 1
            CACHE_ERRORS.labels(op).inc()
            if self._breaker.record_failure():
                CACHE_AVAILABLE.set(0)
                log.warning(
                    "cache_unavailable",
                    op=op,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    retry_after_s=self._breaker.retry_after_s,
                )
            return None
        if self._breaker.record_success():
            CACHE_AVAILABLE.set(1)
            log.info("cache_available_again", op=op)
        return result
