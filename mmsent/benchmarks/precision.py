"""One model in several CPU precisions, side by side: how fast each scores, and whether it gives fp32's labels.

Issue 28 asks which precision wins for the big `seed` preset (BERT-base + ResNet-50) on a CPU with AVX512_BF16 or
AMX: fp32 through ONNX Runtime (the Scorer's default on the CPU), fp32 eager PyTorch, bf16 eager PyTorch (oneDNN runs
bf16 matmuls and convolutions on AMX tiles where the CPU has them), and ONNX Runtime int8 (mmsent/quantize.py). A
faster precision is only kept at equal labels, so every variant is also scored against the reference on the same
posts.

    preset ──build_model──▶ one set of weights ──deepcopy──▶ one Scorer per variant (`precision_variants`)
    synthetic posts ──every variant scores all of them──▶ label agreement with the reference, max |Δp|
    batches of each size ──round k of every variant before round k + 1 of any──▶ median ms per batch ──▶ posts/s

`bf16` is the Scorer's own `cpu_precision="bf16"`: its CUDA recipe on the CPU, the model's weights cast to bf16 once
and every call under bf16 autocast (`autocast(cpu, bf16=True)` from mmsent/device.py), eager PyTorch.
`bf16-autocast` keeps the weights fp32 and puts only the two encoder calls under autocast (which casts the weights
on every call, as its cast cache is off for inference), their outputs handed back to the fp32 head. Two mixes keep
one part out of int8, as issue 28 allows when its int8 loses labels: `int8-text` (the CNN in fp32 on ONNX Runtime)
and `int8-text+bf16-cnn` (the CNN in bf16, eager). The ResNet is
channels-last in every eager variant (the ImageEncoder's own layout). Posts/s are model-only as in
`mmsent.benchmarks.host`: images handed over as encoded JPEG bytes, so decode, resize, tokenising and the head count.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsent import quantize
from mmsent.benchmarks.host import sample_photos, synthetic_captions
from mmsent.device import autocast
from mmsent.model import FusionHead, MMSentModel
from mmsent.presets import build_model
from mmsent.quantize import Int8Model, Int8Recipe
from mmsent.serving.scorer import Scorer

__all__ = ["PRECISION_CPU_FLAGS", "Variant", "compare_precisions", "cpu_flags", "measure_variants",
           "precision_variants", "render_precision"]

# /proc/cpuinfo names of the units that make bf16 or int8 pay: bf16 dot products and AMX tiles, int8 dot products
PRECISION_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni", "avx_vnni")
REFERENCE = "fp32-onnx"
ONE_LABEL_SHARE = 0.8  # a reference that gives one label to more of the posts than this has its head centred


@dataclass(frozen=True)
class Variant:
    """A way to score: `build` makes a Scorer from its own copy of the model's weights."""

    name: str
    build: Callable[[MMSentModel], Scorer]
    recipe: str  # what it runs, for the table


