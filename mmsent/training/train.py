"""Training: head-only on cached frozen features (seconds), or end to end with partial/full fine-tuning; k-fold CV.

    mmsent train DATA.jsonl --out DIR [--preset default] [--fusion gated] [--folds 5] [--extra-text tweets.jsonl]

    train_model ─┬─ frozen encoders ─> features once ─┬─ --folds k: cross_validate (each fold: early stopping,
                 │                                    │   then `ensemble` heads), then the final heads on all rows
                 │                                    └─ otherwise: train_head on one split (early stopping)
                 ├─ trainable encoder layers, on the CPU ─> activations below them once (extract_activations) ─>
                 │  finetune over them, --soup N runs whose weights are averaged (--folds k: k_folds, each
                 │  fold early-stopped, then the final model for the median epochs; calibration.json from the
                 │  out-of-fold probabilities)
                 └─ trainable layers on a GPU (or --no-cache) ─> finetune (end to end on --device, image
                    augmentation, bf16 on CUDA, warm-up + cosine decay, early stopping; see mmsent/training/finetune.py)
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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmsent.data import Example
from mmsent.device import resolve_device
from mmsent.evaluation.calibrate import write_calibration
from mmsent.evaluation.figures import pyplot, save_figure
from mmsent.evaluation.metrics import compute_metrics
from mmsent.model import FusionHead, HeadConfig, HeadEnsemble, MMSentModel
from mmsent.reference import Reference
from mmsent.serving.calibration import Calibration, calibrated_probabilities
from mmsent.training.config import TrainConfig
from mmsent.training.features import ActivationSet, FeatureSet, extract_activations, extract_features
from mmsent.training.finetune import ActivationRows, Rows, finetune, predict
from mmsent.training.heads import pair_indices, predict_head, train_head
from mmsent.training.loop import History

__all__ = ["cross_validate", "finetune_soup", "fold_splits", "k_folds", "save_fold", "train_model"]


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
        pairs=torch.cat([pair_indices(a), pair_indices(b)]),
        text_tokens=tokens,
        text_mask=mask,
    )


def _sample_weights(n: int, n_main: int, cfg: TrainConfig) -> torch.Tensor:
    """Loss weight per row: 1 for the `n_main` main rows, `cfg.extra_weight` for the extra text-only rows after."""
    sw = torch.ones(n)
    sw[n_main:] = cfg.extra_weight
    return sw


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


def fold_splits(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train rows, test rows) of each fold of `mmsent train --folds`: stratified by label, shuffled with the
    seed. Public, so that what is measured on the folds later (out-of-fold alert thresholds) uses the same split."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(y)), y))


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
    folds: dict[str, list[dict[str, Any]]] = {m: [] for m in MODALITIES}
    oof = {m: np.zeros((len(y), len(labels))) for m in MODALITIES}
    best_epochs, histories = [], []
    for k, (tr, te) in enumerate(fold_splits(y, cfg.folds, cfg.seed)):
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
    plt = pyplot()

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
    save_figure(fig, path, dpi=90)


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
    finetune = model.cfg.text_trainable_layers != 0 or model.cfg.image_trainable_blocks != 0
    if extra_text and (finetune or not cfg.cache_features):
        # Only head-only training on cached features mixes extra text-only rows in; the fine-tuning loops would
        # drop them without a word, which a user comparing runs would take for a result.
        raise ValueError("extra text-only data (--extra-text) is used by head-only training on cached features; "
                         "with tuned encoder layers (--text-layers, --image-blocks) or --no-cache it is "
                         "not supported")
    if model.cfg.head.modality_pairs and cfg.class_weights != "none" and all(e.pair is not None for e in examples):
        # The pair loss is unweighted (head_loss): class weights reach only rows without a pair, here none.
        log(f"note: --class-weights {cfg.class_weights} changes nothing here: with --modality-pairs every row "
            "trains on its (text, image) pair, which is not class-weighted")
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    state_path = out / "train_state.pt"
    if not resume:
        for stale in out.glob("train_state*.pt"):  # a soup's later runs checkpoint to train_state.K.pt
            stale.unlink()
    if cfg.cache_features and not finetune:
        result = TrainResult(out, *_train_cached(model, examples, extra_text, cfg, state_path, log))
    elif cfg.cache_features and resolve_device(cfg.device).type == "cpu":
        result = TrainResult(out, *_train_tuned_cached(model, examples, cfg, state_path, log))
    else:
        result = TrainResult(out, None, _train_end_to_end(model, examples, cfg, state_path, log))
    plot_history(result.cv["histories"] if result.cv is not None else [result.history], out / "training.png")
    write_model_directory(model, out, cfg, result.cv, half)
    if result.cv is not None:
        labels = list(model.cfg.labels)
        calibration = _calibrate_out_of_fold(out, examples[: len(result.cv["oof"]["both"])], result.cv, labels, log)
        _reference_out_of_fold(out, result.cv, labels, calibration.temperature, log)
    log(f"saved {out} in {time.time() - t0:.0f}s")
    return result


def _calibrate_out_of_fold(
    out: Path, examples: Sequence[Example], cv: dict[str, Any], labels: list[str], log: Callable[[str], None]
) -> Calibration:
    """The model directory's calibration (temperature, alert thresholds, reliability diagrams) from the CV's
    out-of-fold probabilities: each post scored by a fold model that never trained on it."""
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
    t0 = time.time()
    acts = extract_activations(model, examples, progress=cfg.progress)
    log(f"activations below the tuned layers ready in {time.time() - t0:.0f}s")
    if cfg.folds <= 1:
        tr, va = _stratified_split(acts.labels.numpy(), cfg.val_fraction, cfg.seed)
        rows = ActivationRows(acts, torch.from_numpy(tr)), ActivationRows(acts, torch.from_numpy(va))
        hist, _ = finetune_soup(model, *rows, cfg, state_path=state_path)
        log(_end_to_end_report(hist))
        return None, hist
    initial = copy.deepcopy(model)  # every fold starts from the same weights as the final model
    kept = state_path.parent / "folds" if cfg.keep_folds else None

    def fold(k: int, tr: np.ndarray, te: np.ndarray) -> FoldResult:
        fold_model = copy.deepcopy(initial)
        result = _tuned_fold(fold_model, acts, tr, te, cfg, k)
        if kept is not None:
            save_fold(fold_model, kept / str(k + 1), te)
        return result

    cv = k_folds(acts.labels.numpy(), list(model.cfg.labels), cfg, fold, log)
    epochs = max(1, int(statistics.median(cv["best_epochs"])))
    log(_cv_report(cv))
    log(f"final model: all {len(acts)} examples, {epochs} epochs (median best epoch over folds)")
    hist, _ = finetune_soup(model, ActivationRows(acts, torch.arange(len(acts))), None, cfg, stop_after=epochs)
    return cv, hist


def save_fold(model: MMSentModel, directory: Path, heldout: np.ndarray) -> None:
    """A fold's model directory and the data rows it never trained on (`heldout.json`: row k = the data file's k-th
    post), so that its out-of-fold predictions can be made again, in another precision say."""
    model.save(directory)
    (directory / "heldout.json").write_text(json.dumps({"rows": [int(k) for k in heldout]}))


def _tuned_fold(
    model: MMSentModel, acts: ActivationSet, tr: np.ndarray, te: np.ndarray, cfg: TrainConfig, k: int
) -> FoldResult:
    """Fold k: fine-tune on its training rows but a held-out tenth, which early-stops; score its test rows."""
    inner_tr, inner_va = _stratified_split(acts.labels[tr].numpy(), cfg.val_fraction, cfg.seed + k)
    train, val = (ActivationRows(acts, torch.from_numpy(tr[rows])) for rows in (inner_tr, inner_va))
    hist, best_epoch = finetune_soup(model, train, val, cfg)
    test = ActivationRows(acts, torch.from_numpy(te))
    return {m: predict(model, test, cfg, modality=m) for m in MODALITIES}, hist, best_epoch


def finetune_soup(
    model: MMSentModel, train: Rows, val: Rows | None, cfg: TrainConfig, *, state_path: Path | None = None,
    stop_after: int | None = None,
) -> tuple[History, int]:
    """`cfg.soup` fine-tuning runs of `model` (`_seeded`: each from the same weights, each early-stopped on `val` when
    given), their trainable weights averaged into `model`: a "model soup" (Wortsman et al. 2022), served at one
    model's cost. (the first run's history, the median best epoch)"""
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
    hist, _ = finetune_soup(model, [examples[k] for k in tr], [examples[k] for k in va], cfg, state_path=state_path)
    log(_end_to_end_report(hist))
    return hist


def _end_to_end_report(hist: History) -> str:
    best = max(hist, key=lambda h: h.get("val_macro_f1", 0.0), default={"epoch": -1.0})
    rate = statistics.fmean([h.get("samples_per_s", 0.0) for h in hist] or [0.0])
    f1 = best.get("val_macro_f1", 0.0)
    return f"best validation macro-F1 {f1:.4f} at epoch {best['epoch'] + 1:.0f}; {rate:.1f} posts/s"


def write_model_directory(model: MMSentModel, out: Path, cfg: TrainConfig, cv: dict[str, Any] | None,
                          half: bool) -> None:
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
