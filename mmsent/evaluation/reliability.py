"""Reliability: top-label confidence against accuracy, per equal-width confidence bin, and its diagram."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmsent.evaluation.figures import pyplot, save_figure

__all__ = ["plot_reliability", "reliability_bins"]


def reliability_bins(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = 15) -> list[dict[str, Any]]:
    """The reliability diagram's data: per equal-width bin of top-1 confidence ([lo, hi), the last one closed, as the
    ECE bins them), the posts in it, their mean confidence and their accuracy (None when empty)."""
    y = np.asarray(y_true, dtype=np.int64)
    conf = probs.max(1) if len(probs) else np.zeros(0)
    right = probs.argmax(1) == y if len(probs) else np.zeros(0, dtype=bool)
    which = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        inside = which == b
        count = int(inside.sum())
        bins.append({
            "lo": b / n_bins,
            "hi": (b + 1) / n_bins,
            "count": count,
            "confidence": float(conf[inside].mean()) if count else None,
            "accuracy": float(right[inside].mean()) if count else None,
        })
    return bins


def plot_reliability(bins: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """A reliability diagram from `reliability_bins`: accuracy per confidence bin against the diagonal, the gap
    shaded, and how many posts each bin holds."""
    plt = pyplot()

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = [b["hi"] - b["lo"] for b in bins]
    los = [b["lo"] for b in bins]
    full = [b for b in bins if b["count"]]
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=[b["hi"] - b["lo"] for b in full],
           align="edge", color="tab:blue", edgecolor="black", label="accuracy")
    ax.bar([b["lo"] for b in full], [b["confidence"] - b["accuracy"] for b in full],
           bottom=[b["accuracy"] for b in full], width=[b["hi"] - b["lo"] for b in full], align="edge",
           color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title or "reliability")
    hist.bar(los, [b["count"] for b in bins], width=width, align="edge", color="gray", edgecolor="black")
    hist.set_xlabel("top-label confidence")
    hist.set_ylabel("posts")
    return save_figure(fig, path)
