"""Shape bucketing, warm-up on every shape and compiled model calls (mmsent/serving/shapes.py, `Scorer.warm_up`), on
the CPU with the tiny random model.

The compiled tests use torch.compile's "aot_eager" backend: it traces and guards exactly as inductor does (the
shapes, the recompilations) but runs the traced graph eagerly, where inductor's C++ compilation of these graphs
took a minute on the 2-core development VM. The serving path uses inductor (CUDA graphs on a GPU).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmsent import Scorer
from mmsent.presets import from_config, preset_config
from mmsent.serving.shapes import ShapeBuckets, serving_batch_size

FUSIONS = ["concat", "gated", "attention"]
WORDS = ["good", "bad", "fine", "awful", "lovely", "grim", "okay", "#tbt", "@user"]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _posts(n: int, embedding: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Captions of 0 to ~60 words; images as bytes, PIL, a cached embedding, broken bytes or none."""
    posts: list[dict[str, Any]] = []
    for k in range(n):
        text = " ".join(WORDS[(k + j) % len(WORDS)] for j in range((k * 7) % 61))
        image: Any = [None, _jpeg(k), Image.new("RGB", (30, 20), (k * 9 % 255, 80, 20)), b"\xff\xd8broken",
                      embedding][k % 5]
        posts.append({"text": text, "image": image})
    return posts


def _scorer(fusion: str = "concat", **kwargs: Any) -> Scorer:
    return Scorer(from_config(preset_config("tiny-random", fusion=fusion)), cpu_runtime="torch", **kwargs)


def test_buckets_round_up_and_are_declared_once() -> None:
    buckets = ShapeBuckets.for_model(batch_size=100, max_length=64)
    assert buckets.batch_sizes == (8, 16, 32, 64, 128)
    assert buckets.head_sizes == (8, 16, 32, 64, 128, 256, 512)  # up to three head rows per post
    assert buckets.lengths == (16, 32, 64)
    assert [buckets.rows(n) for n in (1, 8, 9, 100)] == [8, 8, 16, 128]
    assert [buckets.length(n) for n in (1, 17, 64)] == [16, 32, 64]
    assert ShapeBuckets.for_model(256, 128).lengths == (16, 32, 64, 128)
    with pytest.raises(ValueError):
        buckets.length(65)
    assert serving_batch_size("cuda") == 256 and serving_batch_size("cpu") == 32


@pytest.mark.parametrize("fusion", FUSIONS)
def test_bucketing_leaves_the_real_rows_scores_unchanged(fusion: str) -> None:
    plain, bucketed = _scorer(fusion, bucketing=False), _scorer(fusion, bucketing=True, batch_size=16)
    assert plain.buckets is None and bucketed.buckets is not None
    embedding = plain.embed_images([Image.new("RGB", (30, 30), (10, 200, 90))])[0]
    posts = _posts(37, embedding)  # 16 + 16 + 5: the last call padded to 8 rows
    for a, b in zip(plain.score(posts), bucketed.score(posts), strict=True):
        assert a.label == b.label and a.image_used == b.image_used
        assert a.scores == pytest.approx(b.scores, abs=1e-5)
        assert a.scores_by_modality.keys() == b.scores_by_modality.keys()
        for key in a.scores_by_modality:
            assert a.scores_by_modality[key] == pytest.approx(b.scores_by_modality[key], abs=1e-5)
    assert np.allclose(plain.logits(posts), bucketed.logits(posts), atol=1e-5)


def test_padding_rows_never_leave_the_scorer() -> None:
    scorer = _scorer(bucketing=True, batch_size=16)
    one = scorer.score([{"text": "only me", "image": _jpeg(1)}])
    assert len(one) == 1 and one[0].image_used
    assert scorer.logits([{"text": "only me", "image": None}]).shape == (1, 3)
    embeddings = scorer.embed_images([Image.new("RGB", (20, 20), (200, 0, 0)), b"not an image"])
    assert len(embeddings) == 2 and embeddings[0] is not None and embeddings[1] is None


def _shape(name: str, first: Any) -> tuple[int, ...]:
    """encode_text: (rows, tokens); embed_pixels: (rows,); head: (rows,), and tokens in the attention fusion."""
    if name == "head":
        tokens = first.text_tokens
        return (len(first.text),) if tokens is None else (len(first.text), tokens.shape[1])
    return tuple(first.shape[:2]) if name == "encode_text" else (len(first),)


