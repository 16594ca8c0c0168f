"""The calibration artefact and how it is applied: a model directory's calibration.json (`Calibration`: one
temperature on the fused logits, per-label alert thresholds by target precision) and `calibrated_probabilities`,
softmax(logits / T) exactly as the Scorer reports it.

    calibration.json ──Calibration.load (format, finite numbers, fitted on these weights?)──▶ Calibration | None
    logits ──calibrated_probabilities(T)──▶ probabilities ──alert_threshold(label, min precision)──▶ alert or not

Fitting one is the evaluation layer's job (mmsent/evaluation/calibrate.py, `mmsent calibrate`); serving only reads
it. A calibration.json whose weights hash is not the directory's (the model was retrained after it was calibrated)
is ignored, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsent.model import ModelRefused, RefusalReason

__all__ = ["CALIBRATION_FILE", "Calibration", "Threshold", "calibrated_probabilities", "weights_sha256"]

CALIBRATION_FILE = "calibration.json"
FORMAT = "mmsent-calibration/1"


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



def calibrated_probabilities(logits: np.ndarray | torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """(N, K) logits -> (N, K) float64 probabilities, softmax(logits / T) in float32, rows renormalised: exactly what
    the Scorer reports, so that thresholds fit here mean the same on its scores."""
    t = torch.as_tensor(logits).detach().float().cpu()
    if temperature != 1.0:
        t = t / temperature
    p = torch.softmax(t, dim=-1).numpy().astype(np.float64)
    return p / p.sum(1, keepdims=True)
