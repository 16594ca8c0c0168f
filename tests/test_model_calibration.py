"""Calibration: temperature scaling, thresholds by target precision, calibration.json as part of a model directory,
`mmsent calibrate`, and the reliability diagram of `mmsent eval`. Tiny-random models in tmp_path only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmsent import Scorer
from mmsent.cli import app
from mmsent.data import load_examples, load_image
from mmsent.evaluation.calibrate import calibrate_model, fit_calibration, fit_temperature, precision_thresholds
from mmsent.presets import from_config, preset_config
from mmsent.serving.calibration import CALIBRATION_FILE, Calibration, Threshold, calibrated_probabilities

LABELS = ("negative", "neutral", "positive")
COLOURS = [(200, 20, 20), (120, 120, 120), (20, 200, 40), (30, 30, 220), (230, 200, 20), (10, 10, 10)]


def _precision_at(probs: np.ndarray, y: np.ndarray, k: int, threshold: float) -> tuple[float, float]:
    alert = probs[:, k] >= threshold
    hits = alert & (y == k)
    return hits.sum() / alert.sum(), hits.sum() / (y == k).sum()


# --- the fitting, on made-up logits --------------------------------------------------------------------------------
def test_fit_temperature_recovers_a_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (6000, 3))  # calibrated logits: labels drawn from softmax(z)
    p = torch.softmax(torch.from_numpy(z), -1).numpy()
    y = np.array([rng.choice(3, p=row) for row in p])
    assert fit_temperature(3.0 * z, y) == pytest.approx(3.0, rel=0.08)  # three times too sharp
    assert fit_temperature(0.5 * z, y) == pytest.approx(0.5, rel=0.08)  # twice too flat
    with pytest.raises(ValueError):
        fit_temperature(z[:0], y[:0])


def test_precision_thresholds_take_the_smallest_threshold_that_reaches_the_target() -> None:
    # the label-0 probabilities, high to low, and whether the post is label 0
    p0 = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    is0 = np.array([1, 1, 0, 1, 0, 1, 0, 0])
    probs = np.stack([p0, (1 - p0) / 2, (1 - p0) / 2], 1)
    y = np.where(is0 == 1, 0, 1)
    th = precision_thresholds(probs, y, LABELS, targets=(0.9, 0.6, 0.75, 1.0))["negative"]
    assert [t.target for t in th] == [0.6, 0.75, 0.9, 1.0]  # sorted
    by_target = {t.target: t for t in th}
    # precision at >= 0.5: 4/6 = 0.667 -> reaches 0.6; >= 0.7: 3/4 = 0.75; >= 0.9: 2/2 = 1.0 (0.8: 2/3)
    assert by_target[0.6] == Threshold(0.6, 0.5, 4 / 6, 1.0, 6)
    assert by_target[0.75] == Threshold(0.75, 0.7, 0.75, 0.75, 4)
    assert by_target[0.9] == Threshold(0.9, 0.9, 1.0, 0.5, 2)
    assert by_target[1.0] == Threshold(1.0, 0.9, 1.0, 0.5, 2)
    # a label no post has: no threshold reaches any precision
    assert all(t.threshold is None and t.precision is None for t in precision_thresholds(
        probs, y, LABELS, targets=(0.5,))["positive"])
    # ties alert together: a threshold never splits posts of the same probability
    tied = np.array([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1], [0.5, 0.25, 0.25]])
    [t] = precision_thresholds(tied, np.array([0, 1, 0]), LABELS, targets=(0.5,))["negative"]
    assert t.threshold == 0.5 and t.alerts == 3 and t.precision == pytest.approx(2 / 3)


def test_fit_calibration_thresholds_reach_their_targets_on_the_data() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(0, 1, (2000, 3)) + 4.0 * np.eye(3)[y] * rng.uniform(0, 1, (2000, 1))
    cal = fit_calibration(logits, y, LABELS, (0.7, 0.8, 0.9, 0.999))
    probs = calibrated_probabilities(logits, cal.temperature)
    assert cal.metrics["nll_after"] <= cal.metrics["nll_before"] + 1e-9
    assert cal.metrics["n"] == 2000 and cal.metrics["target_precisions"] == [0.7, 0.8, 0.9, 0.999]
    for k, label in enumerate(LABELS):
        for t in cal.thresholds[label]:
            if t.threshold is None:
                continue
            precision, recall = _precision_at(probs, y, k, t.threshold)
            assert precision >= t.target and precision == pytest.approx(t.precision)
            assert recall == pytest.approx(t.recall)
            lower = probs[:, k][probs[:, k] < t.threshold]  # every lower threshold misses the target
            assert all(_precision_at(probs, y, k, q)[0] < t.target for q in np.unique(lower))
    with pytest.raises(ValueError):
        fit_calibration(logits, y, LABELS, (0.0,))


def test_alert_threshold_picks_the_smallest_stored_target_at_least_as_high() -> None:
    th = (Threshold(0.7, 0.4, 0.71, 0.8, 50), Threshold(0.8, 0.55, 0.8, 0.6, 30), Threshold(0.9, None))
    cal = Calibration(1.5, LABELS, {"negative": th, "neutral": (), "positive": th})
    assert cal.alert_threshold("negative", 0.7) == 0.4
    assert cal.alert_threshold("negative", 0.75) == 0.55
    assert cal.alert_threshold("negative", 0.8) == 0.55
    assert cal.alert_threshold("negative", 0.5) == 0.4
    assert cal.alert_threshold("negative", 0.85) is None  # 0.9: unreachable
    assert cal.alert_threshold("negative", 0.95) is None  # no target that high
    assert cal.alert_threshold("neutral", 0.5) is None
    with pytest.raises(ValueError):
        cal.alert_threshold("angry", 0.8)
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    with pytest.raises(ValueError):
        Calibration(0.0, LABELS, {})


# --- a model directory -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny-random model directory and a labelled file whose labels follow that model's own (sharpened) logits, so
    that its logits carry signal and the temperature is finite (well below 1: the random head is timid)."""
    root = tmp_path_factory.mktemp("calibration")
    model_dir = from_config(preset_config("tiny-random")).save(root / "model")
    (root / "images").mkdir()
    rows = []
    for k in range(60):
        colour = tuple(min(255, c + 7 * k % 50) for c in COLOURS[k % len(COLOURS)])
        image = f"images/{k}.jpg" if k % 5 else None  # some posts without an image
        if image:
            Image.new("RGB", (40, 30), colour).save(root / image)
        text = "" if k % 11 == 4 else f"post {k} " + " ".join(["so", "very", "quite", "not"][: k % 4]) + " good"
        rows.append({"id": str(k), "text": text, "image": image})
    scorer = Scorer.load(model_dir)
    logits = scorer.logits([{"text": r["text"], "image": load_image(root / r["image"]) if r["image"] else None}
                            for r in rows])
    sharp = torch.softmax(torch.from_numpy(logits) * 25.0, -1).numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    for row, p in zip(rows, sharp, strict=True):
        row["label"] = LABELS[int(rng.choice(3, p=p / p.sum()))]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def _posts(data: Path) -> tuple[list[dict[str, object]], np.ndarray]:
    examples = load_examples(data, LABELS)
    posts: list[dict[str, object]] = [{"text": e.text, "image": load_image(e.image)} for e in examples]
    return posts, np.array([e.label for e in examples])


