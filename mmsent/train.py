"""Training: head-only on cached frozen features (seconds), or end to end with partial/full fine-tuning; k-fold CV.

    mmsent train DATA.jsonl --out DIR [--preset default] [--fusion gated] [--folds 5] [--extra-text tweets.jsonl]

    train_model ─┬─ frozen encoders ─> features once ─┬─ --folds k: cross_validate (each fold: early stopping,
                 │                                    │   then `ensemble` heads), then the final heads on all rows
                 │                                    └─ otherwise: train_head on one split (early stopping)
                 ├─ trainable encoder layers, on the CPU ─> activations below them once (extract_activations) ─>
                 │  finetune.finetune over them, --soup N runs whose weights are averaged (--folds k: k_folds, each
                 │  fold early-stopped, then the final model for the median epochs; calibration.json from the
                 │  out-of-fold probabilities)
                 └─ trainable layers on a GPU (or --no-cache) ─> finetune.finetune (end to end on --device, image
                    augmentation, bf16 on CUDA, warm-up + cosine decay, early stopping; see mmsent/finetune.py)
                 ─> DIR: config.json (+ train_config, cv) + model.safetensors + labels.json, training.png; with
                    --folds also cv.json, oof.npz (out-of-fold probabilities), calibration.json and
                    reference.json (the drift reference: mmsent/reference.py)

Early stopping on validation macro-F1; class weights or focal loss for the rare neutral class; seeds; resumable
(`train_state.pt` in the output directory); a loss/metric plot (`training.png`); the checkpoint is a model
directory (config.json + model.safetensors + labels.json) that `Scorer.load(DIR)` reads.
"""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmsent.data import Example
from mmsent.evaluate import compute_metrics
from mmsent.features import ActivationSet, FeatureSet, extract_activations, extract_features
from mmsent.model import Features, FusionHead, HeadConfig, HeadEnsemble, MMSentModel

if TYPE_CHECKING:
    from mmsent.calibrate import Calibration
    from mmsent.finetune import Rows  # finetune builds on this module, which may not import it before it runs

__all__ = ["TrainConfig", "cross_validate", "train_head", "train_model"]

