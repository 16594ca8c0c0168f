"""Calibration: one temperature on the fused logits, and per-label alert thresholds by target precision.

    mmsent calibrate DATA.jsonl --model DIR [--precision 0.7 --precision 0.8 --precision 0.9]

scores the labelled file with the model as it is (uncalibrated logits), fits the temperature T that minimises the
negative log-likelihood of softmax(logits / T) (LBFGS over log T), and writes into DIR:

  calibration.json              the temperature, per label and per target precision the smallest probability
                                threshold (on calibrated probabilities) whose precision on the data reaches the target,
                                with its precision, recall and alert count there (null when no threshold reaches it),
                                NLL and ECE before and after, and the SHA-256 of the weights it was fit on
  reliability-before.png        reliability diagrams (top-label confidence against accuracy) before and after
  reliability-after.png
  reference.json                only when the directory has none: the drift reference (mmsent/reference.py), from
                                the calibrated predictions on the data

The artefact itself (`Calibration`, `calibrated_probabilities`) is the serving layer's
(mmsent/serving/calibration.py): `Scorer.load(DIR)` applies the temperature (every head pass: the fused scores and
`scores_by_modality`) and answers `scorer.alert_threshold(label, min_precision)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsent.data import load_examples, load_image
from mmsent.evaluation.metrics import expected_calibration_error
from mmsent.evaluation.reliability import plot_reliability, reliability_bins
from mmsent.presets import model_directory
from mmsent.reference import Reference
from mmsent.serving.calibration import Calibration, Threshold, calibrated_probabilities, weights_sha256
from mmsent.serving.scorer import Scorer

__all__ = [
    "DEFAULT_PRECISIONS",
    "calibrate_model",
    "fit_calibration",
    "fit_temperature",
    "precision_thresholds",
    "write_calibration",
]

DEFAULT_PRECISIONS: tuple[float, ...] = (0.7, 0.8, 0.9)
RELIABILITY_BEFORE = "reliability-before.png"
RELIABILITY_AFTER = "reliability-after.png"


# ------------------------------------------------------------------------------------------------------- fitting
def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    t = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return float(torch.nn.functional.cross_entropy(t, torch.as_tensor(y, dtype=torch.long)))


def fit_temperature(logits: np.ndarray, y: np.ndarray, *, max_iter: int = 200) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (LBFGS over log T, float64)."""
    if len(y) == 0:
        raise ValueError("calibration needs labelled posts")
    x = torch.as_tensor(logits, dtype=torch.float64)
    target = torch.as_tensor(y, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"the temperature fit diverged ({temperature})")
    return temperature


def precision_thresholds(probs: np.ndarray, y: np.ndarray, labels: Sequence[str],
                         targets: Sequence[float] = DEFAULT_PRECISIONS) -> dict[str, tuple[Threshold, ...]]:
    """Per label and target precision, the smallest threshold t among the label's probabilities such that the posts
    with probability >= t have that label with precision >= target (one label against the rest), with the recall
    there; None where no t reaches the target."""
    out: dict[str, tuple[Threshold, ...]] = {}
    y = np.asarray(y)
    for k, label in enumerate(labels):
        p = probs[:, k]
        order = np.argsort(-p, kind="stable")
        ps, hits = p[order], (y[order] == k)
        tp, alerts = np.cumsum(hits), np.arange(1, len(ps) + 1)
        # a threshold is one of the probabilities; ties all alert together: the last position of each value
        ends = np.flatnonzero(np.append(ps[1:] != ps[:-1], True)) if len(ps) else np.zeros(0, dtype=np.int64)
        precision = tp[ends] / alerts[ends]
        positives = int(hits.sum())
        entries = []
        for target in sorted(targets):
            ok = np.flatnonzero(precision >= target)
            if not len(ok):
                entries.append(Threshold(float(target), None))
                continue
            j = ends[ok[-1]]  # the lowest threshold (positions run from the highest probability down)
            entries.append(Threshold(float(target), float(ps[j]), float(tp[j] / alerts[j]),
                                     float(tp[j] / positives) if positives else 0.0, int(alerts[j])))
        out[label] = tuple(entries)
    return out


