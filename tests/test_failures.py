"""The failure analysis of out-of-fold predictions (mmsent/evaluation/failures.py, scripts/oof_failures.py): made-up
posts and probabilities whose answers are known by construction, and the shipped model's recorded alert figures
reproduced from its own oof.npz."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmsent.data import Example
from mmsent.evaluation.failures import confusion, failure_report, fold_means, image_file_present, render_failures
from mmsent.model import LABELS, MODALITY_PAIRS
from mmsent.serving.calibration import Calibration, Threshold
from scripts.oof_failures import main as oof_failures_main
from scripts.oof_failures import training_folds

ROOT = Path(__file__).resolve().parents[1]
NEG, NEU, POS = range(3)
SHIPPED = ROOT / "mmsent" / "models" / "default"
MVSA = ROOT.parent / "shared" / "data" / "mvsa-single" / "train.jsonl"


def confident(k: int) -> list[float]:
    """Probabilities whose argmax is label k."""
    p = [0.1, 0.1, 0.1]
    p[k] = 0.8
    return p


# (label, annotators' text label, image label, fused says, text-only says, image-only says, caption words, image?);
# the word counts sit on the length buckets' edges
POSTS = [
    *[(NEG, NEG, NEG, NEG, NEG, NEG, 5, True)] * 3,  # caught, every path agrees
    *[(NEG, NEU, NEG, POS, POS, POS, 11, True)] * 2,  # missed: both paths call it positive
    (NEG, NEG, NEU, POS, NEG, POS, 21, False),  # missed: the text path was right, the image one won
    (NEG, NEG, NEG, NEU, NEU, NEG, 10, True),  # missed: called neutral
    (NEU, NEU, NEU, NEU, NEU, NEU, 8, True),
    (NEU, NEU, NEU, POS, POS, NEG, 8, True),
    *[(POS, POS, POS, POS, POS, POS, 15, True)] * 3,
    (POS, POS, NEU, NEG, NEG, NEG, 15, True),  # a false alarm
]


def posts(tmp_path: Path) -> tuple[list[Example], dict[str, np.ndarray]]:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"present")
    examples: list[Example] = []
    oof: dict[str, list[list[float]]] = {"both": [], "text": [], "image": []}
    for n, (label, t, i, both, text, image, words, has_image) in enumerate(POSTS):
        caption = " ".join(["word"] * words)
        examples.append(Example(str(n), caption, label, photo if has_image else tmp_path / "gone.jpg",
                                MODALITY_PAIRS.index((t, i))))
        for path, says in (("both", both), ("text", text), ("image", image)):
            oof[path].append(confident(says))
    return examples, {path: np.asarray(p) for path, p in oof.items()}


def calibration(temperature: float = 1.0, threshold: float = 0.5, target: float = 0.8) -> Calibration:
    return Calibration(temperature, LABELS, {"negative": (Threshold(target, threshold, 0.75, 0.5, 4),)})


# --- argmax breakdowns ----------------------------------------------------------------------------------------------
def test_missed_negatives_by_paths_annotators_length_image_and_agreement(tmp_path: Path) -> None:
    examples, oof = posts(tmp_path)
    report = failure_report(examples, oof, calibration())
    neg = report["negative"]
    assert neg["support"] == 7 and neg["missed"] == 4
    assert neg["called"] == {"negative": 3, "neutral": 1, "positive": 3}
    assert neg["recall"] == {"both": 3 / 7, "text": 4 / 7, "image": 4 / 7}
    # rows: text-only says, columns: image-only says (negative, neutral, positive)
    assert neg["missed_by_paths"] == [[0, 0, 1], [1, 0, 0], [0, 0, 2]]
    # rows: text_label, columns: image_label
    assert neg["missed_by_annotators"] == [[1, 1, 0], [2, 0, 0], [0, 0, 0]]
    by = {g["group"]: g for g in neg["by_length"] + neg["by_image"] + neg["by_agreement"] + neg["by_annotators"]}
    assert (by["caption ≤ 5 words"]["support"], by["caption ≤ 5 words"]["recall"]["both"]) == (3, 1.0)
    assert (by["caption 6-10 words"]["posts"], by["caption 6-10 words"]["support"]) == (3, 1)  # 2 neutral posts
    assert by["caption 6-10 words"]["recall"] == {"both": 0.0, "text": 0.0, "image": 1.0}
    assert by["caption 11-20 words"]["caught"] == 0 and by["caption 11-20 words"]["posts"] == 6
    assert by["caption > 20 words"]["recall"]["text"] == 1.0
    assert by["image missing or undecodable"]["support"] == 1 and by["image present"]["recall"]["both"] == 0.5
    assert by["paths agree: both say negative"]["recall"]["both"] == 1.0  # and the false alarm is a post there
    assert by["paths agree: both say negative"]["posts"] == 4
    assert by["paths agree: both say another label"]["recall"]["both"] == 0.0
    assert by["paths disagree: text-only ≠ image-only"]["support"] == 2
    assert by["annotators: text neutral, image negative"]["recall"]["both"] == 0.0
    assert by["annotators: text negative, image negative"]["caught"] == 3
    # only the pairs whose post label is negative are shown
    assert {g["group"] for g in neg["by_annotators"]} == {
        "annotators: text negative, image negative", "annotators: text negative, image neutral",
        "annotators: text neutral, image negative"}
    assert report["confusion"] == [[3, 1, 3], [0, 1, 1], [1, 0, 3]]


def test_neutral_recall_and_what_it_is_called_instead(tmp_path: Path) -> None:
    examples, oof = posts(tmp_path)
    neu = failure_report(examples, oof, calibration())["neutral"]
    assert (neu["support"], neu["missed"]) == (2, 1)
    assert neu["called"] == {"negative": 0, "neutral": 1, "positive": 1}
    assert neu["recall"] == {"both": 0.5, "text": 0.5, "image": 0.5}
    assert neu["missed_by_paths"] == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]  # text says positive, image negative


def test_the_image_status_is_the_callers(tmp_path: Path) -> None:
    examples, oof = posts(tmp_path)
    assert not image_file_present(examples[5]) and image_file_present(examples[0])
    everything_missing = failure_report(examples, oof, calibration(), image_status=lambda e: False)
    by = {g["group"]: g for g in everything_missing["negative"]["by_image"]}
    assert (by["image present"]["posts"], by["image missing or undecodable"]["support"]) == (0, 7)


def test_probabilities_that_do_not_match_the_examples_are_refused(tmp_path: Path) -> None:
    examples, oof = posts(tmp_path)
    with pytest.raises(ValueError, match="one row per example"):
        failure_report(examples[1:], oof, calibration())


# --- alerts ---------------------------------------------------------------------------------------------------------
def test_alerts_apply_the_temperature_before_the_threshold(tmp_path: Path) -> None:
    examples, oof = posts(tmp_path)
    oof["both"][0] = [0.6, 0.3, 0.1]  # a caught negative at 0.6: below 0.65 as it is, above once sharpened
    at_t1 = failure_report(examples, oof, calibration(1.0, 0.65))["negative"]["alerts"][0]
    # 0.8 on the three other caught negatives and the false alarm
    assert (at_t1["alerts"], at_t1["hits"], at_t1["precision"], at_t1["recall"]) == (3, 2, 2 / 3, 2 / 7)
    sharpened = failure_report(examples, oof, calibration(0.5, 0.65))["negative"]["alerts"][0]
    assert (sharpened["alerts"], sharpened["hits"]) == (4, 3)  # 0.36 / (0.36 + 0.09 + 0.01) = 0.78
    assert at_t1["recorded"] == {"alerts": 4, "recall": 0.5, "precision": 0.75}  # what calibration.json says
    assert "cross_fitted" not in at_t1


def test_cross_fitted_thresholds_are_fitted_on_the_other_folds() -> None:
    # fold 0: negatives at 0.9 and 0.8 above a non-negative at 0.7; fold 1: a non-negative at 0.85 above a negative
    # at 0.75. Precision 1.0 fitted on fold 0 is p >= 0.8, which on fold 1 alerts the non-negative only; fitted on
    # fold 1 it is unreachable: fold 0 gets no alert. Fitted on all rows it is p >= 0.9 (one alert, one hit), the
    # threshold the calibration below records.
    p_neg = np.array([0.9, 0.8, 0.7, 0.85, 0.75])
    y = np.array([NEG, NEG, POS, POS, NEG])
    examples = [Example(str(n), "a caption", int(label), None, MODALITY_PAIRS.index((label, label)))
                for n, label in enumerate(y)]
    both = np.stack([p_neg, (1 - p_neg) / 2, (1 - p_neg) / 2], 1)
    in_sample = 0.9 * (1 - 1e-6)  # the calibrated 0.9, up to float32 rounding
    report = failure_report(examples, {"both": both, "text": both, "image": both},
                            calibration(1.0, in_sample, target=1.0), folds=[0, 0, 0, 1, 1])
    row = report["negative"]["alerts"][0]
    assert (row["alerts"], row["hits"], row["recall"]) == (1, 1, 1 / 3)
    cross = row["cross_fitted"]
    assert (cross["alerts"], cross["hits"], cross["precision"], cross["recall"]) == (1, 0, 0.0, 0.0)
    assert [f["alerts"] for f in cross["per_fold"]] == [0, 1]
    assert cross["per_fold"][0]["threshold"] is None
    assert cross["per_fold"][1]["threshold"] == pytest.approx(0.8, abs=1e-6)


def test_fold_means_average_each_folds_figures_not_the_pooled_ones() -> None:
    y = np.array([NEG, POS, NEG, POS, NEG, POS])  # fold 0: rows 0-1, fold 1: rows 2-5
    said = np.array([NEG, POS, NEG, NEG, POS, POS])  # fold 0 all right; fold 1 half right
    probs = np.array([confident(k) for k in said])
    means = fold_means({"both": probs}, y, LABELS, [0, 0, 1, 1, 1, 1])
    assert means["both"]["accuracy"] == pytest.approx((1.0 + 0.5) / 2)  # pooled: 4 / 6
    assert means["both"]["weighted_f1"] == pytest.approx((1.0 + 0.5) / 2)  # fold 1: F1 0.5 for each of its labels
    assert failure_report([Example(str(k), "w", int(label), None) for k, label in enumerate(y)],
                          {"both": probs, "text": probs, "image": probs}, calibration())["fold_means"] is None


# --- Markdown and the script ----------------------------------------------------------------------------------------
def test_the_markdown_carries_the_reports_figures(tmp_path: Path) -> None:
    examples, oof = posts(tmp_path)
    text = render_failures(failure_report(examples, oof, calibration(), folds=[0, 1] * 6 + [0]))
    assert "7 negative posts: called negative 3, neutral 1, positive 3" in text
    assert "| positive | 0 | 0 | 2 | 2 |" in text  # missed negatives: text-only positive, image-only positive
    assert "| neutral | 2 | 0 | 0 | 2 |" in text  # missed negatives: text_label neutral, image_label negative
    assert "| caption ≤ 5 words | 3 | 3 | 3 | **1.000** | 1.000 | 1.000 |" in text
    assert "cross-fitted over the CV folds" in text
    assert "Recall: fused 0.500, text-only 0.500, image-only 0.500" in text
    assert "### Accuracy and weighted-F1, means over the CV folds (argmax)" in text


def test_the_script_reads_a_model_directorys_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    examples, oof = posts(tmp_path)
    data = tmp_path / "posts.jsonl"
    data.write_text("".join(json.dumps({
        "id": e.id, "text": e.text, "label": LABELS[e.label or 0], "text_label": LABELS[MODALITY_PAIRS[e.pair or 0][0]],
        "image_label": LABELS[MODALITY_PAIRS[e.pair or 0][1]], "image": e.image.name if e.image else None}) + "\n"
        for e in examples))
    model = tmp_path / "model"
    model.mkdir()
    np.savez(model / "oof.npz", both=oof["both"], text=oof["text"], image=oof["image"])
    calibration().save(model)
    assert oof_failures_main(["--model", str(model), "--data", str(data), "--folds", "2"]) == 0
    out = capsys.readouterr().out
    assert "7 negative posts: called negative 3, neutral 1, positive 3" in out
    assert "| image missing or undecodable | 1 | 1 | 0 |" in out  # gone.jpg
    assert oof_failures_main(["--model", str(model), "--data", str(data), "--decode", "--json", "--folds", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    # b"present" is no image: decoding finds every post's image missing
    assert {g["group"]: g["posts"] for g in report["negative"]["by_image"]}["image missing or undecodable"] == 13
    # an ensemble (--with): each path the mean of the two models' probabilities, the calibration refitted on it
    other = tmp_path / "other"
    other.mkdir()
    flipped = {path: p[::-1].copy() for path, p in oof.items()}  # another model: other posts right and wrong
    np.savez(other / "oof.npz", **flipped)
    assert oof_failures_main(["--model", str(model), "--data", str(data), "--with", str(other), "--json",
                              "--folds", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    labels = np.array([e.label for e in examples])
    mean = {path: (oof[path] + flipped[path]) / 2 for path in oof}
    assert report["confusion"] == confusion(labels, mean["both"].argmax(1), 3)
    want = fold_means(mean, labels, LABELS, training_folds(labels, 2, 0))
    assert report["fold_means"]["text"] == pytest.approx(want["text"])
    assert report["temperature"] != calibration().temperature, "the ensemble's own calibration"
    with pytest.raises(SystemExit, match="one at a time"):
        oof_failures_main(["--model", str(model), "--data", str(data), "--with", str(other), "--fused", "int8"])


@pytest.mark.skipif(not (MVSA.is_file() and (SHIPPED / "oof.npz").is_file()), reason="no shared MVSA data")
def test_the_shipped_models_recorded_alerts_are_reproduced(capsys: pytest.CaptureFixture[str]) -> None:
    """calibration.json's alert figures were fitted on these out-of-fold probabilities: the report finds them."""
    assert oof_failures_main(["--json", "--folds", "0"]) == 0
    for row in json.loads(capsys.readouterr().out)["negative"]["alerts"]:
        assert (row["alerts"], row["recall"]) == (row["recorded"]["alerts"], pytest.approx(row["recorded"]["recall"]))


@pytest.mark.skipif(not (MVSA.is_file() and (SHIPPED / "oof.npz").is_file()), reason="no shared MVSA data")
def test_the_shipped_models_fold_means_are_its_cross_validations(capsys: pytest.CaptureFixture[str]) -> None:
    """The report's fold means, from oof.npz and training's own folds, are what cv.json summarised at training."""
    assert oof_failures_main(["--json"]) == 0
    means = json.loads(capsys.readouterr().out)["fold_means"]
    summary = json.loads((SHIPPED / "cv.json").read_text())["summary"]
    for path in ("both", "text", "image"):
        for name in ("accuracy", "weighted_f1"):
            assert means[path][name] == pytest.approx(summary[path][name]["mean"], abs=1e-4), (path, name)
