"""The model on a device, from tensors already there: what the GPU pod's model can do, apart from the I/O.

    random_architecture("default" | "seed")   the preset's encoders with random weights (speed needs no trained
                                             weights; the device host carries no 90 MB of MiniLM), tokenizer files
                                             from the pip package or a copy of them (`MMSENT_TOKENIZER_DIR`)
    bench_device(device)                     posts/s per batch size, fp32 and bf16 autocast, FLOPs per post,
                                             the share of the card's bf16 peak where it is known
    label_agreement(cfg, device, dtype)      how often the labels of a lower precision equal fp32's on the CPU
    decode_photos_per_s(device)              JPEG photos decoded, resized and normalised per second: in batches on
                                             the device (mmsent/gpudecode.py) against the safe PIL decoder

Inputs are random token ids (tweet-like lengths) and random pixels, made on the device before timing; a CUDA
device is synchronised around every timed call.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

import torch

from mmsent.model import Batch, MMSentModel, ModelConfig
from mmsent.presets import preset_config

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
    from mmsent.encoders import resolve_path

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps")
    directory = resolve_path(tokenizer)
    assert directory is not None
    found = json.loads((directory / "config.json").read_text())
    return {key: found[key] for key in keys if key in found}


def _inputs(model: MMSentModel, batch_size: int, device: torch.device) -> Batch:
    size = model.cfg.image.preprocess.size
    vocab = 1000  # ids past the special tokens, well inside every vocabulary
    return Batch(
        input_ids=torch.randint(1000, 1000 + vocab, (batch_size, TEXT_LENGTH), device=device),
        attention_mask=torch.ones(batch_size, TEXT_LENGTH, dtype=torch.long, device=device),
        pixels=torch.randn(batch_size, 3, size, size, device=device),
        has_text=torch.ones(batch_size, dtype=torch.bool, device=device),
        has_image=torch.ones(batch_size, dtype=torch.bool, device=device),
    )


def _autocast(device: torch.device, dtype: str) -> Any:
    if dtype == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _forward(model: MMSentModel, batch: Batch, device: torch.device, dtype: str) -> torch.Tensor:
    with torch.inference_mode(), _autocast(device, dtype):
        logits: torch.Tensor = model(batch)
    return logits


def posts_per_s(model: MMSentModel, batch_size: int, device: torch.device, dtype: str, seconds: float) -> float:
    batch = _inputs(model, batch_size, device)
    _forward(model, batch, device, dtype)  # warm-up: kernels chosen, memory pooled
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        _forward(model, batch, device, dtype)
        done += batch_size
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done / (time.perf_counter() - started)


def flops_per_post(model: MMSentModel, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    batch = _inputs(model, 4, device)
    with FlopCounterMode(display=False) as counter:
        _forward(model, batch, device, "fp32")
    return float(counter.get_total_flops()) / 4


def bench_device(device_name: str = "auto", archs: tuple[str, ...] = ("default", "seed"),
                 batch_sizes: tuple[int, ...] = (1, 32, 256), seconds: float = 2.0) -> dict[str, Any]:
    """Posts/s per architecture, precision and batch size; FLOPs per post; share of the bf16 peak (CUDA)."""
    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else
                          ("cpu" if device_name == "auto" else device_name))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((flops for name, flops in BF16_PEAK_FLOPS.items() if name in card), None)
    result: dict[str, Any] = {"device": str(device), "card": card, "bf16_peak_flops": peak, "archs": {}}
    result["decode"] = decode_photos_per_s(device, seconds=seconds)
    for arch in archs:
        model = MMSentModel(random_architecture(arch)).to(device).eval()
        figures = {dtype: {str(size): posts_per_s(model, size, device, dtype, seconds) for size in batch_sizes}
                   for dtype in ("fp32", "bf16")}
        flops = flops_per_post(model, device)
        best = max(figures["bf16"].values())
        result["archs"][arch] = {"posts_per_s": figures, "flops_per_post": flops,
                                 "bf16_peak_share": None if peak is None else best * flops / peak}
    return result


def decode_photos_per_s(device: torch.device, photos: int = 64, seconds: float = 2.0) -> dict[str, Any]:
    """Generated JPEG photos of MVSA's usual size, the default model's preprocessing, both decoders side by side."""
    from mmsent.bench import sample_photos
    from mmsent.gpudecode import decode_batch
    from mmsent.imaging import decode_image

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
    batch = _inputs(model, posts, torch.device("cpu"))
    reference = _forward(model, batch, torch.device("cpu"), "fp32").argmax(-1)
    target = torch.device(device)
    assert batch.pixels is not None
    moved = Batch(batch.input_ids.to(target), batch.attention_mask.to(target), batch.has_text.to(target),
                  batch.has_image.to(target), batch.pixels.to(target))
    other = _forward(model.to(target), moved, target, dtype).argmax(-1).cpu()
    return float((other == reference).float().mean())
