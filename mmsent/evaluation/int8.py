"""`mmsent quantize`: a model directory's int8 artefacts, measured before `auto` may use them.

    DATA.jsonl ──shuffled (seed 0); the first N posts with a photo──▶ the CNN's fp32 graph ──▶ int8-ranges.json
               └─the first 512 captions (a smoothing recipe)──▶ the text encoder's fp32 graph ──▶ int8-text-ranges.json
    DATA.jsonl ──every post (or a sample)──▶ Scorer fp32 ─┐
                                           └─▶ Scorer int8 ┤ (and with each encoder alone in int8)
                                                            ┴─▶ labels kept, accuracy and F1 both ways, per class
                                                            ──▶ int8.json: the recipe, the figures, the parts kept

    --folds FOLDS (a cross-validation's kept fold models, `mmsent train --folds K --keep-folds`): each fold model
    the same way, its ranges on its own training photos, scored both ways on its held-out posts ──▶ out of fold
                                                                 └─▶ int8-oof.npz: those probabilities, pooled

`auto` (mmsent/quantize.py `choose_precision`) runs a part in int8 only when int8.json says it was kept: both
encoders when, with both in int8, the labels are fp32's for at least 98% of the posts and at most 0.5 points of
accuracy and of weighted-F1 are lost (issue 28's bar), out of fold when the folds were given; otherwise the encoder
that passes the bar alone in int8 (each is measured alone too), the other in fp32; otherwise neither.
"""

from __future__ import annotations

import json
import platform
import random
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmsent.data import Example, load_examples, load_image
from mmsent.evaluation.metrics import compute_metrics
from mmsent.presets import model_directory
from mmsent.quantize import (
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    PARTS,
    RANGES_FILE,
    TEXT_RANGES_FILE,
    Int8Model,
    Int8Recipe,
    cpu_int8_flags,
)
from mmsent.serving.scorer import Scorer

__all__ = ["INT8_OOF_FILE", "kept_parts", "passes_bar", "quantize_model"]

# In a model directory, beside oof.npz: the fused out-of-fold probabilities `--folds` scored, one (N, K) array per way
# ("fp32", "int8", and "int8-text" / "int8-cnn" where each part was measured alone), row k the data's k-th labelled
# post, NaN where no fold held it out. What an alert threshold catches as served in int8 is read from here
# (scripts/oof_failures.py --fused).
INT8_OOF_FILE = "int8-oof.npz"
CALIBRATION_CAPTIONS = 512  # training captions the text encoder's channel maxima (smoothing) are taken on


