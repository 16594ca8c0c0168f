"""`Scorer`: the model's public face. Load once, score lists of posts in batches.

    scorer = Scorer.load()                       # the packaged default model
    scorer.score([{"text": "great day", "image": jpeg_bytes}, {"text": "meh", "image": None}])

A post's image may be a PIL image, encoded bytes (decoded by the safe `decode_image`), a precomputed
`ImageEmbedding` from `embed_images` (for the consumer's embedding cache) or None. Bytes that cannot be decoded are
scored text-only (`image_used=False`); a broken image never breaks the batch.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmsent.features import cache_dir
from mmsent.imaging import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, ImageDecodeError, decode_image
from mmsent.model import Batch, MMSentModel, ModelConfig, probabilities
from mmsent.presets import PRESETS, default_model_dir, preset_config
from mmsent.runtime import CPU_RUNTIMES, onnxruntime_available
from mmsent.textnorm import normalize_tweet

__all__ = ["ImageEmbedding", "ScoreResult", "Scorer", "build_model"]

ImageEmbedding = np.ndarray  # float32 or float16, shape fixed per image_encoder_id: (R, C)


@dataclass(frozen=True)
class ScoreResult:
    label: str
    scores: dict[str, float]
    image_used: bool


def build_model(model: str | os.PathLike[str] | None = None) -> MMSentModel:
    """A model directory, a preset name, or None (the packaged default)."""
    if model is None or str(model) == "default":
        d = default_model_dir()
        if (d / "config.json").exists():
            return MMSentModel.load(d)
        warnings.warn("mmsent: the packaged default model is missing; using the UNTRAINED default preset", stacklevel=2)
        return _from_config(preset_config("default"))
    if isinstance(model, str) and model in PRESETS:
        return _from_config(preset_config(model))
    path = Path(model)
    if (path / "config.json").exists():
        return MMSentModel.load(path)
    raise ValueError(f"{model!r} is neither a model directory (with config.json) nor a preset ({', '.join(PRESETS)})")


def _from_config(cfg: ModelConfig) -> MMSentModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # presets are deterministic: the same random head every time
        return MMSentModel(cfg).eval()


class Scorer:
    labels: tuple[str, str, str]
    info: dict[str, str]
    image_encoder_id: str

    def __init__(self, model: MMSentModel, *, device: str | None = None, batch_size: int = 64,
                 cpu_runtime: str = "auto") -> None:
        """`cpu_runtime`: on the CPU, run the frozen CNN through ONNX Runtime ("onnx"), PyTorch ("torch"), or ONNX
        Runtime when it is installed and the CNN exports ("auto"). The text encoder and head always run in PyTorch."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.cpu_runtime = self._use_cpu_runtime(cpu_runtime)
        cfg = model.cfg
        labels = tuple(cfg.labels)
        if len(labels) != 3:
            raise ValueError(f"a Scorer needs three labels, not {labels}")
        self.labels = (labels[0], labels[1], labels[2])
        self.info = {"name": cfg.name, "version": cfg.version, "fusion": cfg.head.fusion}
        kind = "regions" if cfg.head.needs_regions else "pooled"
        self.image_encoder_id = f"{cfg.image.ident}:{kind}"
        if cfg.image_trainable_blocks:  # fine-tuned CNN: its weights are part of the identity
            self.image_encoder_id += f":{cfg.name}@{cfg.version}"
        self.batch_size = batch_size
        self.pad_to_length: int | None = None  # None: dynamic padding; an int pads every batch (benchmarks)
        self.length_bucket: int | None = 8 if self.device.type == "cpu" else None  # rows per text-encoder call
        self.max_pixels = DEFAULT_MAX_PIXELS
        self.max_side = DEFAULT_MAX_SIDE

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None = None, *, device: str | None = None,
             cpu_runtime: str = "auto") -> Scorer:
        return cls(build_model(model), device=device, cpu_runtime=cpu_runtime)

    def _use_cpu_runtime(self, wanted: str) -> str:
        """The runtime the CNN will use: "onnx" or "torch" ("torch" on a GPU, where cuDNN does the job)."""
        if wanted not in CPU_RUNTIMES:
            raise ValueError(f"cpu_runtime must be one of {', '.join(CPU_RUNTIMES)}, not {wanted!r}")
        if wanted == "torch" or self.device.type != "cpu":
            return "torch"
        if not onnxruntime_available():
            if wanted == "onnx":
                raise RuntimeError("cpu_runtime='onnx' needs the onnxruntime and onnxscript packages")
            return "torch"
        try:
            self.model.image_encoder.use_onnx_runtime(threads=torch.get_num_threads(), cache_dir=cache_dir())
        except Exception as exc:  # an exotic user CNN that does not export still scores, in PyTorch
            if wanted == "onnx":
                raise
            warnings.warn(f"mmsent: the CNN did not export to ONNX ({exc!r}); it runs in PyTorch", stacklevel=3)
            return "torch"
        return "onnx"

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- images ------------------------------------------------------------------------------------------------
    def _as_image(self, image: Any) -> Image.Image | np.ndarray | None:
        if image is None:
            return None
        if isinstance(image, np.ndarray):
            return image
        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        if isinstance(image, bytes | bytearray | memoryview):
            try:
                return decode_image(bytes(image), max_pixels=self.max_pixels, max_side=self.max_side)
            except ImageDecodeError:
                return None
        raise TypeError(f"a post's image must be PIL, bytes, an ImageEmbedding or None, not {type(image).__name__}")

    def embed_images(self, images: Sequence[Image.Image]) -> list[ImageEmbedding]:
        """The CNN alone: one embedding (R, C) float32 per image, for caching."""
        out: list[ImageEmbedding] = []
        pre = self.model.cfg.image.preprocess
        for chunk in _chunks(list(images), self.batch_size):
            pixels = pre.batch(chunk).to(self.device)
            with torch.inference_mode(), self._autocast():
                emb = self.model.embed_pixels(pixels).float().cpu().numpy()
            out.extend(np.ascontiguousarray(e) for e in emb)
        return out

    # --- scoring -----------------------------------------------------------------------------------------------
    def _length_buckets(self, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Row indices grouped by caption length, each group padded only to its own longest caption. On the CPU a
        group is 8 rows: measured on MVSA captions at batch 32, the text encoder's time per post fell from 10.7 to
        7.7 ms (groups of 4: 9.6; 16: 8.4). A GPU wants the whole batch in one call."""
        if self.length_bucket is None or self.pad_to_length:
            return [torch.arange(len(lengths))]
        return list(lengths.argsort(stable=True).split(self.length_bucket))

    def score(self, posts: Sequence[Mapping[str, Any]]) -> list[ScoreResult]:
        results: list[ScoreResult] = []
        for chunk in _chunks(list(posts), self.batch_size):
            results.extend(self._score_batch(chunk))
        return results

    def _score_batch(self, posts: list[Mapping[str, Any]]) -> list[ScoreResult]:
        model = self.model
        texts = [normalize_tweet(p.get("text") or "") for p in posts]
        images = [self._as_image(p.get("image")) for p in posts]
        emb_shape = model._emb_shape()
        embs = torch.zeros(len(posts), *emb_shape)
        to_embed = [(k, im) for k, im in enumerate(images) if isinstance(im, Image.Image)]
        if to_embed:
            computed = self.embed_images([im for _, im in to_embed])
            for (k, _), e in zip(to_embed, computed, strict=True):
                embs[k] = torch.from_numpy(e.astype(np.float32))
        has_image = torch.zeros(len(posts), dtype=torch.bool)
        for k, im in enumerate(images):
            if isinstance(im, np.ndarray):
                if tuple(im.shape) != emb_shape:
                    raise ValueError(f"image embedding shape {im.shape} != {emb_shape} for {self.image_encoder_id}")
                embs[k] = torch.from_numpy(im.astype(np.float32))
            has_image[k] = im is not None
        enc = model.text_encoder.tokenize(texts, pad_to=self.pad_to_length)
        has_text = torch.tensor([bool(t) for t in texts])
        lengths = enc["attention_mask"].sum(1)
        probs = np.zeros((len(posts), len(self.labels)))
        for rows in self._length_buckets(lengths):
            width = enc["input_ids"].shape[1] if self.pad_to_length else max(1, int(lengths[rows].max()))
            batch = Batch(
                input_ids=enc["input_ids"][rows, :width].to(self.device),
                attention_mask=enc["attention_mask"][rows, :width].to(self.device),
                has_text=has_text[rows].to(self.device),
                has_image=has_image[rows].to(self.device),
                image_emb=embs[rows].to(self.device),
            )
            with torch.inference_mode(), self._autocast():
                probs[rows.numpy()] = probabilities(model(batch)).cpu().numpy()
        out = []
        for k in range(len(posts)):
            p = probs[k] / probs[k].sum()
            scores = {lab: float(p[j]) for j, lab in enumerate(self.labels)}
            out.append(ScoreResult(self.labels[int(p.argmax())], scores, bool(has_image[k])))
        return out


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
