"""Model-only benchmarks: posts/s and batch latency of `Scorer`, FLOPs per post, and the machine's matmul FLOP/s.

Synthetic posts with a tweet-like caption-length mix (most under 40 tokens) and real photos: the MVSA images in
`../shared/data` when present, otherwise generated pictures (said so in the output).

A model is named by a spec: a directory or preset, optionally with the CPU precision of its encoders after an `@`
(`default@int8`, `./my-model@fp32`; `parse_model_spec`), so that one run can compare one model's fp32 against
another's (or its own) int8:

    "default@int8" ──parse_model_spec──▶ ("default", "int8") ──Scorer.load(cpu_precision=)──▶ scorer
    scorers ──compare_models: round k of each before round k+1 of any──▶ posts/s per spec, resolved precision
"""

from __future__ import annotations

import io
import multiprocessing
import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

from mmsent.quantize import CPU_PRECISIONS, PARTS
from mmsent.runtime import onnxruntime_available
from mmsent.serving.scorer import Scorer

_WORDS = [
    "love", "hate", "great", "awful", "today", "game", "team", "happy", "sad", "new", "best", "worst", "photo",
    "day", "night", "city", "rain", "sun", "friends", "family", "work", "school", "music", "show", "live",
    "amazing", "terrible", "beautiful", "broken", "win", "lose", "fans", "crowd", "breaking", "news", "watch",
    "look", "finally", "again", "never", "always", "thanks", "sorry", "wow", "omg", "lol", "#tbt", "#love",
    "@user", "http",
]
SHARED_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "mvsa-single" / "images"


def parse_model_spec(spec: str, default_precision: str = "auto") -> tuple[str, str]:
    """`MODEL[@PRECISION]` -> (model, CPU precision): `default@int8` -> ("default", "int8"); without a known
    precision after the last `@` (a directory may have an `@` in its name) the whole spec is the model, at
    `default_precision`."""
    model, at, precision = spec.rpartition("@")
    if at and model and precision in CPU_PRECISIONS:
        return model, precision
    return spec, default_precision


def caption_lengths(n: int, rng: random.Random) -> list[int]:
    """Word counts shaped like tweets: most short, a long tail to ~60 words (≈ 80 tokens)."""
    return [max(1, min(60, int(rng.lognormvariate(2.6, 0.6)))) for _ in range(n)]


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(k)) for k in caption_lengths(n, rng)]


def _generated_photo(index: int) -> bytes:
    rng = random.Random(index)
    image = Image.new("RGB", (480, 360), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(480), rng.randrange(360)
        draw.ellipse(
            (x, y, x + rng.randrange(20, 160), y + rng.randrange(20, 160)),
            fill=tuple(rng.randrange(256) for _ in range(3)),
        )
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def sample_photos(n: int) -> tuple[list[bytes], str]:
    """`n` encoded JPEGs and where they came from."""
    if SHARED_IMAGES.is_dir():
        paths = sorted(SHARED_IMAGES.glob("*.jpg"))[:n]
        if len(paths) == n:
            return [p.read_bytes() for p in paths], f"MVSA photos from {SHARED_IMAGES}"
    return [_generated_photo(i) for i in range(n)], "generated pictures (the MVSA photos were not found)"


@dataclass
class BatchFigure:
    preset: str
    batch_size: int
    padding: str
    posts_per_s: float
    batch_ms_p50: float
    batch_ms_max: float

    @classmethod
    def from_times(cls, preset: str, batch_size: int, padding: str, times: list[float]) -> BatchFigure:
        # posts/s is a throughput (all posts / all the time), like the end-to-end figure it is compared with
        return cls(preset, batch_size, padding, batch_size * len(times) / sum(times), 1000 * statistics.median(times),
                   1000 * max(times))


def matmul_flops_per_s(size: int = 2048, repeats: int = 10) -> float:
    """The machine's measured fp32 matrix-multiply rate, the roof the model is compared with: the faster of torch's
    and ONNX Runtime's (where installed). The encoders run in ONNX Runtime on the CPU, and on AMD EPYC its MLAS
    kernels ran over twice torch's `mm` (BENCHMARKS.md, 2026-12-06), so a roof of torch's alone put the seed preset
    at 193% of it."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    rates = [_rate(lambda: torch.mm(a, b), size, repeats)]
    if onnxruntime_available():
        rates.append(_rate(onnxruntime_matmul(a.numpy(), b.numpy()), size, repeats))
    return max(rates)


def matmul_flops_per_s_apart(size: int = 2048, repeats: int = 10) -> float:
    """`matmul_flops_per_s` in a child process. Run in the process the model is then timed in, it left that process
    scoring 10-15% slower (model only, batch 32, 20 rounds alternating: fp32 101.4 -> 91.8 posts/s and int8 213.8 ->
    181.2 after torch's 2048² mm, on the 2-core AMD EPYC VM, 2026-12-07; BENCHMARKS.md)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(matmul_flops_per_s, size, repeats).result()


def _rate(matmul: Callable[[], object], size: int, repeats: int) -> float:
    matmul()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        matmul()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def onnxruntime_matmul(a: np.ndarray, b: np.ndarray) -> Callable[[], object]:
    """One MatMul node in ONNX Runtime, on torch's thread count (what the Scorer gives its sessions)."""
    import onnx
    import onnxruntime as ort

    inputs = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(x.shape))
              for name, x in (("a", a), ("b", b))]
    output = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [a.shape[0], b.shape[1]])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", inputs, [output])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a, "b": b})