def quantize_model(data: str | Path, model: str | Path | None = None, *, calibration_images: int = 128,
                   check_posts: int | None = None, recipe: Int8Recipe | None = None, folds: Path | None = None,
                   columns: Any = None, progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Collect the CNN's int8 ranges on `calibration_images` of the data's photos, then score `check_posts` of its
    posts (None: all) in fp32 and in int8, and write int8-ranges.json and int8.json into the model directory.
    `folds`: the fold models a cross-validation kept (`mmsent train --folds K --keep-folds`: FOLDS/1, FOLDS/2, ...,
    each with heldout.json), each quantized the same way on its own training photos and scored both ways on the
    posts it never trained on; then the bar applies to those out-of-fold figures, and their probabilities are kept
    (INT8_OOF_FILE). Returns int8.json's `measured`."""
    directory = model_directory(model)
    if directory is None:
        raise ValueError(f"{model!r} is not a model directory (with config.json); a preset cannot be quantized")
    recipe = recipe or Int8Recipe()
    (directory / INT8_OOF_FILE).unlink(missing_ok=True)  # an earlier run's, of other ranges: never read as this one's
    fp32 = Scorer.load(directory, cpu_precision="fp32")
    if fp32.model.text_encoder.onnx_model is None:  # a text encoder in PyTorch never runs in int8: nothing to smooth
        recipe = replace(recipe, text_smoothing=0.0)
    labels = fp32.labels
    examples = _labelled(data, labels, columns)
    order = _shuffled(range(len(examples)))
    checked = sorted(order[:check_posts] if check_posts else order)
    probs, photos = _both_ways(fp32, directory, recipe, examples, order, checked, calibration_images, progress, log)
    y = [examples[k].label for k in checked]
    measured = {"data": str(data), "posts": len(checked), "calibration_photos": photos, **_compared(y, probs, labels)}
    if folds is not None:
        measured["out_of_fold"], pooled = _out_of_fold(folds, recipe, examples, labels, calibration_images, progress,
                                                       log)
        arrays: dict[str, Any] = {way: p.astype(np.float32) for way, p in pooled.items()}
        np.savez_compressed(directory / INT8_OOF_FILE, **arrays)
    measured.update(_context(), parts=kept_parts(measured.get("out_of_fold", measured)))
    Int8Model(recipe, directory / RANGES_FILE, measured).write(directory)
    return measured


def _labelled(data: str | Path, labels: tuple[str, ...], columns: Any) -> list[Example]:
    examples = [e for e in load_examples(data, labels, columns) if e.label is not None]
    if not examples:
        raise ValueError(f"{data}: no labelled posts")
    return examples


def _shuffled(rows: Iterable[int]) -> list[int]:
    order = list(rows)
    random.Random(0).shuffle(order)
    return order


def _both_ways(fp32: Scorer, directory: Path, recipe: Int8Recipe, examples: list[Example], training: list[int],
               scored: list[int], calibration_images: int, progress: bool, log: Callable[[str], None]
               ) -> tuple[dict[str, np.ndarray], int]:
    """One model directory: its CNN's ranges on the first `calibration_images` photos of the `training` rows, then
    the `scored` rows' probabilities in fp32 (`fp32`, its Scorer), in int8, and, where both encoders run in int8,
    with each one alone in int8 ("int8-text", "int8-cnn"). (probabilities by name, photos the ranges saw)"""
    photos = [im for k in training if (im := load_image(examples[k].image)) is not None][:calibration_images]
    if not photos:
        raise ValueError(f"{directory}: no photo to collect the CNN's ranges on")
    Int8Model(recipe, None, None).write(directory)  # the recipe first: a half-done run leaves nothing `auto` takes
    seen = fp32.collect_cnn_ranges(photos, directory / RANGES_FILE)
    log(f"{directory}: CNN ranges from {seen} photos")
    (directory / TEXT_RANGES_FILE).unlink(missing_ok=True)  # another run's: never read with this recipe
    if recipe.text_smoothing:
        captions = [examples[k].text or "" for k in training[:CALIBRATION_CAPTIONS]]
        log(f"{directory}: text ranges from {fp32.collect_text_ranges(captions, directory / TEXT_RANGES_FILE)} "
            "captions")
    int8 = Scorer.load(directory, cpu_precision="int8")
    if int8.cpu_precision != "int8":
        raise ValueError(f"{directory} did not load in int8: {int8.precision_note}")
    scorers = {"fp32": fp32, "int8": int8}
    if len(int8.int8_parts) > 1:
        scorers.update({f"int8-{part}": Scorer.load(directory, cpu_precision="int8", int8_parts=(part,))
                        for part in int8.int8_parts})
    rows = [examples[k] for k in scored]
    return {name: _probabilities(scorer, rows, progress, name) for name, scorer in scorers.items()}, seen


def _out_of_fold(folds: Path, recipe: Int8Recipe, examples: list[Example], labels: tuple[str, ...],
                 calibration_images: int, progress: bool, log: Callable[[str], None]
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every fold model on its held-out rows, both ways: the out-of-fold figures, pooled and per fold; and the
    pooled probabilities by way (INT8_OOF_FILE)."""
    fold_dirs = sorted((d for d in folds.iterdir() if (d / "heldout.json").is_file()), key=lambda d: d.name)
    if not fold_dirs:
        raise ValueError(f"{folds}: no fold directories (with heldout.json)")
    n, k = len(examples), len(labels)
    pooled: dict[str, np.ndarray] = {}
    per_fold = []
    for fold in fold_dirs:
        heldout = sorted(int(r) for r in json.loads((fold / "heldout.json").read_text())["rows"])
        training = _shuffled(sorted(set(range(n)) - set(heldout)))
        fp32 = Scorer.load(fold, cpu_precision="fp32")
        probs, _ = _both_ways(fp32, fold, recipe, examples, training, heldout, calibration_images, progress, log)
        for name, p in probs.items():
            pooled.setdefault(name, np.full((n, k), np.nan))[heldout] = p
        per_fold.append({"fold": fold.name, **_compared([examples[r].label for r in heldout], probs, labels)})
    covered = [r for r in range(n) if not np.isnan(pooled["fp32"][r]).any()]
    result = _compared([examples[r].label for r in covered], {m: p[covered] for m, p in pooled.items()}, labels)
    for key in ("accuracy", "weighted_f1", "macro_f1"):
        result[f"fold_mean_{key}"] = {m: float(np.mean([f[m][key] for f in per_fold])) for m in ("fp32", "int8")}
    return {"folds": len(per_fold), "posts": len(covered), **result, "per_fold": per_fold}, pooled


def _probabilities(scorer: Scorer, examples: list[Example], progress: bool, name: str) -> np.ndarray:
    probs = np.zeros((len(examples), len(scorer.labels)))
    step = 64
    for s in tqdm(range(0, len(examples), step), desc=name, disable=not progress, leave=False):
        posts = [{"text": e.text, "image": load_image(e.image)} for e in examples[s : s + step]]
        for k, res in enumerate(scorer.score(posts)):
            probs[s + k] = [res.scores[lab] for lab in scorer.labels]
    return probs


def _compared(y: list[int | None], probs: dict[str, np.ndarray], labels: tuple[str, ...]) -> dict[str, Any]:
    """fp32 against int8 on the same posts: labels kept, the largest probability difference, each one's metrics;
    the same for each part alone in int8 (`alone`), where it was measured."""
    truth = [label if label is not None else -1 for label in y]

    def against_fp32(name: str) -> dict[str, Any]:
        return {"agreement": float(np.mean(probs["fp32"].argmax(1) == probs[name].argmax(1))),
                "max_probability_difference": float(np.abs(probs["fp32"] - probs[name]).max()),
                "int8": _summary(compute_metrics(truth, probs[name], labels))}

    alone = {name.removeprefix("int8-"): against_fp32(name) for name in probs if name.startswith("int8-")}
    return {**against_fp32("int8"), "fp32": _summary(compute_metrics(truth, probs["fp32"], labels)),
            **({"alone": alone} if alone else {})}


def passes_bar(figures: dict[str, Any], fp32: dict[str, Any]) -> bool:
    drops = [fp32[k] - figures["int8"][k] for k in ("accuracy", "weighted_f1")]
    return bool(figures["agreement"] >= MIN_AGREEMENT and all(d <= MAX_ACCURACY_DROP for d in drops))


def kept_parts(figures: dict[str, Any]) -> dict[str, str]:
    """Both parts in int8 where together they pass the bar; else the one part that passes alone (of two that do,
    the one that keeps more labels); else neither."""
    if passes_bar(figures, figures["fp32"]):
        return dict.fromkeys(PARTS, "int8")
    passing = [(f["agreement"], part) for part, f in figures.get("alone", {}).items() if passes_bar(f, figures["fp32"])]
    best = max(passing)[1] if passing else None
    return {part: "int8" if part == best else "fp32" for part in PARTS}


def _context() -> dict[str, Any]:
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{platform.processor() or platform.machine()}; int8 flags: "
                   f"{', '.join(cpu_int8_flags()) or 'none'}",
            "bar": {"min_agreement": MIN_AGREEMENT, "max_accuracy_drop": MAX_ACCURACY_DROP}}


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": m["accuracy"], "weighted_f1": m["weighted_f1"], "macro_f1": m["macro_f1"],
            "per_class": {lab: {k: c[k] for k in ("precision", "recall", "f1")} for lab, c in m["per_class"].items()}}
