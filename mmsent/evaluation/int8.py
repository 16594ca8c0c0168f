"""`mmsent quantize`: a model directory's int8 artefacts, measured before `auto` may use them.

    DATA.jsonl ──shuffled (seed 0); the first N posts with a photo──▶ the CNN's fp32 graph ──▶ int8-ranges.json
    DATA.jsonl ──every post (or a sample)──▶ Scorer fp32 ─┐
                                           └─▶ Scorer int8 ┴─▶ labels kept, accuracy and F1 both ways, per class
                                                            ──▶ int8.json: the recipe, the figures, the parts kept

`auto` (mmsent/quantize.py `choose_precision`) runs a part in int8 only when int8.json says it was kept: here, both
encoders are kept when int8 gives the same label as fp32 for at least 98% of the posts and loses at most 0.5 points
of accuracy and of weighted-F1 (issue 28's bar); otherwise neither is, and the figures say by how much it missed.
"""

from __future__ import annotations

import platform
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmsent.data import Example, load_examples, load_image
from mmsent.evaluation.metrics import compute_metrics
from mmsent.presets import model_directory
from mmsent.quantize import MAX_ACCURACY_DROP, MIN_AGREEMENT, PARTS, RANGES_FILE, Int8Model, Int8Recipe, cpu_int8_flags
from mmsent.serving.scorer import Scorer

__all__ = ["quantize_model"]


def quantize_model(data: str | Path, model: str | Path | None = None, *, calibration_images: int = 128,
                   check_posts: int | None = None, recipe: Int8Recipe | None = None, columns: Any = None,
                   progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Collect the CNN's int8 ranges on `calibration_images` of the data's photos, then score `check_posts` of its
    posts (None: all) in fp32 and in int8, and write int8-ranges.json and int8.json into the model directory.
    Returns what int8.json's `measured` holds."""
    directory = model_directory(model)
    if directory is None:
        raise ValueError(f"{model!r} is not a model directory (with config.json); a preset cannot be quantized")
    recipe = recipe or Int8Recipe()
    fp32 = Scorer.load(directory, cpu_precision="fp32")
    examples = [e for e in load_examples(data, fp32.labels, columns) if e.label is not None]
    if not examples:
        raise ValueError(f"{data}: no labelled posts")
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    photos = [im for k in order if (im := load_image(examples[k].image)) is not None][:calibration_images]
    if not photos:
        raise ValueError(f"{data}: no photo to collect the CNN's ranges on")
    Int8Model(recipe, None, None).write(directory)  # the recipe first: a half-done run leaves nothing `auto` takes
    seen = fp32.collect_cnn_ranges(photos, directory / RANGES_FILE)
    log(f"CNN ranges from {seen} photos -> {directory / RANGES_FILE}")
    int8 = Scorer.load(directory, cpu_precision="int8")
    if int8.cpu_precision != "int8":
        raise ValueError(f"the model did not load in int8: {int8.precision_note}")
    checked = [examples[k] for k in sorted(order[:check_posts] if check_posts else order)]
    probs = {name: _probabilities(scorer, checked, progress, name) for name, scorer in (("fp32", fp32),
                                                                                          ("int8", int8))}
    measured = _measured(data, checked, probs, fp32.labels, seen)
    Int8Model(recipe, directory / RANGES_FILE, measured).write(directory)
    return measured


def _probabilities(scorer: Scorer, examples: list[Example], progress: bool, name: str) -> np.ndarray:
    probs = np.zeros((len(examples), len(scorer.labels)))
    step = 64
    for s in tqdm(range(0, len(examples), step), desc=name, disable=not progress, leave=False):
        posts = [{"text": e.text, "image": load_image(e.image)} for e in examples[s : s + step]]
        for k, res in enumerate(scorer.score(posts)):
            probs[s + k] = [res.scores[lab] for lab in scorer.labels]
    return probs


def _measured(data: str | Path, examples: list[Example], probs: dict[str, np.ndarray], labels: tuple[str, ...],
              photos: int) -> dict[str, Any]:
    y = [e.label if e.label is not None else -1 for e in examples]
    metrics = {name: _summary(compute_metrics(y, p, labels)) for name, p in probs.items()}
    agreement = float(np.mean(probs["fp32"].argmax(1) == probs["int8"].argmax(1)))
    drop = {k: metrics["fp32"][k] - metrics["int8"][k] for k in ("accuracy", "weighted_f1")}
    kept = agreement >= MIN_AGREEMENT and all(d <= MAX_ACCURACY_DROP for d in drop.values())
    return {
        "data": str(data), "posts": len(examples), "calibration_photos": photos,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{platform.processor() or platform.machine()}; int8 flags: {', '.join(cpu_int8_flags()) or 'none'}",
        "agreement": agreement, "max_probability_difference": float(np.abs(probs["fp32"] - probs["int8"]).max()),
        "fp32": metrics["fp32"], "int8": metrics["int8"],
        "bar": {"min_agreement": MIN_AGREEMENT, "max_accuracy_drop": MAX_ACCURACY_DROP},
        "parts": {part: "int8" if kept else "fp32" for part in PARTS},
    }


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": m["accuracy"], "weighted_f1": m["weighted_f1"], "macro_f1": m["macro_f1"],
            "per_class": {lab: {k: c[k] for k in ("precision", "recall", "f1")} for lab, c in m["per_class"].items()}}
