"""Small helpers for tests that talk to a real Kafka-protocol broker."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from consumer.embedded import create_topics
from consumer.topicreader import Record, read_topic

__all__ = ["Record", "committed_offsets", "create_topics", "end_offsets", "produce", "read_all"]


def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | None],
    keys: Iterable[bytes | None] | None = None,
    partition: int | None = None,
) -> int:
    """Produce and wait for every acknowledgement; returns how many were acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
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


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "mmsent-test-offsets"})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
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
) -> list[Record]:
    """Everything on `topic` from the beginning: until `expected` records arrived, or until the end offsets."""
    return read_topic(
        {"bootstrap.servers": bootstrap},
        topic,
        until_count=expected,
        timeout_s=timeout,
        isolation_level=isolation_level,
    )