def with_bf16_encoders(model: MMSentModel) -> MMSentModel:
    """The model with its text encoder and CNN calls under bf16 autocast, their outputs back in fp32 for the head
    (which stays fp32: a few small matmuls). A Scorer binds `model.encode_text` and `model.embed_pixels` when it is
    built, so these instance attributes are what it calls, in every scoring thread (autocast is per thread, so it
    is entered inside each call)."""
    encode_text, embed_pixels = model.encode_text, model.embed_pixels
    cpu = torch.device("cpu")

    def encode_text_bf16(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(cpu, bf16=True):
            tokens, pooled = encode_text(input_ids, attention_mask)
        return tokens.float(), pooled.float()

    def embed_pixels_bf16(pixels: torch.Tensor) -> torch.Tensor:
        with autocast(cpu, bf16=True):
            return embed_pixels(pixels).float()

    model.encode_text = encode_text_bf16  # type: ignore[method-assign]
    model.embed_pixels = embed_pixels_bf16  # type: ignore[method-assign]
    return model


def _int8_text_scorer(model: MMSentModel) -> Scorer:
    """The text encoder in int8 and the CNN in fp32 on ONNX Runtime: what `auto` runs for a model whose measurement
    kept int8 for the text only (on a CPU with VNNI or AMX; fp32 elsewhere, and its note says so)."""
    # A preset has no channel maxima to smooth the text encoder with: plain dynamic int8.
    text_only = Int8Model(Int8Recipe(text_smoothing=0.0), None, {"parts": {"text": "int8", "cnn": "fp32"}})
    return Scorer(model, cpu_runtime="auto", cpu_precision="auto", int8=text_only)


def _int8_text_bf16_cnn_scorer(model: MMSentModel) -> Scorer:
    """The text encoder in int8 on ONNX Runtime, the CNN in bf16 eager PyTorch (its weights cast, under autocast)."""
    scorer = _int8_text_scorer(with_bf16_encoders(model))  # autocast around an ONNX Runtime call changes nothing
    image = scorer.model.image_encoder
    image.onnx_trunk = None  # back to the eager trunk, which `_trunk_map` runs when there is no graph
    image.to(torch.bfloat16)
    return scorer


def precision_variants() -> list[Variant]:
    """What issue 28 compares, the reference (the Scorer's default CPU path) first."""
    return [
        Variant(REFERENCE, lambda m: Scorer(m, cpu_runtime="auto", cpu_precision="fp32"),
                "fp32, ONNX Runtime (the Scorer's default on the CPU)"),
        Variant("fp32-torch", lambda m: Scorer(m, cpu_runtime="torch"), "fp32, eager PyTorch"),
        Variant("bf16-autocast", lambda m: Scorer(with_bf16_encoders(m), cpu_runtime="torch"),
                "eager PyTorch, encoders under bf16 autocast, fp32 weights"),
        Variant("bf16", lambda m: Scorer(m, cpu_precision="bf16"),
                "eager PyTorch, the model's weights in bf16 under bf16 autocast (MMSENT_CPU_PRECISION=bf16)"),
        Variant("int8", lambda m: Scorer(m, cpu_runtime="auto", cpu_precision="int8"),
                "int8, ONNX Runtime (mmsent/quantize.py)"),
        Variant("int8-text", _int8_text_scorer, "text int8, CNN fp32, ONNX Runtime"),
        Variant("int8-text+bf16-cnn", _int8_text_bf16_cnn_scorer,
                "text int8 on ONNX Runtime, CNN bf16 weights in eager PyTorch"),
    ]


def cpu_flags(names: Sequence[str] = PRECISION_CPU_FLAGS, cpuinfo: str | None = None) -> tuple[str, str]:
    """The CPU's model name and which of `names` it has, from /proc/cpuinfo (or the text given); ("unknown", "")
    where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown", ""
    name = next((line.partition(":")[2].strip() for line in cpuinfo.splitlines()
                 if line.partition(":")[0].strip() == "model name"), "unknown")
    return name, " ".join(quantize.cpu_flags(names, cpuinfo))


def probabilities(scorer: Scorer, posts: Sequence[dict[str, Any]]) -> np.ndarray:
    """(N, K) the scorer's probabilities for the posts, in the order of its labels."""
    return np.array([[r.scores[label] for label in scorer.labels] for r in scorer.score(posts)])


def time_in_rounds(scorers: Sequence[Scorer], posts: Sequence[dict[str, Any]], batch_size: int,
                   rounds: int) -> list[list[float]]:
    """Seconds per batch of `batch_size` posts, per scorer: round k of every scorer (on round k's posts) before
    round k + 1 of any, so that a slower spell of a shared machine falls on all of them. Round 0 warms up (oneDNN
    picks and caches its kernels per shape) and is not counted."""
    times: list[list[float]] = [[] for _ in scorers]
    for run in range(rounds + 1):
        batch = [posts[(run * batch_size + j) % len(posts)] for j in range(batch_size)]
        for scorer, own in zip(scorers, times, strict=True):
            started = time.perf_counter()
            scorer.score(batch)
            if run:
                own.append(time.perf_counter() - started)
    return times


def synthetic_posts(n: int) -> tuple[list[dict[str, Any]], str]:
    """`n` posts, each a tweet-like caption and a photo as JPEG bytes, and where the photos came from."""
    photos, source = sample_photos(n)
    return [{"text": t, "image": p} for t, p in zip(synthetic_captions(n), photos, strict=True)], source


def measure_variants(model: MMSentModel, variants: Sequence[Variant], batch_sizes: Sequence[int], posts: int,
                     rounds: int) -> dict[str, Any]:
    """Each variant on its own copy of `model`: its labels and probabilities on `posts` synthetic posts against the
    first variant's (the reference), and its posts/s at each batch size."""
    sample, photo_source = synthetic_posts(max(posts, *batch_sizes))
    scorers = []
    for variant in variants:
        scorer = variant.build(copy.deepcopy(model))
        scorer.batch_size = max(batch_sizes)  # a timed batch is one chunk
        scorers.append(scorer)
    before = np.bincount(scorers[0].logits(sample[:posts]).argmax(1), minlength=len(scorers[0].labels))
    centred = centre_one_label_head(scorers, sample[:posts])
    probs = [probabilities(scorer, sample[:posts]) for scorer in scorers]
    reference = probs[0].argmax(1)
    top2 = np.sort(probs[0], axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # the reference's lead of its label over the next: how far a flip has to go
    timing = {size: time_in_rounds(scorers, sample, size, rounds) for size in batch_sizes}
    entries = []
    for k, (variant, scorer, p) in enumerate(zip(variants, scorers, probs, strict=True)):
        speeds = []
        for size, times in timing.items():
            ms = 1000 * statistics.median(times[k])
            speeds.append({"batch_size": size, "batch_ms_p50": ms, "posts_per_s": 1000 * size / ms,
                           "of_reference": statistics.median(times[0]) / statistics.median(times[k])})
        entries.append({
            "name": variant.name, "recipe": variant.recipe, "cpu_runtime": scorer.cpu_runtime,
            "cpu_precision": scorer.cpu_precision, "precision_note": scorer.precision_note,
            "label_agreement": float((p.argmax(1) == reference).mean()),
            # the widest lead the reference had on a post whose label this variant changed (0: none changed)
            "flipped_max_margin": float(margin[p.argmax(1) != reference].max(initial=0.0)),
            "max_prob_diff": float(np.abs(p - probs[0]).max()),
            "mean_prob_diff": float(np.abs(p - probs[0]).mean()),
            "speed": speeds,
        })
    name, flags = cpu_flags()
    labels = scorers[0].labels
    return {
        "model": scorers[0].info, "cpu": {"name": name, "flags": flags}, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "photos": photo_source, "posts": posts, "rounds": rounds,
        "reference": variants[0].name,
        # how the reference's labels fall (after centring, if done): agreement means little if one label takes
        # nearly every post
        "reference_labels": {label: int((reference == j).sum()) for j, label in enumerate(labels)},
        "head_centred": centred,
        "reference_margin": {"p10": float(np.quantile(margin, 0.1)), "p50": float(np.quantile(margin, 0.5))},
        "reference_labels_uncentred": {label: int(n) for label, n in zip(labels, before, strict=True)},
        "variants": entries,
    }


def centre_one_label_head(scorers: Sequence[Scorer], posts: Sequence[dict[str, Any]]) -> bool:
    """Random weights (the presets without their pretrained weights) tend to give one label to every post, and then
    any variant "agrees". Where the reference (the first scorer) gives one label to more than ONE_LABEL_SHARE of
    the posts, every scorer's head has the reference's mean logits taken off its final layer's bias, the same shift
    for all, so that the labels split across the classes and a flip shows. The head is fp32 in every variant, and
    the encoders, where the precisions differ, are untouched. Returns whether it centred."""
    logits = scorers[0].logits(posts)  # (N, K) before any temperature
    heads = [scorer.model.head for scorer in scorers]
    one_label = np.bincount(logits.argmax(1)).max() > ONE_LABEL_SHARE * len(posts)
    outputs = [h.mlp[-1] for h in heads if isinstance(h, FusionHead) and not h.cfg.modality_pairs]
    if not one_label or len(outputs) != len(heads):
        return False
    shift = torch.from_numpy(logits.mean(0))
    for out in outputs:
        assert isinstance(out, torch.nn.Linear) and out.bias is not None
        with torch.no_grad():
            out.bias.sub_(shift.to(out.bias.dtype))
    return True


def compare_precisions(preset: str, batch_sizes: Sequence[int], posts: int, rounds: int) -> dict[str, Any]:
    """`precision_variants` of one model (a preset or a model directory): posts/s at each batch size, and labels
    and probabilities against fp32 on ONNX Runtime."""
    result = measure_variants(build_model(preset), precision_variants(), batch_sizes, posts, rounds)
    result["preset"] = preset
    return result


def render_precision(result: dict[str, Any]) -> str:
    """The result as a Markdown table: one row per variant, posts/s and ratio to the reference per batch size."""
    sizes = [s["batch_size"] for s in result["variants"][0]["speed"]]
    head = ["variant", *(f"posts/s @{s} (× ref)" for s in sizes), "labels = ref", "max abs Δp",
            "widest lead flipped", "runs"]
    lines = [
        f"{result.get('preset', result['model']['name'])} on {result['cpu']['name']} "
        f"({result['threads']} threads; flags: {result['cpu']['flags'] or 'none of ' + ', '.join(PRECISION_CPU_FLAGS)}"
        f"), torch {result['torch']}; {result['posts']} posts for the labels ({result['photos']}), "
        f"median of {result['rounds']} alternating rounds; reference {result['reference']}, whose labels fall "
        + ", ".join(f"{label} {n}" for label, n in result["reference_labels"].items())
        + (" after centring its head (uncentred: "
           + ", ".join(f"{label} {n}" for label, n in result["reference_labels_uncentred"].items()) + ")"
           if result["head_centred"] else "")
        + f"; the reference's lead of its label over the next: median {result['reference_margin']['p50']:.4f}, "
        f"10th percentile {result['reference_margin']['p10']:.4f}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for v in result["variants"]:
        speeds = [f"{s['posts_per_s']:.1f} (×{s['of_reference']:.2f})" for s in v["speed"]]
        # what the Scorer resolved to: on ONNX Runtime, which parts run in int8 and why
        runs = v["recipe"] + (f"; {v['precision_note']}" if v["cpu_runtime"] == "onnx" else "")
        lines.append(f"| {v['name']} | " + " | ".join(speeds)
                     + f" | {100 * v['label_agreement']:.1f}% | {v['max_prob_diff']:.4f} | "
                     f"{v['flipped_max_margin']:.4f} | {runs} |")
    return "\n".join(lines)
