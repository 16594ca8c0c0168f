"""Small helpers for tests that talk to a real Kafka-protocol broker, and a second broker to run them against."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from tooling.embedded import TANSU_PACKAGE, TansuKafka, create_topics
from tooling.topicreader import Record, read_topic

__all__ = ["TANSU_PACKAGE", "Record", "TansuKafka", "committed_offsets", "create_topics", "end_offsets", "produce",
           "read_all"]


def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | None],
    keys: Iterable[bytes | None] | None = None,
    partition: int | None = None,
    headers: Sequence[list[tuple[str, bytes]]] | None = None,
    timestamps_ms: Sequence[int] | None = None,
    client: Mapping[str, str] | None = None,
) -> int:
    """Produce and wait for every acknowledgement; returns how many were acknowledged. `headers` and
    `timestamps_ms`, when given, are per record; `client`: more client settings (security)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                         **(client or {})})
    errors: list[str] = []
    acked = 0

    def on_delivery(err: object, _msg: Message) -> None:
        nonlocal acked
        if err is not None:
            errors.append(str(err))
        else:
            acked += 1

    key_list: Sequence[bytes | None] = list(keys) if keys is not None else []
    for index, value in enumerate(values):
        key = key_list[index] if index < len(key_list) else None
        while True:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=key,
                    partition=-1 if partition is None else partition,  # -1: let the partitioner choose
                    headers=headers[index] if headers else None,
                    timestamp=timestamps_ms[index] if timestamps_ms else 0,  # 0: now
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(60)
    if remaining or errors:
        raise RuntimeError(f"produce to {topic}: {remaining} unacknowledged, errors: {errors[:3]}")
    return acked


def end_offsets(bootstrap: str, topic: str, client: Mapping[str, str] | None = None) -> dict[int, int]:
    """The high watermark of each partition, as a fetch reports it.

    ListOffsets alone is not enough on every broker: Tansu 0.6.0 answers LATEST with the base offset of the
    partition's last batch + 1 (a batch of five records at the end reads as four short), while its fetch responses
    carry the true high watermark (`tooling.topicreader.read_topic` reads to it for the same reason). So a fetch
    from one below the listed end settles it; on Kafka and noida-db the two agree and the fetch changes nothing.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "mmsent-test-offsets",
                         "enable.auto.commit": False, "isolation.level": "read_uncommitted", **(client or {})})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        listed = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}
        ends = {p: high for p, (_low, high) in listed.items()}
        probe = [TopicPartition(topic, p, max(low, high - 1)) for p, (low, high) in listed.items() if high > low]
        if probe:
            consumer.assign(probe)
            fetched: dict[int, int] = {}
            deadline = time.monotonic() + 10
            while len(fetched) < len(probe) and time.monotonic() < deadline:
                consumer.consume(1000, 0.05)
                for tp in probe:
                    high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), cached=True)[1]
                    if high >= 0:
                        fetched[tp.partition] = high
            if len(fetched) < len(probe):
                missing = sorted({tp.partition for tp in probe} - set(fetched))
                raise RuntimeError(f"end_offsets({topic}): no fetch answered for partitions {missing}")
            ends.update({p: max(ends[p], high) for p, high in fetched.items()})
        return ends
    finally:
        consumer.close()


def committed_offsets(
    bootstrap: str, group: str, topic: str, client: Mapping[str, str] | None = None
) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         **(client or {})})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = [TopicPartition(topic, p) for p in sorted(metadata.topics[topic].partitions)]
        return {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
    finally:
        consumer.close()


def read_all(
    bootstrap: str,
    topic: str,
    expected: int | None = None,
    timeout: float = 30,
    isolation_level: str = "read_uncommitted",
    client: Mapping[str, str] | None = None,
) -> list[Record]:
    """Everything on `topic` from the beginning: until `expected` records arrived, or until the end offsets."""
    return read_topic(
        {"bootstrap.servers": bootstrap, **(client or {})},
        topic,
        until_count=expected,
        timeout_s=timeout,
        isolation_level=isolation_level,
    )