def fit_calibration(logits: np.ndarray, y: Sequence[int] | np.ndarray, labels: Sequence[str],
                    targets: Sequence[float] = DEFAULT_PRECISIONS, *, model_sha256: str | None = None,
                    metrics: Mapping[str, Any] | None = None) -> Calibration:
    """Temperature and thresholds from uncalibrated (N, K) logits and labels (indices into `labels`)."""
    for target in targets:
        if not 0 < target <= 1:
            raise ValueError(f"a target precision is in (0, 1], not {target}")
    y_arr = np.asarray(y, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float32)
    temperature = fit_temperature(logits, y_arr)
    before, after = calibrated_probabilities(logits), calibrated_probabilities(logits, temperature)
    summary = {
        "n": int(len(y_arr)),
        "target_precisions": sorted(float(t) for t in targets),
        "nll_before": nll(logits, y_arr),
        "nll_after": nll(logits, y_arr, temperature),
        "ece_before": expected_calibration_error(y_arr, before),
        "ece_after": expected_calibration_error(y_arr, after),
        **(metrics or {}),
    }
    return Calibration(temperature, tuple(labels), precision_thresholds(after, y_arr, labels, targets),
                       model_sha256, summary)


def calibrate_model(data: str | Path, model: str | Path | None = None, *,
                    targets: Sequence[float] = DEFAULT_PRECISIONS, columns: Any = None,
                    progress: bool = False, cpu_precision: str = "auto") -> tuple[Calibration, Path]:
    """Fit the calibration of a model directory (None: the packaged default) on a labelled file and write it, with
    the reliability diagrams, into the directory. Returns it and the directory."""
    directory = model_directory(model)
    if directory is None:
        raise ValueError(f"{model!r} is not a model directory (with config.json); a preset cannot be calibrated")
    scorer = Scorer.load(directory, cpu_precision=cpu_precision)  # fit on the logits of the precision it serves in
    examples = [e for e in load_examples(data, scorer.labels, columns) if e.label is not None]
    if not examples:
        raise ValueError(f"{data}: no labelled posts")
    step = 64
    parts = []
    for s in tqdm(range(0, len(examples), step), desc="calibrate", disable=not progress, leave=False):
        chunk = examples[s : s + step]
        parts.append(scorer.logits([{"text": e.text, "image": load_image(e.image)} for e in chunk]))
    logits = np.concatenate(parts)
    y = np.asarray([e.label for e in examples], dtype=np.int64)
    metrics = {"data": str(Path(data).resolve()), "model": dict(scorer.info)}
    calibration = write_calibration(directory, logits, y, scorer.labels, targets, metrics)
    if scorer.reference is None:
        _write_reference(directory, logits, calibration, scorer.labels, data)
    return calibration, directory


def _write_reference(directory: Path, logits: np.ndarray, calibration: Calibration, labels: Sequence[str],
                     data: str | Path) -> None:
    """A drift reference (mmsent/reference.py) for a model directory without one: its calibrated predictions on the
    calibration data. One written by `mmsent train --folds` (out of fold) is kept."""
    probs = calibrated_probabilities(logits, calibration.temperature)
    source = f"predictions on {Path(data).name} (mmsent calibrate), T = {calibration.temperature:.4f}"
    Reference.from_probabilities(probs, labels, source).save(directory)


def write_calibration(directory: Path, logits: np.ndarray, y: np.ndarray, labels: Sequence[str],
                      targets: Sequence[float] = DEFAULT_PRECISIONS,
                      metrics: Mapping[str, Any] | None = None) -> Calibration:
    """Fit on (N, K) uncalibrated logits of labelled posts and write calibration.json and the reliability diagrams
    into the model directory, tied to its weights. `mmsent calibrate` fits on a labelled file; `mmsent train
    --folds k` on the cross-validation's out-of-fold probabilities (no row scored by a model that trained on it)."""
    weights = directory / "model.safetensors"
    calibration = fit_calibration(
        logits, y, labels, targets,
        model_sha256=weights_sha256(weights) if weights.is_file() else None,
        metrics={**(metrics or {}), "reliability_before": RELIABILITY_BEFORE, "reliability_after": RELIABILITY_AFTER},
    )
    m = calibration.metrics
    plot_reliability(reliability_bins(y, calibrated_probabilities(logits)), directory / RELIABILITY_BEFORE,
                     title=f"uncalibrated (ECE {m['ece_before']:.4f})")
    plot_reliability(reliability_bins(y, calibrated_probabilities(logits, calibration.temperature)),
                     directory / RELIABILITY_AFTER,
                     title=f"T = {calibration.temperature:.3f} (ECE {m['ece_after']:.4f})")
    calibration.save(directory)
    return calibration
