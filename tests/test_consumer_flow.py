"""The consumer end to end on a real broker, a real Redis and a real image server, in this process.

The `Application` runs on a thread with the `tiny-random` model (loaded once for the module).
"""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from consumer.app import Application
from consumer.metrics import Metrics
from consumer.outputs import Output
from consumer.sink import Sink
from schemas.models import ImageStatus
from tests.consumerutil import (
    Outcome,
    Topics,
    all_committed,
    app_in_thread,
    committed_total,
    keys_for,
    make_settings,
    post,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.imageserver import ImageServer, image, sample_image, status
from tests.kafkautil import committed_offsets, create_topics, end_offsets, produce, read_all

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.fixture(scope="module")
def scorer() -> Any:
    from mmsent import Scorer

    return Scorer.load("tiny-random")


def _serve_images(server: ImageServer) -> dict[str, str]:
    urls = {
        "red": server.route("/red.jpg", image(sample_image("JPEG", color=(220, 30, 30)))),
        "blue": server.route("/blue.png", image(sample_image("PNG", color=(20, 30, 220)), "image/png")),
        "broken": server.route("/broken.jpg", image(b"\xff\xd8\xff\xe0 this is not really a jpeg")),
        "missing": server.route("/missing.jpg", status(404)),
    }
    for index in range(8):
        urls[f"u{index}"] = server.route(f"/u{index}.png", image(sample_image("PNG", color=(index * 30, 90, 10)),
                                                                 "image/png"))
    return {name: server.url(path) if path.startswith("/") else path for name, path in urls.items()}


def _image_for(urls: dict[str, str]) -> Any:
    def choose(i: int) -> str | None:
        if i % 10 in (0, 1, 2):
            return None
        if i % 10 in (3, 4):
            return urls["red"]  # a repeated image: one download, one CNN pass (or a few across batches)
        if i % 10 == 5:
            return urls["blue"]
        if i % 10 == 6:
            return urls[f"u{(i // 10) % 8}"]
        if i % 10 == 7:
            return urls["broken"] if i % 20 == 7 else urls["missing"]
        if i % 10 == 8:
            return "http://10.0.0.1/private.jpg"  # refused by the fetch policy
        return "ftp://images.example/x.jpg"  # not http(s): blocked, never fetched

    return choose


EXPECTED_STATUS = {0: "none", 1: "none", 2: "none", 3: "ok", 4: "ok", 5: "ok", 6: "ok", 7: "unavailable",
                   8: "blocked", 9: "blocked"}

BAD_RECORDS: list[tuple[bytes | None, str]] = [
    (b"not json at all", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"text": "no post id"}', "invalid_post"),
    (post("too-long", "x" * 600), "invalid_post"),
    (b"\xff\xfe\x00garbage", "invalid_utf8"),
    (None, "null_value"),
]


def test_every_post_yields_one_event_bad_records_dead_letter_and_offsets_commit(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, scorer: Any
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 3, topics.sentiment: 3, topics.dlq: 1, topics.alerts: 1})
    urls = _serve_images(image_server)
    count = 240
    values: list[bytes | None] = list(synthetic_posts(count, _image_for(urls)))
    for index, (value, _code) in enumerate(BAD_RECORDS):
        values.insert(37 * (index + 1), value)
    produce(kafka_bootstrap, topics.posts, values, keys=keys_for([v or b"" for v in values]))

    env = settings_env(kafka_bootstrap, topics, redis_url, max_text_chars=500, alert_topic=topics.alerts,
                       alert_label="positive", alert_min_probability=0.34)
    settings = make_settings(env)
    metrics = Metrics.get()
    cnn_before = metrics.cnn_images._value.get()
    started = time.monotonic()
    with app_in_thread(settings, scorer=scorer) as app:
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60), "not all offsets committed"
        elapsed = time.monotonic() - started
    assert app.rc == 0  # type: ignore[attr-defined]

    outcome = Outcome.read(kafka_bootstrap, topics)
    cnn_images = metrics.cnn_images._value.get() - cnn_before
    print(f"\n{count} posts + {len(BAD_RECORDS)} bad records -> {len(outcome.events)} events, "
          f"{len(outcome.dead_letters)} dead letters in {elapsed:.1f}s (incl. start-up); "
          f"downloads of red.jpg: {image_server.count('/red.jpg')}, images through the CNN: {cnn_images:.0f}")

    # exactly one event per post, with the contract's fields and the input's coordinates
    by_id = Counter(event.post_id for event in outcome.events)
    assert set(by_id) == {f"p{i}" for i in range(count)} and set(by_id.values()) == {1}
    inputs = {(r.partition, r.offset): r for r in outcome.inputs}
    for event in outcome.events:
        record = inputs[(event.source.partition, event.source.offset)]
        assert event.source.topic == topics.posts
        assert post_id_of(record.value) == event.post_id
        assert event.model.name == scorer.info["name"] and event.model.version == scorer.info["version"]
        assert event.scored_at.tzinfo is not None
        assert event.label.value == max(event.scores.model_dump().items(), key=lambda kv: kv[1])[0]
        expected = EXPECTED_STATUS[int(event.post_id[1:]) % 10]
        assert event.image_status.value == expected, (event.post_id, event.image_status)
    assert Counter(e.image_status for e in outcome.events)[ImageStatus.OK] == count * 4 // 10
    events_raw = read_all(kafka_bootstrap, topics.sentiment)
    assert all(r.key == post_id_of_event(r.value) for r in events_raw)  # keyed by post_id

    # bad records: dead letters with the error, the coordinates, the original value and key
    assert sorted(d.error.code for d in outcome.dead_letters) == sorted(code for _v, code in BAD_RECORDS)
    for letter in outcome.dead_letters:
        record = inputs[(letter.source.partition, letter.source.offset)]
        assert letter.source.topic == topics.posts
        assert letter.original_value() == record.value
        assert letter.key_b64 == base64.b64encode(record.key or b"").decode()

    # the alert rule routed exactly the matching events
    alerts = read_all(kafka_bootstrap, topics.alerts)
    matching = {e.post_id for e in outcome.events if e.label.value == "positive" and e.scores.positive >= 0.34}
    assert {post_id_of(a.value) for a in alerts} == matching and len(alerts) == len(matching)

    # repeated images: far fewer downloads than posts with them; the cache held their embeddings
    assert image_server.count("/red.jpg") < count * 2 // 10 // 2
    assert cnn_images <= 10  # red, blue, u0..u7: each through the CNN once
    assert committed_offsets(kafka_bootstrap, topics.group, topics.posts) == end_offsets(kafka_bootstrap, topics.posts)

    # a second run of the group produces nothing new
    with app_in_thread(settings, scorer=scorer) as again:
        assert wait_until(lambda: bool(again.ready), timeout=30)
        time.sleep(2.0)
    assert again.rc == 0  # type: ignore[attr-defined]
    assert len(read_all(kafka_bootstrap, topics.sentiment)) == len(outcome.events)
    assert len(read_all(kafka_bootstrap, topics.dlq)) == len(outcome.dead_letters)


