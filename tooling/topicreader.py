"""Read a whole topic (or until a count) with a throwaway assignment: no group, nothing committed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: list[tuple[str, str | bytes | None]] = field(default_factory=list)  # in order


def read_topic(
    client_config: dict[str, Any],
    topic: str,
    *,
    until_count: int | None = None,
    timeout_s: float = 60.0,
    isolation_level: str = "read_uncommitted",
) -> list[Record]:
    """Every record of `topic` from the start to the end offsets seen when reading began (or `until_count`).

    With `read_committed`, aborted records and transaction markers are skipped; the reader still stops at the
    end offsets because it follows its position, not the count of records it saw.

    Read uncommitted, a partition's end is also taken from the high watermark its first fetch answer carries:
    Tansu 0.6.0 answers ListOffsets LATEST with the base offset of the partition's last batch + 1, so a batch of
    five records at the end would read as four short. On Kafka and noida-db the two agree.
    """
    consumer = _reader(client_config, isolation_level)
    try:
        bounds = _bounds(consumer, topic)
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _high) in bounds.items()])
        # read_committed ends at the last stable offset, which a fetch's high watermark may pass: keep ListOffsets'
        confirm_ends = isolation_level == "read_uncommitted"
        confirmed: set[int] = set()
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if until_count is not None and len(records) >= until_count:
                break
            if until_count is None and _reached_end(consumer, topic, bounds):
                break
            for message in consumer.consume(1000, 0.2):
                partition, offset = message.partition(), message.offset()
                if message.error() or partition is None or offset is None:
                    continue
                if confirm_ends and partition not in confirmed:
                    confirmed.add(partition)
                    low, high = bounds[partition]
                    fetched = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)[1]
                    bounds[partition] = (low, max(high, fetched))
                headers = message.headers()
                records.append(
                    Record(topic, partition, offset, message.key(), message.value(), message.timestamp()[1],
                           list(headers) if isinstance(headers, list) else [])
                )
        return records
    finally:
        consumer.close()


def watermarks(client_config: dict[str, Any], topic: str) -> dict[int, tuple[int, int]]:
    """Per partition of `topic`: (log start offset, end offset). Below the start the log has deleted the records."""
    consumer = _reader(client_config, "read_uncommitted")
    try:
        return _bounds(consumer, topic)
    finally:
        consumer.close()


def _reader(client_config: dict[str, Any], isolation_level: str) -> Consumer:
    return Consumer(
        {
            **client_config,
            "group.id": f"mmsent-reader-{time.monotonic_ns()}",  # required by librdkafka; never committed
            "enable.auto.commit": False,
            "isolation.level": isolation_level,
            "auto.offset.reset": "earliest",
        }
    )


def _bounds(consumer: Consumer, topic: str) -> dict[int, tuple[int, int]]:
    metadata = consumer.list_topics(topic, timeout=10)
    if topic not in metadata.topics or metadata.topics[topic].error is not None:
        raise LookupError(f"topic {topic!r} does not exist")
    partitions = sorted(metadata.topics[topic].partitions)
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}


def _reached_end(consumer: Consumer, topic: str, bounds: dict[int, tuple[int, int]]) -> bool:
    positions = consumer.position([TopicPartition(topic, p) for p in bounds])
    return all(tp.offset >= bounds[tp.partition][1] or bounds[tp.partition][1] == bounds[tp.partition][0]
               for tp in positions)
