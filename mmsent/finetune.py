"""End-to-end training through the encoders, on a GPU or the CPU: the loop `train_model` runs when encoder layers
are unfrozen (the seed preset; `--text-layers N --image-blocks N` for the default one) or with `--no-cache`.

    examples ─> DataLoader: `cfg.workers` processes load, preprocess, augment (training only) and tokenize
            │   (data.collate); pinned memory on CUDA; the shuffle of epoch e seeded from (seed, e)
            ├─> each batch: to the device ─> autocast (bf16 on CUDA, fp32 on the CPU) ─> loss (train.loss_fn)
            │   ─> AdamW (the head at --lr, unfrozen encoder layers at --encoder-lr) ─> warm-up + cosine/linear LR
            ├─> each epoch: validation macro-F1 ─> early stopping (train._Progress) ─> DIR/train_state.pt
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
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmsent.data import Example, augmentation, collate
from mmsent.model import Batch, MMSentModel
from mmsent.train import History, TrainConfig, _descend, _macro_f1, _Progress, _set_seed, loss_fn, make_class_weights

__all__ = ["finetune", "lr_factor", "predict", "resolve_device"]

DECAYS = ("cosine", "linear")


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (use cpu or auto)")
    return torch.device(name)


def finetune(
    model: MMSentModel,
    train: Sequence[Example],
    val: Sequence[Example] | None,
    cfg: TrainConfig,
    *,
    state_path: Path | None = None,
) -> tuple[MMSentModel, History]:
    """Train `model` end to end (only its trainable parameters move); early stopping on `val`'s macro-F1 when given.

    Returns the model with its best weights, on the CPU, and a record per epoch (loss, posts/s, learning rate,
    validation macro-F1). With `state_path`, a checkpoint each epoch, and a run that finds one continues from it.
    """
    _set_seed(cfg.seed)
    t = _Trainer.new(model, train, cfg)
    run = t.resume(state_path) if state_path is not None and state_path.exists() else _Progress()
    for epoch in range(run.start, cfg.epochs):
        rec = t.epoch(epoch)
        if val:
            rec["val_macro_f1"] = t.macro_f1(val)
            run.update(rec["val_macro_f1"], epoch, model.trainable_state)
        run.history.append(rec)
        if state_path is not None:
            t.save(state_path, run, epoch)
        if val and run.bad >= cfg.patience:
            break
    run.restore_best(model, strict=False)
    return model.cpu().eval(), run.history


# ---------------------------------------------------------------------------------------------------- the trainer
@dataclass
class _Trainer:
    """A model on its device with its optimiser, schedule and class weights, and the examples it trains on."""

    model: MMSentModel
    cfg: TrainConfig
    device: torch.device
    train: Sequence[Example]
    opt: torch.optim.Optimizer
    sched: LambdaLR
    class_weights: torch.Tensor | None

    @classmethod
    def new(cls, model: MMSentModel, train: Sequence[Example], cfg: TrainConfig) -> _Trainer:
        device = resolve_device(cfg.device)
        model.to(device)
        opt = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
        sched = _schedule(opt, cfg.epochs * math.ceil(len(train) / cfg.batch_size), cfg)
        labels = torch.tensor([e.label for e in train if e.label is not None])
        weights = make_class_weights(labels, model.cfg.head.n_classes, cfg.class_weights)
        return cls(model, cfg, device, train, opt, sched, None if weights is None else weights.to(device))

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
        loader = _loader(self.train, self.model, self.cfg, self.device, epoch=epoch)
        quiet = not self.cfg.progress
        with tqdm(total=len(self.train), desc=f"epoch {epoch + 1}", unit="post", leave=False, disable=quiet) as bar:
            for b in loader:  # a Batch (data.collate)
                loss = self.step(_to(b, self.device))
                bar.update(len(b.has_text))
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                yield loss, len(b.has_text)

    def step(self, b: Batch) -> float:
        """One optimiser step on a batch; its mean loss."""
        assert b.labels is not None
        with _autocast(self.device):
            logits = self.model(b)
        ones = torch.ones(len(b.labels), device=self.device)
        loss = loss_fn(logits.float(), b.labels, self.cfg, self.class_weights, ones)  # the loss in fp32
        _descend(loss, self.opt, [p for g in self.opt.param_groups for p in g["params"]])
        self.sched.step()
        return float(loss.detach())

    def _lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def macro_f1(self, val: Sequence[Example]) -> float:
        probs = predict(self.model, val, self.cfg)
        return _macro_f1(np.array([e.label for e in val]), probs, self.model.cfg.head.n_classes)

    def save(self, path: Path, run: _Progress, epoch: int) -> None:
        """The checkpoint after `epoch`: the trainable weights (frozen ones come from their references), the
        optimiser, the schedule, and the run's progress and RNGs (`_Progress.checkpoint`)."""
        state = {"model": self.model.trainable_state(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}
        torch.save(state | run.checkpoint(epoch), path)

    def resume(self, path: Path) -> _Progress:
        st = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(st["model"], strict=False)
        self.opt.load_state_dict(st["opt"])  # its state moves to the parameters' device
        self.sched.load_state_dict(st["sched"])  # the step count; the factor is this run's (more epochs stretch it)
        return _Progress.resumed(st)


@torch.no_grad()
def predict(model: MMSentModel, examples: Sequence[Example], cfg: TrainConfig) -> np.ndarray:
    """Class probabilities (N, K) of `examples` in order, unaugmented, on the device the model is on."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for b in _loader(examples, model, cfg, device, epoch=None):
        with _autocast(device):
            out.append(F.softmax(model(_to(b, device)).float(), -1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.head.n_classes))


# ----------------------------------------------------------------------------------------------------- the pieces
def _param_groups(model: MMSentModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The head at `cfg.lr`; the unfrozen encoder layers at `cfg.encoder_lr` (pretrained weights take small steps)."""
    encoders = [p for e in (model.text_encoder, model.image_encoder) for p in e.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    return groups + ([{"params": encoders, "lr": cfg.encoder_lr}] if encoders else [])


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


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 on CUDA (no loss scaling needed, unlike fp16); fp32 on the CPU, where bf16 is slower on most cores."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
