"""Alerting through the consumer, on a real broker: `MMSENT_ALERT_MIN_PRECISION` takes the threshold the model
directory's calibration gives for that precision, and a model without one is refused; every alert record says why
(its `alert` object: the rule, the label, the probability, the threshold, the target precision, the calibration's
weights digest), and the output topic's copy carries none.

The model is `tiny-random` (random weights: its labels mean nothing) with a calibration written by the test, so that
the threshold, and so which events alert, is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.metrics import Metrics
from mmsent.serving.calibration import Calibration, Threshold, weights_sha256
from tests.consumerutil import (
    Topics,
    all_committed,
    app_in_thread,
    make_settings,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.kafkautil import create_topics, produce, read_all

pytestmark = [pytest.mark.kafka]


def _tiny_model(directory: Path, positive_threshold: float | None) -> Path:
    from mmsent.presets import from_config, preset_config

    model = from_config(preset_config("tiny-random")).save(directory)
    if positive_threshold is not None:
        labels = ("negative", "neutral", "positive")
        thresholds = {"positive": (Threshold(0.7, None), Threshold(0.8, positive_threshold, 0.8, 0.5, 10))}
        Calibration(1.0, labels, thresholds, weights_sha256(directory / "model.safetensors")).save(directory)
    return model


def test_calibrated_thresholds_decide_what_reaches_the_alert_topic(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1, topics.alerts: 1})
    produce(kafka_bootstrap, topics.posts, synthetic_posts(120, lambda i: None))
    # the tiny model labels most of these posts positive, at 0.34-0.38: a threshold of 0.36 splits them
    model = _tiny_model(tmp_path / "model", positive_threshold=0.36)
    env = settings_env(kafka_bootstrap, topics, None, model=str(model), alert_topic=topics.alerts,
                       alert_label="positive", alert_min_precision=0.75,  # -> the 0.8 target's threshold
                       alert_min_probability=0.99)
    with app_in_thread(make_settings(env)) as app:
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    assert app.rc == 0  # type: ignore[attr-defined]
    events = [json.loads(r.value) for r in read_all(kafka_bootstrap, topics.sentiment)]
    expected = sorted(e["post_id"] for e in events if e["label"] == "positive" and e["scores"]["positive"] >= 0.36)
    records = [json.loads(r.value) for r in read_all(kafka_bootstrap, topics.alerts)]
    alerts = sorted(record["post_id"] for record in records)
    assert alerts == expected and 0 < len(alerts) < len(events), "the calibrated threshold (not 0.99) decides"
    digest = weights_sha256(model / "model.safetensors")
    for record in records:
        assert record["alert"] == {"rule": "min_precision", "label": "positive",
                                   "probability": record["scores"]["positive"], "threshold": 0.36,
                                   "min_precision": 0.75, "calibration": digest}, record
    assert not any("alert" in event for event in events), "the output topic's events are not alerts"


def test_alert_records_name_the_operators_threshold(kafka_bootstrap: str, unique_name: str) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1, topics.alerts: 1})
    produce(kafka_bootstrap, topics.posts, synthetic_posts(80, lambda i: None))
    counted = Metrics.get().alerts
    before = counted._value.get()
    env = settings_env(kafka_bootstrap, topics, None, alert_topic=topics.alerts, alert_label="positive",
                       alert_min_probability=0.36)  # tiny-random, no calibration
    with app_in_thread(make_settings(env)) as app:
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    assert app.rc == 0  # type: ignore[attr-defined]
    events = {e["post_id"]: e for e in (json.loads(r.value) for r in read_all(kafka_bootstrap, topics.sentiment))}
    records = [json.loads(r.value) for r in read_all(kafka_bootstrap, topics.alerts)]
    expected = {p for p, e in events.items() if e["label"] == "positive" and e["scores"]["positive"] >= 0.36}
    assert {record["post_id"] for record in records} == expected and 0 < len(expected) < len(events)
    for record in records:
        assert record["alert"] == {"rule": "min_probability", "label": "positive",
                                   "probability": record["scores"]["positive"], "threshold": 0.36,
                                   "min_precision": None, "calibration": None}, record
        assert {k: v for k, v in record.items() if k not in ("alert", "scored_at")} == {
            k: v for k, v in events[record["post_id"]].items() if k != "scored_at"}, "else a copy of the event"
    assert counted._value.get() - before == len(records), "decided once: the metric counts what was routed"


@pytest.mark.parametrize("positive_threshold", [None, 0.5])
def test_a_model_without_a_threshold_for_that_precision_is_refused(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path, positive_threshold: float | None
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1, topics.alerts: 1})
    model = _tiny_model(tmp_path / "model", positive_threshold)  # no calibration, or none reaching 0.95
    env = settings_env(kafka_bootstrap, topics, None, model=str(model), alert_topic=topics.alerts,
                       alert_label="positive", alert_min_precision=0.95)
    with app_in_thread(make_settings(env)) as app:
        pass  # run() returns at once: the model is refused before the consumer joins the group
    assert app.rc == 1 and not app.started.is_set()  # type: ignore[attr-defined]
