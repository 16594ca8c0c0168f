"""Training: `TrainConfig` (`config.py`), the loop's machinery (`loop.py`) and losses (`losses.py`) both trainers
share, head training on cached features (`heads.py` over `features.py`), fine-tuning through the encoders
(`finetune.py`), and the entry point with k-fold CV and soups (`train.py`, `mmsent train`). It imports the core,
serving and evaluation, never the benchmarks or the CLI."""

from mmsent.training.config import TrainConfig
from mmsent.training.finetune import finetune
from mmsent.training.train import train_model

__all__ = ["TrainConfig", "finetune", "train_model"]
