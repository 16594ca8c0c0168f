"""Thumbnails for the console, through the consumer's own doors: the URL policy first, then the Redis image cache,
then the SSRF-safe fetcher, the bounded decoder, and a small JPEG served from the console's origin. The browser
never sees a post's URL as something to load.

    url ──ImageFetcher.refuses──▶ refused: no thumbnail (the cache is not even read)
        ──ImageCache.get_images──▶ bytes ─┐
        ──ImageFetcher.fetch_image───────┴─▶ image_decoder (pixel budget, deadline) ──▶ THUMB_PX JPEG ──▶ memo
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import structlog
from cachetools import LRUCache

from consumer.cache import ImageCache
from consumer.fetch import ImageFetcher, image_decoder
from consumer.settings import Settings

log = structlog.get_logger(__name__)

THUMB_PX = 160
MEMO_ENTRIES = 4_096  # thumbnails (a few KB each) and misses, by URL


def to_jpeg(image: Any, size: int = THUMB_PX) -> bytes:
    """A copy of a decoded RGB image, no side above `size`, as a JPEG."""
    small = image.copy()
    small.thumbnail((size, size))
    out = io.BytesIO()
    small.convert("RGB").save(out, format="JPEG", quality=80)
    return out.getvalue()


class Thumbnails:
    """Owned by the server's event loop (the fetcher's connection pool lives there): `aclose()` it."""

    def __init__(self, settings: Settings, *, fetcher: ImageFetcher | None = None,
                 cache: ImageCache | None = None, decode: Callable[[bytes], Any] | None = None) -> None:
        self._decode = decode or image_decoder(settings)
        self._fetcher = fetcher or ImageFetcher(settings, decode=self._decode)
        self._cache = cache or ImageCache.from_settings(settings)
        self._memo: LRUCache[str, bytes | None] = LRUCache(MEMO_ENTRIES)
        self._building: dict[str, asyncio.Future[bytes | None]] = {}
        self.refused = 0

    async def aclose(self) -> None:
        await self._fetcher.aclose()
        await self._cache.aclose()

    async def get(self, url: str) -> bytes | None:
        """The thumbnail of `url`, or None: refused by the policy, unavailable, undecodable. Never raises."""
        if url in self._memo:
            return self._memo[url]
        # Cards sharing a picture ask at once: one build for them all, or the second, finding no cache entry yet,
        # downloads the picture again once the first download is done (the fetcher only shares downloads in flight).
        building = self._building.get(url)
        if building is None:
            building = asyncio.ensure_future(self._build(url))
            self._building[url] = building
            building.add_done_callback(lambda _done: self._building.pop(url, None))
        return await asyncio.shield(building)  # one client going away must not cancel the others' build

    async def _build(self, url: str) -> bytes | None:
        try:
            thumb = await self._make(url)
        except Exception as exc:  # a thumbnail is a nicety: a fault here is a missing picture, never a 500
            log.warning("inspect_thumbnail_failed", error=repr(exc))
            thumb = None
        self._memo[url] = thumb
        return thumb

    async def _make(self, url: str) -> bytes | None:
        if self._fetcher.refuses(url) is not None:
            self.refused += 1
            return None
        image = await self._from_cache(url)
        if image is None:
            result, image = await self._fetcher.fetch_image(url)
            if not result.ok or image is None:
                return None
            if result.data is not None:
                await self._cache.put_images({url: result.data})
        return await asyncio.to_thread(to_jpeg, image)

    async def _from_cache(self, url: str) -> Any | None:
        data = (await self._cache.get_images([url])).get(url)
        if data is None:
            return None
        try:
            return await asyncio.to_thread(self._decode, data)
        except Exception as exc:  # an entry the decoder refuses is a miss: fetch it again
            log.info("inspect_cached_image_undecodable", error=repr(exc))
            return None