History = list[dict[str, float]]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `mmsent train` has an option per field, default and help from here: declared once, they
    cannot disagree. The option is `--batch-size` for batch_size (`--tta/--no-tta` for a bool), unless
    `metadata["flags"]` names it otherwise."""

    epochs: int = field(default=40, metadata={"help": "epochs at most (early stopping usually ends sooner)"})
    batch_size: int = field(default=64, metadata={"help": "examples per optimiser step"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the fusion head"})
    encoder_lr: float = field(default=2e-5, metadata={"help": "learning rate of fine-tuned encoder layers"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    loss: str = field(default="ce", metadata={"help": "ce | focal"})
    focal_gamma: float = field(default=2.0, metadata={"help": "focal loss: the exponent of (1 - p)"})
    class_weights: str = field(default="sqrt", metadata={"help": "none | balanced | sqrt (root of the balanced ones)"})
    label_smoothing: float = field(default=0.05, metadata={"help": "label smoothing of the loss"})
    patience: int = field(default=8, metadata={"help": "early stopping: epochs without a better validation macro-F1"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the rows held out for early stopping"})
    seed: int = field(default=0, metadata={"help": "random seed (ensemble head k: seed + 1000 k)"})
    folds: int = field(default=0, metadata={"help": "k-fold cross-validation (reports mean ± std); 0 = one split"})
    cache_features: bool = field(
        default=True,
        metadata={"help": "head-only training on cached frozen features", "flags": ("--cache/--no-cache",)},
    )
    # Off, as `mmsent train` always defaulted and the shipped model was trained: the mirror doubles the CNN's cost
    # of every served image for a CV accuracy unchanged within noise (BENCHMARKS.md, the model card).
    tta: bool = field(default=False, metadata={"help": "score the image and its mirror (2x CNN cost), CV and serving"})
    extra_weight: float = field(default=0.5, metadata={"help": "loss weight of the extra text-only examples"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    progress: bool = field(default=True, metadata={"help": "progress bars", "flags": ("--progress/--quiet",)})
    ensemble: int = field(default=1, metadata={"help": "final model: average of N heads (different seeds)"})
    # The end-to-end loop's own settings (mmsent/finetune.py); head-only training on cached features ignores them.
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
    soup: int = field(
        default=1,
        metadata={"help": "fine-tuning: average the weights of N runs (seeds seed + 1000 k) from one start; one "
                          "model's serving cost"},
    )


# ----------------------------------------------------------------------------------------------------------- loss
def make_class_weights(labels: torch.Tensor, n_classes: int, mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = torch.bincount(labels[labels >= 0], minlength=n_classes).float().clamp(min=1)
    w = counts.sum() / (n_classes * counts)
    if mode == "sqrt":
        w = w.sqrt()
    elif mode != "balanced":
        raise ValueError(f"class_weights must be none, balanced or sqrt, not {mode!r}")
    return w / (w * counts).sum() * counts.sum()  # mean weight per example stays 1


def loss_fn(
    logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, weights: torch.Tensor | None, sample_w: torch.Tensor
) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, weight=weights, reduction="none", label_smoothing=cfg.label_smoothing)
    if cfg.loss == "focal":
        pt = torch.exp(-F.cross_entropy(logits, y, reduction="none")).clamp(max=1.0)
        ce = (1 - pt) ** cfg.focal_gamma * ce
    elif cfg.loss != "ce":
        raise ValueError(f"loss must be ce or focal, not {cfg.loss!r}")
    return (ce * sample_w).sum() / sample_w.sum().clamp(min=1e-8)


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _macro_f1(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

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


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A `--resume` checkpoint, unpickled with `weights_only=True`: tensors, numbers, strings and containers only,
    so that a file put where a checkpoint is expected cannot run code."""
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def _descend(loss: torch.Tensor, opt: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """One optimiser step down `loss`, the gradient norm clipped at 5."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, 5.0)
    opt.step()


@dataclass
class _Progress:
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
    def resumed(cls, st: dict[str, Any]) -> _Progress:
        """The progress in checkpoint `st`, from the epoch after its own; its RNGs restored."""
        _set_rng_state(st["rng"])
        return cls(st["history"], st["best"], st["best_state"], st["best_epoch"], st["bad"], st["epoch"] + 1)

    def restore_best(self, module: nn.Module, *, strict: bool = True) -> int:
        """Load the best weights into `module`; the best epoch (the last one when nothing was validated)."""
        if self.best_state is None:
            return len(self.history) - 1
        module.load_state_dict(self.best_state, strict=strict)
        return self.best_epoch


# ------------------------------------------------------------------------------------------- head-only (cached)
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
    _set_seed(cfg.seed)
    n_epochs = epochs or cfg.epochs
    steps = max(n_epochs * math.ceil(len(train_idx) / cfg.batch_size), 1)
    t = _HeadTrainer.new(head_cfg, fs, train_idx, cfg, steps, sample_weight)
    run = t.resume(state_path, steps) if state_path is not None and state_path.exists() else _Progress()
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
class _HeadTrainer:
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
    ) -> _HeadTrainer:
        head = FusionHead(head_cfg)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
        weights = make_class_weights(fs.labels[train_idx], head_cfg.n_classes, cfg.class_weights)
        sample_w = sample_weight if sample_weight is not None else torch.ones(len(fs))
        return cls(head, fs, cfg, opt, sched, weights, sample_w, _pairs_of(fs))

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
        _descend(loss, self.opt, self.head.parameters())
        self.sched.step()
        return float(loss.detach()) * len(idx)

    def validate(self, val_idx: torch.Tensor) -> dict[str, float]:
        probs = predict_head(self.head, self.fs, val_idx, tta=self.cfg.tta)
        y = self.fs.labels[val_idx]
        return {
            "val_loss": float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp(min=1e-8)), y)),
            "val_macro_f1": _macro_f1(y.numpy(), probs, self.head.cfg.n_classes),
            "val_accuracy": float((probs.argmax(1) == y.numpy()).mean()),
        }

    def save(self, path: Path, run: _Progress, epoch: int) -> None:
        state = {"head": self.head.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}
        torch.save(state | run.checkpoint(epoch), path)

    def resume(self, path: Path, steps: int) -> _Progress:
        st = load_checkpoint(path)
        self.head.load_state_dict(st["head"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.sched.total_steps = steps  # resuming with more epochs stretches the schedule
        return _Progress.resumed(st)


def _stratified_split(labels: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, va = train_test_split(idx, test_size=frac, random_state=seed, stratify=labels)
    return np.sort(tr), np.sort(va)


def _concat(a: FeatureSet, b: FeatureSet) -> FeatureSet:
    if a.image.shape[1:] != b.image.shape[1:]:
        b_img = torch.zeros(len(b), *a.image.shape[1:], dtype=a.image.dtype)
        b = replace(b, image=b_img, image_flip=b_img.clone(), has_image=torch.zeros(len(b), dtype=torch.bool))
    tokens = mask = None
    if a.text_tokens is not None and b.text_tokens is not None and a.text_mask is not None and b.text_mask is not None:
        tokens, mask = torch.cat([a.text_tokens, b.text_tokens]), torch.cat([a.text_mask, b.text_mask])
    return FeatureSet(
        text=torch.cat([a.text, b.text]),
        image=torch.cat([a.image, b.image.to(a.image.dtype)]),
        image_flip=torch.cat([a.image_flip, b.image_flip.to(a.image.dtype)]),
        has_text=torch.cat([a.has_text, b.has_text]),
        has_image=torch.cat([a.has_image, b.has_image]),
        labels=torch.cat([a.labels, b.labels]),
        pairs=torch.cat([_pairs_of(a), _pairs_of(b)]),
        text_tokens=tokens,
        text_mask=mask,
    )


def _pairs_of(fs: FeatureSet) -> torch.Tensor:
    return fs.pairs if fs.pairs is not None else torch.full_like(fs.labels, -100)


def _sample_weights(n: int, n_main: int, cfg: TrainConfig) -> torch.Tensor:
    """Loss weight per row: 1 for the `n_main` main rows, `cfg.extra_weight` for the extra text-only rows after."""
    sw = torch.ones(n)
    sw[n_main:] = cfg.extra_weight
    return sw


def head_loss(
    head: FusionHead,
    f: Features,
    y: torch.Tensor,
    pairs: torch.Tensor,
    cfg: TrainConfig,
    weights: torch.Tensor | None,
    sample_w: torch.Tensor,
) -> torch.Tensor:
    """The label loss; with a modality-pairs head, rows with both per-modality labels learn the pair instead."""
    out = head.outputs(f)  # one forward: one dropout mask for both losses
    if not head.cfg.modality_pairs:
        return loss_fn(out, y, cfg, weights, sample_w)
    has_pair = pairs >= 0
    label_loss = loss_fn(head.labels_from_pairs(out), y, cfg, weights, sample_w * ~has_pair)
    pair_loss = loss_fn(out, pairs.clamp(min=0), cfg, None, sample_w * has_pair)
    share = has_pair.float().mean()
    return share * pair_loss + (1 - share) * label_loss


def _seeded(cfg: TrainConfig, n: int) -> list[TrainConfig]:
    """`cfg` for each of `n` runs whose results are averaged (ensemble heads, soup runs): seeds seed + 1000 k."""
    return [replace(cfg, seed=cfg.seed + 1000 * k) for k in range(n)]


def _ensemble(
    head_cfg: HeadConfig, fs: FeatureSet, idx: torch.Tensor, cfg: TrainConfig, epochs: int, n_main: int, desc: str
) -> nn.Module:
    """`cfg.ensemble` heads (seeds seed + 1000 k) trained on all of `idx` for `epochs`: one head or their average."""
    sw = _sample_weights(len(fs), n_main, cfg)
    heads = [
        train_head(head_cfg, fs, idx, None, c, sample_weight=sw, epochs=epochs, desc=f"{desc} {e + 1}")[0]
        for e, c in enumerate(_seeded(cfg, max(1, cfg.ensemble)))
    ]
    return heads[0] if len(heads) == 1 else HeadEnsemble(heads)


# ------------------------------------------------------------------------------------------- cross-validation
CV_METRICS = ("accuracy", "macro_f1", "weighted_f1", "ece")


def _summary(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for k in CV_METRICS:
        vals = [m[k] for m in per_fold]
        out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def cross_validate(
    head_cfg: HeadConfig,
    fs: FeatureSet,
    n_main: int,
    labels: Sequence[str],
    cfg: TrainConfig,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """k-fold CV of head-only training over the first `n_main` rows of `fs` (rows after are extra text-only data).

    Each fold's model is made the way the shipped one is (`_fold_model`) and scores the fold's test rows with both
    modalities, the text only and the image only.
    """

    def fold(k: int, tr: np.ndarray, te: np.ndarray) -> FoldResult:
        model, hist, best_epoch = _fold_model(head_cfg, fs, n_main, tr, cfg, k)
        idx = torch.from_numpy(te)
        return {m: predict_head(model, fs, idx, tta=cfg.tta, modality=m) for m in MODALITIES}, hist, best_epoch

    return k_folds(fs.labels[:n_main].numpy(), labels, cfg, fold, log)


MODALITIES = ("both", "text", "image")
FoldResult = tuple[dict[str, np.ndarray], History, int]  # probabilities per modality, history, best epoch


def k_folds(
    y: np.ndarray,
    labels: Sequence[str],
    cfg: TrainConfig,
    fold: Callable[[int, np.ndarray, np.ndarray], FoldResult],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Stratified k-fold CV: `fold(k, train rows, test rows)` trains on the first and scores the second. The
    metrics per fold and modality, their summary, the best epochs, and the out-of-fold probabilities ("oof", one
    row per example: what calibration may fit on without having trained on the row)."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    folds: dict[str, list[dict[str, Any]]] = {m: [] for m in MODALITIES}
    oof = {m: np.zeros((len(y), len(labels))) for m in MODALITIES}
    best_epochs, histories = [], []
    for k, (tr, te) in enumerate(skf.split(np.zeros(len(y)), y)):
        probs, hist, best_epoch = fold(k, tr, te)
        best_epochs.append(best_epoch)
        histories.append(hist)
        for modality, metrics in folds.items():
            oof[modality][te] = probs[modality]
            metrics.append(compute_metrics(y[te], probs[modality], labels))
        log(_fold_report(k, cfg.folds, folds, best_epoch))
    return {
        "folds": cfg.folds,
        "per_fold": {mod: [{k: m[k] for k in CV_METRICS} for m in ms] for mod, ms in folds.items()},
        "summary": {mod: _summary(ms) for mod, ms in folds.items()},
        "best_epochs": [e + 1 for e in best_epochs],
        "histories": histories,
        "oof": oof,  # arrays: never in a JSON file (oof.npz)
    }


def _fold_model(
    head_cfg: HeadConfig, fs: FeatureSet, n_main: int, tr: np.ndarray, cfg: TrainConfig, k: int
) -> tuple[nn.Module, History, int]:
    """Fold k's model from its training rows `tr` (and every extra row): (model, early-stopping history, best epoch).

    The procedure that makes the shipped model: early stopping on a held-out tenth picks the epoch count, then
    `cfg.ensemble` heads (different seeds) train on all of the fold's training part for it.
    """
    inner_tr, inner_va = _stratified_split(fs.labels[tr].numpy(), cfg.val_fraction, cfg.seed + k)
    extra = torch.arange(n_main, len(fs))
    tr_idx, va_idx = torch.cat([torch.from_numpy(tr[inner_tr]), extra]), torch.from_numpy(tr[inner_va])
    sw = _sample_weights(len(fs), n_main, cfg)
    _, hist, best_epoch = train_head(head_cfg, fs, tr_idx, va_idx, cfg, sample_weight=sw, desc=f"fold {k + 1}")
    full_idx = torch.cat([torch.from_numpy(tr), extra])
    return _ensemble(head_cfg, fs, full_idx, cfg, best_epoch + 1, n_main, f"fold {k + 1} head"), hist, best_epoch


def _fold_report(k: int, n_folds: int, folds: dict[str, list[dict[str, Any]]], best_epoch: int) -> str:
    b, text, image = folds["both"][-1], folds["text"][-1], folds["image"][-1]
    return (
        f"fold {k + 1}/{n_folds}: acc {b['accuracy']:.4f} macro-F1 {b['macro_f1']:.4f} "
        f"weighted-F1 {b['weighted_f1']:.4f} (text-only acc {text['accuracy']:.4f}, "
        f"image-only acc {image['accuracy']:.4f}) epochs {best_epoch + 1}"
    )


def _cv_report(cv: dict[str, Any]) -> str:
    lines = [f"{cv['folds']}-fold cross-validation (mean ± std over folds):"]
    for mod in ("both", "text", "image"):
        s = cv["summary"][mod]
        lines.append(
            f"  {mod:5s}: accuracy {100 * s['accuracy']['mean']:.2f} ± {100 * s['accuracy']['std']:.2f}  "
            f"macro-F1 {100 * s['macro_f1']['mean']:.2f} ± {100 * s['macro_f1']['std']:.2f}  "
            f"weighted-F1 {100 * s['weighted_f1']['mean']:.2f} ± {100 * s['weighted_f1']['std']:.2f}  "
            f"ECE {s['ece']['mean']:.3f}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ driver
@dataclass
class TrainResult:
    out: Path
    cv: dict[str, Any] | None = None
    history: History = field(default_factory=list)


def plot_history(histories: Sequence[Sequence[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k, hist in enumerate(histories):
        ep = [h["epoch"] + 1 for h in hist]
        ax1.plot(ep, [h.get("train_loss", h.get("epoch_train_loss", 0.0)) for h in hist], label=f"train {k + 1}")
        if any("val_loss" in h for h in hist):
            ax1.plot(ep, [h.get("val_loss", float("nan")) for h in hist], "--", label=f"val {k + 1}")
        if any("val_macro_f1" in h for h in hist):
            ax2.plot(ep, [h.get("val_macro_f1", float("nan")) for h in hist], label=f"run {k + 1}")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation macro-F1")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train_model(
    model: MMSentModel,
    examples: Sequence[Example],
    out: Path,
    cfg: TrainConfig,
    *,
    extra_text: Sequence[Example] = (),
    resume: bool = False,
    log: Callable[[str], None] = print,
    half: bool = False,
) -> TrainResult:
    """Train `model` on `examples` and save it to `out`. Cached head-only training unless encoders are trainable."""
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    state_path = out / "train_state.pt"
    if not resume:
        for stale in out.glob("train_state*.pt"):  # a soup's later runs checkpoint to train_state.K.pt
            stale.unlink()
    finetune = model.cfg.text_trainable_layers != 0 or model.cfg.image_trainable_blocks != 0
    if cfg.cache_features and not finetune:
        result = TrainResult(out, *_train_cached(model, examples, extra_text, cfg, state_path, log))
    elif cfg.cache_features and _device_type(cfg) == "cpu":
        result = TrainResult(out, *_train_tuned_cached(model, examples, cfg, state_path, log))
    else:
        result = TrainResult(out, None, _train_end_to_end(model, examples, cfg, state_path, log))
    plot_history(result.cv["histories"] if result.cv is not None else [result.history], out / "training.png")
    _save(model, out, cfg, result.cv, half)
    if result.cv is not None:
        labels = list(model.cfg.labels)
        calibration = _calibrate_out_of_fold(out, examples[: len(result.cv["oof"]["both"])], result.cv, labels, log)
        _reference_out_of_fold(out, result.cv, labels, calibration.temperature, log)
    log(f"saved {out} in {time.time() - t0:.0f}s")
    return result


def _device_type(cfg: TrainConfig) -> str:
    from mmsent.finetune import resolve_device

    return resolve_device(cfg.device).type


def _calibrate_out_of_fold(
    out: Path, examples: Sequence[Example], cv: dict[str, Any], labels: list[str], log: Callable[[str], None]
) -> Calibration:
    """The model directory's calibration (temperature, alert thresholds, reliability diagrams) from the CV's
    out-of-fold probabilities: each post scored by a fold model that never trained on it."""
    from mmsent.calibrate import write_calibration

    probs = np.asarray(cv["oof"]["both"], dtype=np.float64)
    y = np.asarray([e.label for e in examples], dtype=np.int64)
    source = {"source": f"out-of-fold probabilities of the {cv['folds']}-fold cross-validation"}
    c = write_calibration(out, np.log(np.clip(probs, 1e-12, None)), y, labels, metrics=source)
    log(f"calibration: T = {c.temperature:.3f}, ECE {c.metrics['ece_before']:.4f} -> {c.metrics['ece_after']:.4f}")
    return c


def _reference_out_of_fold(out: Path, cv: dict[str, Any], labels: list[str], temperature: float,
                           log: Callable[[str], None]) -> None:
    """The model directory's drift reference (mmsent/reference.py) from the same out-of-fold probabilities, at the
    calibration's temperature: what the consumer's predictions are compared with."""
    from mmsent.calibrate import calibrated_probabilities
    from mmsent.reference import Reference

    probs = calibrated_probabilities(np.log(np.clip(np.asarray(cv["oof"]["both"]), 1e-12, None)), temperature)
    reference = Reference.from_probabilities(
        probs, labels, f"out-of-fold probabilities of the {cv['folds']}-fold cross-validation, T = {temperature:.4f}")
    reference.save(out)
    log(f"reference: {reference.n} predictions, label mix {reference.to_dict()['label_mix']}")


def _train_cached(
    model: MMSentModel,
    examples: Sequence[Example],
    extra_text: Sequence[Example],
    cfg: TrainConfig,
    state_path: Path,
    log: Callable[[str], None],
) -> tuple[dict[str, Any] | None, History]:
    """Heads on features extracted once: CV, then the final heads (`cfg.folds` > 1), or one split. (cv, history)"""
    fs, n_main = _cached_features(model, examples, extra_text, cfg, log)
    if cfg.folds > 1:
        cv = cross_validate(model.cfg.head, fs, n_main, list(model.cfg.labels), cfg, log=log)
        _set_head(model, _final_heads(model.cfg.head, fs, n_main, cfg, cv, log))
        return cv, []
    head, hist = _one_split(model.cfg.head, fs, n_main, cfg, state_path, log)
    _set_head(model, head)
    return None, hist


def _cached_features(
    model: MMSentModel,
    examples: Sequence[Example],
    extra_text: Sequence[Example],
    cfg: TrainConfig,
    log: Callable[[str], None],
) -> tuple[FeatureSet, int]:
    """The frozen encoders' features of `examples`, then of `extra_text`; (features, number of main rows)."""
    t0, regions = time.time(), model.cfg.head.needs_regions
    fs = extract_features(model, examples, regions=regions, progress=cfg.progress, desc="data")
    n_main = len(fs)
    if extra_text:
        fs = _concat(fs, extract_features(model, extra_text, regions=regions, progress=cfg.progress, desc="extra"))
    log(f"features ready in {time.time() - t0:.0f}s ({n_main} examples + {len(fs) - n_main} extra text-only)")
    return fs, n_main


def _final_heads(
    head_cfg: HeadConfig, fs: FeatureSet, n_main: int, cfg: TrainConfig, cv: dict[str, Any], log: Callable[[str], None]
) -> nn.Module:
    """After CV: `cfg.ensemble` heads on every row, for the median over the folds of the best epoch count."""
    epochs = max(1, int(statistics.median(cv["best_epochs"])))
    log(_cv_report(cv))
    log(f"final model: all {n_main} examples, {epochs} epochs (median best epoch over folds)")
    return _ensemble(head_cfg, fs, torch.arange(len(fs)), cfg, epochs, n_main, "final")


def _one_split(
    head_cfg: HeadConfig, fs: FeatureSet, n_main: int, cfg: TrainConfig, state_path: Path, log: Callable[[str], None]
) -> tuple[FusionHead, History]:
    """One head: a stratified validation part of the main rows for early stopping, every other row trains."""
    tr, va = _stratified_split(fs.labels[:n_main].numpy(), cfg.val_fraction, cfg.seed)
    tr_idx = torch.cat([torch.from_numpy(tr), torch.arange(n_main, len(fs))])
    sw = _sample_weights(len(fs), n_main, cfg)
    head, hist, best = train_head(
        head_cfg, fs, tr_idx, torch.from_numpy(va), cfg, sample_weight=sw, state_path=state_path
    )
    log(f"best validation macro-F1 {max(h.get('val_macro_f1', 0) for h in hist):.4f} at epoch {best + 1}")
    return head, hist


def _set_head(model: MMSentModel, head: nn.Module) -> None:
    """Put the trained head into `model`; an average of heads is recorded in its config."""
    if isinstance(head, HeadEnsemble):
        model.cfg = replace(model.cfg, ensemble=len(head.heads))
    model.head = head


def _train_tuned_cached(
    model: MMSentModel, examples: Sequence[Example], cfg: TrainConfig, state_path: Path, log: Callable[[str], None]
) -> tuple[dict[str, Any] | None, History]:
    """Fine-tuning on the CPU: the activations below the tuned layers once (features.extract_activations), then the
    end-to-end loop over them, `cfg.soup` times. With `cfg.folds` > 1: k-fold CV (each fold early-stopped on a
    held-out tenth of its training part), then the final model on every row for the median best epoch count.
    (cv, history)"""
    from mmsent.finetune import ActivationRows

    t0 = time.time()
    acts = extract_activations(model, examples, progress=cfg.progress)
    log(f"activations below the tuned layers ready in {time.time() - t0:.0f}s")
    if cfg.folds <= 1:
        tr, va = _stratified_split(acts.labels.numpy(), cfg.val_fraction, cfg.seed)
        rows = ActivationRows(acts, torch.from_numpy(tr)), ActivationRows(acts, torch.from_numpy(va))
        hist, _ = _soup(model, *rows, cfg, state_path=state_path)
        log(_end_to_end_report(hist))
        return None, hist
    initial = copy.deepcopy(model)  # every fold starts from the same weights as the final model

    def fold(k: int, tr: np.ndarray, te: np.ndarray) -> FoldResult:
        return _tuned_fold(copy.deepcopy(initial), acts, tr, te, cfg, k)

    cv = k_folds(acts.labels.numpy(), list(model.cfg.labels), cfg, fold, log)
    epochs = max(1, int(statistics.median(cv["best_epochs"])))
    log(_cv_report(cv))
    log(f"final model: all {len(acts)} examples, {epochs} epochs (median best epoch over folds)")
    hist, _ = _soup(model, ActivationRows(acts, torch.arange(len(acts))), None, cfg, stop_after=epochs)
    return cv, hist


def _tuned_fold(
    model: MMSentModel, acts: ActivationSet, tr: np.ndarray, te: np.ndarray, cfg: TrainConfig, k: int
) -> FoldResult:
    """Fold k: fine-tune on its training rows but a held-out tenth, which early-stops; score its test rows."""
    from mmsent.finetune import ActivationRows, predict

    inner_tr, inner_va = _stratified_split(acts.labels[tr].numpy(), cfg.val_fraction, cfg.seed + k)
    train, val = (ActivationRows(acts, torch.from_numpy(tr[rows])) for rows in (inner_tr, inner_va))
    hist, best_epoch = _soup(model, train, val, cfg)
    test = ActivationRows(acts, torch.from_numpy(te))
    return {m: predict(model, test, cfg, modality=m) for m in MODALITIES}, hist, best_epoch


def _soup(
    model: MMSentModel, train: Rows, val: Rows | None, cfg: TrainConfig, *, state_path: Path | None = None,
    stop_after: int | None = None,
) -> tuple[History, int]:
    """`cfg.soup` fine-tuning runs of `model` (`_seeded`: each from the same weights, each early-stopped on `val` when
    given), their trainable weights averaged into `model`: a "model soup" (Wortsman et al. 2022), served at one
    model's cost. (the first run's history, the median best epoch)"""
    from mmsent.finetune import finetune  # it builds on this module (loss, early stopping), so it comes in late

    if cfg.soup < 1:
        raise ValueError(f"soup must be 1 run or more, not {cfg.soup}")
    start = copy.deepcopy(model) if cfg.soup > 1 else model
    states: list[dict[str, torch.Tensor]] = []
    histories: list[History] = []
    for k, run_cfg in enumerate(_seeded(cfg, cfg.soup)):
        run = model if k == 0 else copy.deepcopy(start)
        path = state_path.with_suffix(f".{k}.pt") if state_path is not None and k else state_path
        _, hist = finetune(run, train, val, run_cfg, state_path=path, stop_after=stop_after)
        states.append(run.trainable_state())
        histories.append(hist)
    if len(states) > 1:  # every trainable tensor is a float weight (no counters): a plain mean
        model.load_state_dict({key: torch.stack([st[key] for st in states]).mean(0) for key in states[0]},
                              strict=False)
    best_epochs = [max(range(len(h)), key=lambda e: h[e].get("val_macro_f1", 0.0)) for h in histories]
    return histories[0], int(statistics.median(best_epochs))


def _train_end_to_end(
    model: MMSentModel, examples: Sequence[Example], cfg: TrainConfig, state_path: Path, log: Callable[[str], None]
) -> History:
    """`finetune` (`cfg.soup` runs) on one stratified split of `examples` (the validation part early-stops)."""
    tr, va = _stratified_split(np.array([e.label for e in examples]), cfg.val_fraction, cfg.seed)
    hist, _ = _soup(model, [examples[k] for k in tr], [examples[k] for k in va], cfg, state_path=state_path)
    log(_end_to_end_report(hist))
    return hist


def _end_to_end_report(hist: History) -> str:
    best = max(hist, key=lambda h: h.get("val_macro_f1", 0.0), default={"epoch": -1.0})
    rate = statistics.fmean([h.get("samples_per_s", 0.0) for h in hist] or [0.0])
    f1 = best.get("val_macro_f1", 0.0)
    return f"best validation macro-F1 {f1:.4f} at epoch {best['epoch'] + 1:.0f}; {rate:.1f} posts/s"


def _save(model: MMSentModel, out: Path, cfg: TrainConfig, cv: dict[str, Any] | None, half: bool) -> None:
    """Record the training config (and the CV scores) in the model's config; write the model directory (with a CV:
    cv.json and the out-of-fold probabilities, oof.npz)."""
    extra = {**model.cfg.extra, "train_config": asdict(cfg)}
    if cv is not None:
        extra["cv"] = {k: v for k, v in cv.items() if k not in ("histories", "oof")}
        (out / "cv.json").write_text(json.dumps({k: v for k, v in cv.items() if k != "oof"}, indent=2) + "\n")
        # The out-of-fold probabilities, row k = the data file's k-th post: what a decision rule or another
        # calibration can be fitted on later without rerunning the cross-validation.
        np.savez_compressed(out / "oof.npz", **{m: p.astype(np.float32) for m, p in cv["oof"].items()})
    model.cfg = replace(model.cfg, extra=extra)
    model.save(out, half=half)
