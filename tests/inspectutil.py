"""Helpers for the console's tests: posts on a real broker, and the events, alerts and dead letters the consumer
would write for them (its record shapes and headers), with their `source` pointing at the posts' real offsets."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message, Producer

from consumer.settings import Settings
from schemas import headers as wire
from tests.consumerutil import Topics
from tooling.embedded import create_topics

MODEL = {"name": "mmsent-test", "version": "t1"}


@dataclass
class ScoredPost:
    """One post and what the consumer said about it."""

    post_id: str
    text: str
    image_url: str | None = None
    label: str = "neutral"
    probability: float = 0.6
    text_label: str | None = None
    image_label: str | None = None
    alert: bool = False
    dead_letter: tuple[str, str] | None = None  # (code, message) instead of an event
    trace_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def topics_for(bootstrap: str, prefix: str) -> Topics:
    topics = Topics.named(prefix)
    create_topics(bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1, topics.alerts: 1})
    return topics


def inspect_settings(bootstrap: str, topics: Topics, redis_url: str | None, **extra: Any) -> Settings:
    return Settings(kafka_bootstrap_servers=bootstrap, input_topic=topics.posts, output_topic=topics.sentiment,
                    dlq_topic=topics.dlq, alert_topic=topics.alerts, group_id=topics.group, redis_url=redis_url,
                    fetch_allow_private=False, fetch_allow_cidrs="127.0.0.1/32",  # type: ignore[arg-type]
                    fetch_retries=0, inspect_port=0, **extra)


def _scores(label: str, probability: float) -> dict[str, float]:
    rest = (1 - probability) / 2
    return {name: (probability if name == label else rest) for name in ("negative", "neutral", "positive")}


def _produce(producer: Producer, topic: str, value: bytes, headers: list[tuple[str, bytes]]) -> Message:
    delivered: list[Message] = []
    producer.produce(topic, value=value, headers=headers, on_delivery=lambda err, msg: delivered.append(msg))
    producer.flush(30)
    assert delivered and delivered[0].error() is None, "the broker did not take the record"
    return delivered[0]


def event_of(post: ScoredPost, source: dict[str, Any]) -> dict[str, Any]:
    by_modality = {}
    if post.text_label:
        by_modality["text"] = _scores(post.text_label, 0.8)
    if post.image_label:
        by_modality["image"] = _scores(post.image_label, 0.8)
    return {"schema_version": 1, "post_id": post.post_id, "label": post.label,
            "scores": _scores(post.label, post.probability), "image_status": "ok" if post.image_url else "none",
            "model": MODEL, "source": source, "scored_at": datetime.now(UTC).isoformat(),
            "scores_by_modality": by_modality}


def publish(bootstrap: str, topics: Topics, posts: Sequence[ScoredPost]) -> None:
    """Each post on the input topic, then its event (and alert) or dead letter, as the consumer writes them."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for post in posts:
        traceparent = f"00-{post.trace_id}-{'ab' * 8}-01".encode()
        body = {"post_id": post.post_id, "text": post.text, "image_url": post.image_url}
        sent = _produce(producer, topics.posts, json.dumps(body).encode(), [(wire.TRACEPARENT, traceparent)])
        source = {"topic": topics.posts, "partition": sent.partition(), "offset": sent.offset()}
        if post.dead_letter:
            code, message = post.dead_letter
            letter = {"schema_version": 1, "error": {"code": code, "message": message}, "source": source,
                      "value_b64": None}
            written_ms = str(sent.timestamp()[1]).encode()
            _produce(producer, topics.dlq, json.dumps(letter).encode(),
                     [(wire.TRACEPARENT, traceparent), (wire.ERROR_CODE, code.encode()),
                      (wire.ERROR_MESSAGE, message.encode()), (wire.SOURCE_TIMESTAMP, written_ms)])
            continue
        event = event_of(post, source)
        headers = [(wire.TRACEPARENT, traceparent), (wire.MODEL, b"mmsent-test:t1")]
        _produce(producer, topics.sentiment, json.dumps(event).encode(), headers)
        if post.alert:
            reason = {"rule": "min_probability", "label": post.label, "probability": post.probability,
                      "threshold": 0.9, "min_precision": None, "calibration": None}
            _produce(producer, topics.alerts, json.dumps({**event, "alert": reason}).encode(), headers)
