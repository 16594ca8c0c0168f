"""End-to-end training through the encoders, on a GPU or the CPU: the loop `train_model` runs when encoder layers
are unfrozen (the seed preset; `--text-layers N --image-blocks N` for the default one) or with `--no-cache`.

    examples ─> DataLoader: `cfg.workers` processes load, preprocess, augment (training only) and tokenize
            │   (data.collate); pinned memory on CUDA; the shuffle of epoch e seeded from (seed, e)
            │   or, on the CPU, ActivationRows: what enters the tuned layers, cached once (features.ActivationSet),
            │   the mirrored image at random
            ├─> each batch: to the device ─> autocast (bf16 on CUDA, fp32 on the CPU) ─> loss (losses.head_loss:
            │   the label, or the modality pair) + cfg.aux_weight x each encoder's own annotators' label (AuxHeads)
            │   ─> AdamW (the heads at --lr, unfrozen text layers at --encoder-lr, image blocks at
            │   --image-encoder-lr) ─> warm-up + cosine/linear LR
            ├─> each epoch (loop.fit, the loop head training runs too): validation macro-F1 ─> early stopping
            │   ─> DIR/train_state.pt
            └─> the best weights back in the model, on the CPU, for `train_model` to save

    mmsent train DATA.jsonl --out DIR --preset seed --device auto [--workers 8] [--resume]

A run repeats: the checkpoint holds the model's trainable weights, the optimiser, the schedule, the epoch and every
RNG, and each epoch's shuffle (and its workers' augmentation seeds) come from a generator seeded by the epoch, so a
run interrupted after an epoch and resumed reaches the weights of the uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmsent.data import Example, augmentation, collate
from mmsent.device import autocast, resolve_device
from mmsent.model import MODALITY_PAIRS, Batch, Features, FusionHead, MMSentModel
from mmsent.training.config import TrainConfig
from mmsent.training.features import ActivationSet
from mmsent.training.loop import History, descend, fit, macro_f1
from mmsent.training.losses import head_loss, make_class_weights

__all__ = ["ActivationRows", "AuxHeads", "FinetuneTrainer", "Rows", "finetune", "lr_factor", "predict"]

DECAYS = ("cosine", "linear")


def finetune(
    model: MMSentModel,
    train: Rows,
    val: Rows | None,
    cfg: TrainConfig,
    *,
    state_path: Path | None = None,
    stop_after: int | None = None,
) -> tuple[MMSentModel, History]:
    """Train `model` end to end (only its trainable parameters move); early stopping on `val`'s macro-F1 when given.

    Returns the model with its best weights, on the CPU, and a record per epoch (loss, posts/s, learning rate,
    validation macro-F1). With `state_path`, a checkpoint each epoch, and a run that finds one continues from it.
    `stop_after` ends the run after that many epochs of a schedule laid out for `cfg.epochs` (as early stopping
    would have): how the final model repeats the epochs that cross-validation chose.
    """
    epochs = min(cfg.epochs, stop_after or cfg.epochs)
    _, history, _ = fit(lambda: FinetuneTrainer.new(model, train, val, cfg), cfg, epochs=epochs,
                        state_path=state_path, desc="fine-tune")
    return model.cpu().eval(), history


# ------------------------------------------------------------------------------------------------------ the rows
@dataclass(frozen=True)
class ActivationRows:
    """Rows of an ActivationSet to train on (or score): the CPU's fast road, where only the tuned layers run."""

    acts: ActivationSet
    rows: torch.Tensor  # (n,) indices into acts

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self) -> torch.Tensor:
        return self.acts.labels[self.rows]

    def batches(self, cfg: TrainConfig, *, epoch: int | None) -> Iterator[Batch]:
        """In order (epoch None), or shuffled with each image mirrored at random, from a generator seeded by the
        epoch (so a resumed run repeats)."""
        rows, gen = self.rows, torch.Generator().manual_seed(cfg.seed * 100_003 + (epoch or 0))
        if epoch is not None:
            rows = rows[torch.randperm(len(rows), generator=gen)]
        for s in range(0, len(rows), cfg.batch_size):
            idx = rows[s : s + cfg.batch_size]
            flip = torch.rand(len(idx), generator=gen) < 0.5 if epoch is not None else None
            yield self.acts.batch(idx, flip=flip)


Rows = Sequence[Example] | ActivationRows  # what finetune trains on: examples end to end, or cached activations


def _batches(rows: Rows, model: MMSentModel, cfg: TrainConfig, device: torch.device, *,
             epoch: int | None) -> Iterator[Batch]:
    if isinstance(rows, ActivationRows):
        return rows.batches(cfg, epoch=epoch)
    return iter(_loader(rows, model, cfg, device, epoch=epoch))


