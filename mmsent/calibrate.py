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

`Scorer.load(DIR)` applies the temperature (every head pass: the fused scores and `scores_by_modality`) and answers
`scorer.alert_threshold(label, min_precision)`. A calibration.json whose weights hash is not the directory's (the
model was retrained after it was calibrated) is ignored, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsent.model import ModelRefused, RefusalReason

__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_PRECISIONS",
    "Calibration",
    "Threshold",
    "calibrate_model",
    "calibrated_probabilities",
    "fit_calibration",
    "fit_temperature",
    "precision_thresholds",
    "write_calibration",
]

CALIBRATION_FILE = "calibration.json"
FORMAT = "mmsent-calibration/1"
DEFAULT_PRECISIONS: tuple[float, ...] = (0.7, 0.8, 0.9)
RELIABILITY_BEFORE = "reliability-before.png"
RELIABILITY_AFTER = "reliability-after.png"


@dataclass(frozen=True)
class Threshold:
    """For one label and one target precision: alert when the label's calibrated probability is >= `threshold`.
    `threshold` (and precision, recall) None: no threshold reaches the target on the calibration data."""

    target: float
    threshold: float | None
    precision: float | None = None
    recall: float | None = None
    alerts: int = 0  # posts of the calibration data at or above the threshold

    def __post_init__(self) -> None:
        # a NaN threshold never alerts (every comparison with it is false): a file holding one is refused instead
        for name in ("target", "threshold", "precision", "recall"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"a threshold's {name} must be a probability in [0, 1], not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "threshold": self.threshold, "precision": self.precision,
                "recall": self.recall, "alerts": self.alerts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Threshold:
        def opt(key: str) -> float | None:
            value = d.get(key)
            return None if value is None else float(value)

        return cls(float(d["target"]), opt("threshold"), opt("precision"), opt("recall"), int(d.get("alerts", 0)))


@dataclass(frozen=True)
class Calibration:
    temperature: float
    labels: tuple[str, ...]
    thresholds: dict[str, tuple[Threshold, ...]]  # per label, ascending target precision
    model_sha256: str | None = None  # of the model.safetensors it was fit on
    metrics: dict[str, Any] = field(default_factory=dict)  # n, nll/ece before and after, data, model, PNG names

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"the temperature must be a positive number, not {self.temperature!r}")

    def alert_threshold(self, label: str, min_precision: float) -> float | None:
        """The threshold of the smallest stored target precision >= `min_precision`; None when there is none or
        it is unreachable."""
        if label not in self.labels:
            raise ValueError(f"unknown label {label!r} (labels: {', '.join(self.labels)})")
        for entry in self.thresholds.get(label, ()):
            if entry.target >= min_precision - 1e-9:
                return entry.threshold
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "temperature": self.temperature,
            "labels": list(self.labels),
            "thresholds": {lab: [t.to_dict() for t in entries] for lab, entries in self.thresholds.items()},
            "model_sha256": self.model_sha256,
            **self.metrics,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        if d.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} file (format={d.get('format')!r})")
        known = {"format", "temperature", "labels", "thresholds", "model_sha256"}
        thresholds = {
            str(lab): tuple(sorted((Threshold.from_dict(t) for t in entries), key=lambda t: t.target))
            for lab, entries in dict(d.get("thresholds") or {}).items()
        }
        return cls(float(d["temperature"]), tuple(d["labels"]), thresholds, d.get("model_sha256"),
                   {k: v for k, v in d.items() if k not in known})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CALIBRATION_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Calibration | None:
        """The directory's calibration; None when it has none, or when it was fit on other weights (warned).
        `ModelRefused` (bad_calibration) when it cannot be read or holds a non-finite temperature or threshold."""
        d = Path(directory)
        path = d / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            calibration = cls.from_dict(json.loads(path.read_text()))
        except Exception as exc:  # unreadable, not JSON, fields missing, mistyped or out of range
            raise ModelRefused(RefusalReason.BAD_CALIBRATION, f"{path}: {exc!r}") from exc
        weights = d / "model.safetensors"
        if calibration.model_sha256 and weights.is_file() and weights_sha256(weights) != calibration.model_sha256:
            warnings.warn(f"mmsent: {path} was fit on other weights than {weights}; it is ignored (run mmsent "
                          "calibrate again)", stacklevel=2)
            return None
        return calibration


def weights_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------- fitting
def calibrated_probabilities(logits: np.ndarray | torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """(N, K) logits -> (N, K) float64 probabilities, softmax(logits / T) in float32, rows renormalised: exactly what
    the Scorer reports, so that thresholds fit here mean the same on its scores."""
    t = torch.as_tensor(logits).detach().float().cpu()
    if temperature != 1.0:
        t = t / temperature
    p = torch.softmax(t, dim=-1).numpy().astype(np.float64)
    return p / p.sum(1, keepdims=True)


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
    from mmsent.evaluate import expected_calibration_error

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
                    progress: bool = False) -> tuple[Calibration, Path]:
    """Fit the calibration of a model directory (None: the packaged default) on a labelled file and write it, with
    the reliability diagrams, into the directory. Returns it and the directory."""
    from tqdm.auto import tqdm

    from mmsent.data import load_examples, load_image
    from mmsent.scorer import Scorer, model_directory

    directory = model_directory(model)
    if directory is None:
        raise ValueError(f"{model!r} is not a model directory (with config.json); a preset cannot be calibrated")
    scorer = Scorer.load(directory)
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
    from mmsent.reference import Reference

    probs = calibrated_probabilities(logits, calibration.temperature)
    source = f"predictions on {Path(data).name} (mmsent calibrate), T = {calibration.temperature:.4f}"
    Reference.from_probabilities(probs, labels, source).save(directory)


def write_calibration(directory: Path, logits: np.ndarray, y: np.ndarray, labels: Sequence[str],
                      targets: Sequence[float] = DEFAULT_PRECISIONS,
                      metrics: Mapping[str, Any] | None = None) -> Calibration:
    """Fit on (N, K) uncalibrated logits of labelled posts and write calibration.json and the reliability diagrams
    into the model directory, tied to its weights. `mmsent calibrate` fits on a labelled file; `mmsent train
    --folds k` on the cross-validation's out-of-fold probabilities (no row scored by a model that trained on it)."""
    from mmsent.evaluate import plot_reliability, reliability_bins

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
