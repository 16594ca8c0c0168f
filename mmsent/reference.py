"""A model's reference: what its predictions look like on data like the data it was trained on.

    mmsent train --folds k   ──▶ the cross-validation's out-of-fold probabilities ──┐
    mmsent calibrate DATA    ──▶ the model's probabilities on DATA (no reference yet) ┴─▶ reference.json

reference.json counts the posts per predicted label and per bin of the predicted label's probability (the "top
probability", in [1/3, 1] for three labels): the joint distribution whose marginals are the label mix and the
confidence histogram, both written beside it for readers. The probabilities are the calibrated ones (softmax of the
logits over the calibration's temperature), as the Scorer reports them, so that a stream scored by this model is
compared with what the same model said on known data. The consumer's drift gauge (consumer/drift.py) bins each
prediction with `cell()` and compares its recent window with `distribution()`.

A reference is monitoring, not scoring: one that cannot be read is ignored with a warning (`load` gives None), and
the model still loads.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["REFERENCE_FILE", "TOP_PROBABILITY_EDGES", "Reference"]

REFERENCE_FILE = "reference.json"
FORMAT = "mmsent-reference/1"
# Upper bounds of the top-probability bins (the last is 1). Finer where a three-way softmax is most often:
# confident predictions pile up above 0.9.
TOP_PROBABILITY_EDGES: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True, eq=False)
class Reference:
    """Posts per predicted label (rows, in `labels` order) and top-probability bin (columns, upper bounds `edges`)."""

    labels: tuple[str, ...]
    edges: tuple[float, ...]
    counts: np.ndarray  # (len(labels), len(edges)) non-negative integers
    source: str = ""

    def __post_init__(self) -> None:
        shape = (len(self.labels), len(self.edges))
        if self.counts.shape != shape or (self.counts < 0).any() or self.counts.sum() <= 0:
            raise ValueError(f"a reference needs {shape} non-negative counts, not all zero; got {self.counts.shape}")
        if list(self.edges) != sorted(self.edges) or self.edges[-1] < 1.0:
            raise ValueError(f"the bin edges must rise to 1, not {self.edges}")

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def cells(self) -> int:
        return self.counts.size

    def cell(self, label: str, top_probability: float) -> int | None:
        """The flat index of a prediction's (label, bin); None for a label the reference does not know."""
        if label not in self.labels:
            return None
        column = min(int(np.searchsorted(self.edges, top_probability, side="left")), len(self.edges) - 1)
        return self.labels.index(label) * len(self.edges) + column

    def distribution(self) -> np.ndarray:
        """The joint distribution, flat (`cell()` indexes it), summing to 1."""
        flat = self.counts.astype(np.float64).ravel()
        return flat / flat.sum()

    @classmethod
    def from_probabilities(cls, probs: np.ndarray, labels: Sequence[str], source: str,
                           edges: Sequence[float] = TOP_PROBABILITY_EDGES) -> Reference:
        """From (N, K) probabilities (rows in `labels` order), as a Scorer would report them."""
        p = np.asarray(probs, dtype=np.float64)
        rows = p.argmax(axis=1)
        columns = np.minimum(np.searchsorted(edges, p.max(axis=1), side="left"), len(edges) - 1)
        counts = np.zeros((len(labels), len(edges)), dtype=np.int64)
        np.add.at(counts, (rows, columns), 1)
        return cls(tuple(labels), tuple(float(e) for e in edges), counts, source)

    def to_dict(self) -> dict[str, Any]:
        n = self.n
        return {
            "format": FORMAT,
            "source": self.source,
            "n": n,
            "labels": list(self.labels),
            "top_probability_edges": list(self.edges),
            "counts": {label: [int(c) for c in row] for label, row in zip(self.labels, self.counts, strict=True)},
            # the two marginals, for readers (not read back)
            "label_mix": {label: int(row.sum()) / n for label, row in zip(self.labels, self.counts, strict=True)},
            "top_probability": [int(c) / n for c in self.counts.sum(axis=0)],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reference:
        if d.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} file (format={d.get('format')!r})")
        labels = tuple(str(label) for label in d["labels"])
        counts = np.asarray([d["counts"][label] for label in labels], dtype=np.int64)
        return cls(labels, tuple(float(e) for e in d["top_probability_edges"]), counts, str(d.get("source", "")))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / REFERENCE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Reference | None:
        """The directory's reference; None when it has none, or one that cannot be read (warned)."""
        path = Path(directory) / REFERENCE_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except Exception as exc:  # unreadable, not JSON, fields missing or mistyped: monitoring goes without it
            warnings.warn(f"mmsent: {path} cannot be read ({exc!r}); the model has no drift reference", stacklevel=2)
            return None