def _recording(scorer: Scorer) -> set[tuple[str, tuple[int, ...]]]:
    """Every (call, shape) the scorer's model calls are made with, from now on."""
    seen: set[tuple[str, tuple[int, ...]]] = set()

    def record(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(first: Any, *rest: Any) -> Any:
            seen.add((name, _shape(name, first)))
            return call(first, *rest)
        return wrapped

    scorer._calls = scorer._calls._make(record(name, call)
                                        for name, call in zip(scorer._calls._fields, scorer._calls, strict=True))
    return seen


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_warm_up_visits_every_shape_that_scoring_uses(fusion: str) -> None:
    scorer = _scorer(fusion, bucketing=True, batch_size=16)
    warmed = _recording(scorer)
    assert scorer.warm_up() > 1
    buckets = scorer.buckets
    assert buckets is not None
    assert {shape for name, shape in warmed if name == "encode_text"} == set(buckets.text_shapes())
    assert {shape[0] for name, shape in warmed if name == "embed_pixels"} == set(buckets.batch_sizes)
    assert {shape[0] for name, shape in warmed if name == "head"} == set(buckets.head_sizes)
    scored = _recording(scorer)
    for n in (1, 3, 9, 16, 40):
        scorer.score(_posts(n))
    assert scored and scored <= warmed


def test_without_buckets_the_warm_up_is_one_small_post() -> None:
    scorer = _scorer(bucketing=False)
    assert scorer.warm_up() == 1


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


@pytest.mark.usefixtures("aot_eager")
def test_compiled_calls_give_the_eager_labels_and_compile_only_during_warm_up() -> None:
    from torch._dynamo.utils import counters

    eager, compiled = _scorer(), _scorer(compile=True, batch_size=8)
    assert compiled.bucketing and compiled.cpu_runtime == "torch"
    posts = _posts(20)
    before_warm_up = compiled.score(posts)  # before warm_up: eager, nothing compiled on live posts
    frames = counters["frames"]["total"]
    assert [r.label for r in before_warm_up] == [r.label for r in eager.score(posts)]
    assert counters["frames"]["total"] == frames
    compiled.warm_up()
    compiled_frames = counters["frames"]["total"]
    assert compiled_frames > frames
    results = compiled.score(posts) + compiled.score(posts[:3]) + compiled.score(posts[:1])
    assert counters["frames"]["total"] == compiled_frames, "a post triggered a compilation"
    expected = eager.score(posts) + eager.score(posts[:3]) + eager.score(posts[:1])
    for a, b in zip(expected, results, strict=True):
        assert a.label == b.label and a.scores == pytest.approx(b.scores, abs=1e-4)


def test_compile_refuses_onnx_runtime() -> None:
    with pytest.raises(ValueError, match="onnx"):
        Scorer(from_config(preset_config("tiny-random")), compile=True, cpu_runtime="onnx")


def test_the_batched_decode_path_for_image_bytes_scores_like_the_pil_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA scorer does with bytes (decode_batch, then the CNN), run here with torchvision's CPU decoder."""
    pil_path = _scorer()
    posts = [{"text": f"caption {k}", "image": _jpeg(k)} for k in range(6)]
    posts += [{"text": "png", "image": _png()}, {"text": "broken", "image": b"\xff\xd8\xff broken"}]
    expected = pil_path.score(posts)
    monkeypatch.setattr(Scorer, "wants_image_bytes", property(lambda _self: True))
    batched = _scorer(bucketing=True, batch_size=8)
    assert batched._as_image(posts[0]["image"]) == posts[0]["image"]  # kept as bytes until the batch decodes them
    for a, b in zip(expected, batched.score(posts), strict=True):
        assert a.image_used == b.image_used
        assert a.scores == pytest.approx(b.scores, abs=0.02)  # two JPEG decoders and resizers: close, not equal
    assert [e is None for e in batched.embed_images([p["image"] for p in posts])] == [False] * 7 + [True]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (33, 17), (5, 120, 240)).save(buffer, "PNG")
    return buffer.getvalue()
