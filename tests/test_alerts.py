"""Calibrated alerting through the consumer, on a real broker: `MMSENT_ALERT_MIN_PRECISION` takes the threshold the
model directory's calibration gives for that precision, and a model without one is refused.

The model is `tiny-random` (random weights: its labels mean nothing) with a calibration written by the test, so that
the threshold, and so which events alert, is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmsent.calibrate import Calibration, Threshold
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
    from mmsent.presets import preset_config
    from mmsent.scorer import from_config

    model = from_config(preset_config("tiny-random")).save(directory)
    if positive_threshold is not None:
        labels = ("negative", "neutral", "positive")
        thresholds = {"positive": (Threshold(0.7, None), Threshold(0.8, positive_threshold, 0.8, 0.5, 10))}
        Calibration(1.0, labels, thresholds).save(directory)
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
    alerts = sorted(json.loads(r.value)["post_id"] for r in read_all(kafka_bootstrap, topics.alerts))
    assert alerts == expected and 0 < len(alerts) < len(events), "the calibrated threshold (not 0.99) decides"


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
