"""Evaluation of a model on a labelled file: its metrics (mmsent/evaluation/metrics.py), reliability bins, whether
it was calibrated, and the model's identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmsent.data import load_examples, load_image
from mmsent.evaluation.metrics import compute_metrics
from mmsent.evaluation.reliability import reliability_bins
from mmsent.serving.scorer import Scorer

__all__ = ["evaluate_file"]


def evaluate_file(
    data: str | Path,
    model: str | Path | None = None,
    *,
    modality: str = "both",
    columns: Any = None,
    progress: bool = False,
    device: str = "auto",
    cpu_precision: str = "auto",
) -> dict[str, Any]:
    """Score a labelled file with a Scorer on `device` (auto: a GPU when there is one), its CPU encoders in
    `cpu_precision`; `modality` "text" drops images, "image" drops captions."""
    if modality not in ("both", "text", "image"):
        raise ValueError("modality must be text, image or both")
    scorer = Scorer.load(model, device=device, cpu_precision=cpu_precision)
    examples = load_examples(data, scorer.labels, columns)
    probs = np.zeros((len(examples), len(scorer.labels)))
    step = 64
    for s in tqdm(range(0, len(examples), step), desc="eval", disable=not progress, leave=False):
        chunk = examples[s : s + step]
        posts = [
            {
                "text": e.text if modality != "image" else "",
                "image": load_image(e.image) if modality != "text" else None,
            }
            for e in chunk
        ]
        for k, res in enumerate(scorer.score(posts)):
            probs[s + k] = [res.scores[lab] for lab in scorer.labels]
    y = [e.label if e.label is not None else -1 for e in examples]
    metrics = compute_metrics(y, probs, scorer.labels)
    metrics["reliability"] = reliability_bins(y, probs)
    metrics["calibrated"] = scorer.calibration is not None
    metrics["modality"] = modality
    metrics["model"] = dict(scorer.info)
    metrics["cpu_precision"] = scorer.cpu_precision
    return metrics
