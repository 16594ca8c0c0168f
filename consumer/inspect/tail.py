"""The console's eyes on Kafka: one throwaway consumer that reads, never joins a group and never commits.

    input topic      (from end - POSTS_PER_PARTITION) ──▶ PostCache     (what events are joined with)
    output, alert,   (from their end)                 ──▶ Joiner ──▶ cards ──▶ hand_over(cards)  (the server's loop)
    dead-letter topics

`assign()` with explicit offsets: no group membership, no committed offsets read or written (its `group.id` is
only what librdkafka insists on, one of its own, never the consumers'). Topics or partitions that appear later are
picked up on the next refresh. `GroupLag` is separate, on its own thread: an admin call must never stall the tail.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from consumer.inspect.cards import Joiner, Kind, PostCache, Record
from consumer.kafkaconfig import LibrdkafkaLog, client_config
from consumer.settings import Settings

log = structlog.get_logger(__name__)

POSTS_REMEMBERED = 50_000  # the join cache: recent input posts, about 10 MB
REFRESH_S = 10.0  # how often topics and partitions are looked up again
BATCH = 1_000
ADMIN_TIMEOUT_S = 5.0

Cards = list[dict[str, Any]]


def tail_config(settings: Settings) -> dict[str, Any]:
    """The service's client settings (brokers, security), for a reader that never joins nor commits."""
    return {
        **client_config(settings),
        "group.id": f"mmsent-inspect-{os.getpid()}",  # never used: assign() only, nothing committed
        "client.id": f"mmsent-inspect-{os.getpid()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "latest",
        "isolation.level": "read_committed",  # what the consumers' downstream sees: no aborted transactions
        "fetch.wait.max.ms": 100,
        "logger": LibrdkafkaLog(),
    }


class Tail:
    """Reads the topics on a thread of its own and hands each batch's cards to `hand_over`."""

    def __init__(self, settings: Settings, hand_over: Callable[[Cards], None], *,
                 posts_remembered: int = POSTS_REMEMBERED) -> None:
        self._settings = settings
        self._hand_over = hand_over
        self.posts = PostCache(posts_remembered)
        self._joiner = Joiner(self.posts)
        self._kinds = {settings.output_topic: Kind.EVENT, settings.dlq_topic: Kind.DEAD_LETTER}
        if settings.alert_topic:
            self._kinds[settings.alert_topic] = Kind.ALERT
        self._assigned: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmsent-inspect-tail", daemon=True)
        self.records_read = 0
        self.positions: dict[tuple[str, int], int] = {}  # the next offset to read, by (topic, partition)
        self.ready = threading.Event()  # set once every topic is assigned: what is written after it is seen

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        consumer = Consumer(tail_config(self._settings))
        try:
            refreshed = 0.0
            while not self._stop.is_set():
                if time.monotonic() - refreshed > REFRESH_S:
                    self._refresh(consumer)
                    refreshed = time.monotonic()
                self._step(consumer)
        finally:
            consumer.close()

    def _step(self, consumer: Consumer) -> None:
        """One batch; a fault is logged and the tail goes on (cards are built never raising: this is a bug's net)."""
        try:
            self._read(consumer)
        except Exception:
            log.exception("inspect_tail_batch_failed")
            self._stop.wait(1.0)

    def _refresh(self, consumer: Consumer) -> None:
        """Assign the partitions not assigned yet: the input a little before its end, the outputs at their end."""
        try:
            metadata = consumer.list_topics(timeout=ADMIN_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("inspect_metadata_failed", error=str(exc))
            return
        new: list[TopicPartition] = []
        missing = 0
        for topic in [self._settings.input_topic, *self._kinds]:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                missing += 1
                continue
            for partition in found.partitions:
                if (topic, partition) not in self._assigned:
                    new.append(self._start_of(consumer, topic, partition, len(found.partitions)))
        if new:
            consumer.incremental_assign(new)
            self._assigned.update((tp.topic, tp.partition) for tp in new)
            log.info("inspect_assigned", partitions=[f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in new])
        if not missing:
            self.ready.set()

    def _start_of(self, consumer: Consumer, topic: str, partition: int, partitions: int) -> TopicPartition:
        """The outputs from their end as it is now (a concrete offset: what is written after `ready` is read);
        the input from a little before its end, so that events of posts read before we started find them."""
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=ADMIN_TIMEOUT_S)
        if topic != self._settings.input_topic:
            return TopicPartition(topic, partition, high)
        return TopicPartition(topic, partition, max(low, high - self.posts.capacity // max(1, partitions)))

    def _read(self, consumer: Consumer) -> None:
        cards: Cards = []
        outputs: list[tuple[Record, Kind]] = []
        for message in consumer.consume(BATCH, 0.2):
            if message.error() is not None:
                continue
            kind_ts, ts = message.timestamp()
            topic, partition, offset = message.topic() or "", message.partition() or 0, message.offset() or 0
            headers = message.headers() or []
            record = Record(topic, partition, offset, ts if kind_ts and ts > 0 else None, message.value(),
                            tuple(headers.items() if isinstance(headers, dict) else headers))
            self.positions[(topic, partition)] = offset + 1
            if topic == self._settings.input_topic:
                self.posts.remember(record)  # posts first: an event of this same batch finds its post
            else:
                outputs.append((record, self._kinds[topic]))
        self.records_read += len(outputs)
        for record, kind in outputs:
            card = self._joiner.add(record, kind)
            if card is not None:
                cards.append(card)
        cards.extend(self._joiner.settle())
        if cards:
            self._hand_over(cards)


class GroupLag:
    """The consumers' group lag on the input topic: end offsets less committed offsets, summed, every `every_s`.
    Read-only: the admin API's offset fetch (no membership) and list_offsets."""

    def __init__(self, settings: Settings, report: Callable[[int | None], None], every_s: float = 5.0) -> None:
        self._settings = settings
        self._report = report
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmsent-inspect-lag", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(ADMIN_TIMEOUT_S * 3)

    def _run(self) -> None:
        config: dict[str, Any] = {**client_config(self._settings), "logger": LibrdkafkaLog()}
        admin = AdminClient(config)
        while not self._stop.wait(self._every_s):
            try:
                self._report(self.measure(admin))
            except Exception as exc:  # a broker that cannot answer: a gap in the chart, not a dead thread
                log.warning("inspect_lag_failed", error=repr(exc))
                self._report(None)

    def measure(self, admin: AdminClient) -> int:
        topic = self._settings.input_topic
        metadata = admin.list_topics(topic, timeout=ADMIN_TIMEOUT_S)
        partitions = [TopicPartition(topic, p) for p in sorted(metadata.topics[topic].partitions)]
        request = ConsumerGroupTopicPartitions(self._settings.group_id, partitions)
        committed_future = admin.list_consumer_group_offsets([request], request_timeout=ADMIN_TIMEOUT_S)
        committed = {tp.partition: tp.offset for tp in committed_future[self._settings.group_id].result(
            ).topic_partitions or []}
        ends = admin.list_offsets({tp: OffsetSpec.latest() for tp in partitions}, request_timeout=ADMIN_TIMEOUT_S)
        lag = 0
        for tp, future in ends.items():
            end = future.result().offset
            done = committed.get(tp.partition, -1)
            lag += max(0, end - done) if done >= 0 else max(0, end)
        return lag