def post_id_of(value: bytes | None) -> str:
    import json

    return str(json.loads(value or b"{}")["post_id"])


def post_id_of_event(value: bytes | None) -> bytes:
    return post_id_of(value).encode()


class PoisonScorer:
    """The real scorer, except that any batch holding a post with the marker text raises."""

    def __init__(self, inner: Any, marker: str = "POISON-PILL") -> None:
        self.inner = inner
        self.marker = marker
        self.calls = 0
        self.info = inner.info
        self.image_encoder_id = inner.image_encoder_id

    def score(self, posts: Any) -> Any:
        self.calls += 1
        if any(self.marker in p["text"] for p in posts):
            raise RuntimeError("tensor shape mismatch (simulated poison post)")
        return self.inner.score(posts)

    def embed_images(self, images: Any) -> Any:
        return self.inner.embed_images(images)


def test_a_poison_post_is_bisected_out_dead_lettered_and_the_rest_scored(
    kafka_bootstrap: str, unique_name: str, scorer: Any
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1})
    values = synthetic_posts(60, lambda i: None)
    poison = {7: post("poison-a", "this one is a POISON-PILL"), 41: post("poison-b", "POISON-PILL again")}
    for index, value in sorted(poison.items()):
        values.insert(index, value)
    produce(kafka_bootstrap, topics.posts, values, keys=keys_for(values))
    wrapped = PoisonScorer(scorer)
    settings = make_settings(settings_env(kafka_bootstrap, topics, None, max_batch_size=32, max_wait_ms=200))
    with app_in_thread(settings, scorer=wrapped, cache_factory=lambda _s: None):
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    outcome = Outcome.read(kafka_bootstrap, topics)
    print(f"\n62 posts, 2 poison: {len(outcome.events)} events, {len(outcome.dead_letters)} dead letters, "
          f"{wrapped.calls} scorer calls")
    assert sorted(e.post_id for e in outcome.events) == sorted(f"p{i}" for i in range(60))
    assert sorted(d.error.code for d in outcome.dead_letters) == ["model_error", "model_error"]
    assert sorted(post_id_of(d.original_value()) for d in outcome.dead_letters) == ["poison-a", "poison-b"]
    assert all("simulated poison" in d.error.message for d in outcome.dead_letters)
    assert not outcome.missing()


