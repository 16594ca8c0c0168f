"""The model on a device: what the GPU pod's model can do, from tensors already there and from JPEG bytes.

    random_architecture("default" | "seed")   the preset's encoders with random weights (speed needs no trained
                                             weights; the device host carries no 90 MB of MiniLM), tokenizer files
                                             from the pip package or a copy of them (`MMSENT_TOKENIZER_DIR`)
    bench_device(device)                     model only: posts/s per batch size in fp32, bf16 autocast and compiled
                                             (bf16, torch.compile; measured on CUDA only, null on the CPU, where
                                             inductor takes minutes to compile these models), FLOPs per post, the
                                             share of the card's bf16 peak where it is known
    bench_serving(device)                    the Scorer from JPEG bytes at the device's serving batch size (decode,
                                             CNN, text, head: on CUDA bf16 weights and the batched device decode),
                                             and per-post latency at half that load, batched as the consumer does
    bench_training(device)                   samples/s of the fine-tuning loop (mmsent/training/finetune.py) on
                                             generated posts
    label_agreement(cfg, device, dtype)      how often the labels of a lower precision equal fp32's on the CPU
    decode_photos_per_s(device)              JPEG photos decoded, resized and normalised per second: in batches on
                                             the device (mmsent/serving/gpudecode.py) against the safe PIL decoder
    GPU utilisation                          `torch.cuda.utilization()` sampled while the model works, where it
                                             answers (it needs NVML); null on the CPU or when it does not

Model-only inputs are random token ids (tweet-like lengths) and random pixels, made on the device before timing; a
CUDA device is synchronised around every timed call. Every key is present on every device: null where a figure was
not measured there.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmsent.benchmarks.host import sample_photos, synthetic_captions, time_batches
from mmsent.data import Example
from mmsent.device import autocast, resolve_device
from mmsent.encoders import resolve_path
from mmsent.imaging import decode_image
from mmsent.model import Batch, MMSentModel, ModelConfig
from mmsent.presets import from_config, preset_config
from mmsent.serving.gpudecode import decode_batch
from mmsent.serving.scorer import Scorer
from mmsent.training.config import TrainConfig
from mmsent.training.finetune import finetune

# Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), for "share of peak".
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TEXT_LENGTH = 32  # tokens per caption: MVSA captions are mostly shorter (bench.caption_lengths)


def tokenizer_dir(name: str) -> str:
    """Where the text encoder's tokenizer (and config) files are: `MMSENT_TOKENIZER_DIR`, else the preset's."""
    return os.environ.get("MMSENT_TOKENIZER_DIR") or name


def random_architecture(name: str) -> ModelConfig:
    """The preset's architecture with random encoder weights."""
    cfg = preset_config(name)
    text = cfg.text
    tokenizer = tokenizer_dir(text.tokenizer or text.path or "")
    config = text.config or _bert_config(tokenizer)
    return replace(cfg, text=replace(text, path=None, tokenizer=tokenizer, config=config),
                   image=replace(cfg.image, weights=None), version="random")


def _bert_config(tokenizer: str) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps")
    directory = resolve_path(tokenizer)
    assert directory is not None
    found = json.loads((directory / "config.json").read_text())
    return {key: found[key] for key in keys if key in found}


def _inputs(cfg: ModelConfig, batch_size: int, device: torch.device) -> Batch:
    size = cfg.image.preprocess.size
    vocab = 1000  # ids past the special tokens, well inside every vocabulary
    return Batch(
        input_ids=torch.randint(1000, 1000 + vocab, (batch_size, TEXT_LENGTH), device=device),
        attention_mask=torch.ones(batch_size, TEXT_LENGTH, dtype=torch.long, device=device),
        pixels=torch.randn(batch_size, 3, size, size, device=device),
        has_text=torch.ones(batch_size, dtype=torch.bool, device=device),
        has_image=torch.ones(batch_size, dtype=torch.bool, device=device),
    )


def _forward(model: Callable[[Batch], torch.Tensor], batch: Batch, device: torch.device, dtype: str) -> torch.Tensor:
    with torch.inference_mode(), autocast(device, bf16=dtype != "fp32"):  # bf16 and compiled: bf16
        logits: torch.Tensor = model(batch)
    return logits


def posts_per_s(model: MMSentModel, batch_size: int, device: torch.device, dtype: str, seconds: float,
                run: Callable[[Batch], torch.Tensor] | None = None) -> float:
    """`run`: the model as it is called (default: the model; `compiled_posts_per_s`: the model compiled)."""
    call = model if run is None else run
    batch = _inputs(model.cfg, batch_size, device)
    _forward(call, batch, device, dtype)  # warm-up: kernels chosen, memory pooled (compiled: the compilation)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        _forward(call, batch, device, dtype)
        done += batch_size
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done / (time.perf_counter() - started)