def scorer_flops_per_post(scorer: Scorer, posts: Sequence[dict[str, Any]]) -> float:
    """The FLOPs a Scorer spends per post on these posts, end to end (text, CNN, head), as PyTorch counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        scorer.score(posts)
    return counter.get_total_flops() / len(posts)


def time_batches(scorer: Scorer, posts: list[dict[str, Any]], batch_size: int, min_seconds: float) -> list[float]:
    """Seconds per batch of `batch_size` posts (images as encoded bytes: decode + CNN + text + fusion)."""
    scorer.score(posts[:batch_size])  # warm-up: allocator, tokenizer caches
    times: list[float] = []
    start = time.perf_counter()
    index = 0
    while time.perf_counter() - start < min_seconds or len(times) < 2:
        batch = [posts[(index + k) % len(posts)] for k in range(batch_size)]
        index += batch_size
        t0 = time.perf_counter()
        scorer.score(batch)
        times.append(time.perf_counter() - t0)
    return times


def precision_ran(entry: dict[str, Any]) -> str:
    """The precision a model-only entry (`bench_model`, `compare_models`) ran in, naming the parts when int8 covers
    only some: `auto` serves a model whose measurement kept one part in int8 with the other in fp32 (e.g. "int8 (cnn
    only)"), which is slower than both in int8 and must not read as the same figure."""
    parts = entry.get("int8_parts") or []
    if entry["cpu_precision"] == "int8" and parts and set(parts) != set(PARTS):
        return f"int8 ({', '.join(parts)} only)"
    return str(entry["cpu_precision"])


def bench_model(
    preset: str,
    batch_sizes: Sequence[int],
    *,
    min_seconds: float = 2.0,
    compare_padding_at: int | None = 32,
    cpu_precision: str = "auto",
) -> dict[str, Any]:
    scorer = Scorer.load(preset, cpu_precision=cpu_precision)
    scorer.batch_size = max(batch_sizes)
    n = max(max(batch_sizes), 64)
    photos, photo_source = sample_photos(n)
    posts = [{"text": text, "image": photo} for text, photo in zip(synthetic_captions(n), photos, strict=True)]
    figures: list[BatchFigure] = []
    for batch_size in batch_sizes:
        times = time_batches(scorer, posts, batch_size, min_seconds)
        figures.append(BatchFigure.from_times(preset, batch_size, "dynamic", times))
    if compare_padding_at:
        scorer.pad_to_length = 128
        times = time_batches(scorer, posts, compare_padding_at, min_seconds)
        figures.append(BatchFigure.from_times(preset, compare_padding_at, "pad-128", times))
        scorer.pad_to_length = None
    # Counted on the plain PyTorch path in this thread: the counter sees neither ONNX Runtime nor worker threads.
    # The same model, handed to a PyTorch scorer (which detaches the ONNX graphs: the timing is done).
    flops = scorer_flops_per_post(Scorer(scorer.model, cpu_runtime="torch", cpu_workers=1), posts[:16])
    return {
        "preset": preset,
        "model": scorer.info,
        "device": str(scorer.device),
        "cpu_precision": scorer.cpu_precision,
        "int8_parts": list(scorer.int8_parts),
        "precision_note": scorer.precision_note,
        "threads": torch.get_num_threads(),
        "photos": photo_source,
        "flops_per_post": flops,
        "figures": [asdict(f) for f in figures],
    }


def compare_models(models: Sequence[str], batch_size: int = 32, rounds: int = 8,
                   cpu_precision: str = "auto", posts: int | None = None) -> dict[str, Any]:
    """Model-only posts/s of several models (specs: `parse_model_spec`; `cpu_precision` for those that name none)
    on the same posts, timed in alternation (round k of every model, on the same batch, before round k + 1 of any),
    so that a ratio between them compares like with like on a machine whose speed drifts. Images as encoded bytes:
    decode + CNN + text + head, as `bench_model`. `posts` (default: one batch): distinct posts, taken a batch a
    round in turn, so that the figure is not one batch's captions and photos. Each model's entry says the precision
    its scorer resolved to on this machine."""
    specs = [parse_model_spec(spec, cpu_precision) for spec in models]
    scorers = [Scorer.load(model, cpu_precision=precision) for model, precision in specs]
    n = max(posts or batch_size, batch_size)
    photos, photo_source = sample_photos(n)
    pool = [{"text": t, "image": p} for t, p in zip(synthetic_captions(n), photos, strict=True)]
    times: list[list[float]] = [[] for _ in scorers]
    for run in range(rounds + 1):  # round 0 warms up and is not counted
        batch = [pool[(run * batch_size + k) % n] for k in range(batch_size)]
        for scorer, own in zip(scorers, times, strict=True):
            t0 = time.perf_counter()
            scorer.score(batch)
            if run:
                own.append(time.perf_counter() - t0)
    medians = [statistics.median(own) for own in times]
    rates = [batch_size / median for median in medians]
    return {
        "batch_size": batch_size, "rounds": rounds, "posts": n, "photos": photo_source,
        "threads": torch.get_num_threads(),
        "models": [{"spec": spec, "model": model, "asked": asked, "cpu_precision": s.cpu_precision,
                    "int8_parts": list(s.int8_parts), "precision_note": s.precision_note, "info": s.info,
                    "posts_per_s": r,
                    "batch_ms_p50": 1000 * median, "of_first": r / rates[0]}
                   for spec, (model, asked), s, r, median in zip(models, specs, scorers, rates, medians, strict=True)],
    }