class SlowScorer(PoisonScorer):
    """The real scorer, slowed down, watching how much work the poll loop holds in flight."""

    def __init__(self, inner: Any, app_ref: list[Application], delay_s: float) -> None:
        super().__init__(inner, marker="\x00never")
        self.app_ref = app_ref
        self.delay_s = delay_s
        self.max_in_flight_seen = 0
        self.lock = threading.Lock()

    def score(self, posts: Any) -> Any:
        if self.app_ref:
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.app_ref[0].tracker.in_flight)
        time.sleep(self.delay_s)
        return super().score(posts)


def test_backpressure_pauses_the_partitions_and_resumes_without_losing_anything(
    kafka_bootstrap: str, unique_name: str, scorer: Any
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 3, topics.sentiment: 3, topics.dlq: 1})
    values = synthetic_posts(120, lambda i: None)
    produce(kafka_bootstrap, topics.posts, values, keys=keys_for(values))
    holder: list[Application] = []
    slow = SlowScorer(scorer, holder, delay_s=0.03)
    settings = make_settings(settings_env(kafka_bootstrap, topics, None, max_batch_size=4, max_in_flight=12,
                                          max_wait_ms=5))
    with app_in_thread(settings, scorer=slow, cache_factory=lambda _s: None) as app:
        holder.append(app)
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
        assert app.pausing is not None
        pauses, resumes = app.pausing.pauses, app.pausing.resumes
    outcome = Outcome.read(kafka_bootstrap, topics)
    print(f"\nbackpressure: {pauses} pauses, {resumes} resumes, at most {slow.max_in_flight_seen} in flight "
          f"(limit 12), {len(outcome.events)} events")
    assert pauses >= 1 and resumes >= 1
    assert slow.max_in_flight_seen <= 12
    assert sorted(e.post_id for e in outcome.events) == sorted(f"p{i}" for i in range(120))


