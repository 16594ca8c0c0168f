"""Training: head-only on cached frozen features (seconds), or live with partial/full fine-tuning; k-fold CV.

    mmsent train DATA.jsonl --out DIR [--preset default] [--fusion gated] [--folds 5] [--extra-text tweets.jsonl]

Early stopping on validation macro-F1; class weights or focal loss for the rare neutral class; seeds; resumable
(`train_state.pt` in the output directory); a loss/metric plot (`training.png`); the checkpoint is a model
directory (config.json + model.safetensors + labels.json) that `Scorer.load(DIR)` reads.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmsent.data import Example, collate
from mmsent.evaluate import compute_metrics
from mmsent.features import FeatureSet, extract_features
from mmsent.model import Batch, Features, FusionHead, HeadConfig, HeadEnsemble, MMSentModel

__all__ = ["TrainConfig", "cross_validate", "train_head", "train_live", "train_model"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    encoder_lr: float = 2e-5  # fine-tuned encoder layers
    weight_decay: float = 0.05
    loss: str = "ce"  # "ce" | "focal"
    focal_gamma: float = 2.0
    class_weights: str = "sqrt"  # "none" | "balanced" | "sqrt" (square root of the balanced weights)
    label_smoothing: float = 0.05
    patience: int = 8  # epochs without a better validation macro-F1
    val_fraction: float = 0.1
    seed: int = 0
    folds: int = 0
    cache_features: bool = True  # head-only training on cached frozen features
    tta: bool = True  # evaluate on the mean of the image and its mirror (cached training only)
    extra_weight: float = 0.5  # loss weight of extra text-only examples (e.g. TweetEval)
    threads: int = 2
    progress: bool = True
    ensemble: int = 1  # final model: average of this many heads trained with different seeds


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
) -> tuple[FusionHead, list[dict[str, float]], int]:
    """Train a FusionHead on cached features. Returns (best head, history, best epoch)."""
    _set_seed(cfg.seed)
    head = FusionHead(head_cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_epochs = epochs or cfg.epochs
    steps = n_epochs * math.ceil(len(train_idx) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
    sw_all = sample_weight if sample_weight is not None else torch.ones(len(fs))
    pairs_all = _pairs_of(fs)
    weights = make_class_weights(fs.labels[train_idx], head_cfg.n_classes, cfg.class_weights)
    history: list[dict[str, float]] = []
    best, best_state, best_epoch, start, bad = -1.0, None, 0, 0, 0
    if state_path is not None and state_path.exists():  # resume
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        sched.total_steps = max(steps, 1)  # resuming with more epochs stretches the schedule
        history, best, best_state, best_epoch, bad = (
            st["history"],
            st["best"],
            st["best_state"],
            st["best_epoch"],
            st["bad"],
        )
        start = st["epoch"] + 1
        torch.set_rng_state(st["rng"])
    y_val = fs.labels[val_idx].numpy() if val_idx is not None else None
    bar = tqdm(range(start, n_epochs), desc=desc, disable=not cfg.progress, leave=False)
    for epoch in bar:
        head.train()
        perm = train_idx[torch.randperm(len(train_idx))]
        total, count = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            f = fs.batch(idx, flip=torch.rand(len(idx)) < 0.5)
            loss = head_loss(head, f, fs.labels[idx], pairs_all[idx], cfg, weights, sw_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        rec = {"epoch": float(epoch), "train_loss": total / max(count, 1)}
        if val_idx is not None and y_val is not None and len(val_idx):
            probs = predict_head(head, fs, val_idx, tta=cfg.tta)
            rec["val_loss"] = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp(min=1e-8)), fs.labels[val_idx]))
            rec["val_macro_f1"] = _macro_f1(y_val, probs, head_cfg.n_classes)
            rec["val_accuracy"] = float((probs.argmax(1) == y_val).mean())
            if rec["val_macro_f1"] > best:
                best, best_epoch, bad = rec["val_macro_f1"], epoch, 0
                best_state = {k: v.clone() for k, v in head.state_dict().items()}
            else:
                bad += 1
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", f1=f"{rec['val_macro_f1']:.3f}")
        history.append(rec)
        if state_path is not None:
            torch.save(
                {
                    "head": head.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "history": history,
                    "best": best,
                    "best_state": best_state,
                    "best_epoch": best_epoch,
                    "bad": bad,
                    "epoch": epoch,
                    "rng": torch.get_rng_state(),
                },
                state_path,
            )
        if val_idx is not None and bad >= cfg.patience:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    else:
        best_epoch = len(history) - 1
    return head.eval(), history, best_epoch


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


def _summary(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = ["accuracy", "macro_f1", "weighted_f1", "ece"]
    out = {}
    for k in keys:
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
    """k-fold CV over the first `n_main` rows of `fs` (rows after are extra text-only training data)."""
    from sklearn.model_selection import StratifiedKFold

    y = fs.labels[:n_main].numpy()
    skf = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    extra = torch.arange(n_main, len(fs))
    sw = torch.ones(len(fs))
    sw[n_main:] = cfg.extra_weight
    folds: dict[str, list[dict[str, Any]]] = {"both": [], "text": [], "image": []}
    best_epochs, histories = [], []
    for k, (tr, te) in enumerate(skf.split(np.zeros(n_main), y)):
        inner_tr, inner_va = _stratified_split(y[tr], cfg.val_fraction, cfg.seed + k)
        tr_idx = torch.cat([torch.from_numpy(tr[inner_tr]), extra])
        va_idx = torch.from_numpy(tr[inner_va])
        te_idx = torch.from_numpy(te)
        # Each fold runs the procedure that makes the shipped model: early stopping on a held-out tenth picks the
        # epoch count, then `cfg.ensemble` heads (different seeds) train on all of the fold's training part for it.
        _, hist, best_epoch = train_head(head_cfg, fs, tr_idx, va_idx, cfg, sample_weight=sw, desc=f"fold {k + 1}")
        best_epochs.append(best_epoch)
        histories.append(hist)
        full_idx = torch.cat([torch.from_numpy(tr), extra])
        heads = [
            train_head(head_cfg, fs, full_idx, None, replace(cfg, seed=cfg.seed + 1000 * e), sample_weight=sw,
                       epochs=best_epoch + 1, desc=f"fold {k + 1} head {e + 1}")[0]
            for e in range(max(1, cfg.ensemble))
        ]
        fold_model: nn.Module = heads[0] if len(heads) == 1 else HeadEnsemble(heads)
        for modality in folds:
            probs = predict_head(fold_model, fs, te_idx, tta=cfg.tta, modality=modality)
            m = compute_metrics(y[te], probs, labels)
            folds[modality].append(m)
        b = folds["both"][-1]
        log(
            f"fold {k + 1}/{cfg.folds}: acc {b['accuracy']:.4f} macro-F1 {b['macro_f1']:.4f} "
            f"weighted-F1 {b['weighted_f1']:.4f} (text-only acc {folds['text'][-1]['accuracy']:.4f}, "
            f"image-only acc {folds['image'][-1]['accuracy']:.4f}) epochs {best_epoch + 1}"
        )
    result = {
        "folds": cfg.folds,
        "per_fold": {
            mod: [{k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1", "ece")} for m in ms]
            for mod, ms in folds.items()
        },
        "summary": {mod: _summary(ms) for mod, ms in folds.items()},
        "best_epochs": [e + 1 for e in best_epochs],
        "histories": histories,
    }
    return result


# ---------------------------------------------------------------------------------------------- live fine-tuning
def train_live(
    model: MMSentModel,
    train: Sequence[Example],
    val: Sequence[Example] | None,
    cfg: TrainConfig,
    *,
    max_steps: int | None = None,
    state_path: Path | None = None,
) -> tuple[MMSentModel, list[dict[str, float]]]:
    """End-to-end training through the encoders (only their trainable layers move); image augmentation on."""
    _set_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    head_params = list(model.head.parameters())
    enc_params = [p for p in model.text_encoder.parameters() if p.requires_grad]
    enc_params += [p for p in model.image_encoder.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": head_params, "lr": cfg.lr}]
    if enc_params:
        groups.append({"params": enc_params, "lr": cfg.encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    labels = torch.tensor([e.label for e in train if e.label is not None])
    weights = make_class_weights(labels, model.cfg.head.n_classes, cfg.class_weights)
    pre = model.cfg.image.preprocess
    history: list[dict[str, float]] = []
    best, best_state, bad, step, start = -1.0, None, 0, 0, 0
    if state_path is not None and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"], strict=False)
        opt.load_state_dict(st["opt"])
        history, best, bad, step, start = st["history"], st["best"], st["bad"], st["step"], st["epoch"] + 1
    for epoch in range(start, cfg.epochs):
        model.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        total, count = 0.0, 0
        bar = tqdm(
            range(0, len(order), cfg.batch_size), desc=f"epoch {epoch + 1}", disable=not cfg.progress, leave=False
        )
        for s in bar:
            b = collate([train[k] for k in order[s : s + cfg.batch_size]], model.text_encoder.tokenize, pre, rng=rng)
            assert b.labels is not None
            loss = loss_fn(model(b), b.labels, cfg, weights, torch.ones(len(b.labels)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(head_params + enc_params, 5.0)
            opt.step()
            total += float(loss.detach()) * len(b.labels)
            count += len(b.labels)
            step += 1
            history.append({"epoch": float(epoch), "step": float(step), "train_loss": float(loss.detach())})
            if max_steps is not None and step >= max_steps:
                break
        rec = history[-1] if history else {"epoch": float(epoch)}
        rec["epoch_train_loss"] = total / max(count, 1)
        if val:
            probs = predict_live(model, val)
            y = np.array([e.label for e in val])
            rec["val_macro_f1"] = _macro_f1(y, probs, model.cfg.head.n_classes)
            if rec["val_macro_f1"] > best:
                best, bad = rec["val_macro_f1"], 0
                best_state = {k: v.clone() for k, v in model.trainable_state().items()}
            else:
                bad += 1
        if state_path is not None:
            torch.save(
                {
                    "model": model.trainable_state(),
                    "opt": opt.state_dict(),
                    "history": history,
                    "best": best,
                    "bad": bad,
                    "step": step,
                    "epoch": epoch,
                },
                state_path,
            )
        if (max_steps is not None and step >= max_steps) or (val and bad >= cfg.patience):
            break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return model.eval(), history


@torch.no_grad()
def predict_live(model: MMSentModel, examples: Sequence[Example], batch_size: int = 32) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(examples), batch_size):
        b: Batch = collate(examples[s : s + batch_size], model.text_encoder.tokenize, model.cfg.image.preprocess)
        out.append(F.softmax(model(b), -1))
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------------------ driver
@dataclass
class TrainResult:
    out: Path
    cv: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


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
    labels = list(model.cfg.labels)
    t0 = time.time()
    state_path = out / "train_state.pt"
    if not resume and state_path.exists():
        state_path.unlink()
    finetune = model.cfg.text_trainable_layers != 0 or model.cfg.image_trainable_blocks != 0
    result = TrainResult(out)
    if cfg.cache_features and not finetune:
        regions = model.cfg.head.needs_regions
        fs = extract_features(model, examples, regions=regions, progress=cfg.progress, desc="data")
        n_main = len(fs)
        if extra_text:
            fx = extract_features(model, extra_text, regions=regions, progress=cfg.progress, desc="extra")
            fs = _concat(fs, fx)
        log(f"features ready in {time.time() - t0:.0f}s ({n_main} examples + {len(fs) - n_main} extra text-only)")
        sw = torch.ones(len(fs))
        sw[n_main:] = cfg.extra_weight
        histories: list[list[dict[str, float]]] = []
        if cfg.folds > 1:
            result.cv = cross_validate(model.cfg.head, fs, n_main, labels, cfg, log=log)
            histories = result.cv["histories"]
            epochs = max(1, int(statistics.median(result.cv["best_epochs"])))
            log(_cv_report(result.cv))
            log(f"final model: all {n_main} examples, {epochs} epochs (median best epoch over folds)")
            heads = []
            for e in range(cfg.ensemble):
                head, hist, _ = train_head(
                    model.cfg.head,
                    fs,
                    torch.arange(len(fs)),
                    None,
                    replace(cfg, seed=cfg.seed + 1000 * e),
                    sample_weight=sw,
                    epochs=epochs,
                    desc=f"final {e + 1}",
                )
                heads.append(head)
            final: nn.Module = heads[0] if len(heads) == 1 else HeadEnsemble(heads)
        else:
            y = fs.labels[:n_main].numpy()
            tr, va = _stratified_split(y, cfg.val_fraction, cfg.seed)
            tr_idx = torch.cat([torch.from_numpy(tr), torch.arange(n_main, len(fs))])
            final, hist, best_epoch = train_head(
                model.cfg.head, fs, tr_idx, torch.from_numpy(va), cfg, sample_weight=sw, state_path=state_path
            )
            histories = [hist]
            result.history = hist
            log(f"best validation macro-F1 {max(h.get('val_macro_f1', 0) for h in hist):.4f} at epoch {best_epoch + 1}")
        if isinstance(final, HeadEnsemble):
            model = _with_ensemble(model, final)
        else:
            model.head = final  # type: ignore[assignment]
        plot_history(histories, out / "training.png")
    else:
        y = np.array([e.label for e in examples])
        tr, va = _stratified_split(y, cfg.val_fraction, cfg.seed)
        model, hist = train_live(
            model, [examples[k] for k in tr], [examples[k] for k in va], cfg, state_path=state_path
        )
        result.history = hist
        plot_history([hist], out / "training.png")
    extra = dict(model.cfg.extra)
    extra["train_config"] = asdict(cfg)
    if result.cv is not None:
        extra["cv"] = {k: v for k, v in result.cv.items() if k != "histories"}
        (out / "cv.json").write_text(json.dumps(result.cv, indent=2) + "\n")
    model.cfg = replace(model.cfg, extra=extra)
    model.save(out, half=half)
    log(f"saved {out} in {time.time() - t0:.0f}s")
    return result


def _with_ensemble(model: MMSentModel, ens: HeadEnsemble) -> MMSentModel:
    model.cfg = replace(model.cfg, ensemble=len(ens.heads))
    model.head = ens
    return model


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