def test_calibration_round_trips_through_the_model_directory(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    model_dir = Path(shutil.copytree(labelled[0], tmp_path / "model"))
    data = labelled[1]
    uncalibrated = Scorer.load(model_dir)
    assert uncalibrated.calibration is None and uncalibrated.temperature == 1.0
    assert uncalibrated.alert_threshold("negative", 0.8) is None
    cal, directory = calibrate_model(data, model_dir, targets=(0.5, 0.7, 0.9))
    assert directory == model_dir and (model_dir / CALIBRATION_FILE).is_file()
    assert 0 < cal.temperature < 1 and np.isfinite(cal.temperature)
    stored = json.loads((model_dir / CALIBRATION_FILE).read_text())
    assert stored["temperature"] == cal.temperature and stored["n"] == 60
    assert set(stored["thresholds"]) == set(LABELS)
    assert [t["target"] for t in stored["thresholds"]["negative"]] == [0.5, 0.7, 0.9]

    scorer = Scorer.load(model_dir)
    assert scorer.calibration == cal and scorer.temperature == cal.temperature
    for label in LABELS:
        for t in cal.thresholds[label]:
            assert scorer.alert_threshold(label, t.target) == t.threshold

    # calibrated probabilities are the uncalibrated logits divided by the temperature, for every head pass
    posts, y = _posts(data)
    before, after = uncalibrated.score(posts), scorer.score(posts)
    for b, a in zip(before, after, strict=True):
        assert set(a.scores_by_modality) == set(b.scores_by_modality)
        for got, was in [(a.scores, b.scores)] + [(a.scores_by_modality[m], b.scores_by_modality[m])
                                                  for m in b.scores_by_modality]:
            log_p = torch.log(torch.tensor([was[k] for k in LABELS], dtype=torch.float64))
            want = torch.softmax(log_p / cal.temperature, -1).numpy()
            assert np.allclose([got[k] for k in LABELS], want, atol=1e-5)
            assert abs(sum(got.values()) - 1) < 1e-6
    assert not all(np.isclose(a.scores["negative"], b.scores["negative"]) for a, b in zip(after, before, strict=True))

    # the thresholds reach their target precision on the data they were fit on, on the scores the Scorer gives
    probs = np.array([[r.scores[k] for k in LABELS] for r in after])
    reached = 0
    for k, label in enumerate(LABELS):
        for t in cal.thresholds[label]:
            if t.threshold is not None:
                precision, recall = _precision_at(probs, y, k, t.threshold)
                assert precision >= t.target and recall == pytest.approx(t.recall)
                reached += 1
    assert reached >= 3


def test_a_calibration_fit_on_other_weights_is_ignored(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir = from_config(preset_config("tiny-random")).save(tmp_path / "model")
    Calibration(2.0, LABELS, {}, model_sha256="0" * 64).save(model_dir)
    with pytest.warns(UserWarning, match="other weights"):
        scorer = Scorer.load(model_dir)
    assert scorer.calibration is None and scorer.temperature == 1.0
    Calibration(2.0, LABELS, {}).save(model_dir)  # no hash: applied
    assert Scorer.load(model_dir).temperature == 2.0
    with pytest.raises(ValueError, match="labels"):
        Scorer(from_config(preset_config("tiny-random")), calibration=Calibration(2.0, ("a", "b", "c"), {}))


def test_calibrate_command_writes_calibration_and_diagrams(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    model_dir = Path(shutil.copytree(labelled[0], tmp_path / "model"))
    res = CliRunner().invoke(app, ["calibrate", str(labelled[1]), "--model", str(model_dir),
                                   "--precision", "0.6", "--precision", "0.8"])
    assert res.exit_code == 0, res.output
    assert "temperature" in res.output and "ECE" in res.output
    stored = json.loads((model_dir / CALIBRATION_FILE).read_text())
    assert stored["format"] == "mmsent-calibration/1" and stored["target_precisions"] == [0.6, 0.8]
    for key in ("temperature", "nll_before", "nll_after", "ece_before", "ece_after", "model_sha256"):
        assert stored[key] is not None
    for name in (stored["reliability_before"], stored["reliability_after"]):
        assert (model_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Scorer.load(model_dir).temperature == stored["temperature"]
    # a model without a drift reference gets one: its calibrated predictions on the calibration data
    reference = Scorer.load(model_dir).reference
    assert reference is not None and reference.n == stored["n"] and "mmsent calibrate" in reference.source

    res = CliRunner().invoke(app, ["calibrate", str(labelled[1]), "--model", "tiny-random"])
    assert res.exit_code == 2 and "not a model directory" in res.output
    res = CliRunner().invoke(app, ["calibrate", str(labelled[1]), "--model", str(model_dir), "--precision", "1.5"])
    assert res.exit_code == 2


def test_eval_reports_ece_and_draws_the_reliability_diagram(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["eval", str(labelled[1]), "--model", str(labelled[0]), "--json",
                                   "--confusion-png", str(tmp_path / "cm.png")])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output.strip().splitlines()[-1])
    assert 0 <= metrics["ece"] <= 1 and metrics["calibrated"] is False
    assert metrics["reliability_png"] == str(tmp_path / "data.reliability-both.png")
    assert Path(metrics["reliability_png"]).read_bytes()[:4] == b"\x89PNG"
    assert sum(b["count"] for b in metrics["reliability"]) == metrics["n"] == 60