class TurnsFatalSink(Sink):
    """The first producer turns fatal after 30 records and raises from `produce` before any error callback has run,
    as librdkafka does once a broker restart has cost it its idempotence state."""

    made = 0

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        TurnsFatalSink.made += 1
        self._records_left = 30 if TurnsFatalSink.made == 1 else None

    def produce(self, output: Output, on_delivery: Any = None) -> None:
        if self._records_left is not None:
            if self._records_left == 0:
                # what confluent-kafka raises then: the code _FATAL, without the fatal flag
                raise KafkaException(KafkaError(KafkaError._FATAL, "Unable to produce message: Local: Fatal error"))
            self._records_left -= 1
        super().produce(output, on_delivery)


def test_a_producer_that_turns_fatal_mid_batch_is_replaced_and_nothing_is_lost(
    kafka_bootstrap: str, unique_name: str, scorer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 3, topics.sentiment: 3, topics.dlq: 1})
    values = synthetic_posts(120, lambda i: None)
    produce(kafka_bootstrap, topics.posts, values, keys=keys_for(values))
    monkeypatch.setattr("consumer.app.Sink", TurnsFatalSink)
    TurnsFatalSink.made = 0
    settings = make_settings(settings_env(kafka_bootstrap, topics, None, max_batch_size=8, max_wait_ms=5))
    with app_in_thread(settings, scorer=scorer, cache_factory=lambda _s: None) as app:
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    assert app.rc == 0  # type: ignore[attr-defined]
    assert TurnsFatalSink.made == 2  # replaced once, not exited
    outcome = Outcome.read(kafka_bootstrap, topics)
    assert {e.post_id for e in outcome.events} == {f"p{i}" for i in range(120)}  # at least once: repeats allowed


def test_scoring_goes_on_with_images_while_redis_is_down(
    kafka_bootstrap: str, redis_server: Any, image_server: ImageServer, unique_name: str, scorer: Any
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1})
    urls = _serve_images(image_server)
    values = synthetic_posts(80, lambda i: urls["red"] if i % 2 else urls["blue"])
    produce(kafka_bootstrap, topics.posts, values, keys=keys_for(values))
    redis_server.stop()  # the cache is configured but does not answer
    settings = make_settings(settings_env(kafka_bootstrap, topics, redis_server.url))
    with app_in_thread(settings, scorer=scorer):
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    outcome = Outcome.read(kafka_bootstrap, topics)
    assert sorted(e.post_id for e in outcome.events) == sorted(f"p{i}" for i in range(80))
    assert {e.image_status for e in outcome.events} == {ImageStatus.OK}


def test_exactly_once_through_a_rebalance_when_a_second_member_joins(
    kafka_bootstrap: str, unique_name: str, scorer: Any
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 4, topics.sentiment: 4, topics.dlq: 1})
    values = synthetic_posts(1200, lambda i: None)
    produce(kafka_bootstrap, topics.posts, values, keys=keys_for(values))
    base = settings_env(kafka_bootstrap, topics, None, processing_guarantee="exactly_once", max_batch_size=8)
    slow = SlowScorer(scorer, [], delay_s=0.01)
    with app_in_thread(make_settings({**base, "MMSENT_TRANSACTIONAL_ID": f"{unique_name}-a"}), scorer=slow,
                       cache_factory=lambda _s: None):
        assert wait_until(lambda: committed_total(kafka_bootstrap, topics) >= 100, timeout=60)
        with app_in_thread(make_settings({**base, "MMSENT_TRANSACTIONAL_ID": f"{unique_name}-b"}), scorer=slow,
                           cache_factory=lambda _s: None) as second:
            assert wait_until(lambda: bool(second.ready), timeout=30), "the second member never got partitions"
            assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=90)
    committed_view = Outcome.read(kafka_bootstrap, topics, isolation_level="read_committed")
    raw_view = Outcome.read(kafka_bootstrap, topics)
    print(f"\nexactly once through a rebalance: read_committed {len(committed_view.events)} events for 1200 posts "
          f"({committed_view.repeats()} repeats); read_uncommitted {len(raw_view.events)}")
    assert Counter(e.post_id for e in committed_view.events) == Counter(f"p{i}" for i in range(1200))
