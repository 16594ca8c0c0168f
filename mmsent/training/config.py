"""`TrainConfig`: how to train, for both trainers (head training on cached features, mmsent/training/heads.py, and
fine-tuning, mmsent/training/finetune.py) and the entry point that chooses between them (mmsent/training/train.py).
`mmsent train` has an option per field."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `mmsent train` has an option per field, default and help from here: declared once, they
    cannot disagree. The option is `--batch-size` for batch_size (`--tta/--no-tta` for a bool), unless
    `metadata["flags"]` names it otherwise.

    The fields are grouped by who reads them: both trainers (the one loop, mmsent/training/loop.py, and the losses),
    head training on cached features only (mmsent/training/heads.py), fine-tuning only (mmsent/training/
    finetune.py), and the entry point that chooses between them (mmsent/training/train.py)."""

    # --- both trainers: the loop (epochs, early stopping, seed, progress), the optimiser and the losses
    epochs: int = field(default=40, metadata={"help": "epochs at most (early stopping usually ends sooner)"})
    batch_size: int = field(default=64, metadata={"help": "examples per optimiser step"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the fusion head"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    loss: str = field(default="ce", metadata={"help": "ce | focal"})
    focal_gamma: float = field(default=2.0, metadata={"help": "focal loss: the exponent of (1 - p)"})
    class_weights: str = field(default="sqrt", metadata={"help": "none | balanced | sqrt (root of the balanced ones)"})
    label_smoothing: float = field(default=0.05, metadata={"help": "label smoothing of the loss"})
    patience: int = field(default=8, metadata={"help": "early stopping: epochs without a better validation macro-F1"})
    seed: int = field(default=0, metadata={"help": "random seed (ensemble head k: seed + 1000 k)"})
    progress: bool = field(default=True, metadata={"help": "progress bars", "flags": ("--progress/--quiet",)})

    # --- the entry point (train_model): which trainer, the split or the folds, the threads
    val_fraction: float = field(default=0.1, metadata={"help": "share of the rows held out for early stopping"})
    folds: int = field(default=0, metadata={"help": "k-fold cross-validation (reports mean ± std); 0 = one split"})
    cache_features: bool = field(
        default=True,
        metadata={"help": "head-only training on cached frozen features", "flags": ("--cache/--no-cache",)},
    )
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})

    # --- head training on cached features only; fine-tuning ignores them
    # Off, as `mmsent train` always defaulted and the shipped model was trained: the mirror doubles the CNN's cost
    # of every served image for a CV accuracy unchanged within noise (BENCHMARKS.md, the model card). Also read by
    # `mmsent train` for the served model's config (ModelOptions.config).
    tta: bool = field(default=False, metadata={"help": "score the image and its mirror (2x CNN cost), CV and serving"})
    extra_weight: float = field(default=0.5, metadata={"help": "loss weight of the extra text-only examples"})
    ensemble: int = field(default=1, metadata={"help": "final model: average of N heads (different seeds)"})

    # --- fine-tuning only (mmsent/training/finetune.py, and its soups in train.py); head training ignores them
    encoder_lr: float = field(default=2e-5, metadata={"help": "learning rate of fine-tuned encoder layers"})
    # (the entry point reads it too: fine-tuning on the CPU trains from cached activations)
    device: str = field(default="auto", metadata={"help": "end to end: cuda | cpu | auto (the GPU when there is one)"})
    workers: int = field(
        default=-1, metadata={"help": "end to end: image-loading DataLoader processes (-1: up to 8 on GPU, 0 on CPU)"}
    )
    warmup: float = field(default=0.1, metadata={"help": "end to end: share of the steps that warm the rates up"})
    decay: str = field(default="cosine", metadata={"help": "end to end: cosine | linear decay after the warm-up"})
    image_encoder_lr: float = field(
        default=0.0, metadata={"help": "learning rate of fine-tuned image blocks (0: --encoder-lr)"}
    )
    aux_weight: float = field(
        default=0.3, metadata={"help": "fine-tuning: weight of the losses teaching each encoder its modality's label"}
    )
    keep_folds: bool = field(
        default=False,
        metadata={"help": "with --folds, fine-tuning: also save each fold's model in OUT/folds/K with the rows it "
                          "never trained on (heldout.json), to score them later another way (mmsent quantize --folds)"},
    )
    soup: int = field(
        default=1,
        metadata={"help": "fine-tuning: average the weights of N runs (seeds seed + 1000 k) from one start; one "
                          "model's serving cost"},
    )
