"""Serving: the `Scorer` over a model (mmsent/serving/scorer.py), the fixed shapes of its model calls
(`shapes.py`), batched image decode on the device (`gpudecode.py`), and the calibration artefact and how it is
applied (`calibration.py`). It imports only the core; nothing here fits, evaluates or trains."""

from mmsent.serving.calibration import CALIBRATION_FILE, Calibration, Threshold, calibrated_probabilities
from mmsent.serving.scorer import ImageEmbedding, Scorer, ScoreResult, model_languages
from mmsent.serving.shapes import ShapeBuckets, serving_batch_size

__all__ = [
    "CALIBRATION_FILE", "Calibration", "ImageEmbedding", "ScoreResult", "Scorer", "ShapeBuckets", "Threshold",
    "calibrated_probabilities", "model_languages", "serving_batch_size",
]
