"""`Scorer`: the model's public face. Load once, score lists of posts in batches.

    scorer = Scorer.load()                       # the packaged default model
    scorer.score([{"text": "great day", "image": jpeg_bytes}, {"text": "meh", "image": None}])

A post's image may be a PIL image, encoded bytes (decoded by the safe `decode_image`), a precomputed
`ImageEmbedding` from `embed_images` (for the consumer's embedding cache) or None. Bytes that cannot be decoded are
scored text-only (`image_used=False`); a broken image never breaks the batch.

Each result also says what each modality alone says (`scores_by_modality`: "text" when the post has a caption,
"image" when its image was used): the same head on the same encoder outputs with the other modality marked absent
(its learned missing-modality embedding, as in training with modality dropout), so no encoder runs twice; the posts
that have both add two rows each to the batch's one head call.

A model directory with a `calibration.json` (`mmsent calibrate`, mmsent/calibrate.py) is loaded calibrated: every
head pass's logits are divided by its temperature, and `alert_threshold(label, min_precision)` gives its thresholds.

    posts --normalize_tweet, tokenize--> _encode_text (length buckets) --> pooled text (B, Dt) --+
          --_as_image--> _image_embs (the CNN, or the caller's cached embedding) --> (B, R, C) --+
                                            MMSentModel.features_from --> head (+ each modality alone)
                                            --> logits / T --> softmax --> ScoreResult per post
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from mmsent.calibrate import Calibration, calibrated_probabilities
from mmsent.features import cache_dir
from mmsent.imaging import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, ImageDecodeError, decode_image
from mmsent.model import Features, MMSentModel, ModelConfig
from mmsent.presets import PRESETS, default_model_dir, preset_config
from mmsent.runtime import CPU_RUNTIMES, onnxruntime_available
from mmsent.textnorm import normalize_tweet

__all__ = ["ImageEmbedding", "ScoreResult", "Scorer", "build_model", "from_config", "model_directory"]

ImageEmbedding = np.ndarray  # float32 or float16, shape fixed per image_encoder_id: (R, C)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ScoreResult:
    label: str
    scores: dict[str, float]
    image_used: bool
    # what each modality alone says: "text" when the caption is non-empty, "image" when the image was used; each
    # like `scores` (the three labels' probabilities, summing to 1)
    scores_by_modality: dict[str, dict[str, float]] = field(default_factory=dict)


def build_model(model: str | os.PathLike[str] | None = None) -> MMSentModel:
    """A model directory, a preset name, or None (the packaged default)."""
    if model is None or str(model) == "default":
        d = default_model_dir()
        if (d / "config.json").exists():
            return MMSentModel.load(d)
        warnings.warn("mmsent: the packaged default model is missing; using the UNTRAINED default preset", stacklevel=2)
        return from_config(preset_config("default"))
    if isinstance(model, str) and model in PRESETS:
        return from_config(preset_config(model))
    path = Path(model)
    if (path / "config.json").exists():
        return MMSentModel.load(path)
    raise ValueError(f"{model!r} is neither a model directory (with config.json) nor a preset ({', '.join(PRESETS)})")


def model_directory(model: str | os.PathLike[str] | None = None) -> Path | None:
    """The directory that `build_model(model)` loads from; None for a preset (or a missing packaged model)."""
    if model is None or str(model) == "default":
        d = default_model_dir()
        return d if (d / "config.json").exists() else None
    if isinstance(model, str) and model in PRESETS:
        return None
    path = Path(model)
    return path if (path / "config.json").exists() else None


def from_config(cfg: ModelConfig) -> MMSentModel:
    """A fresh model (in eval mode) from a config; its head's random weights are the same on every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # presets are deterministic: the same random head every time
        return MMSentModel(cfg).eval()