def compiled_posts_per_s(model: MMSentModel, batch_sizes: tuple[int, ...], device: torch.device, seconds: float,
                         measure: bool) -> dict[str, float | None]:
    """Model only through `torch.compile` in bf16 (CUDA graphs on CUDA, one static graph per batch size), each
    compiled before it is timed; None for every size when not `measure`d."""
    if not measure:
        return {str(size): None for size in batch_sizes}
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(model, mode=mode, dynamic=False)
    return {str(size): posts_per_s(model, size, device, "bf16", seconds, run=compiled) for size in batch_sizes}


def model_flops_per_post(model: MMSentModel, device: torch.device) -> float:
    """The FLOPs of one forward pass of the model per post, on random inputs of `TEXT_LENGTH` tokens and an image."""
    batch = _inputs(model.cfg, 4, device)
    with FlopCounterMode(display=False) as counter:
        _forward(model, batch, device, "fp32")
    return float(counter.get_total_flops()) / 4


def bench_device(device_name: str = "auto", archs: tuple[str, ...] = ("default", "seed"),
                 batch_sizes: tuple[int, ...] = (1, 32, 256), seconds: float = 2.0,
                 compiled_sizes: tuple[int, ...] = (256,)) -> dict[str, Any]:
    """Posts/s per architecture, precision and batch size; FLOPs per post; share of the bf16 peak (CUDA).
    Compiled: the default architecture at `compiled_sizes`, on CUDA only (each size is a compilation)."""
    device = resolve_device(device_name)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((flops for name, flops in BF16_PEAK_FLOPS.items() if name in card), None)
    result: dict[str, Any] = {"device": str(device), "card": card, "bf16_peak_flops": peak, "archs": {}}
    result["decode"] = decode_photos_per_s(device, seconds=seconds)
    for arch in archs:
        model = MMSentModel(random_architecture(arch)).to(device).eval()
        figures: dict[str, dict[str, float | None]] = {
            dtype: {str(size): posts_per_s(model, size, device, dtype, seconds) for size in batch_sizes}
            for dtype in ("fp32", "bf16")}
        with utilisation(device) as busy:
            posts_per_s(model, max(batch_sizes), device, "bf16", seconds)
        measure = device.type == "cuda" and arch == "default"
        figures["compiled"] = compiled_posts_per_s(model, compiled_sizes, device, seconds, measure)
        flops = model_flops_per_post(model, device)
        best = max(v for dtype in figures.values() for v in dtype.values() if v is not None)
        result["archs"][arch] = {"posts_per_s": figures, "flops_per_post": flops,
                                 "bf16_peak_share": None if peak is None else best * flops / peak,
                                 "gpu_utilization_percent": busy()}
    return result


