"""Moderators' verdicts joined to this group's recent events: live alert precision and recall per model.

    poll loop: an event acknowledged ──remember(post_id, model, label)──▶ hand-over deque (an append, nothing more)
                                                                                │
    FeedbackJoiner thread (its own consumer, group `<group>.feedback`):          ▼
      ├─ drain the hand-over ──▶ RecentEvents (the last `feedback_memory_posts` posts) + Redis SET EX (best effort)
      └─ consume(feedback topic) ──decode_verdict──┬─ not a verdict ──▶ mmsent_feedback_unmatched_total{invalid}, log
                                                   └─ post_id: memory ─miss─▶ Redis MGET ─miss─▶ ...{reason="unknown"}
                                                                │hit              │hit
                                                                ▼                 ▼
                                      mmsent_feedback_total{model, predicted, actual}; the verdict's offset stored
                                      (auto-committed: at least once, a verdict may count twice after a crash)

A thread of its own rather than a zero-timeout poll in the loop's tick: the join reads and writes Redis (round trips
of up to its timeout when Redis is slow), which must never hold up the poll loop; the loop's only cost is one deque
append per event, and the memory is touched by this thread alone (no lock). Redis lets the members of a group share
what they scored (a verdict lands on any member), under keys that expire after FEEDBACK_TTL_S; without Redis, or
while it fails, each member joins against its own memory. A new feedback group starts at the topic's end: a verdict
published before it existed cannot match an event remembered since.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import redis
import structlog
from cachetools import LRUCache
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from consumer.cache import CircuitBreaker
from consumer.kafkaconfig import feedback_consumer_config
from consumer.metrics import Metrics
from consumer.settings import Settings
from schemas.decode import BadRecord
from schemas.feedback import FeedbackVerdict, decode_verdict

log = structlog.get_logger("consumer")

FEEDBACK_TTL_S = 24 * 3600  # verdicts come within hours of the post; a day of events is what the group shares
POLL_S = 0.2  # the thread's consume timeout: how soon it sees a stop request
MAX_VERDICTS = 500  # per consume call
REDIS_TIMEOUT_S = 0.5
REDIS_RETRY_AFTER_S = 5.0

Prediction = tuple[str, str]  # (model name:version, predicted label)


class SharedMemory:
    """The group's recent events in Redis, best effort: every failure is a miss, and after one the breaker keeps
    Redis alone for REDIS_RETRY_AFTER_S."""

    def __init__(self, url: str, group_id: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                            socket_connect_timeout=REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 1))
        self._prefix = f"mmsent:feedback:{group_id}:"
        self._breaker = CircuitBreaker(REDIS_RETRY_AFTER_S)

    def put(self, events: dict[str, Prediction]) -> None:
        def write() -> None:
            pipe = self._client.pipeline(transaction=False)
            for post_id, (model, label) in events.items():
                pipe.set(self._prefix + post_id, f"{model}\n{label}", ex=FEEDBACK_TTL_S)
            pipe.execute()

        if events:
            self._guarded("put", write)

    def get(self, post_ids: list[str]) -> dict[str, Prediction]:
        if not post_ids:
            return {}
        values = self._guarded("get", lambda: self._client.mget([self._prefix + p for p in post_ids]))
        found: dict[str, Prediction] = {}
        for post_id, value in zip(post_ids, values or [], strict=False):
            if not isinstance(value, bytes):
                continue
            model, _, label = value.decode("utf-8", "replace").partition("\n")
            if model and label:
                found[post_id] = (model, label)
        return found

    def close(self) -> None:
        self._client.close()

    def _guarded(self, op: str, call: Any) -> Any:
        if not self._breaker.allow():
            return None
        try:
            result = call()
        except Exception as exc:  # Redis is optional: whatever went wrong, the answer is "not shared"
            if self._breaker.record_failure():
                log.warning("feedback_memory_unshared", op=op, error=f"{type(exc).__name__}: {exc}"[:300],
                            retry_after_s=REDIS_RETRY_AFTER_S)
            return None
        if self._breaker.record_success():
            log.info("feedback_memory_shared_again", op=op)
        return result


class FeedbackJoiner:
    """Reads the feedback topic on its own thread and counts each verdict against the event it judges."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        assert settings.feedback_topic is not None
        self.topic = settings.feedback_topic
        self.metrics = metrics
        self.assigned = threading.Event()  # set once this member holds feedback partitions
        self._handover: collections.deque[tuple[str, Prediction]] = collections.deque(
            maxlen=settings.feedback_memory_posts)
        self._recent: LRUCache[str, Prediction] = LRUCache(maxsize=settings.feedback_memory_posts)
        self._shared = SharedMemory(settings.redis_url, settings.group_id) if settings.redis_url else None
        self._consumer = Consumer(feedback_consumer_config(settings, error_cb=self._on_error))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmsent-feedback", daemon=True)

    def start(self) -> FeedbackJoiner:
        self._consumer.subscribe([self.topic], on_assign=self._on_assign)
        self._thread.start()
        log.info("feedback_joining", topic=self.topic, shared=self._shared is not None)
        return self

    def remember(self, post_id: str, model: str, label: str) -> None:
        """On the poll loop: an event this process produced (the latest of a post wins)."""
        self._handover.append((post_id, (model, label)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._shared is not None:
            self._shared.close()

    # -- the thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._take_handover()
                messages = self._consumer.consume(MAX_VERDICTS, POLL_S)
                self._take_handover()  # events acknowledged while it waited, before the verdicts that follow them
                self._join([m for m in messages if self._readable(m)])
            except Exception:  # a bug here must not stop the joiner, nor ever the consumer: log, wait, go on
                log.exception("feedback_joiner_failed")
                self._stop.wait(1.0)
        self._consumer.close()  # commits the stored offsets

    def _take_handover(self) -> None:
        taken: dict[str, Prediction] = {}
        while self._handover:
            post_id, prediction = self._handover.popleft()
            self._recent[post_id] = taken[post_id] = prediction
        if self._shared is not None:
            self._shared.put(taken)

    def _readable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("feedback_consume_error", error=str(error))
        return False

    def _join(self, messages: list[Message]) -> None:
        verdicts: list[tuple[Message, FeedbackVerdict]] = []
        for message in messages:
            try:
                verdicts.append((message, decode_verdict(message.value())))
            except BadRecord as bad:
                self.metrics.feedback_unmatched.labels("invalid").inc()
                log.warning("feedback_invalid", code=bad.code, reason=bad.message[:300], topic=message.topic(),
                            partition=message.partition(), offset=message.offset())
        unknown = [v.post_id for _, v in verdicts if v.post_id not in self._recent]
        shared = self._shared.get(unknown) if self._shared is not None else {}
        for _, verdict in verdicts:
            prediction = self._recent.get(verdict.post_id) or shared.get(verdict.post_id)
            if prediction is None:
                self.metrics.feedback_unmatched.labels("unknown").inc()
            else:
                self.metrics.feedback.labels(prediction[0], prediction[1], verdict.label.value).inc()
        if messages:
            self._consumer.store_offsets(offsets=_next_offsets(messages))

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("feedback_partitions_assigned", partitions=sorted(tp.partition for tp in partitions))
        self.assigned.set()

    def _on_error(self, error: KafkaError) -> None:
        log.warning("feedback_kafka_error", error=str(error), fatal=error.fatal())


def _next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """Per partition, the offset after the last message handled (what a commit records)."""
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        topic, partition, offset = m.topic(), m.partition(), m.offset()
        if topic is not None and partition is not None and offset is not None:
            last[(topic, partition)] = max(offset, last.get((topic, partition), -1))
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
