"""What the console has seen: the recent cards (an event and its alert merged into one), the charts' counts, and the
live feed to each open page, sampled so that a browser is never flooded while the charts count everything.

    cards (from the tail) ──▶ Feed.publish() ──┬──▶ recent: the last RECENT_CARDS, by id (a page opens on them)
                                               ├──▶ Charts.count(): every card, in BUCKET_S buckets
                                               └──▶ Sampler ──▶ each subscriber's queue (a slow page drops batches)

Everything here runs on the server's event loop: the tail hands over whole batches with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RECENT_CARDS = 2_000  # remembered, merged by id; a page opens on the newest SNAPSHOT_CARDS of them
SNAPSHOT_CARDS = 200
BUCKET_S = 10  # the charts' resolution
HISTORY_S = 6 * 3600  # how far back the charts go
FEED_RATE = 40.0  # plain events per second sent to pages at most; alerts and dead letters always go
SUBSCRIBER_QUEUE = 256  # batches a page may fall behind before its next ones are dropped


@dataclass
class Bucket:
    """BUCKET_S seconds of counts. Latencies are kept raw until the bucket closes, then as p50/p95 only."""

    start: int
    events: int = 0
    alerts: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    p50_ms: float | None = None
    p95_ms: float | None = None
    lag: int | None = None

    def close(self) -> None:
        if self.latencies_ms:
            self.p50_ms, self.p95_ms = (float(v) for v in np.percentile(self.latencies_ms, [50, 95]))
        self.latencies_ms = []

    def point(self) -> dict[str, Any]:
        p50, p95 = self.p50_ms, self.p95_ms
        if self.latencies_ms:  # the open bucket: its percentiles so far
            p50, p95 = (float(v) for v in np.percentile(self.latencies_ms, [50, 95]))
        return {"t": self.start, "events": self.events, "alerts": self.alerts, "labels": dict(self.labels),
                "dead_letters": dict(self.dead_letters), "p50_ms": p50, "p95_ms": p95, "lag": self.lag}


class Charts:
    """Counts of every card and lag sample, by BUCKET_S bucket, for HISTORY_S."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: deque[Bucket] = deque(maxlen=HISTORY_S // BUCKET_S)
        self.totals: Counter[str] = Counter()

    def _current(self) -> Bucket:
        start = int(self._clock()) // BUCKET_S * BUCKET_S
        if not self._buckets or self._buckets[-1].start != start:
            if self._buckets:
                self._buckets[-1].close()
            self._buckets.append(Bucket(start))
        return self._buckets[-1]

    def count(self, card: dict[str, Any]) -> None:
        """One record's card. An alert copy counts as an alert only: its event comes on the output topic and counts
        there, whichever of the two arrives first."""
        bucket = self._current()
        if card["alert"]:
            bucket.alerts += 1
            self.totals["alerts"] += 1
            return
        if card["kind"] == "dead_letter":
            bucket.dead_letters[card["error_code"] or "unknown"] += 1
            self.totals["dead_letters"] += 1
            return
        bucket.events += 1
        self.totals["events"] += 1
        bucket.labels[card["label"] or "unknown"] += 1
        if card["latency_ms"] is not None:
            bucket.latencies_ms.append(card["latency_ms"])

    def record_lag(self, lag: int | None) -> None:
        self._current().lag = lag
        self.totals["lag"] = -1 if lag is None else lag

    def series(self, window_s: int) -> dict[str, Any]:
        since = self._clock() - window_s
        points = [bucket.point() for bucket in self._buckets if bucket.start + BUCKET_S > since]
        return {"bucket_s": BUCKET_S, "window_s": window_s, "points": points, "totals": dict(self.totals)}


class Sampler:
    """A token bucket: at most `rate` plain events a second (bursts of one second's worth)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = rate
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def merge(existing: dict[str, Any] | None, card: dict[str, Any]) -> dict[str, Any]:
    """An event and its alert copy are one card: the event's fields, the alert's flag and reason."""
    if existing is None:
        return card
    if card["alert"]:
        return {**existing, "alert": True, "reason": card["reason"] or existing["reason"]}
    return {**card, "alert": existing["alert"], "reason": existing["reason"] or card["reason"]}


class Feed:
    def __init__(self, *, feed_rate: float = FEED_RATE, charts: Charts | None = None) -> None:
        self.charts = charts or Charts()
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._sampler = Sampler(feed_rate)
        self._subscribers: set[asyncio.Queue[list[dict[str, Any]]]] = set()
        self.sampled_out = 0
        self.dropped_batches = 0

    def publish(self, cards: Iterable[dict[str, Any]]) -> None:
        batch = []
        for card in cards:
            existing = self._recent.get(card["id"])
            merged = merge(existing, card)
            self._recent[card["id"]] = merged
            self.charts.count(card)
            if merged["alert"] or merged["kind"] == "dead_letter" or self._sampler.take():
                batch.append(merged)
            else:
                self.sampled_out += 1
        while len(self._recent) > RECENT_CARDS:
            self._recent.popitem(last=False)
        if batch:
            self._broadcast(batch)

    def _broadcast(self, batch: list[dict[str, Any]]) -> None:
        for queue in self._subscribers:
            try:
                queue.put_nowait(batch)
            except asyncio.QueueFull:
                self.dropped_batches += 1

    def card(self, card_id: str) -> dict[str, Any] | None:
        return self._recent.get(card_id)

    def snapshot(self, limit: int = SNAPSHOT_CARDS) -> list[dict[str, Any]]:
        """The newest `limit` cards, newest first."""
        newest = []
        for card in reversed(self._recent.values()):
            newest.append(card)
            if len(newest) >= limit:
                break
        return newest

    def subscribe(self) -> asyncio.Queue[list[dict[str, Any]]]:
        queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[list[dict[str, Any]]]) -> None:
        self._subscribers.discard(queue)