@contextmanager
def utilisation(device: torch.device, every_s: float = 0.1) -> Iterator[Callable[[], float | None]]:
    """While the block runs, `torch.cuda.utilization()` every `every_s`; yields a function giving their mean in
    percent, or None (not CUDA, or NVML not there to ask)."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            try:
                samples.append(float(torch.cuda.utilization(device)))
            except Exception:  # NVML missing or refusing: utilisation unknown, which is not an error of the bench
                return

    sampler = threading.Thread(target=sample, name="mmsent-gpu-utilisation", daemon=True)
    if device.type == "cuda":
        sampler.start()
    try:
        yield lambda: statistics.fmean(samples) if samples else None
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()


def bench_serving(device_name: str = "auto", seconds: float = 2.0, max_wait_s: float = 0.05) -> dict[str, Any]:
    """The Scorer (random default architecture, warmed on every shape) on posts with JPEG bytes, at the device's
    serving batch size: posts/s, then per-post latency with posts arriving at half that rate."""
    device = resolve_device(device_name)
    # on the CPU in PyTorch: ONNX Runtime's export of these random weights would cost the check ~12 s
    scorer = Scorer(from_config(random_architecture("default")), device=str(device), cpu_runtime="torch")
    started = time.perf_counter()
    scorer.warm_up()
    warm_up_s = time.perf_counter() - started
    size = scorer.serving_batch_size
    photos, source = sample_photos(64)
    posts = [{"text": text, "image": photos[k % len(photos)]} for k, text in enumerate(synthetic_captions(4 * size))]
    with utilisation(device) as busy:
        times = time_batches(scorer, posts, size, seconds)
    rate = size * len(times) / sum(times)
    latency = latency_at_load(scorer, posts, rate / 2, seconds, size, max_wait_s)
    return {"photos": source, "batch_size": size, "warm_up_s": warm_up_s, "posts_per_s": rate,
            "gpu_utilization_percent": busy(), "half_load": latency}


def latency_at_load(score: Any, posts: list[dict[str, Any]], rate: float, seconds: float, max_batch: int,
                    max_wait_s: float) -> dict[str, float]:
    """Posts arrive steadily at `rate`; a batch is cut when `max_batch` have arrived or the oldest has waited
    `max_wait_s` (the consumer's MicroBatcher), and scored on one thread. -> p50 and p99 of arrival to result, ms.
    The scorer alone: no broker, no fetch, one model thread (the consumer overlaps two)."""
    count = max(max_batch, int(rate * seconds))
    start = time.perf_counter() + 0.01
    arrivals = [start + k / rate for k in range(count)]
    latencies: list[float] = []
    first = 0
    while first < count:
        cut = _cut(arrivals, first, max_batch, arrivals[first] + max_wait_s)
        score.score([posts[k % len(posts)] for k in range(first, cut)])
        done = time.perf_counter()
        latencies += [done - arrivals[k] for k in range(first, cut)]
        first = cut
    cuts = statistics.quantiles(latencies, n=100)
    return {"rate_posts_per_s": rate, "posts": float(count), "p50_ms": 1000 * cuts[49], "p99_ms": 1000 * cuts[98]}


def _cut(arrivals: list[float], first: int, max_batch: int, deadline: float) -> int:
    """Wait until the batch from `first` is due; -> the index after its last post."""
    while True:
        now = time.perf_counter()
        arrived = first
        while arrived < len(arrivals) and arrived - first < max_batch and arrivals[arrived] <= now:
            arrived += 1
        if arrived - first >= max_batch or arrived == len(arrivals) or (arrived > first and now >= deadline):
            return arrived
        wake = arrivals[arrived] if arrived == first else min(deadline, arrivals[arrived])
        time.sleep(max(0.0, wake - now))


def bench_training(device_name: str = "auto", posts: int | None = None, batch_size: int | None = None
                   ) -> dict[str, Any]:
    """Samples/s of `finetune` (the random default architecture with its last text layer and its CNN's head convolution
    unfrozen, bf16 autocast on CUDA, DataLoader workers) on generated posts with JPEG files: the second
    epoch's, as the first also pays for starting workers and choosing kernels. Default size: 2,048 posts in batches
    of 64 on CUDA; 16 in batches of 8 elsewhere (a CPU trains this model at a few posts/s)."""
    device = resolve_device(device_name)
    on_cuda = device.type == "cuda"
    posts = posts or (2048 if on_cuda else 16)
    batch_size = batch_size or (64 if on_cuda else 8)
    cfg = replace(random_architecture("default"), text_trainable_layers=1, image_trainable_blocks=1)
    photos, _source = sample_photos(min(posts, 64))
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="mmsent-train-bench-") as tmp:
        paths = [Path(tmp) / f"{k}.jpg" for k in range(len(photos))]
        for path, data in zip(paths, photos, strict=True):
            path.write_bytes(data)
        examples = [Example(str(k), text, rng.randrange(3), paths[k % len(paths)])
                    for k, text in enumerate(synthetic_captions(posts))]
        train = TrainConfig(epochs=2, batch_size=batch_size, progress=False, device=str(device), patience=99)
        _model, history = finetune(from_config(cfg), examples, None, train)
    return {"posts": posts, "batch_size": batch_size, "samples_per_s": history[-1]["samples_per_s"]}


def decode_photos_per_s(device: torch.device, photos: int = 64, seconds: float = 2.0) -> dict[str, Any]:
    """Generated JPEG photos of MVSA's usual size, the default model's preprocessing, both decoders side by side."""
    datas, source = sample_photos(photos)
    preprocess = preset_config("default").image.preprocess
    batched = _rate(lambda: decode_batch(datas, preprocess, device), photos, device, seconds)
    on_cpu = _rate(lambda: preprocess.batch([decode_image(d) for d in datas]), photos, device, seconds)
    return {"photos": source, "batched_on_device_photos_per_s": batched, "pil_photos_per_s": on_cpu}


def _rate(work: Any, items: int, device: torch.device, seconds: float) -> float:
    work()  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        work()
        done += items
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done / (time.perf_counter() - started)


def label_agreement(cfg: ModelConfig, device: str, dtype: str, posts: int = 256, seed: int = 0) -> float:
    """The share of random posts whose label at `dtype` on `device` equals fp32's on the CPU (the same weights)."""
    torch.manual_seed(seed)
    model = MMSentModel(cfg).eval()
    batch = _inputs(model.cfg, posts, torch.device("cpu"))
    reference = _forward(model, batch, torch.device("cpu"), "fp32").argmax(-1)
    target = torch.device(device)
    assert batch.pixels is not None
    moved = Batch(batch.input_ids.to(target), batch.attention_mask.to(target), batch.has_text.to(target),
                  batch.has_image.to(target), batch.pixels.to(target))
    other = _forward(model.to(target), moved, target, dtype).argmax(-1).cpu()
    return float((other == reference).float().mean())
