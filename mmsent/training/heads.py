"""Head training on cached features: a FusionHead learns from the frozen encoders' features (mmsent/training/
features.py) in seconds; early stopping on validation macro-F1, resumable."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmsent.model import FusionHead, HeadConfig
from mmsent.training.config import TrainConfig
from mmsent.training.features import FeatureSet
from mmsent.training.loop import History, descend, fit, macro_f1
from mmsent.training.losses import head_loss, make_class_weights

__all__ = ["HeadTrainer", "pair_indices", "predict_head", "train_head"]


@torch.no_grad()
def predict_head(
    head: nn.Module, fs: FeatureSet, idx: torch.Tensor, *, tta: bool = True, modality: str = "both"
) -> np.ndarray:
    head.eval()
    out = []
    for s in range(0, len(idx), 512):
        f = fs.batch(idx[s : s + 512], tta=tta)
        if modality == "text":
            f = f._replace(has_image=torch.zeros_like(f.has_image))
        elif modality == "image":
            f = f._replace(has_text=torch.zeros_like(f.has_text))
        out.append(F.softmax(head(f), -1))
    n_classes = int(getattr(head, "cfg").n_classes)  # noqa: B009
    return torch.cat(out).numpy() if out else np.zeros((0, n_classes))


def train_head(
    head_cfg: HeadConfig,
    fs: FeatureSet,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor | None,
    cfg: TrainConfig,
    *,
    sample_weight: torch.Tensor | None = None,
    epochs: int | None = None,
    desc: str = "train",
    state_path: Path | None = None,
) -> tuple[FusionHead, History, int]:
    """Train a FusionHead on cached features (`fit`, the one loop). Returns (best head, history, best epoch).

    Each epoch: shuffled mini-batches (each image mirrored at random) -> AdamW + one-cycle steps; with `val_idx`,
    validation macro-F1 for early stopping; with `state_path`, a checkpoint that a resumed run continues from.
    """
    n_epochs = epochs or cfg.epochs
    steps = max(n_epochs * math.ceil(len(train_idx) / cfg.batch_size), 1)
    t, history, best_epoch = fit(lambda: HeadTrainer.new(head_cfg, fs, train_idx, val_idx, cfg, steps, sample_weight),
                                 cfg, epochs=n_epochs, state_path=state_path, desc=desc)
    return t.head.eval(), history, best_epoch


@dataclass
class HeadTrainer:
    """A FusionHead with its optimiser, one-cycle schedule, loss inputs (class, row and pair weights) and rows: the
    `Trainer` that `fit` runs on cached features."""

    head: FusionHead
    fs: FeatureSet
    cfg: TrainConfig
    train_idx: torch.Tensor
    val_idx: torch.Tensor | None
    steps: int  # the schedule's length: a run resumed with more epochs stretches it
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.OneCycleLR
    class_weights: torch.Tensor | None
    sample_w: torch.Tensor
    pairs: torch.Tensor

    @classmethod
    def new(
        cls,
        head_cfg: HeadConfig,
        fs: FeatureSet,
        train_idx: torch.Tensor,
        val_idx: torch.Tensor | None,
        cfg: TrainConfig,
        steps: int,
        sample_weight: torch.Tensor | None,
    ) -> HeadTrainer:
        head = FusionHead(head_cfg)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
        weights = make_class_weights(fs.labels[train_idx], head_cfg.n_classes, cfg.class_weights)
        sample_w = sample_weight if sample_weight is not None else torch.ones(len(fs))
        return cls(head, fs, cfg, train_idx, val_idx, steps, opt, sched, weights, sample_w, pair_indices(fs))

    @property
    def validates(self) -> bool:
        return self.val_idx is not None and len(self.val_idx) > 0

    def epoch(self, epoch: int) -> dict[str, float]:
        """One shuffled pass over the training rows; the epoch's record (the mean training loss)."""
        self.head.train()
        perm = self.train_idx[torch.randperm(len(self.train_idx))]
        bs = self.cfg.batch_size
        total = sum((self.step(perm[s : s + bs]) for s in range(0, len(perm), bs)), 0.0)
        return {"epoch": float(epoch), "train_loss": total / max(len(perm), 1)}

    def step(self, idx: torch.Tensor) -> float:
        """One optimiser step on the rows `idx`; their summed loss."""
        f = self.fs.batch(idx, flip=torch.rand(len(idx)) < 0.5)
        y, pairs, sample_w = self.fs.labels[idx], self.pairs[idx], self.sample_w[idx]
        loss = head_loss(self.head, f, y, pairs, self.cfg, self.class_weights, sample_w)
        descend(loss, self.opt, self.head.parameters())
        self.sched.step()
        return float(loss.detach()) * len(idx)

    def validate(self) -> dict[str, float]:
        assert self.val_idx is not None  # `fit` validates only when `validates`
        probs = predict_head(self.head, self.fs, self.val_idx, tta=self.cfg.tta)
        y = self.fs.labels[self.val_idx]
        return {
            "val_loss": float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp(min=1e-8)), y)),
            "val_macro_f1": macro_f1(y.numpy(), probs, self.head.cfg.n_classes),
            "val_accuracy": float((probs.argmax(1) == y.numpy()).mean()),
        }

    def weights(self) -> dict[str, torch.Tensor]:
        return self.head.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(weights)

    def state(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.sched.total_steps = self.steps  # resuming with more epochs stretches the schedule


def pair_indices(fs: FeatureSet) -> torch.Tensor:
    """Each row's modality pair (an index into MODALITY_PAIRS), -100 where the features carry none."""
    return fs.pairs if fs.pairs is not None else torch.full_like(fs.labels, -100)
