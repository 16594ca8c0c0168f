"""What the model says, as metrics: the predicted label's probability, text-image disagreements, and drift.

    scored event ──▶ PredictionMonitor.observe(model, result)
                       ├─▶ mmsent_top_probability{label, model}            (histogram)
                       ├─▶ mmsent_modality_disagreements_total{model}      (text alone and image alone disagree)
                       └─▶ DriftWindow of the model (the last `drift_window` predictions, counts per reference cell)
                             └─ every UPDATE_EVERY predictions, once full ──▶ mmsent_prediction_drift{model}

The drift is the Jensen-Shannon distance (base 2: 0 same, 1 disjoint) between the window's distribution and the
model's reference (mmsent/reference.py), both over the JOINT of predicted label and top-probability bin (3 labels x
9 bins), not the average of a label-mix distance and a confidence distance: one distribution gives one true metric
with one scale for the alert threshold, and the joint also sees a shift that keeps both marginals (confident
positives turning into hesitant positives while hesitant negatives turn confident). The price is more cells to
estimate: the sampling noise of a 2,000-prediction window over 27 cells stays far below the alert threshold
(tests/test_model_monitoring.py measures it).

Only full windows are reported: a half-filled window's noise would read as drift. A model without a reference has no
gauge (logged once). Each model name:version has its own window, bound to the reference of the first serving model
seen under that name (a new model is a new version). The cost per prediction is a deque append, two counter updates
and, every UPDATE_EVERY predictions, one distance over 27 cells.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import structlog
from scipy.spatial.distance import jensenshannon

from consumer.metrics import Metrics

log = structlog.get_logger("consumer")

UPDATE_EVERY = 50  # predictions between two distance updates


class ReferenceLike(Protocol):
    """What the drift needs of `mmsent.Reference`."""

    @property
    def cells(self) -> int: ...
    def cell(self, label: str, top_probability: float) -> int | None: ...
    def distribution(self) -> np.ndarray: ...


class DriftWindow:
    """The last `size` predictions of one model, as counts per reference cell."""

    def __init__(self, reference: ReferenceLike, size: int) -> None:
        self.reference = reference
        self.size = size
        self._expected = reference.distribution()
        self._cells: collections.deque[int] = collections.deque()
        self._counts = np.zeros(reference.cells, dtype=np.int64)
        self._since_update = 0

    def __len__(self) -> int:
        return len(self._cells)

    @property
    def full(self) -> bool:
        return len(self._cells) >= self.size

    def add(self, label: str, top_probability: float) -> bool:
        """Count a prediction in (the oldest out when full); True when the distance is due for an update."""
        cell = self.reference.cell(label, top_probability)
        if cell is None:
            return False
        if self.full:
            self._counts[self._cells.popleft()] -= 1
        self._cells.append(cell)
        self._counts[cell] += 1
        self._since_update += 1
        if self._since_update < UPDATE_EVERY or not self.full:
            return False
        self._since_update = 0
        return True

    def distance(self) -> float:
        """Jensen-Shannon distance (base 2) between the window and the reference."""
        return float(jensenshannon(self._counts / self._counts.sum(), self._expected, base=2))


class PredictionMonitor:
    """Per model (its `name:version`): the metrics of what it says, and its drift window. Called on the poll loop's
    thread for every event acknowledged."""

    def __init__(self, metrics: Metrics, window: int) -> None:
        self.metrics = metrics
        self.window = window
        self._windows: dict[str, DriftWindow | None] = {}  # None: the model has no reference

    def observe(self, model: str, reference: ReferenceLike | None, result: Any) -> None:
        """`result`: the scorer's ScoreResult (`label`, `scores`, `scores_by_modality`)."""
        top = float(result.scores[result.label])
        self.metrics.top_probability.labels(result.label, model).observe(top)
        if _modalities_disagree(result.scores_by_modality):
            self.metrics.modality_disagreements.labels(model).inc()
        window = self._window(model, reference)
        if window is not None and window.add(result.label, top):
            self.metrics.prediction_drift.labels(model).set(window.distance())

    def _window(self, model: str, reference: ReferenceLike | None) -> DriftWindow | None:
        if model not in self._windows:
            if reference is None:
                log.warning("drift_reference_missing", model=model,
                            hint="no reference.json in the model directory: run mmsent calibrate on labelled data")
            self._windows[model] = None if reference is None else DriftWindow(reference, self.window)
        return self._windows[model]


def _modalities_disagree(by_modality: Mapping[str, Mapping[str, float]]) -> bool:
    """Both modalities scored alone, and their argmax labels differ."""
    text, image = by_modality.get("text"), by_modality.get("image")
    if not text or not image:
        return False
    return max(text, key=text.__getitem__) != max(image, key=image.__getitem__)
