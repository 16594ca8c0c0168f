"""Lag in time, and records lost to retention, per partition of the input topic.

    statistics callback (the poll thread, every `statistics.interval.ms`) ──▶ TimeLag.update
        uncommitted: now − the oldest timestamp among the records read and not yet committed (OffsetTracker)
        unread:      0 when the consumer's position is at the partition's end (the stats' last stable offset);
                     else now − the timestamp of the record at the position, looked up by UnreadProbe
    UnreadProbe (its own thread and a group-less consumer): reads the one record at each position it is asked for

    assignment ──▶ RetentionWatch.at_assignment: committed offset below the log start? count the gap
    a record read past the offset expected (OffsetTracker.register) ──▶ RetentionWatch.after_gap: the part of the
        gap below the log start (librdkafka's cached low watermark, which every fetch answer refreshes) was deleted
        before it was read; the rest were transaction markers or compacted records, which are not losses

Why a lookup for "unread": the record at the position has not been fetched (or sits in librdkafka's queue, out of
reach), and its age is the one number that says how stale the next decision will be. Interpolating the log end's
growth (kafka-lag-exporter's way) knows nothing of a backlog older than the process; one fetch of one record per
lagging partition per interval is cheap and exact. Between lookups the value is at most one interval stale: when
the position has moved past the record looked up, the next record is younger, so the gauge over-states by at most
what was consumed since. The timestamps are the records' own (producer CreateTime unless the topic logs append
time).

A reset to the log start with nothing left to read (every record deleted) is seen at assignment; while running,
it is seen when the next record arrives (the gap), not before.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

from consumer.metrics import Metrics
from consumer.offsets import PartitionState, TopicPartitionKey

log = structlog.get_logger("consumer")

KINDS = ("uncommitted", "unread")
PROBE_TIMEOUT_S = 2.0  # one lookup round; a partition whose record does not come in time keeps its last value
WATERMARK_TIMEOUT_S = 5.0


def age_seconds(timestamp_ms: int | None, now_s: float) -> float:
    """How old a record is; 0 for none (nothing waits) or a timestamp from the future (a producer's clock)."""
    return 0.0 if timestamp_ms is None else max(0.0, now_s - timestamp_ms / 1000)


class UnreadProbe:
    """The timestamps of the records at the consumer's positions, read by a group-less consumer on its own thread.

    The poll thread hands it the positions it wants (`want`, non-blocking) and reads what it found (`found`); the
    thread does one round per request: assign each partition at its position, read until one record of each came
    back or `PROBE_TIMEOUT_S` passed."""

    def __init__(self, client_config: Mapping[str, Any], topic: str) -> None:
        self._config = {
            **client_config,
            "group.id": "mmsent-lag-probe",  # required by librdkafka; never joined, never committed
            "enable.auto.commit": False,
            "isolation.level": "read_committed",  # as the service reads
            "fetch.max.bytes": 1_048_576,
            "max.partition.fetch.bytes": 65_536,  # one batch per partition at least; no more than needed
        }
        self._topic = topic
        self._wanted: dict[int, int] = {}
        self._found: dict[int, tuple[int, int]] = {}  # partition -> (offset of the record found, timestamp ms)
        self._request = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmsent-lag-probe", daemon=True)
        self._thread.start()

    def want(self, positions: dict[int, int]) -> None:
        self._wanted = positions  # replaced whole: the thread reads one consistent request
        self._request.set()

    def found(self, partition: int) -> int | None:
        """The timestamp of the record at `position` (or of the one looked up before it, while the position has
        moved on); None when none was looked up yet."""
        hit = self._found.get(partition)
        return None if hit is None else hit[1]

    def close(self) -> None:
        self._closed.set()
        self._request.set()
        self._thread.join(PROBE_TIMEOUT_S + 5)

    def _run(self) -> None:
        consumer = Consumer(self._config)
        try:
            while not self._closed.is_set():
                self._request.wait()
                self._request.clear()
                if not self._closed.is_set() and self._wanted:
                    self._found = {**self._found, **self._lookup(consumer, dict(self._wanted))}
        finally:
            consumer.close()

    def _lookup(self, consumer: Consumer, positions: dict[int, int]) -> dict[int, tuple[int, int]]:
        found: dict[int, tuple[int, int]] = {}
        try:
            consumer.assign([TopicPartition(self._topic, p, offset) for p, offset in positions.items()])
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            while len(found) < len(positions) and time.monotonic() < deadline:
                for message in consumer.consume(len(positions), 0.1):
                    partition, offset = message.partition(), message.offset()
                    if message.error() is None and partition is not None and offset is not None:
                        found.setdefault(partition, (offset, message.timestamp()[1]))
        except KafkaException as exc:
            log.warning("lag_probe_failed", error=str(exc))
        return found


class TimeLag:
    """`mmsent_lag_seconds{partition, kind}` from the statistics callback (the poll thread)."""

    def __init__(self, metrics: Metrics, probe: UnreadProbe | None) -> None:
        self._metrics = metrics
        self._probe = probe

    def update(self, states: Mapping[int, PartitionState], ends: Mapping[int, int]) -> None:
        """`states`: the assigned partitions' current generations; `ends`: their last stable offsets (the stats)."""
        now = time.time()
        lagging: dict[int, int] = {}
        for partition, state in states.items():
            self._set(partition, "uncommitted", age_seconds(state.oldest_uncommitted_ms(), now))
            position, end = state.position(), ends.get(partition)
            if position is None or end is None or position >= end:
                self._set(partition, "unread", 0.0)  # nothing left to read (or not known yet: nothing read)
                continue
            lagging[partition] = position
            found = self._probe.found(partition) if self._probe is not None else None
            if found is not None:
                self._set(partition, "unread", age_seconds(found, now))
        if lagging and self._probe is not None:
            self._probe.want(lagging)

    def forget(self, partition: int) -> None:
        for kind in KINDS:
            with contextlib.suppress(KeyError):
                self._metrics.lag_seconds.remove(str(partition), kind)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()

    def _set(self, partition: int, kind: str, seconds: float) -> None:
        self._metrics.lag_seconds.labels(str(partition), kind).set(round(seconds, 3))


class RetentionWatch:
    """Counts the records a partition's log deleted before this consumer read them (its offset fell below the log
    start): `mmsent_records_lost_to_retention_total{partition}` and one error log line with the range."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def at_assignment(self, consumer: Consumer, states: Mapping[TopicPartitionKey, PartitionState]) -> None:
        """Newly assigned partitions: where reading starts (the committed offset) against the log start. One
        committed-offset request and one watermark request per partition, in the rebalance callback."""
        try:
            committed = consumer.committed([TopicPartition(t, p) for t, p in states], timeout=WATERMARK_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("retention_check_failed", error=str(exc))
            return
        for tp in committed:
            state = states[(tp.topic, tp.partition)]
            if tp.error is not None or tp.offset < 0:
                continue  # never committed: the group starts at the log start, nothing of it was lost
            state.expected = tp.offset
            low = _low_watermark(consumer, state.key, cached=False)
            if low is not None and low > tp.offset:
                self._lost(state, tp.offset, low, "assignment")

    def after_gap(self, consumer: Consumer, state: PartitionState, skipped_from: int, offset: int) -> None:
        """A record at `offset` was read where `skipped_from` was expected: the part of the gap below the log start
        was deleted unread."""
        low = _low_watermark(consumer, state.key, cached=True)
        if low is None:
            low = _low_watermark(consumer, state.key, cached=False)
        if low is not None and min(low, offset) > skipped_from:
            self._lost(state, skipped_from, min(low, offset), "offset_reset")

    def _lost(self, state: PartitionState, first: int, end: int, seen_at: str) -> None:
        topic, partition = state.key
        self._metrics.lost_to_retention.labels(str(partition)).inc(end - first)
        state.expected = max(state.expected or 0, end)
        log.error("records_lost_to_retention", topic=topic, partition=partition, first_offset=first,
                  last_offset=end - 1, count=end - first, seen_at=seen_at,
                  hint="the log deleted them before they were scored: retention shorter than the lag")


def _low_watermark(consumer: Consumer, key: TopicPartitionKey, *, cached: bool) -> int | None:
    """The partition's log start offset: librdkafka's cached value (refreshed by every fetch answer), or asked of
    the broker. None when unknown."""
    try:
        if cached:
            low, _high = consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
        else:
            low, _high = consumer.get_watermark_offsets(TopicPartition(*key), timeout=WATERMARK_TIMEOUT_S)
    except KafkaException as exc:
        log.warning("watermark_lookup_failed", partition=key[1], error=str(exc))
        return None
    return int(low) if low is not None and low >= 0 else None
