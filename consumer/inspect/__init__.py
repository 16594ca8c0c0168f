"""`mmsent inspect`: the live moderation console. A web page that shows the scored stream as it happens, each event
joined back to its post (caption, thumbnail), with filters, the reasons of alerts, and charts.

    Kafka ──▶ Tail (thread: assign(), never a group, never a commit) ──▶ cards ──call_soon_threadsafe──┐
    Kafka ──▶ GroupLag (thread: admin API, read-only) ──▶ lag ───────────────────────────────────────────┤
                                                                                                          ▼
    browser ◀── aiohttp on its own event loop (thread): page, /api/stream (SSE), /api/charts, /thumb/<id> ◀── Feed
                                                              └─ Thumbnails: policy, Redis cache, SSRF-safe fetcher

It reads the same `MMSENT_*` settings as the consumer (brokers, security, topics, Redis, fetch policy) and never
writes to any topic: there is no producer in this package.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import structlog
from aiohttp import web

from consumer.inspect.feed import Feed
from consumer.inspect.server import UnsafeBind, build_app, check_bind
from consumer.inspect.tail import GroupLag, Tail
from consumer.inspect.thumbs import Thumbnails
from consumer.settings import Settings

__all__ = ["Inspector", "UnsafeBind"]

log = structlog.get_logger(__name__)


class Inspector:
    """The console, running on threads of its own: `start()` returns its URL; `stop()` ends it.

    `host` / `port` default to `MMSENT_INSPECT_HOST` / `MMSENT_INSPECT_PORT` (port 0: a free one). Raises
    `UnsafeBind` before anything starts when it would bind beyond loopback without a token."""

    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None,
                 feed: Feed | None = None) -> None:
        self.settings = settings
        self.host = host or settings.inspect_host
        self.port = settings.inspect_port if port is None else port
        self._token = settings.inspect_token.get_secret_value() if settings.inspect_token else None
        check_bind(self.host, self._token)
        self.feed = feed or Feed()
        self._loop = asyncio.new_event_loop()
        self.tail = Tail(settings, self._hand_over)
        self._lag = GroupLag(settings, self._lag_over)
        self._thread = threading.Thread(target=self._loop.run_forever, name="mmsent-inspect-http", daemon=True)
        self._runner: web.AppRunner | None = None
        self._thumbnails: Thumbnails | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def _hand_over(self, cards: list[dict[str, Any]]) -> None:
        self._loop.call_soon_threadsafe(self.feed.publish, cards)

    def _lag_over(self, lag: int | None) -> None:
        self._loop.call_soon_threadsafe(self.feed.charts.record_lag, lag)

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(30)
        self.tail.start()
        self._lag.start()
        log.info("inspect_started", url=self.url)
        return self.url

    async def _serve(self) -> None:
        self._thumbnails = Thumbnails(self.settings)  # its fetcher's pool belongs to this loop
        self._runner = web.AppRunner(build_app(self.feed, self._thumbnails, self._token), access_log=None,
                                     handler_cancellation=True, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # the free port the system chose
            self.port = int(self._runner.addresses[0][1])

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._thumbnails is not None:
            await self._thumbnails.aclose()

    def stop(self) -> None:
        self.tail.stop()
        self._lag.stop()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(15)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)

    def __enter__(self) -> Inspector:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
