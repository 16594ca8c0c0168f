"""Faults: crashes, a broker restart, a Redis outage, a hostile image server, a poison post and a group that
scales, each with a stream of posts in flight, and each ending with `mmsent reconcile` reporting zero lost.

The consumer runs as real processes (`python -m consumer consume`, the `tiny-random` model: small random weights,
fast, never a real score) against the real broker, Redis and a local image server. Figures are printed (`-s`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.consumerutil import (
    ConsumerProcess,
    Outcome,
    SteadyProducer,
    Topics,
    all_committed,
    app_in_thread,
    make_settings,
    settings_env,
    started_member,
    synthetic_posts,
    wait_until,
)
from tests.imageserver import ImageServer, drop, garbage, image, sample_image, slow, status
from tests.kafkautil import create_topics, produce
from tooling.embedded import NoidaKafka, RedisProcess
from tooling.reconcile import Report, reconcile, render_table

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

START_TIMEOUT_S = 90  # a consumer process imports torch and loads the model before it joins
BAD_RECORDS = [b"not json", b"[1,2,3]", b'{"text": "no post id"}', b"\xff\xfe\x00"]


def _with_bad_records(values: list[bytes], every: int = 97) -> list[bytes]:
    out: list[bytes] = []
    for index, value in enumerate(values):
        out.append(value)
        if index % every == every - 1:
            out.append(BAD_RECORDS[(index // every) % len(BAD_RECORDS)])
    return out


def _image_urls(server: ImageServer, count: int = 6) -> list[str]:
    return [server.route(f"/f{i}.jpg", image(sample_image("JPEG", color=(i * 30, 90, 160)))) for i in range(count)]


def _topics(bootstrap: str, name: str, partitions: int = 3) -> Topics:
    topics = Topics.named(name)
    create_topics(bootstrap, {topics.posts: partitions, topics.sentiment: partitions, topics.dlq: 1})
    return topics


def _reconciled(bootstrap: str, topics: Topics, scenario: str, started: float, expected_inputs: int,
                **figures: object) -> Report:
    report = reconcile({"bootstrap.servers": bootstrap}, topics.posts, topics.sentiment, topics.dlq, timeout_s=60)
    totals = report.as_dict()["totals"]
    extra = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[{scenario}] posts={totals['inputs']} lost={totals['lost']} repeats={totals['repeats']} "
          f"dead_letters={totals['dead_letters']} seconds={time.monotonic() - started:.1f} {extra}")
    print(render_table(report))
    assert totals["inputs"] == expected_inputs
    assert report.ok, render_table(report)
    return report


def _drain(bootstrap: str, topics: Topics, stream: SteadyProducer, consumer: ConsumerProcess, timeout: float) -> None:
    stream.join(timeout)
    assert stream.produced == len(stream.values), "the producer did not finish"
    if not wait_until(lambda: all_committed(bootstrap, topics), timeout, interval=1.0):
        pytest.fail(f"offsets never reached the end\n{consumer.tail()}")


def _start(env: dict[str, str], log: Path) -> ConsumerProcess:
    return started_member(env, log, START_TIMEOUT_S)


def test_sigkill_five_times_at_random_moments_loses_nothing(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    topics = _topics(kafka_bootstrap, unique_name)
    urls = _image_urls(image_server)
    values = _with_bad_records(synthetic_posts(2000, lambda i: urls[i % len(urls)] if i % 3 else None))
    # A crashed pod restarts under the same name: static membership hands it its partitions back at once.
    env = settings_env(kafka_bootstrap, topics, redis_url, group_instance_id="member-0")
    rng = random.Random(20261128)
    started = time.monotonic()
    stream = SteadyProducer(kafka_bootstrap, topics.posts, values, per_burst=40, interval_s=0.1).start()
    recoveries = []
    for kill in range(5):
        restarted = time.monotonic()
        consumer = _start(env, tmp_path / f"consumer-{kill}.log")
        recoveries.append(time.monotonic() - restarted)
        time.sleep(rng.uniform(0.5, 4.0))
        consumer.kill()  # SIGKILL: no drain, no commit, no goodbye to the group
    final = _start(env, tmp_path / "consumer-final.log")
    try:
        _drain(kafka_bootstrap, topics, stream, final, timeout=180)
    finally:
        final.stop()
    _reconciled(kafka_bootstrap, topics, "sigkill x5", started, len(values),
                recover_s_max=f"{max(recoveries):.1f}")


def test_broker_stopped_and_started_mid_stream(
    kafka_broker: NoidaKafka, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    topics = _topics(bootstrap, unique_name)
    urls = _image_urls(image_server)
    values = _with_bad_records(synthetic_posts(4000, lambda i: urls[i % len(urls)] if i % 2 else None))
    consumer = _start(settings_env(bootstrap, topics, redis_url), tmp_path / "consumer.log")
    started = time.monotonic()
    try:
        first, second = values[:3000], values[3000:]
        produce(bootstrap, topics.posts, first)  # a backlog: the consumer is busy producing events
        time.sleep(0.5)
        kafka_broker.stop()  # SIGTERM: the broker keeps its data across a graceful stop
        down = time.monotonic()
        time.sleep(3.0)
        kafka_broker.start()
        outage_s = time.monotonic() - down
        stream = SteadyProducer(bootstrap, topics.posts, second, per_burst=50, interval_s=0.05).start()
        stream.join(120)
        stream.values = values  # `_drain` checks all were produced: both halves
        stream.produced = len(values)
        _drain(bootstrap, topics, stream, consumer, timeout=180)
        assert consumer.process.poll() is None, "the consumer died with the broker instead of reconnecting"
    finally:
        consumer.stop()
    replaced = len(consumer.events("producer_failed_replacing"))
    _reconciled(bootstrap, topics, "broker restart", started, len(values), broker_down_s=f"{outage_s:.1f}",
                producers_replaced=replaced)


def test_redis_stopped_and_started_mid_stream(
    kafka_bootstrap: str, redis_server: RedisProcess, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    topics = _topics(kafka_bootstrap, unique_name)
    urls = _image_urls(image_server, count=3)
    values = synthetic_posts(1500, lambda i: urls[i % len(urls)])
    consumer = _start(settings_env(kafka_bootstrap, topics, redis_server.url), tmp_path / "consumer.log")
    started = time.monotonic()
    stream = SteadyProducer(kafka_bootstrap, topics.posts, values, per_burst=30, interval_s=0.05).start()
    try:
        time.sleep(2.0)
        redis_server.stop()
        time.sleep(4.0)
        redis_server.start()
        _drain(kafka_bootstrap, topics, stream, consumer, timeout=180)
    finally:
        consumer.stop()
    outcome = Outcome.read(kafka_bootstrap, topics)
    statuses = {e.image_status.value for e in outcome.events}
    _reconciled(kafka_bootstrap, topics, "redis outage", started, len(values),
                image_requests=image_server.count(), image_status=sorted(statuses))
    # Without Redis the consumer fetched more, but every post was still scored with its image.
    assert statuses == {"ok"}


def test_image_server_stalls_errors_drops_and_serves_garbage(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    topics = _topics(kafka_bootstrap, unique_name)
    good = image_server.route("/good.jpg", image(sample_image("JPEG")))
    hostile = [
        image_server.route("/stall.jpg", slow(30.0, image(sample_image("JPEG")))),
        image_server.route("/500.jpg", status(500)),
        image_server.route("/drop.jpg", drop()),
        image_server.route("/garbage.jpg", garbage()),
        image_server.route("/text.jpg", image(b"this is not an image at all", "image/jpeg")),
    ]
    urls = [good, *hostile]
    values = synthetic_posts(600, lambda i: urls[i % len(urls)])
    env = settings_env(kafka_bootstrap, topics, redis_url, fetch_total_timeout_s=2, fetch_read_timeout_s=1,
                       max_in_flight=600)
    started = time.monotonic()
    with app_in_thread(make_settings(env)):
        stream = SteadyProducer(kafka_bootstrap, topics.posts, values, per_burst=100, interval_s=0.01).start()
        stream.join(60)
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 180, interval=1.0)
    outcome = Outcome.read(kafka_bootstrap, topics)
    by_url = dict(zip((f"p{i}" for i in range(len(values))), (urls[i % len(urls)] for i in range(len(values))),
                      strict=True))
    for event in outcome.events:
        expected = "ok" if by_url[event.post_id] == good else "unavailable"
        assert event.image_status.value == expected, (event.post_id, by_url[event.post_id], event.image_status)
    _reconciled(kafka_bootstrap, topics, "hostile image server", started, len(values),
                requests=image_server.count())


class _PoisonScorer:
    """The real model, except that a post whose text holds the marker makes it raise (fault injection)."""

    def __init__(self, marker: str) -> None:
        from mmsent import Scorer

        self._scorer = Scorer.load("tiny-random")
        self._marker = marker
        self.info = self._scorer.info
        self.image_encoder_id = self._scorer.image_encoder_id
        self.labels = self._scorer.labels
        self.embed_images: Callable[..., object] = self._scorer.embed_images

    def score(self, posts: list[dict[str, object]]) -> list[object]:
        if any(self._marker in str(p.get("text")) for p in posts):
            raise RuntimeError("injected model failure")
        return list(self._scorer.score(posts))


def test_a_post_that_makes_the_model_raise_is_the_only_dead_letter(
    kafka_bootstrap: str, redis_url: str, unique_name: str
) -> None:
    topics = _topics(kafka_bootstrap, unique_name)
    values = synthetic_posts(500, lambda i: None)
    poison_index = 321
    values[poison_index] = values[poison_index].replace(b'"text": "', b'"text": "POISON ')
    started = time.monotonic()
    env = settings_env(kafka_bootstrap, topics, redis_url, max_batch_size=32)
    with app_in_thread(make_settings(env), scorer=_PoisonScorer("POISON")):
        SteadyProducer(kafka_bootstrap, topics.posts, values, per_burst=100, interval_s=0.01).start().join(60)
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 120, interval=1.0)
    outcome = Outcome.read(kafka_bootstrap, topics)
    assert [d.error.code for d in outcome.dead_letters] == ["model_error"]
    assert outcome.dead_letters[0].original_value() == values[poison_index]
    assert len({e.post_id for e in outcome.events}) == len(values) - 1
    _reconciled(kafka_bootstrap, topics, "poison post", started, len(values))


def test_group_scales_from_one_to_three_and_back(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    topics = _topics(kafka_bootstrap, unique_name, partitions=6)
    urls = _image_urls(image_server)
    values = synthetic_posts(3000, lambda i: urls[i % len(urls)] if i % 4 == 0 else None)
    env = settings_env(kafka_bootstrap, topics, redis_url)
    started = time.monotonic()
    stream = SteadyProducer(kafka_bootstrap, topics.posts, values, per_burst=40, interval_s=0.05).start()
    first = _start(env, tmp_path / "member-0.log")
    extra = [ConsumerProcess(env, tmp_path / f"member-{k}.log") for k in (1, 2)]
    try:
        spread = wait_until(lambda: all(len(c.assigned()) == 2 for c in (first, *extra)), START_TIMEOUT_S)
        assert spread, "three members did not split six partitions two each:\n" + "\n".join(
            f"{c.log_path.name}: {c.assigned()}" for c in (first, *extra))
        time.sleep(2.0)
        for member in extra:
            member.stop()  # scale down: SIGTERM, drain, commit, leave the group
            assert member.process.returncode == 0, member.tail()
        assert wait_until(lambda: len(first.assigned()) == 6, 60), first.tail()
        _drain(kafka_bootstrap, topics, stream, first, timeout=180)
    finally:
        for member in (first, *extra):
            member.stop()
    _reconciled(kafka_bootstrap, topics, "scale 1-3-1", started, len(values))
