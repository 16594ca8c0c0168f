"""The one training loop, and its machinery: seeds and RNG state, checkpoints, one optimiser step, validation
macro-F1, and a run's progress (history, early stopping, what a resumed run continues from).

Head training (mmsent/training/heads.py, `HeadTrainer`) and fine-tuning (mmsent/training/finetune.py,
`FinetuneTrainer`) are two `Trainer`s of the same loop, `fit`:

    fit(new trainer, cfg, epochs) ─ seed ─> the trainer ─> a checkpoint at state_path? resume from it (its RNGs too)
        each epoch ─> trainer.epoch (its record: train_loss, ...) ─> trainer.validate when it has validation rows
                    (val_macro_f1, ...) ─> Progress.update (the best weights kept) ─> history
                    ─> checkpoint (the trainer's state + the progress + every RNG) ─> stop after cfg.patience bad epochs
        ─> the best weights back in the trainer ─> (trainer, history, best epoch)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmsent.training.config import TrainConfig

__all__ = [
    "History", "Progress", "Trainer", "descend", "fit", "load_checkpoint", "macro_f1", "save_checkpoint", "set_seed",
]

History = list[dict[str, float]]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def macro_f1(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score  # ~1 s to import: only when a run validates, not with every command

    return float(f1_score(y, probs.argmax(1), labels=list(range(n_classes)), average="macro", zero_division=0))


def _rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (shuffles, dropout, augmentation): what a checkpoint saves to repeat the run. Only
    tensors and plain values, so that a checkpoint loads with `torch.load(..., weights_only=True)`: numpy's key
    array goes in as a tensor."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_state = (name, torch.from_numpy(np.asarray(key, dtype=np.int64)), pos, has_gauss, gauss)
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    name, key, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a `--resume` checkpoint: tensors, numbers, strings and containers only (see `load_checkpoint`)."""
    torch.save(state, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A `--resume` checkpoint, unpickled with `weights_only=True`: tensors, numbers, strings and containers only,
    so that a file put where a checkpoint is expected cannot run code."""
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def descend(loss: torch.Tensor, opt: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """One optimiser step down `loss`, the gradient norm clipped at 5."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, 5.0)
    opt.step()


@dataclass
class Progress:
    """A run's history and early stopping on validation macro-F1; what a resumed run continues from."""

    history: History = field(default_factory=list)
    best: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    bad: int = 0  # epochs since the best
    start: int = 0  # the first epoch still to run

    def update(self, f1: float, epoch: int, state: Callable[[], dict[str, torch.Tensor]]) -> None:
        if f1 > self.best:
            self.best, self.best_epoch, self.bad = f1, epoch, 0
            self.best_state = {k: v.clone() for k, v in state().items()}
        else:
            self.bad += 1

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """What a run resumed after `epoch` continues from: this progress and every RNG (a trainer adds its own)."""
        best = {"best": self.best, "best_state": self.best_state, "best_epoch": self.best_epoch, "bad": self.bad}
        return {"history": self.history, **best, "epoch": epoch, "rng": _rng_state()}

    @classmethod
    def resumed(cls, st: dict[str, Any]) -> Progress:
        """The progress in checkpoint `st`, from the epoch after its own; its RNGs restored."""
        _set_rng_state(st["rng"])
        return cls(st["history"], st["best"], st["best_state"], st["best_epoch"], st["bad"], st["epoch"] + 1)

    def restore_best(self, load: Callable[[dict[str, torch.Tensor]], None]) -> int:
        """Hand the best weights to `load`; the best epoch (the last one when nothing was validated)."""
        if self.best_state is None:
            return len(self.history) - 1
        load(self.best_state)
        return self.best_epoch


class Trainer(Protocol):
    """One way of training that `fit` runs: what moves, how an epoch passes and validates, what a checkpoint holds."""

    @property
    def validates(self) -> bool:
        """Whether it has validation rows: early stopping on their macro-F1, or every epoch it is given."""
        ...

    def epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training rows; the epoch's record ("epoch", "train_loss", and its own figures)."""
        ...

    def validate(self) -> dict[str, float]:
        """The validation figures, "val_macro_f1" among them."""
        ...

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights that training moves: what the best epoch's copy keeps."""
        ...

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

    def state(self) -> dict[str, Any]:
        """Its part of a checkpoint: the moving weights, the optimiser, the schedule."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...


T = TypeVar("T", bound=Trainer)


def fit(new: Callable[[], T], cfg: TrainConfig, *, epochs: int, state_path: Path | None = None,
        desc: str = "train") -> tuple[T, History, int]:
    """Run `epochs` epochs of the trainer that `new` makes (after seeding with `cfg.seed`, so that its initial
    weights repeat), early-stopped after `cfg.patience` epochs without a better validation macro-F1; with
    `state_path`, a checkpoint after each epoch, and a run that finds one continues from it. The best weights end in
    the trainer. (the trainer, a record per epoch, the best epoch: the last one when nothing was validated)"""
    set_seed(cfg.seed)
    trainer = new()
    run = Progress()
    if state_path is not None and state_path.exists():
        checkpoint = load_checkpoint(state_path)
        trainer.load_state(checkpoint)
        run = Progress.resumed(checkpoint)
    bar = tqdm(range(run.start, epochs), desc=desc, disable=not cfg.progress, leave=False)
    for epoch in bar:
        record = trainer.epoch(epoch)
        if trainer.validates:
            record.update(trainer.validate())
            run.update(record["val_macro_f1"], epoch, trainer.weights)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", f1=f"{record['val_macro_f1']:.3f}")
        run.history.append(record)
        if state_path is not None:
            save_checkpoint(state_path, trainer.state() | run.checkpoint(epoch))
        if trainer.validates and run.bad >= cfg.patience:
            break
    return trainer, run.history, run.restore_best(trainer.load_weights)