class Scorer:
    labels: tuple[str, str, str]
    info: dict[str, str]
    image_encoder_id: str

    def __init__(self, model: MMSentModel, *, device: str | None = None, batch_size: int = 64,
                 cpu_runtime: str = "auto", cpu_workers: int | None = None,
                 calibration: Calibration | None = None) -> None:
        """`cpu_runtime`: on the CPU, run the frozen encoders (the CNN; a Hugging Face text encoder too) through ONNX
        Runtime ("onnx"), PyTorch ("torch"), or ONNX Runtime where it is installed and they export ("auto"). The
        small fusion head always runs in PyTorch.

        `cpu_workers` (default: torch's thread count, one per core): on the CPU a batch is cut into that many slices
        scored at once, each with single-threaded kernels, instead of one slice with multi-threaded kernels. Depthwise
        convolutions and small matmuls scale poorly across threads, and one preempted thread stalls every parallel
        region. Measured on the 2-core dev VM, 128 MVSA posts: 54 posts/s with 2 workers against 44 with one
        2-thread call. A single post runs in the caller's thread, with its threads.

        `calibration` (what `load` reads from a model directory's calibration.json): its temperature divides the
        logits of every head pass; None scores the model as it is."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        on_cpu = self.device.type == "cpu"
        self.cpu_workers = max(1, cpu_workers or torch.get_num_threads()) if on_cpu else 1
        # Each worker runs single-threaded kernels (set per thread), so no worker waits on another's stragglers.
        self._pool = (ThreadPoolExecutor(self.cpu_workers, initializer=torch.set_num_threads, initargs=(1,),
                                         thread_name_prefix="mmsent-score") if self.cpu_workers > 1 else None)
        self.cpu_runtime = self._use_cpu_runtime(cpu_runtime)
        cfg = model.cfg
        labels = tuple(cfg.labels)
        if len(labels) != 3:
            raise ValueError(f"a Scorer needs three labels, not {labels}")
        self.labels = (labels[0], labels[1], labels[2])
        if calibration is not None and tuple(calibration.labels) != self.labels:
            raise ValueError(f"the calibration's labels {calibration.labels} are not the model's {self.labels}")
        self.calibration = calibration
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
             cpu_runtime: str = "auto", cpu_workers: int | None = None) -> Scorer:
        directory = model_directory(model)
        calibration = Calibration.load(directory) if directory is not None else None
        return cls(build_model(model), device=device, cpu_runtime=cpu_runtime, cpu_workers=cpu_workers,
                   calibration=calibration)

    @property
    def temperature(self) -> float:
        """The calibration's temperature (1.0 uncalibrated)."""
        return self.calibration.temperature if self.calibration is not None else 1.0

    def alert_threshold(self, label: str, min_precision: float) -> float | None:
        """The probability of `label` at which to alert so that, on the calibration data, the alerts' precision was
        at least `min_precision` (the threshold of the smallest calibrated target >= it); None when the model has no
        calibration, no target that high, or the target was unreachable."""
        if label not in self.labels:
            raise ValueError(f"unknown label {label!r} (labels: {', '.join(self.labels)})")
        return self.calibration.alert_threshold(label, min_precision) if self.calibration is not None else None

    def _use_cpu_runtime(self, wanted: str) -> str:
        """Where the frozen encoders run: "onnx" (ONNX Runtime, the CNN at least) or "torch" (also on a GPU)."""
        if wanted not in CPU_RUNTIMES:
            raise ValueError(f"cpu_runtime must be one of {', '.join(CPU_RUNTIMES)}, not {wanted!r}")
        image, text = self.model.image_encoder, self.model.text_encoder
        image.onnx_trunk = text.onnx_model = None  # a model handed over from another Scorer starts plain
        if wanted == "torch" or self.device.type != "cpu":
            return "torch"
        if not onnxruntime_available():
            if wanted == "onnx":
                raise RuntimeError("cpu_runtime='onnx' needs the onnxruntime and onnxscript packages")
            return "torch"
        threads = 1 if self.cpu_workers > 1 else torch.get_num_threads()  # the workers are the parallelism
        encoders: list[Any] = [image] + ([text] if text.spec.arch == "hf" else [])
        for encoder in encoders:
            try:
                encoder.use_onnx_runtime(threads=threads, cache_dir=cache_dir())
            except Exception as exc:  # an exotic user encoder that does not export still scores, in PyTorch
                if wanted == "onnx":
                    raise
                warnings.warn(f"mmsent: {type(encoder).__name__} did not export to ONNX ({exc!r}); it runs in "
                              "PyTorch", stacklevel=3)
        return "onnx" if image.onnx_trunk is not None else "torch"

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
        for chunk in _chunks(list(images), self.batch_size):
            out.extend(self._in_slices(self._embed_chunk, chunk))
        return out

    def _embed_chunk(self, images: list[Image.Image]) -> list[ImageEmbedding]:
        pixels = self.model.cfg.image.preprocess.batch(images).to(self.device)
        with torch.inference_mode(), self._autocast():
            emb = self.model.embed_pixels(pixels).float().cpu().numpy()
        return [np.ascontiguousarray(e) for e in emb]

    # --- scoring -----------------------------------------------------------------------------------------------
    def score(self, posts: Sequence[Mapping[str, Any]]) -> list[ScoreResult]:
        return self._batched(self._score_batch, posts)

    def logits(self, posts: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The head's fused logits (N, K) float32 for the posts, before the calibration's temperature (what
        `mmsent calibrate` fits on): `score` reports softmax(logits / temperature)."""
        rows = self._batched(self._logit_rows, posts)
        return np.stack(rows) if rows else np.zeros((0, len(self.labels)), dtype=np.float32)

    def _batched(self, work: Callable[[list[Mapping[str, Any]]], list[R]],
                 posts: Sequence[Mapping[str, Any]]) -> list[R]:
        results: list[R] = []
        for chunk in _chunks(list(posts), self.batch_size):
            # Similar caption lengths side by side, so that each slice (and each length bucket in it) pads little.
            order = sorted(range(len(chunk)), key=lambda k: len(chunk[k].get("text") or ""))
            by_index = dict(zip(order, self._in_slices(work, [chunk[k] for k in order]), strict=True))
            results.extend(by_index[k] for k in range(len(chunk)))
        return results

    def _in_slices(self, work: Callable[[list[T]], list[R]], items: list[T]) -> list[R]:
        """`work(items)`, split into up to `cpu_workers` slices run at once; the results in the order of `items`."""
        n = min(self.cpu_workers, len(items))
        if self._pool is None or n < 2:
            return work(items)
        # Dealt like cards, so that with items sorted by caption length every slice gets as much text to encode.
        done = list(self._pool.map(work, [items[k::n] for k in range(n)]))
        return [done[i % n][i // n] for i in range(len(items))]

    def _score_batch(self, posts: list[Mapping[str, Any]]) -> list[ScoreResult]:
        logits, has_text, has_image, both = self._head_logits(posts)
        probs = calibrated_probabilities(logits, self.temperature)  # (B + 2n, K) float64, rows sum to 1
        b, n = len(posts), len(both)
        text_alone = {k: b + j for j, k in enumerate(both)}  # the rows that have both: their extra head rows
        image_alone = {k: b + n + j for j, k in enumerate(both)}
        out = []
        for k in range(b):
            by_modality = {}
            if has_text[k]:  # a post without an image: its text alone is its score
                by_modality["text"] = self._scores(probs[text_alone.get(k, k)])
            if has_image[k]:
                by_modality["image"] = self._scores(probs[image_alone.get(k, k)])
            p = probs[k]
            out.append(ScoreResult(self.labels[int(p.argmax())], self._scores(p), bool(has_image[k]), by_modality))
        return out

    def _scores(self, p: np.ndarray) -> dict[str, float]:
        return {lab: float(p[j]) for j, lab in enumerate(self.labels)}

    def _logit_rows(self, posts: list[Mapping[str, Any]]) -> list[np.ndarray]:
        logits = self._head_logits(posts)[0]
        return list(logits[: len(posts)].numpy())

    def _head_logits(self, posts: list[Mapping[str, Any]]) -> tuple[torch.Tensor, list[bool], list[bool], list[int]]:
        """One head call for the batch: logits (B + 2n, K) float32 on the CPU, uncalibrated: the B posts as they
        are, then each of the n posts that have both modalities with its text alone, then with its image alone.
        Also has_text and has_image per post, and those n posts' indices."""
        texts = [normalize_tweet(p.get("text") or "") for p in posts]
        embs, has_image = self._image_embs([self._as_image(p.get("image")) for p in posts])
        enc = self.model.text_encoder.tokenize(texts, pad_to=self.pad_to_length)
        dev = self.device
        text_flags = [bool(t) for t in texts]
        image_flags = [bool(h) for h in has_image.tolist()]
        both = [k for k in range(len(posts)) if text_flags[k] and image_flags[k]]
        with torch.inference_mode(), self._autocast():
            tokens, text = self._encode_text(enc["input_ids"], enc["attention_mask"])
            features = self.model.features_from(text, embs.to(dev), torch.tensor(text_flags, device=dev),
                                                has_image.to(dev), tokens, enc["attention_mask"].to(dev))
            if both:
                features = _each_alone(features, torch.tensor(both, device=dev))
            logits = self.model.head(features).float().cpu()
        return logits, text_flags, image_flags, both

    def _image_embs(self, images: list[Image.Image | np.ndarray | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posts' images -> embeddings (B, R, C) float32 on the CPU and has_image (B,): decoded images through the
        CNN in one call, precomputed embeddings as they are, zeros where there is no image."""
        emb_shape = self.model._emb_shape()
        embs = torch.zeros(len(images), *emb_shape)
        to_embed = [(k, im) for k, im in enumerate(images) if isinstance(im, Image.Image)]
        if to_embed:
            computed = self._embed_chunk([im for _, im in to_embed])
            for (k, _), e in zip(to_embed, computed, strict=True):
                embs[k] = torch.from_numpy(e)
        for k, im in enumerate(images):
            if isinstance(im, np.ndarray):
                if tuple(im.shape) != emb_shape:
                    raise ValueError(f"image embedding shape {im.shape} != {emb_shape} for {self.image_encoder_id}")
                embs[k] = torch.from_numpy(im)  # float16 or float32: the assignment casts
        return embs, torch.tensor([im is not None for im in images], dtype=torch.bool)

    def _encode_text(self, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, T) tokens -> token states (B, T, H) or None, and pooled text (B, Dt), on the device."""
        if self.model.cfg.head.needs_regions:  # the attention fusion reads every token state: one padded call
            return self.model.encode_text(input_ids.to(self.device), attention_mask.to(self.device))
        return None, self._pooled_text(input_ids, attention_mask)

    def _pooled_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> (B, Dt) pooled text, the encoder run once per length bucket. On the CPU a bucket is 8
        rows, each padded only to its own longest caption: measured on MVSA captions at batch 32, the encoder's
        time per post fell from 10.7 to 7.7 ms (buckets of 4: 9.6; 16: 8.4). A GPU wants the whole batch at once."""
        lengths = attention_mask.sum(1)
        if self.length_bucket is None or self.pad_to_length:
            buckets = [torch.arange(len(lengths))]
        else:
            buckets = list(lengths.argsort(stable=True).split(self.length_bucket))
        pooled: torch.Tensor | None = None
        for rows in buckets:
            width = input_ids.shape[1] if self.pad_to_length else max(1, int(lengths[rows].max()))
            ids = input_ids[rows, :width].to(self.device)
            mask = attention_mask[rows, :width].to(self.device)
            _, part = self.model.encode_text(ids, mask)  # (b, Dt)
            if pooled is None:
                pooled = part.new_zeros(len(lengths), part.shape[1])
            pooled[rows.to(self.device)] = part
        assert pooled is not None
        return pooled


def _each_alone(f: Features, rows: torch.Tensor) -> Features:
    """The head's inputs (B rows), then `rows` again with the image marked absent (text alone), then `rows` again
    with the text marked absent (image alone): (B + 2n) rows, one head call."""
    absent = torch.zeros(len(rows), dtype=torch.bool, device=f.has_text.device)

    def twice(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.cat([x, x[rows], x[rows]])

    text, image = twice(f.text), twice(f.image)
    assert text is not None and image is not None
    return Features(
        text=text,
        image=image,
        has_text=torch.cat([f.has_text.bool(), f.has_text[rows].bool(), absent]),
        has_image=torch.cat([f.has_image.bool(), absent, f.has_image[rows].bool()]),
        text_tokens=twice(f.text_tokens),
        text_mask=twice(f.text_mask),
        image_regions=twice(f.image_regions),
    )


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
