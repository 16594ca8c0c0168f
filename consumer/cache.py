"""A Redis cache of image bytes and image embeddings, so a repost skips the download and the CNN.

* Keys come from a SHA-256 of the URL in the one normal form the fetcher requests too (`netpolicy.normalise_url`);
  a URL the fetch policy cannot parse has no key. Embedding keys also carry a digest of the model's
  `image_encoder_id`, so a new encoder never reads an old encoder's vectors.
* Every value is a versioned envelope bound to its key: a digest of the key is inside it, and a checksum covers
  the whole (SHA-256, or HMAC-SHA-256 keyed with `MMSENT_CACHE_SECRET` when it is set, so that nobody without
  the secret can write an entry we accept). A corrupt, truncated or foreign value, one copied from another key,
  one sealed without the secret or with another, is a miss (`mmsent_cache_corrupt_total`), never a wrong answer.
* An embedding is served only when it has the dtype and shape this encoder produces, learned from the first
  embedding this process stores for it (until then embeddings are misses), and finite values.
* Redis is an optimisation: every method returns misses (or does nothing) when Redis is down, slow or
  misbehaving, never raises. After a failure a circuit breaker skips Redis for `retry_after_s`, then lets one
  probe through; a warning is logged once per outage and a metric counts each error. A Redis that refuses our
  credentials turns the cache off for good, with one warning: retrying cannot fix a wrong password.

    lookup(url) ──normalise_url──▶ key ──MGET──▶ envelope ──checksum or MAC, key digest, kind, version──▶
               ──(embeddings) encoder, dtype, shape, finite──▶ hit          (anything off: a miss)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import structlog
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthenticationWrongNumberOfArgsError, NoPermissionError

from consumer.netpolicy import normalise_url
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
CACHE_AVAILABLE = Gauge(
    "mmsent_cache_available", "1 while Redis answers, 0 while the cache is backed off or turned off."
)
# Redis refused who we are: a configuration error that no retry fixes.
_REFUSED_CREDENTIALS = (AuthenticationError, AuthenticationWrongNumberOfArgsError, NoPermissionError)

IMAGE = "image"
EMBEDDING = "embedding"


# -- keys -----------------------------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _encoder_digest(encoder_id: str) -> bytes:
    return hashlib.sha256(encoder_id.encode("utf-8")).digest()[:8]


# -- value envelopes ------------------------------------------------------------------------------------
#
#   magic "MMSC" | version 2 | kind | seal | SHA-256(key)[:16] | kind's body | tag (32 bytes over all before it)
#   embedding body: encoder digest | source image bytes | dtype ("<f4") | ndim | shape | little-endian values

_MAGIC = b"MMSC"
_VERSION = 2  # 1 had no key inside and a plain checksum: its entries are misses
_KIND_IMAGE = 1
_KIND_EMBEDDING = 2
_SEAL_SHA256 = 0
_SEAL_HMAC = 1
_HEAD = struct.Struct("<4sBBB16s")  # magic, version, kind, seal, key digest
_EMBEDDING_META = struct.Struct("<8sQ4sB")  # encoder digest, source image bytes, dtype ("<f4"), ndim
_TAG_BYTES = 32
_DTYPES = {"<f2", "<f4", "<f8"}
_MAX_DIMS = 8


class CorruptValue(ValueError):
    """A cached value that is not ours, not this version, not for this key, or damaged."""


@dataclass(frozen=True)
class Seal:
    """How envelopes are checksummed: SHA-256, or HMAC-SHA-256 keyed with the secret when there is one."""

    secret: bytes | None = None

    @property
    def kind(self) -> int:
        return _SEAL_SHA256 if self.secret is None else _SEAL_HMAC

    def tag(self, data: bytes | memoryview) -> bytes:
        if self.secret is None:
            return hashlib.sha256(data).digest()
        return hmac.new(self.secret, data, hashlib.sha256).digest()

    def close(self, key: str, kind: int, body: bytes) -> bytes:
        sealed = _HEAD.pack(_MAGIC, _VERSION, kind, self.kind, _key_digest(key)) + body
        return sealed + self.tag(sealed)

    def open(self, key: str, kind: int, blob: bytes) -> memoryview:
        """The body after the header, once magic, version, kind, seal, tag and key are right."""
        if len(blob) < _HEAD.size + _TAG_BYTES:
            raise CorruptValue("too short")
        view = memoryview(blob)
        sealed, tag = view[:-_TAG_BYTES], bytes(view[-_TAG_BYTES:])
        magic, version, found_kind, seal, key_digest = _HEAD.unpack_from(sealed)
        if magic != _MAGIC or version != _VERSION or found_kind != kind:
            raise CorruptValue("foreign value")
        if seal != self.kind:
            raise CorruptValue("sealed with the cache secret" if seal == _SEAL_HMAC else "sealed without the secret")
        if not hmac.compare_digest(self.tag(sealed), tag):
            raise CorruptValue("checksum mismatch (damaged, or sealed with another secret)")
        if not hmac.compare_digest(key_digest, _key_digest(key)):
            raise CorruptValue("another key's entry")
        return sealed[_HEAD.size :]


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()[:16]


def encode_image(data: bytes, key: str, seal: Seal = Seal()) -> bytes:
    return seal.close(key, _KIND_IMAGE, data)


def decode_image_value(blob: bytes, key: str, seal: Seal = Seal()) -> bytes:
    data = bytes(seal.open(key, _KIND_IMAGE, blob))
    if sniff_format(data[:16]) is None:
        raise CorruptValue("not an image")
    return data


def encode_embedding(embedding: np.ndarray, encoder_id: str, key: str, source_bytes: int = 0,
                     seal: Seal = Seal()) -> bytes:
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
    return seal.close(key, _KIND_EMBEDDING, meta + shape + array.tobytes())


def decode_embedding(blob: bytes, encoder_id: str, key: str, seal: Seal = Seal()) -> tuple[np.ndarray, int]:
    """(embedding, size of the image it came from) from a cached value; `CorruptValue` if anything is off,
    non-finite values included."""
    body = seal.open(key, _KIND_EMBEDDING, blob)
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
    embedding = np.frombuffer(payload, dtype=dtype).reshape(shape).copy()
    if not np.isfinite(embedding).all():
        raise CorruptValue("non-finite values")
    return embedding, int(source_bytes)


@dataclass(frozen=True)
class EmbeddingForm:
    """The dtype and shape an image encoder's embeddings have (learned from the first one the scorer makes)."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, embedding: np.ndarray) -> EmbeddingForm:
        return cls(np.dtype(embedding.dtype), tuple(embedding.shape))

    def check(self, embedding: np.ndarray) -> np.ndarray:
        if EmbeddingForm.of(embedding) != self:
            raise CorruptValue(f"{embedding.dtype}{embedding.shape}, not the encoder's {self.dtype}{self.shape}")
        return embedding