def _labels(rows: Rows) -> torch.Tensor:
    if isinstance(rows, ActivationRows):
        return rows.labels()
    return torch.tensor([e.label for e in rows if e.label is not None], dtype=torch.long)


class AuxHeads(nn.Module):
    """Training-only linear heads that teach each encoder its own annotators' label (MVSA's text_label and
    image_label, from the row's modality pair): the tuned layers learn what their modality says, not only what
    helps the fused head. Not part of the saved model."""

    pair_labels: torch.Tensor  # (P + 1, 2) buffer: each modality pair's text and image label; the last row: none

    def __init__(self, text_dim: int, image_dim: int, n_classes: int) -> None:
        super().__init__()
        self.text, self.image = nn.Linear(text_dim, n_classes), nn.Linear(image_dim, n_classes)
        pairs = torch.tensor(MODALITY_PAIRS + ((-100, -100),))  # (P + 1, 2); row -1: no pair
        self.register_buffer("pair_labels", pairs, persistent=False)

    def loss(self, f: Features, pairs: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of both heads over the rows that have the modality and a pair; 0 without any."""
        own = self.pair_labels[torch.where(pairs >= 0, pairs, -1)]  # (B, 2): text label, image label
        text_y = torch.where(f.has_text, own[:, 0], -100)
        image_y = torch.where(f.has_image, own[:, 1], -100)
        total = f.text.new_zeros(())
        for head, x, y in ((self.text, f.text, text_y), (self.image, f.image, image_y)):
            if (y >= 0).any():
                total = total + F.cross_entropy(head(F.dropout(x.float(), 0.3, self.training)), y, ignore_index=-100)
        return total


# ---------------------------------------------------------------------------------------------------- the trainer
@dataclass
class FinetuneTrainer:
    """A model on its device with its optimiser, schedule, class weights and auxiliary heads, and its rows: the
    `Trainer` that `fit` runs through the encoders."""

    model: MMSentModel
    cfg: TrainConfig
    device: torch.device
    train: Rows
    val: Rows | None
    opt: torch.optim.Optimizer
    sched: LambdaLR
    class_weights: torch.Tensor | None
    aux: AuxHeads

    @classmethod
    def new(cls, model: MMSentModel, train: Rows, val: Rows | None, cfg: TrainConfig) -> FinetuneTrainer:
        device = resolve_device(cfg.device)
        head = model.cfg.head
        aux = AuxHeads(head.text_dim, head.image_dim, head.n_classes).to(device)
        model.to(device)
        opt = torch.optim.AdamW(_param_groups(model, aux, cfg), weight_decay=cfg.weight_decay)
        sched = _schedule(opt, cfg.epochs * math.ceil(len(train) / cfg.batch_size), cfg)
        weights = make_class_weights(_labels(train), head.n_classes, cfg.class_weights)
        return cls(model, cfg, device, train, val, opt, sched, None if weights is None else weights.to(device), aux)

    @property
    def validates(self) -> bool:
        return self.val is not None and len(self.val) > 0

    def epoch(self, epoch: int) -> dict[str, float]:
        """One shuffled pass over the training examples; the epoch's record."""
        self.model.train()
        t0, total, n = time.perf_counter(), 0.0, 0
        for loss, size in self._steps(epoch):
            total, n = total + loss * size, n + size
        rate = n / max(time.perf_counter() - t0, 1e-9)
        return {"epoch": float(epoch), "train_loss": total / max(n, 1), "samples_per_s": rate, "lr": self._lr()}

    def _steps(self, epoch: int) -> Iterator[tuple[float, int]]:
        """(loss, batch size) per optimiser step, under a progress bar that counts posts (so its rate is posts/s)."""
        loader = _batches(self.train, self.model, self.cfg, self.device, epoch=epoch)
        quiet = not self.cfg.progress
        with tqdm(total=len(self.train), desc=f"epoch {epoch + 1}", unit="post", leave=False, disable=quiet) as bar:
            for b in loader:  # a Batch (data.collate)
                loss = self.step(_to(b, self.device))
                bar.update(len(b.has_text))
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                yield loss, len(b.has_text)

    def step(self, b: Batch) -> float:
        """One optimiser step on a batch; its mean loss."""
        if b.labels is None or not isinstance(self.model.head, FusionHead):
            raise ValueError("fine-tuning needs labelled rows and a single fusion head")
        self.aux.train()
        pairs = b.pairs if b.pairs is not None else torch.full_like(b.labels, -100)
        ones = torch.ones(len(b.labels), device=self.device)
        with autocast(self.device):
            f = self.model.features(b)
            loss = head_loss(self.model.head, f, b.labels, pairs, self.cfg, self.class_weights, ones)
            if self.cfg.aux_weight:
                loss = loss + self.cfg.aux_weight * self.aux.loss(f, pairs)
        descend(loss, self.opt, [p for g in self.opt.param_groups for p in g["params"]])
        self.sched.step()
        return float(loss.detach())

    def _lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def validate(self) -> dict[str, float]:
        assert self.val is not None  # `fit` validates only when `validates`
        probs = predict(self.model, self.val, self.cfg)
        return {"val_macro_f1": macro_f1(_labels(self.val).numpy(), probs, self.model.cfg.head.n_classes)}

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.trainable_state()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights, strict=False)  # the trainable weights; frozen ones come from references

    def state(self) -> dict[str, Any]:
        """Its part of a checkpoint: the trainable weights (frozen ones come from their references), the auxiliary
        heads, the optimiser and the schedule."""
        return {"model": self.model.trainable_state(), "aux": self.aux.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.aux.load_state_dict(state["aux"])
        self.opt.load_state_dict(state["opt"])  # its state moves to the parameters' device
        self.sched.load_state_dict(state["sched"])  # the step count; the factor is this run's (more epochs stretch it)


@torch.no_grad()
def predict(model: MMSentModel, rows: Rows, cfg: TrainConfig, *, modality: str = "both") -> np.ndarray:
    """Class probabilities (N, K) of `rows` in order, unaugmented, on the device the model is on; with `modality`
    "text" or "image", as if the post had only that one."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for b in _batches(rows, model, cfg, device, epoch=None):
        if modality != "both":
            keep_text = modality == "text"
            b = b._replace(has_text=b.has_text & keep_text, has_image=b.has_image & (not keep_text))
        with autocast(device):
            out.append(F.softmax(model(_to(b, device)).float(), -1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.head.n_classes))


# ----------------------------------------------------------------------------------------------------- the pieces
def _param_groups(model: MMSentModel, aux: AuxHeads, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The heads at `cfg.lr`; the unfrozen encoder layers at `cfg.encoder_lr` (pretrained weights take small steps)."""
    groups: list[dict[str, Any]] = [{"params": [*model.head.parameters(), *aux.parameters()], "lr": cfg.lr}]
    image_lr = cfg.image_encoder_lr or cfg.encoder_lr
    for encoder, lr in ((model.text_encoder, cfg.encoder_lr), (model.image_encoder, image_lr)):
        tuned = [p for p in encoder.parameters() if p.requires_grad]
        groups += [{"params": tuned, "lr": lr}] if tuned else []
    return groups


def lr_factor(step: int, *, total: int, warmup: int, decay: str) -> float:
    """The learning-rate multiplier at `step`: linear from 0 up to 1 over `warmup` steps (large early steps would
    wreck the pretrained layers through a random head), then down to 0 at `total`, cosine or linear."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * done)) if decay == "cosine" else 1.0 - done


def _schedule(opt: torch.optim.Optimizer, steps: int, cfg: TrainConfig) -> LambdaLR:
    if cfg.decay not in DECAYS:
        raise ValueError(f"decay must be cosine or linear, not {cfg.decay!r}")
    warmup = int(cfg.warmup * steps)
    return LambdaLR(opt, partial(lr_factor, total=max(steps, 1), warmup=warmup, decay=cfg.decay))


def _loader(
    examples: Sequence[Example], model: MMSentModel, cfg: TrainConfig, device: torch.device, *, epoch: int | None
) -> DataLoader[Example]:
    """Batches of `examples` made in worker processes (`data.collate`: load, preprocess, tokenize, and with an
    `epoch`, augment and shuffle). Its own generator per epoch, seeded by it: the shuffle and the workers' seeds
    repeat in a resumed run, and the global RNG (dropout) is left to the model."""
    pre = model.cfg.image.preprocess
    augment = augmentation(pre.size) if epoch is not None else None
    make = partial(collate, tokenize=model.text_encoder.tokenize, preprocess=pre, augment=augment)
    return DataLoader(
        cast("Dataset[Example]", list(examples)),  # a list is a map-style dataset (len and [k])
        batch_size=cfg.batch_size,
        shuffle=epoch is not None,
        collate_fn=make,
        num_workers=_workers(cfg, device),
        pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
        generator=torch.Generator().manual_seed(cfg.seed * 100_003 + (epoch or 0)),
    )


def _workers(cfg: TrainConfig, device: torch.device) -> int:
    """`cfg.workers`; -1: up to 8 processes feeding a GPU, none on the CPU (the model needs its cores there)."""
    if cfg.workers >= 0:
        return cfg.workers
    return min(8, max((os.cpu_count() or 1) - 1, 0)) if device.type == "cuda" else 0


def _to(b: Batch, device: torch.device) -> Batch:
    """The batch on `device`; non-blocking, which overlaps the copy from pinned memory with the GPU's work."""
    return Batch._make(None if t is None else t.to(device, non_blocking=True) for t in b)
