"""Evaluation: metrics of probabilities against labels (`metrics.py`), reliability bins and diagrams
(`reliability.py`), figures (`figures.py`), a model evaluated on a labelled file (`evaluate.py`, `mmsent eval`) and
fitting a calibration (`calibrate.py`, `mmsent calibrate`). It imports the core and serving, never training."""

from mmsent.evaluation.calibrate import DEFAULT_PRECISIONS, calibrate_model, fit_calibration, write_calibration
from mmsent.evaluation.evaluate import evaluate_file
from mmsent.evaluation.metrics import compute_metrics, expected_calibration_error
from mmsent.evaluation.reliability import plot_reliability, reliability_bins

__all__ = [
    "DEFAULT_PRECISIONS", "calibrate_model", "compute_metrics", "evaluate_file", "expected_calibration_error",
    "fit_calibration", "plot_reliability", "reliability_bins", "write_calibration",
]
