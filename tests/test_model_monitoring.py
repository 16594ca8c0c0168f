"""Monitoring of the model itself (issue 27): drift against the model's reference, and moderators' verdicts joined to
the events, through a real consumer on the real broker (and Redis).

The drift test runs the packaged default model and its shipped reference (the out-of-fold predictions of its
cross-validation) on real MVSA-Single posts served from a loopback image server, then on the same captions with every
image one grey placeholder: a stand-in for a CDN that serves placeholders. It needs ../shared/data (the project never
ships it) and skips cleanly without it. Random weights (tiny-random) would not make this test mean anything: their
predictions hardly move with the images.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client import REGISTRY
from scipy.spatial.distance import jensenshannon

from consumer.app import Application
from consumer.drift import UPDATE_EVERY, DriftWindow
from consumer.errors import EXIT_CONFIGURATION
from mmsent import Reference
from tests.consumerutil import (
    Topics,
    all_committed,
    app_in_thread,
    make_settings,
    post,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.imageserver import ImageServer, image
from tests.kafkautil import create_topics, produce, read_all

pytestmark = [pytest.mark.kafka]

MVSA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvsa-single"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "mmsent" / "models" / "default"
# The alert's threshold on mmsent_prediction_drift (k8s/monitoring's PrometheusRule uses the same): above the noise
# of a full default window (2,000: mean 0.048, p99 0.066) and above in-sample training posts (0.17 at 400), below a
# stream of grey placeholders (0.28).
DRIFT_ALERT_THRESHOLD = 0.22
WINDOW = 400  # the test's window: the noise of 400 predictions drawn from the reference is 0.11 (p99 0.15)


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _drift(model: str) -> float | None:
    return REGISTRY.get_sample_value("mmsent_prediction_drift", {"model": model})


# -- drift ---------------------------------------------------------------------------------------------------------


def test_the_shipped_reference_is_the_default_models_out_of_fold_predictions() -> None:
    """reference.json holds what train --folds writes: the out-of-fold probabilities, binned, at the calibration's
    temperature."""
    reference = Reference.load(DEFAULT_MODEL)
    assert reference is not None
    oof = np.load(DEFAULT_MODEL / "oof.npz")["both"]
    temperature = json.loads((DEFAULT_MODEL / "calibration.json").read_text())["temperature"]
    logits = np.log(np.clip(oof.astype(np.float64), 1e-12, None)) / temperature
    probs = np.exp(logits - logits.max(1, keepdims=True))
    again = Reference.from_probabilities(probs / probs.sum(1, keepdims=True), reference.labels, "test")
    assert reference.n == len(oof) == 4000
    assert np.array_equal(again.counts, reference.counts)


def test_a_window_drawn_from_the_reference_stays_under_the_threshold_and_a_skewed_one_does_not() -> None:
    """The noise floor: windows of the default size sampled from the reference itself read far below the alert;
    the same window with the label mix moved by a third (confident positives turned hesitant negatives) above it."""
    reference = Reference.load(DEFAULT_MODEL)
    assert reference is not None
    rng = np.random.default_rng(7)
    expected = reference.distribution()
    floor = [jensenshannon(rng.multinomial(2000, expected) / 2000, expected, base=2) for _ in range(100)]
    assert max(floor) < DRIFT_ALERT_THRESHOLD / 2

    window = DriftWindow(reference, 2000)
    for i in range(2000):
        label, top = ("negative", 0.45) if i % 3 == 0 else ("positive", 0.93)
        window.add(label, top)
    assert window.distance() > DRIFT_ALERT_THRESHOLD


@pytest.mark.skipif(not (MVSA / "train.jsonl").is_file(), reason="needs ../shared/data/mvsa-single")
def test_drift_stays_low_on_posts_like_the_training_data_and_rises_on_grey_placeholders(
    kafka_bootstrap: str, image_server: ImageServer, unique_name: str
) -> None:
    from mmsent import Scorer

    rows = [json.loads(line) for line in (MVSA / "train.jsonl").read_text().splitlines()]
    random.Random(1).shuffle(rows)
    rows = rows[:WINDOW]
    for row in rows:
        image_server.route(f"/mvsa/{row['id']}.jpg", image((MVSA / row["image"]).read_bytes()))
    grey = io.BytesIO()
    Image.new("RGB", (224, 224), (128, 128, 128)).save(grey, format="JPEG")
    placeholder = image_server.route("/placeholder.jpg", image(grey.getvalue()))

    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1})
    settings = make_settings(settings_env(kafka_bootstrap, topics, None, drift_window=WINDOW, max_batch_size=32))
    scorer = Scorer.load()
    model = f"{scorer.info['name']}:{scorer.info['version']}"
    assert WINDOW % UPDATE_EVERY == 0  # the last post of each phase updates the gauge

    def events() -> float:
        return sum(_sample("mmsent_events_produced_total", {"label": label, "model": model})
                   for label in scorer.labels)

    before = events()
    with app_in_thread(settings, scorer=scorer):
        normal = [post(f"n{row['id']}", row["text"], image_server.url(f"/mvsa/{row['id']}.jpg")) for row in rows]
        produce(kafka_bootstrap, topics.posts, normal)
        assert wait_until(lambda: events() - before >= WINDOW, timeout=120), "the normal posts were not all scored"
        low = _drift(model)
        produce(kafka_bootstrap, topics.posts, [post(f"g{row['id']}", row["text"], placeholder) for row in rows])
        assert wait_until(lambda: events() - before >= 2 * WINDOW, timeout=120), "the grey posts were not all scored"
        high = _drift(model)
    print(f"\ndrift over {WINDOW} predictions: MVSA posts {low:.4f}, grey placeholders {high:.4f} "
          f"(threshold {DRIFT_ALERT_THRESHOLD})")
    assert low is not None and low < DRIFT_ALERT_THRESHOLD
    assert high is not None and high > DRIFT_ALERT_THRESHOLD


# -- feedback ------------------------------------------------------------------------------------------------------


@pytest.mark.redis
def test_verdicts_count_against_the_events_they_judge(
    kafka_bootstrap: str, redis_url: str, unique_name: str
) -> None:
    """Verdicts for scored posts count per model, predicted and given label as the events read back imply; verdicts
    for posts never scored count as unknown, messages that are not verdicts as invalid; the group's events are
    shared in Redis."""
    topics = Topics.named(unique_name)
    feedback_topic = f"{unique_name}-feedback"
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1, feedback_topic: 2})
    count = 60
    produce(kafka_bootstrap, topics.posts, synthetic_posts(count, lambda _i: None))
    settings = make_settings(settings_env(kafka_bootstrap, topics, redis_url, feedback_topic=feedback_topic))
    labels = ("negative", "neutral", "positive")
    unknown_before = _sample("mmsent_feedback_unmatched_total", {"reason": "unknown"})
    invalid_before = _sample("mmsent_feedback_unmatched_total", {"reason": "invalid"})

    with app_in_thread(settings) as app:
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=90), "the posts were not scored"
        assert app.feedback is not None and app.feedback.assigned.wait(30), "no feedback partition assigned"
        events = [json.loads(r.value) for r in read_all(kafka_bootstrap, topics.sentiment, expected=count)]
        judged = {e["post_id"]: (f"{e['model']['name']}:{e['model']['version']}", e["label"]) for e in events}
        verdicts = {post_id: labels[i % 3] for i, post_id in enumerate(sorted(judged)) if i % 4 != 3}
        expected = Counter((*judged[post_id], given) for post_id, given in verdicts.items())
        before = {key: _sample("mmsent_feedback_total", dict(zip(("model", "predicted", "actual"), key, strict=True)))
                  for key in expected}
        messages = [json.dumps({"post_id": p, "label": given, "reviewer": "r1", "reviewed_at": "2026-01-02T03:04:05Z"})
                    .encode() for p, given in verdicts.items()]
        messages += [json.dumps({"post_id": f"never-scored-{i}", "label": "negative"}).encode() for i in range(5)]
        messages += [b"not json", b'{"post_id": "p1", "label": "furious"}', b'{"label": "neutral"}']
        produce(kafka_bootstrap, feedback_topic, messages)

        def counted() -> dict[tuple[str, str, str], float]:
            return {key: _sample("mmsent_feedback_total", dict(zip(("model", "predicted", "actual"), key,
                                                                   strict=True))) - before[key] for key in expected}

        assert wait_until(
            lambda: _sample("mmsent_feedback_unmatched_total", {"reason": "invalid"}) - invalid_before >= 3
            and counted() == dict(expected), timeout=30), f"counted {counted()}, expected {dict(expected)}"
        unknown = _sample("mmsent_feedback_unmatched_total", {"reason": "unknown"}) - unknown_before
        invalid = _sample("mmsent_feedback_unmatched_total", {"reason": "invalid"}) - invalid_before
        shared = redis.Redis.from_url(redis_url).get(f"mmsent:feedback:{topics.group}:{events[0]['post_id']}")
    assert (unknown, invalid) == (5, 3)
    assert shared == "\n".join(judged[events[0]["post_id"]]).encode()


def test_a_missing_feedback_topic_refuses_to_start(kafka_bootstrap: str, unique_name: str) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    settings = make_settings(settings_env(kafka_bootstrap, topics, None, feedback_topic=f"{unique_name}-nowhere"))
    assert Application(settings, serve_http=False).run() == EXIT_CONFIGURATION