def _embedding_of(blob: bytes, *, form: EmbeddingForm, encoder_id: str, key: str, seal: Seal) -> tuple[np.ndarray, int]:
    embedding, source_bytes = decode_embedding(blob, encoder_id, key, seal)
    return form.check(embedding), source_bytes


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
    """Faults of this cache instance (the Prometheus counters, hits and savings included, are process-wide)."""

    errors: int = 0
    corrupt: int = 0


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
        secret: bytes | None = None,
    ) -> None:
        """`secret`: entries are sealed with HMAC-SHA-256 keyed with it (`MMSENT_CACHE_SECRET`)."""
        self.image_ttl_s = image_ttl_s
        self.embedding_ttl_s = embedding_ttl_s
        self.max_image_bytes = max_image_bytes
        self.op_timeout_s = op_timeout_s
        self.key_prefix = key_prefix
        self.stats = CacheStats()
        self._seal = Seal(secret)
        self._forms: dict[str, EmbeddingForm] = {}  # by encoder id: what its embeddings look like
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
            "secret": settings.cache_secret.get_secret_value().encode() if settings.cache_secret else None,
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

    def image_key(self, url: str) -> str | None:
        """None for a URL the fetch policy cannot parse: it is never fetched, so never cached."""
        normal = normalise_url(url)
        return None if normal is None else f"{self.key_prefix}img:v2:{_sha256(normal)}"

    def embedding_key(self, url: str, encoder_id: str) -> str | None:
        normal = normalise_url(url)
        return None if normal is None else f"{self.key_prefix}emb:v2:{_sha256(encoder_id)[:16]}:{_sha256(normal)}"

    # -- images ----------------------------------------------------------------------------------------

    async def get_images(self, urls: Iterable[str]) -> dict[str, bytes]:
        """Cached image bytes for those of `urls` that have them (one round trip for the batch)."""
        keys = self._keys({url: self.image_key(url) for url in urls})
        found: dict[str, bytes] = {}
        for (url, key), blob in zip(keys.items(), await self._mget("get_images", list(keys.values())), strict=True):
            data = self._checked(IMAGE, blob, functools.partial(decode_image_value, key=key, seal=self._seal))
            if data is not None:
                found[url] = data
                CACHE_BYTES_SAVED.inc(len(data))
        return found

    async def put_images(self, images: Mapping[str, bytes]) -> None:
        """Store image bytes (those over `max_image_bytes` are skipped: Redis is no blob store)."""
        keys = self._keys({url: self.image_key(url) for url, data in images.items()
                           if 0 < len(data) <= self.max_image_bytes})
        entries = {key: encode_image(images[url], key, self._seal) for url, key in keys.items()}
        await self._mset("put_images", entries, self.image_ttl_s)

    # -- embeddings ------------------------------------------------------------------------------------

    async def get_embeddings(self, urls: Iterable[str], encoder_id: str) -> dict[str, np.ndarray]:
        """Cached embeddings of `urls` made by the encoder `encoder_id` (one round trip for the batch). Until this
        process has stored an embedding of that encoder, whose dtype and shape every hit must have, all misses."""
        keys = self._keys({url: self.embedding_key(url, encoder_id) for url in urls})
        form = self._forms.get(encoder_id)
        if form is None:
            CACHE_MISSES.labels(EMBEDDING).inc(len(keys))
            return {}
        found: dict[str, np.ndarray] = {}
        for (url, key), blob in zip(keys.items(), await self._mget("get_embeddings", list(keys.values())), strict=True):
            decoded = self._checked(EMBEDDING, blob, functools.partial(
                _embedding_of, form=form, encoder_id=encoder_id, key=key, seal=self._seal))
            if decoded is not None:
                embedding, source_bytes = decoded
                found[url] = embedding
                CACHE_CNN_PASSES_SAVED.inc()
                CACHE_BYTES_SAVED.inc(source_bytes)
        return found

    async def put_embeddings(
        self,
        embeddings: Mapping[str, np.ndarray],
        encoder_id: str,
        image_sizes: Mapping[str, int] | None = None,
    ) -> None:
        """Store embeddings (the scorer's: the first one teaches the cache this encoder's dtype and shape);
        `image_sizes` (bytes of each source image) lets later hits count bytes saved."""
        sizes = image_sizes or {}
        entries: dict[str, bytes] = {}
        for url, key in self._keys({url: self.embedding_key(url, encoder_id) for url in embeddings}).items():
            embedding = embeddings[url]
            try:
                self._forms.setdefault(encoder_id, EmbeddingForm.of(embedding)).check(embedding)
                entries[key] = encode_embedding(embedding, encoder_id, key, sizes.get(url, 0), self._seal)
            except ValueError as exc:  # CorruptValue included: not what this encoder makes
                log.warning("cache_embedding_not_stored", reason=str(exc))
        await self._mset("put_embeddings", entries, self.embedding_ttl_s)

    # -- plumbing --------------------------------------------------------------------------------------

    @staticmethod
    def _keys(keys: Mapping[str, str | None]) -> dict[str, str]:
        """The URLs that have a key (a URL the fetch policy cannot parse has none), with it."""
        return {url: key for url, key in keys.items() if key is not None}

    def _checked(self, kind: str, blob: bytes | None, decode: Callable[[bytes], T]) -> T | None:
        if blob is None:
            CACHE_MISSES.labels(kind).inc()
            return None
        try:
            value = decode(blob)
        except (CorruptValue, ValueError, struct.error) as exc:
            self.stats.corrupt += 1
            CACHE_CORRUPT.labels(kind).inc()
            CACHE_MISSES.labels(kind).inc()
            log.info("cache_value_rejected", kind=kind, reason=str(exc))
            return None
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

    async def _turn_off(self, op: str, exc: Exception) -> None:
        """Redis refused our credentials: no more Redis calls in this process, one warning (concurrent calls that
        failed the same way find the cache off already)."""
        client, self._client = self._client, None
        if client is None:
            return
        CACHE_AVAILABLE.set(0)
        log.warning("cache_turned_off", op=op, reason="Redis refused the credentials; scoring goes on uncached",
                    error=f"{type(exc).__name__}: {exc}"[:300])
        with contextlib.suppress(Exception):
            await client.aclose()

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
            if isinstance(exc, _REFUSED_CREDENTIALS):
                await self._turn_off(op, exc)
            elif self._breaker.record_failure():
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
