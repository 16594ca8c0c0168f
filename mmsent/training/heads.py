"""Head training on cached features: a FusionHead learns from the frozen encoders' features (mmsent/training/
features.py) in seconds; early stopping on validation macro-F1, resumable."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmsent.model import FusionHead, HeadConfig
from mmsent.training.config import TrainConfig
from mmsent.training.features import FeatureSet
from mmsent.training.loop import History, Progress, descend, load_checkpoint, macro_f1, set_seed
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
    """Train a FusionHead on cached features. Returns (best head, history, best epoch).

    Each epoch: shuffled mini-batches (each image mirrored at random) -> AdamW + one-cycle steps; with `val_idx`,
    validation macro-F1 for early stopping; with `state_path`, a checkpoint that a resumed run continues from.
    """
    set_seed(cfg.seed)
    n_epochs = epochs or cfg.epochs
    steps = max(n_epochs * math.ceil(len(train_idx) / cfg.batch_size), 1)
    t = HeadTrainer.new(head_cfg, fs, train_idx, cfg, steps, sample_weight)
    run = t.resume(state_path, steps) if state_path is not None and state_path.exists() else Progress()
    bar = tqdm(range(run.start, n_epochs), desc=desc, disable=not cfg.progress, leave=False)
    for epoch in bar:
        rec = {"epoch": float(epoch), "train_loss": t.epoch(train_idx)}
        if val_idx is not None and len(val_idx):
            rec.update(t.validate(val_idx))
            run.update(rec["val_macro_f1"], epoch, t.head.state_dict)
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", f1=f"{rec['val_macro_f1']:.3f}")
        run.history.append(rec)
        if state_path is not None:
            t.save(state_path, run, epoch)
        if val_idx is not None and run.bad >= cfg.patience:
            break
    best_epoch = run.restore_best(t.head)
    return t.head.eval(), run.history, best_epoch


@dataclass
class HeadTrainer:
    """A FusionHead with its optimiser, one-cycle schedule and loss inputs (class, row and pair weights)."""

    head: FusionHead
    fs: FeatureSet
    cfg: TrainConfig
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
        cfg: TrainConfig,
        steps: int,
        sample_weight: torch.Tensor | None,
    ) -> HeadTrainer:
        head = FusionHead(head_cfg)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
        weights = make_class_weights(fs.labels[train_idx], head_cfg.n_classes, cfg.class_weights)
        sample_w = sample_weight if sample_weight is not None else torch.ones(len(fs))
        return cls(head, fs, cfg, opt, sched, weights, sample_w, pair_indices(fs))

    def epoch(self, train_idx: torch.Tensor) -> float:
        """One shuffled pass over `train_idx`; the mean training loss."""
        self.head.train()
        perm = train_idx[torch.randperm(len(train_idx))]
        bs = self.cfg.batch_size
        total = sum((self.step(perm[s : s + bs]) for s in range(0, len(perm), bs)), 0.0)
        return total / max(len(perm), 1)

    def step(self, idx: torch.Tensor) -> float:
        """One optimiser step on the rows `idx`; their summed loss."""
        f = self.fs.batch(idx, flip=torch.rand(len(idx)) < 0.5)
        y, pairs, sample_w = self.fs.labels[idx], self.pairs[idx], self.sample_w[idx]
        loss = head_loss(self.head, f, y, pairs, self.cfg, self.class_weights, sample_w)
        descend(loss, self.opt, self.head.parameters())
        self.sched.step()
        return float(loss.detach()) * len(idx)

    def validate(self, val_idx: torch.Tensor) -> dict[str, float]:
        probs = predict_head(self.head, self.fs, val_idx, tta=self.cfg.tta)
        y = self.fs.labels[val_idx]
        return {
            "val_loss": float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp(min=1e-8)), y)),
            "val_macro_f1": macro_f1(y.numpy(), probs, self.head.cfg.n_classes),
            "val_accuracy": float((probs.argmax(1) == y.numpy()).mean()),
        }

    def save(self, path: Path, run: Progress, epoch: int) -> None:
        state = {"head": self.head.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}
        torch.save(state | run.checkpoint(epoch), path)

    def resume(self, path: Path, steps: int) -> Progress:
        st = load_checkpoint(path)
        self.head.load_state_dict(st["head"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.sched.total_steps = steps  # resuming with more epochs stretches the schedule
        return Progress.resumed(st)


def pair_indices(fs: FeatureSet) -> torch.Tensor:
    return fs.pairs if fs.pairs is not None else torch.full_like(fs.labels, -100)
