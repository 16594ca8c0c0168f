"""`Scorer`: the model's public face. Load once, score lists of posts in batches.

    scorer = Scorer.load()                       # the packaged default model
    scorer.score([{"text": "great day", "image": jpeg_bytes}, {"text": "meh", "image": None}])

A post's image may be a PIL image, encoded bytes (decoded by the safe `decode_image`, at the model's own side as
the consumer decodes them), a precomputed `ImageEmbedding` from `embed_images` (for the consumer's embedding cache)
or None. Bytes that cannot be decoded are scored text-only (`image_used=False`); a broken image never breaks the
batch.

Each result also says what each modality alone says (`scores_by_modality`: "text" when the post has a caption,
"image" when its image was used): the same head on the same encoder outputs with the other modality marked absent
(its learned missing-modality embedding, as in training with modality dropout), so no encoder runs twice; the posts
that have both add two rows each to the batch's one head call.

A model directory with a `calibration.json` (`mmsent calibrate`, mmsent/evaluation/calibrate.py; the artefact:
mmsent/serving/calibration.py) is loaded calibrated: every head pass's logits are divided by its temperature, and
`alert_threshold(label, min_precision)` gives its thresholds.

    posts --normalize_tweet, tokenize--> _encode_text (length buckets) --> pooled text (B, Dt) --+
          --_as_image--> _image_embs (the CNN, or the caller's cached embedding) --> (B, R, C) --+
                                            MMSentModel.features_from --> head (+ each modality alone)
                                            --> logits / T --> softmax --> ScoreResult per post

Every model call (`_ModelCalls`: text encoder, CNN, head) goes through one of three doors, so that its shapes can be
fixed: with bucketing (on a GPU, or when compiling) its rows and caption tokens are padded up to the few shapes of
mmsent/serving/shapes.py, and the padding is cut off its outputs. `warm_up` runs each of those shapes once
(compiling them first with `compile=True`), so that no post pays for a compilation or a kernel choice.

On CUDA the weights are bfloat16 (under bf16 autocast), and each thread that scores has its own CUDA stream:

    image bytes ──decode_batch: header limits, then nvJPEG on the device (the CPU decoder for the rest)─┐
    PIL images ──preprocess on the host──▶ pinned memory ──non_blocking copy──────────────────────────┼─▶ CNN
    cached embeddings ──pinned memory ──non_blocking copy─────────────────────────────── (no CNN) ────┴─▶ head
    token ids, masks ──pinned memory ──non_blocking copy──▶ text encoder ─────────────────────────────────┘
                                                    logits ──.cpu() (waits for this thread's stream)──▶ results
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmsent.device import autocast, resolve_device
from mmsent.imaging import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, ImageDecodeError, ImagePreprocess, decode_image
from mmsent.model import Features, MMSentModel, ModelConfig
from mmsent.presets import build_model, cache_dir, model_directory
from mmsent.quantize import (
    CPU_PRECISIONS,
    PARTS,
    Int8Model,
    bf16_note,
    choose_precision,
    collect_cnn_ranges,
    collect_text_ranges,
    cpu_int8_flags,
    quantize_cnn,
    quantize_text,
)
from mmsent.reference import Reference
from mmsent.runtime import CPU_RUNTIMES, Int8, OnnxGraph, onnxruntime_available
from mmsent.serving.calibration import Calibration, calibrated_probabilities
from mmsent.serving.gpudecode import decode_batch
from mmsent.serving.shapes import ShapeBuckets, serving_batch_size
from mmsent.textnorm import normalize_tweet

__all__ = ["ImageEmbedding", "ScoreResult", "Scorer", "model_languages"]

DEFAULT_LANGUAGES: tuple[str, ...] = ("en",)
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


def model_languages(cfg: ModelConfig) -> tuple[str, ...]:
    """The caption languages (ISO 639-1) the model was trained for: its config's `extra.languages`; the MVSA and
    TweetEval data every preset and packaged model was trained on are English, hence `("en",)` when unsaid."""
    languages = cfg.extra.get("languages", DEFAULT_LANGUAGES)
    if not (isinstance(languages, list | tuple) and all(isinstance(x, str) for x in languages)):
        raise ValueError(f"the config's extra.languages must be a list of ISO 639-1 codes, not {languages!r}")
    return tuple(languages)


class _ModelCalls(NamedTuple):
    """The three calls a Scorer makes into its model: eager, or compiled by `Scorer.warm_up` (MMSENT_COMPILE)."""

    # (B, T) ids and mask -> token states (B, T, H), pooled text (B, Dt)
    encode_text: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    embed_pixels: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) -> image embeddings (B, R, C)
    head: Callable[[Features], torch.Tensor]  # the head's inputs, B rows -> logits (B, K)

    @classmethod
    def of(cls, model: MMSentModel) -> _ModelCalls:
        return cls(model.encode_text, model.embed_pixels, model.head)

    def compiled(self, device: torch.device) -> _ModelCalls:
        """Each call through `torch.compile`, one static graph per shape (`dynamic=False`): on CUDA with CUDA graphs
        ("reduce-overhead": a batch is one graph launch instead of hundreds of kernel launches), elsewhere inductor's
        default. Nothing is compiled until the first call of each shape, which `Scorer.warm_up` makes."""
        if device.type != "cuda":
            return _ModelCalls._make(torch.compile(call, dynamic=False) for call in self)
        return _ModelCalls._make(_copied_out(torch.compile(call, mode="reduce-overhead", dynamic=False))
                                 for call in self)


def _copied_out(call: Callable[..., Any]) -> Callable[..., Any]:
    """`call` with its outputs copied: a CUDA graph's outputs live in memory that the next graph run on the thread
    reuses, and a Scorer feeds one call's outputs (token states, embeddings) to the next."""
    def run(*args: Any) -> Any:
        out = call(*args)
        return tuple(x.clone() for x in out) if isinstance(out, tuple) else out.clone()
    return run


class Scorer:
    labels: tuple[str, str, str]
    info: dict[str, str]
    image_encoder_id: str
    languages: tuple[str, ...]  # ISO 639-1 codes of the caption languages the model was trained for

    def __init__(self, model: MMSentModel, *, device: str | None = None, batch_size: int | None = None,
                 cpu_runtime: str = "auto", cpu_workers: int | None = None,
                 calibration: Calibration | None = None, compile: bool = False,
                 bucketing: bool | None = None, reference: Reference | None = None,
                 cpu_precision: str = "auto", int8: Int8Model | None = None,
                 int8_parts: tuple[str, ...] = PARTS) -> None:
        """`cpu_runtime`: on the CPU, run the frozen encoders (the CNN; a Hugging Face text encoder too) through ONNX
        Runtime ("onnx"), PyTorch ("torch"), or ONNX Runtime where it is installed and they export ("auto"). The
        small fusion head always runs in PyTorch.

        `cpu_precision` (on the CPU only; mmsent/quantize.py): "fp32"; "bf16", the CUDA recipe on the CPU (the
        weights cast to bf16, under bf16 autocast, eager PyTorch: for a CPU with AVX512_BF16 or AMX); "int8", both
        encoders in int8 on ONNX Runtime (the CNN from `int8`'s stored ranges, or, where the model has none, ranges
        from generated pictures, with a warning: fit for timing random-weights presets, not for a trained model's
        accuracy); "auto", int8 for the parts whose int8 accuracy `int8` (what `load` reads from the model
        directory) says was measured and kept, on a CPU with VNNI or AMX, else fp32. `cpu_precision` then says what
        it resolved to ("int8" when any part runs in int8), `int8_parts` which parts do, and `precision_note` why.
        `int8_parts`: the parts "int8" means ("text", "cnn"; `mmsent quantize` measures each alone too).

        `cpu_workers` (default: torch's thread count, one per core): on the CPU a batch is cut into that many slices
        scored at once, each with single-threaded kernels, instead of one slice with multi-threaded kernels. Depthwise
        convolutions and small matmuls scale poorly across threads, and one preempted thread stalls every parallel
        region. Measured on the 2-core dev VM, 128 MVSA posts: 54 posts/s with 2 workers against 44 with one
        2-thread call. A single post runs in the caller's thread, with its threads.

        `calibration` (what `load` reads from a model directory's calibration.json): its temperature divides the
        logits of every head pass; None scores the model as it is.

        `reference` (what `load` reads from a model directory's reference.json, mmsent/reference.py): what the
        model's predictions looked like on data like its training data, for drift monitoring; None when it has none.

        `batch_size`: posts per model call at most (default: 256 on a GPU, 64 on the CPU).

        `compile`: `warm_up` compiles the model's calls with `torch.compile` (PyTorch runtime only); until then, and
        without it, they run eagerly. `bucketing` (default: on a GPU or when compiling): every model call padded to
        one of a few fixed shapes (mmsent/serving/shapes.py), which compiled code and CUDA graphs need; off, each call
        has the shape of its posts, which the CPU's eager and ONNX Runtime paths do best with.

        On CUDA the weights are cast to bfloat16 (under bf16 autocast, which keeps the precision-sensitive ops in
        fp32): autocast alone re-casts every weight on every call, as its cast cache is off for inference."""
        self.device = resolve_device(device or "auto")
        on_cuda = self.device.type == "cuda"
        if compile and cpu_runtime == "onnx":
            raise ValueError("compile=True compiles the PyTorch model: it cannot run with cpu_runtime='onnx'")
        if cpu_precision not in CPU_PRECISIONS:
            raise ValueError(f"cpu_precision must be one of {', '.join(CPU_PRECISIONS)}, not {cpu_precision!r}")
        cpu_bf16 = self.device.type == "cpu" and cpu_precision == "bf16"
        if cpu_bf16 and cpu_runtime == "onnx":
            raise ValueError("cpu_precision='bf16' runs the encoders in PyTorch: not with cpu_runtime='onnx'")
        self.dtype = torch.bfloat16 if on_cuda or cpu_bf16 else torch.float32
        self._emb_shape = model.embedding_shape()  # (R, C); measured (for regions) while the weights are still fp32
        self.model = model.to(self.device, self.dtype).eval()  # fp32 on the CPU but in bf16 (or a CUDA Scorer's)
        if on_cuda:  # the weights' copies ran on the default stream; the scoring threads read them on their own
            torch.cuda.synchronize(self.device)
        on_cpu = self.device.type == "cpu"
        self.cpu_workers = max(1, cpu_workers or torch.get_num_threads()) if on_cpu else 1
        # Each worker runs single-threaded kernels (set per thread), so no worker waits on another's stragglers.
        self._pool = (ThreadPoolExecutor(self.cpu_workers, initializer=torch.set_num_threads, initargs=(1,),
                                         thread_name_prefix="mmsent-score") if self.cpu_workers > 1 else None)
        self._int8 = int8 or Int8Model.load(None)
        self.precision_note = "fp32: not on the CPU's ONNX Runtime"
        self.cpu_runtime = self._use_cpu_runtime("torch" if compile else cpu_runtime, cpu_precision, int8_parts)
        cfg = model.cfg
        labels = tuple(cfg.labels)
        if len(labels) != 3:
            raise ValueError(f"a Scorer needs three labels, not {labels}")
        self.labels = (labels[0], labels[1], labels[2])
        if calibration is not None and tuple(calibration.labels) != self.labels:
            raise ValueError(f"the calibration's labels {calibration.labels} are not the model's {self.labels}")
        self.calibration = calibration
        self.reference = reference
        self.info = {"name": cfg.name, "version": cfg.version, "fusion": cfg.head.fusion}
        self.languages = model_languages(cfg)
        kind = "regions" if cfg.head.needs_regions else "pooled"
        self.image_encoder_id = f"{cfg.image.ident}:{kind}"
        if cfg.image_trainable_blocks:  # fine-tuned CNN: its weights are part of the identity
            self.image_encoder_id += f":{cfg.name}@{cfg.version}"
        if self._cnn_int8 is not None:  # an int8 CNN's embeddings differ from fp32's: not shared through the cache
            self.image_encoder_id += f":int8-{self._cnn_int8}"
        self.batch_size = batch_size or (serving_batch_size("cuda") if on_cuda else 64)
        self.serving_batch_size = serving_batch_size(self.device.type)  # MMSENT_MAX_BATCH_SIZE's default
        self.compile = compile
        self.bucketing = (on_cuda or compile) if bucketing is None else bucketing
        self._calls = _ModelCalls.of(self.model)
        self._compiled = False  # `warm_up` compiles `_calls` once, when `compile`
        self._threads = threading.local()  # per scoring thread: its CUDA stream
        self.pad_to_length: int | None = None  # None: dynamic padding; an int pads every batch (benchmarks)
        self.length_bucket: int | None = 8 if on_cpu else None  # rows per text-encoder call
        self.max_pixels = DEFAULT_MAX_PIXELS
        self.max_side = DEFAULT_MAX_SIDE
        # image bytes decoded to a shorter side of at least this, as the consumer decodes them (mmsent/imaging.py);
        # None: every pixel
        self.decode_side: int | None = cfg.image.preprocess.source_side

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None = None, *, device: str | None = None,
             cpu_runtime: str = "auto", cpu_workers: int | None = None, compile: bool = False,
             max_params: int | None = None, cpu_precision: str = "auto",
             int8_parts: tuple[str, ...] = PARTS) -> Scorer:
        """`max_params` (None: no limit): a model whose config asks for more parameters is refused before any of
        its weights is read. A model that fails a check raises `ModelRefused` with the reason's code: see
        `MMSentModel.load` for the checks, in order; its calibration (read after the weights passed) is refused
        when it holds a non-finite temperature or threshold."""
        built = build_model(model, max_params=max_params)
        directory = model_directory(model)
        calibration = Calibration.load(directory) if directory is not None else None
        reference = Reference.load(directory) if directory is not None else None
        return cls(built, device=device, cpu_runtime=cpu_runtime, cpu_workers=cpu_workers,
                   calibration=calibration, compile=compile, reference=reference, cpu_precision=cpu_precision,
                   int8=Int8Model.load(directory), int8_parts=int8_parts)

    @property
    def calibration_digest(self) -> str | None:
        """SHA-256 of the weights the calibration was fitted on (what an alert names); None uncalibrated, or when
        the calibration did not record them."""
        return self.calibration.model_sha256 if self.calibration is not None else None

    @property
    def temperature(self) -> float:
        """The calibration's temperature (1.0 uncalibrated)."""
        return self.calibration.temperature if self.calibration is not None else 1.0

    @property
    def buckets(self) -> ShapeBuckets | None:
        """The fixed shapes of the model calls for the current `batch_size`, or None (shapes as they come)."""
        if not self.bucketing:
            return None
        return ShapeBuckets.for_model(self.batch_size, self.model.cfg.text.max_length)

    @property
    def wants_image_bytes(self) -> bool:
        """True on CUDA: hand images over as encoded bytes (after a header check), which the Scorer decodes in
        batches on the device (mmsent/serving/gpudecode.py), rather than as decoded PIL images."""
        return self.device.type == "cuda"

    def alert_threshold(self, label: str, min_precision: float) -> float | None:
        """The probability of `label` at which to alert so that, on the calibration data, the alerts' precision was
        at least `min_precision` (the threshold of the smallest calibrated target >= it); None when the model has no
        calibration, no target that high, or the target was unreachable."""
        if label not in self.labels:
            raise ValueError(f"unknown label {label!r} (labels: {', '.join(self.labels)})")
        return self.calibration.alert_threshold(label, min_precision) if self.calibration is not None else None

    def _use_cpu_runtime(self, wanted: str, precision: str, int8_parts: tuple[str, ...]) -> str:
        """Where the frozen encoders run: "onnx" (ONNX Runtime, the CNN at least) or "torch" (also on a GPU); in
        which precision (`cpu_precision`, `precision_note`)."""
        if wanted not in CPU_RUNTIMES:
            raise ValueError(f"cpu_runtime must be one of {', '.join(CPU_RUNTIMES)}, not {wanted!r}")
        image, text = self.model.image_encoder, self.model.text_encoder
        image.onnx_trunk = text.onnx_model = None  # a model handed over from another Scorer starts plain
        self.cpu_precision = "fp32"
        self.int8_parts: tuple[str, ...] = ()
        self._cnn_int8: str | None = None  # the CNN's int8 recipe and ranges, when it runs in int8
        if precision == "bf16" and self.device.type == "cpu":  # eager, in the bf16 dtype `__init__` chose
            self.cpu_precision, self.precision_note = "bf16", bf16_note()
            return "torch"
        if wanted == "torch" or self.device.type != "cpu":
            return "torch"
        if not onnxruntime_available():
            if wanted == "onnx":
                raise RuntimeError("cpu_runtime='onnx' needs the onnxruntime and onnxscript packages")
            return "torch"
        choice = choose_precision(precision, cpu_int8_flags(), self._int8, int8_parts)
        threads = 1 if self.cpu_workers > 1 else torch.get_num_threads()  # the workers are the parallelism
        parts: list[tuple[str, Any]] = ([("text", text)] if text.spec.arch == "hf" else []) + [("cnn", image)]
        in_int8: list[str] = []
        for part, encoder in parts:
            int8 = self._int8_twin(part) if part in choice.parts else None
            if self._onnx_graph(part, encoder, threads, int8, strict=wanted == "onnx") and int8 is not None:
                in_int8.append(part)
                self._cnn_int8 = int8.key if part == "cnn" else self._cnn_int8
        self.cpu_precision, self.int8_parts = ("int8" if in_int8 else "fp32"), tuple(in_int8)
        self.precision_note = choice.note if tuple(in_int8) == choice.parts else (  # e.g. a text encoder in PyTorch
            f"{choice.note}; in int8: {', '.join(in_int8) or 'nothing'}")
        return "onnx" if image.onnx_trunk is not None else "torch"

    @staticmethod
    def _onnx_graph(part: str, encoder: Any, threads: int, int8: Int8 | None, *, strict: bool) -> bool:
        """One encoder onto ONNX Runtime: its int8 twin when `int8` is given and builds, else its fp32 graph, else
        (an exotic user encoder that does not export; `strict`: raise) PyTorch. Whether it runs `int8`."""
        if int8 is not None:
            try:
                encoder.use_onnx_runtime(threads=threads, cache_dir=cache_dir(), int8=int8)
                return True
            except Exception as exc:  # e.g. ranges of another export: this part in fp32
                warnings.warn(f"mmsent: the {part} encoder stays fp32: its int8 graph did not build ({exc})",
                              stacklevel=4)
        try:
            encoder.use_onnx_runtime(threads=threads, cache_dir=cache_dir())
        except Exception as exc:
            if strict:
                raise
            warnings.warn(f"mmsent: {type(encoder).__name__} did not export to ONNX ({exc!r}); it runs in PyTorch",
                          stacklevel=4)
        return False

    def collect_cnn_ranges(self, images: Sequence[Image.Image], out: Path) -> int:
        """The CNN's activation ranges over these images (preprocessed as for scoring), written to `out` in the
        format `int8-ranges.json` has: what its static int8 twin is quantized with. Needs the CNN on ONNX Runtime
        in fp32 (`cpu_precision="fp32"`). Returns the number of images."""
        graph = self.model.image_encoder.onnx_trunk
        if not isinstance(graph, OnnxGraph) or self.cpu_precision != "fp32":
            raise ValueError("the CNN's ranges are collected on its fp32 ONNX Runtime graph: load the Scorer on the "
                             "CPU with cpu_precision='fp32'")
        preprocess = self.model.cfg.image.preprocess
        batches = (preprocess.batch(images[k : k + 16]).numpy() for k in range(0, len(images), 16))
        with graph.fp32_file() as fp32:
            return collect_cnn_ranges(fp32, batches, out)

    def collect_text_ranges(self, texts: Sequence[str], out: Path) -> int:
        """The text encoder's channel maxima over these captions (normalised and tokenised as for scoring), written
        to `out` in the format `int8-text-ranges.json` has: what its smoothed int8 twin is quantized with. Needs the
        text encoder on ONNX Runtime in fp32. Returns the number of captions."""
        graph = self.model.text_encoder.onnx_model
        if not isinstance(graph, OnnxGraph) or self.cpu_precision != "fp32":
            raise ValueError("the text encoder's ranges are collected on its fp32 ONNX Runtime graph: load the "
                             "Scorer on the CPU with cpu_precision='fp32'")
        tokenize = self.model.text_encoder.tokenize
        encoded = (tokenize([normalize_tweet(t) for t in texts[k : k + 32]]) for k in range(0, len(texts), 32))
        batches = ((e["input_ids"].numpy(), e["attention_mask"].numpy()) for e in encoded)
        with graph.fp32_file() as fp32:
            return collect_text_ranges(fp32, batches, out)

    def _int8_twin(self, part: str) -> Int8 | None:
        """How to quantize one encoder's graph (mmsent/quantize.py), keyed by the recipe and the ranges it reads;
        None (the part in fp32) when its ranges file vanished since the directory was read (a roll-out under way)."""
        recipe = self._int8.recipe
        if part == "text":
            return self._text_int8_twin()
        ranges = self._int8.ranges
        if ranges is not None:
            digest = _file_digest(ranges, "the CNN")
            if digest is None:
                return None
            return Int8(f"cnn-{recipe.digest()}-{digest}", lambda fp32, out: quantize_cnn(fp32, out, ranges, recipe))
        warnings.warn("mmsent: the model has no int8 ranges (mmsent quantize): its CNN is quantized with ranges from "
                      "generated pictures, fit for timing, not for accuracy", stacklevel=4)

        def from_generated(fp32: Path, out: Path) -> None:
            generated = out.with_name("generated-ranges.json")  # beside `out`: the quantizer's own temporary dir
            collect_cnn_ranges(fp32, generated_pixels(self.model.cfg.image.preprocess), generated)
            quantize_cnn(fp32, out, generated, recipe)

        return Int8(f"cnn-{recipe.digest()}-generated", from_generated)

    def _text_int8_twin(self) -> Int8 | None:
        """The text encoder's: smoothed with the model's channel maxima where the recipe says; where they are missing
        (asked for int8 on a model that was not quantized so) not smoothed, said in a warning."""
        recipe, ranges = self._int8.recipe, self._int8.text_ranges
        if not recipe.text_smoothing:
            return Int8(f"text-{recipe.digest()}", lambda fp32, out: quantize_text(fp32, out, recipe))
        if ranges is None:
            warnings.warn("mmsent: the model has no readable int8 text ranges (mmsent quantize): its text encoder "
                          "is quantized without smoothing", stacklevel=5)
            plain = replace(recipe, text_smoothing=0.0)
            return Int8(f"text-{plain.digest()}", lambda fp32, out: quantize_text(fp32, out, plain))
        digest = _file_digest(ranges, "the text encoder")
        if digest is None:
            return None
        return Int8(f"text-{recipe.digest()}-{digest}", lambda fp32, out: quantize_text(fp32, out, recipe, ranges))

    # --- the device ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Inference mode, bf16 autocast with bf16 weights (on CUDA; on the CPU when asked), and on CUDA this
        thread's own stream: the consumer's two model threads then overlap one batch's copies and decode with the
        other's compute instead of queueing on the default stream. Each thread waits for its own results (`.cpu()`),
        so they leave in submission order."""
        with torch.inference_mode(), autocast(self.device, bf16=self.dtype == torch.bfloat16), self._stream():
            yield

    def _stream(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._threads, "stream", None)
        if stream is None:
            stream = self._threads.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor onto the device. On CUDA through pinned memory (torch's caching host allocator: reused
        blocks, each kept until its copy is done) and a `non_blocking` copy, so the thread goes on preparing while
        the copy runs on its stream."""
        if self.device.type != "cuda":
            return x
        return x.pin_memory().to(self.device, non_blocking=True)

    def warm_up(self) -> int:
        """Run every shape the model calls can have once (compiling them first when `compile`), so that no post
        pays for kernel selection, memory pooling or a compilation. Without buckets (the CPU's eager path: shapes
        as they come) one small post. Call it from each thread that will score: CUDA graphs are recorded per
        thread, and compiled code is guarded on the calling thread's torch thread count (the CPU slices' workers,
        which run single-threaded, are warmed here too). Returns the number of model calls made."""
        buckets = self.buckets
        calls = 0
        if buckets is not None:
            if self.compile and not self._compiled:
                self._calls, self._compiled = self._calls.compiled(self.device), True
            calls = self._warm_every_shape(buckets)
            if self._pool is not None:
                calls += self._pool.submit(self._warm_every_shape, buckets).result()
        self.score([{"text": "warm up", "image": None}])  # and the Python around the calls: tokenizer, softmax
        return calls + 1

    def _warm_every_shape(self, buckets: ShapeBuckets) -> int:
        """The calls of every shape, on this thread. Dynamo keeps 8 graphs per function unless told more (a setting
        of the compiling thread in newer torch), then runs the rest eagerly: here each function has one graph per
        shape and torch thread count that calls it (callers, slice workers), and only warm-up ever compiles."""
        import torch._dynamo

        graphs = 4 * max(len(buckets.text_shapes()), len(buckets.head_sizes) * len(buckets.lengths))
        with torch._dynamo.config.patch(recompile_limit=graphs), self._on_device():
            return self._warm_calls(buckets)

    def _warm_calls(self, buckets: ShapeBuckets) -> int:
        size = self.model.cfg.image.preprocess.size
        calls = 0
        for rows in buckets.batch_sizes:
            self._calls.embed_pixels(torch.zeros(rows, 3, size, size, device=self.device, dtype=self.dtype))
            calls += 1
        emb = torch.zeros(1, *self._emb_shape, device=self.device, dtype=self.dtype)
        for length in buckets.lengths:
            ids = torch.zeros(1, length, dtype=torch.long, device=self.device)
            mask = torch.ones_like(ids)
            for rows in buckets.batch_sizes:
                tokens, pooled = self._calls.encode_text(_pad_rows(ids, rows), _pad_rows(mask, rows))
                calls += 1
            if length != buckets.lengths[0] and not self.model.cfg.head.needs_regions:
                continue  # the head sees the token states (and so the lengths) only in the attention fusion
            flags = torch.ones(1, dtype=torch.bool, device=self.device)
            features = self.model.features_from(pooled[:1], emb, flags, flags, tokens[:1], mask)
            for rows in buckets.head_sizes:
                self._calls.head(_pad_features(features, rows))
                calls += 1
        return calls

    # --- images ------------------------------------------------------------------------------------------------
    def _as_image(self, image: Any) -> Image.Image | np.ndarray | bytes | None:
        """A post's image as the model stage takes it: PIL (RGB), a cached embedding, None, or on CUDA the encoded
        bytes, decoded later with the batch's others on the device (`_pixels`)."""
        if image is None:
            return None
        if isinstance(image, np.ndarray):
            return image
        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        if isinstance(image, bytes | bytearray | memoryview):
            if self.wants_image_bytes:
                return bytes(image)
            try:
                return decode_image(bytes(image), max_pixels=self.max_pixels, max_side=self.max_side,
                                    min_side=self.decode_side)
            except ImageDecodeError:
                return None
        raise TypeError(f"a post's image must be PIL, bytes, an ImageEmbedding or None, not {type(image).__name__}")

    def embed_images(self, images: Sequence[Image.Image | bytes]) -> list[ImageEmbedding | None]:
        """The CNN alone: one embedding (R, C) float32 per image, for caching; None for bytes that do not decode."""
        out: list[ImageEmbedding | None] = []
        for chunk in _chunks([self._as_image(im) for im in images], self.batch_size):
            out.extend(self._in_slices(self._embed_chunk, chunk))
        return out

    def _embed_chunk(self, images: list[Image.Image | bytes | None]) -> list[ImageEmbedding | None]:
        present = [(k, im) for k, im in enumerate(images) if im is not None]
        with self._on_device():
            emb, decoded = self._embed_on_device([im for _, im in present])
            rows = iter(emb.float().cpu().numpy())
        done = {k: np.ascontiguousarray(next(rows)) for (k, _), ok in zip(present, decoded, strict=True) if ok}
        return [done.get(k) for k in range(len(images))]

    def _embed_on_device(self, images: list[Image.Image | bytes]) -> tuple[torch.Tensor, list[bool]]:
        """Images -> embeddings (m, R, C) on the device for the m that decoded, in order; whether each decoded."""
        pixels, decoded = self._pixels(images)  # (m, 3, S, S)
        if not len(pixels):
            return torch.zeros(0, *self._emb_shape, device=self.device, dtype=self.dtype), decoded
        rows = len(pixels)
        buckets = self.buckets
        padded = _pad_rows(pixels, buckets.rows(rows)) if buckets is not None else pixels
        return self._calls.embed_pixels(padded)[:rows], decoded

    def _pixels(self, images: list[Image.Image | bytes]) -> tuple[torch.Tensor, list[bool]]:
        """PIL images preprocessed on the host and copied over; encoded bytes (CUDA) decoded, resized and normalised
        in one batch on the device, with the safe CPU decoder for what nvJPEG refuses -> (m, 3, S, S) on the
        device in the model's dtype, for the m that decoded, in order; whether each decoded."""
        preprocess = self.model.cfg.image.preprocess
        pil = [(k, im) for k, im in enumerate(images) if isinstance(im, Image.Image)]
        encoded = [(k, im) for k, im in enumerate(images) if isinstance(im, bytes)]
        decoded = [True] * len(images)
        parts: dict[int, torch.Tensor] = {}
        if pil:
            host = preprocess.batch([im for _, im in pil])  # (p, 3, S, S) float32
            if not encoded:
                return self._to_device(host).to(self.dtype), decoded
            parts.update(zip([k for k, _ in pil], self._to_device(host), strict=True))
        if encoded:
            pixels, reasons = decode_batch([data for _, data in encoded], preprocess, self.device,
                                           max_pixels=self.max_pixels, max_side=self.max_side)
            ok = [k for (k, _), reason in zip(encoded, reasons, strict=True) if reason is None]
            parts.update(zip(ok, pixels, strict=True))
            for (k, _), reason in zip(encoded, reasons, strict=True):
                decoded[k] = reason is None
        size = preprocess.size
        if not parts:
            return torch.zeros(0, 3, size, size, device=self.device, dtype=self.dtype), decoded
        return torch.stack([parts[k] for k in sorted(parts)]).to(self.dtype), decoded

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
        images = [self._as_image(p.get("image")) for p in posts]
        enc = self.model.text_encoder.tokenize(texts, pad_to=self.pad_to_length)
        text_flags = [bool(t) for t in texts]
        with self._on_device():
            embs, image_flags = self._image_embs(images)
            both = [k for k in range(len(posts)) if text_flags[k] and image_flags[k]]
            tokens, mask, text = self._encode_text(enc["input_ids"], enc["attention_mask"])
            features = self.model.features_from(text, embs, self._to_device(torch.tensor(text_flags)),
                                                self._to_device(torch.tensor(image_flags)), tokens, mask)
            if both:
                features = _each_alone(features, self._to_device(torch.tensor(both)))
            logits = self._head(features).float().cpu()
        return logits, text_flags, image_flags, both

    def _head(self, features: Features) -> torch.Tensor:
        """The head on n rows -> logits (n, K); with buckets, on rows padded to a head bucket."""
        rows = len(features.text)
        buckets = self.buckets
        if buckets is not None:
            features = _pad_features(features, buckets.head_rows(rows))
        return self._calls.head(features)[:rows]

    def _image_embs(self, images: list[Image.Image | np.ndarray | bytes | None]) -> tuple[torch.Tensor, list[bool]]:
        """Posts' images -> embeddings (B, R, C) on the device and has_image per post: images through the CNN in one
        call, cached embeddings as they are, zeros where there is no image (or its bytes did not decode)."""
        has_image = [im is not None for im in images]
        embs = torch.zeros(len(images), *self._emb_shape, device=self.device, dtype=self.dtype)
        to_embed = [(k, im) for k, im in enumerate(images) if isinstance(im, Image.Image | bytes)]
        if to_embed:
            computed, decoded = self._embed_on_device([im for _, im in to_embed])
            embs[[k for (k, _), ok in zip(to_embed, decoded, strict=True) if ok]] = computed.to(self.dtype)
            for (k, _), ok in zip(to_embed, decoded, strict=True):
                has_image[k] = ok
        cached = [(k, im) for k, im in enumerate(images) if isinstance(im, np.ndarray)]
        for _, emb in cached:
            if tuple(emb.shape) != self._emb_shape:
                raise ValueError(f"image embedding shape {emb.shape} != {self._emb_shape} for {self.image_encoder_id}")
        if cached:  # float16 or float32, stacked as float32
            host = torch.from_numpy(np.stack([emb for _, emb in cached]).astype(np.float32))  # (c, R, C)
            embs[[k for k, _ in cached]] = self._to_device(host).to(self.dtype)
        return embs, has_image

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(B, T) tokens -> token states (B, W, H) with their mask (B, W), or None and None, and pooled text (B, Dt),
        on the device."""
        if self.model.cfg.head.needs_regions:  # the attention fusion reads every token state: one padded call
            ids, mask = self._text_call_inputs(input_ids, attention_mask, torch.arange(len(input_ids)))
            tokens, pooled = self._calls.encode_text(ids, mask)
            rows = len(input_ids)
            return tokens[:rows], mask[:rows], pooled[:rows]
        return None, None, self._pooled_text(input_ids, attention_mask)

    def _pooled_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> (B, Dt) pooled text, the encoder run once per length bucket. On the CPU a bucket is 8
        rows, each padded only to its own longest caption: measured on MVSA captions at batch 32, the encoder's
        time per post fell from 10.7 to 7.7 ms (buckets of 4: 9.6; 16: 8.4). A GPU wants the whole batch at once."""
        lengths = attention_mask.sum(1)
        if self.length_bucket is None or self.pad_to_length:
            groups = [torch.arange(len(lengths))]
        else:
            groups = list(lengths.argsort(stable=True).split(self.length_bucket))
        pooled: torch.Tensor | None = None
        for rows in groups:
            ids, mask = self._text_call_inputs(input_ids, attention_mask, rows)
            _, part = self._calls.encode_text(ids, mask)  # (b', Dt), b' >= len(rows) with buckets
            if pooled is None:
                pooled = part.new_zeros(len(lengths), part.shape[1])
            pooled[self._to_device(rows)] = part[: len(rows)]
        assert pooled is not None
        return pooled

    def _text_call_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's inputs (b', W) for these rows, on the device: W their longest caption (the whole
        width with `pad_to_length`), and with buckets W and b' rounded up to buckets (the added rows copies of the
        last, the added tokens masked padding)."""
        longest = input_ids.shape[1] if self.pad_to_length else max(1, int(attention_mask[rows].sum(1).max()))
        ids, mask = input_ids[rows, :longest], attention_mask[rows, :longest]
        buckets = self.buckets
        if buckets is not None:
            width = longest if self.pad_to_length else buckets.length(longest)
            ids, mask = (_pad_rows(F.pad(x, (0, width - longest)), buckets.rows(len(rows))) for x in (ids, mask))
        # contiguous: compiled code is specialised on strides too, and a column slice is not
        return self._to_device(ids.contiguous()), self._to_device(mask.contiguous())


def generated_pixels(preprocess: ImagePreprocess, images: int = 32, batch: int = 8) -> Iterator[np.ndarray]:
    """Preprocessed pictures (B, 3, S, S) of smooth random colour fields: inputs with an image's range of values,
    for quantizing a CNN that has no ranges from real photos (timing random-weights presets)."""
    rng = np.random.default_rng(0)
    for start in range(0, images, batch):
        pictures = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((320, 240))
                    for _ in range(min(batch, images - start))]
        yield preprocess.batch(pictures).numpy()


def _file_digest(ranges: Path, part: str) -> str | None:
    """A ranges file's digest, part of its int8 graph's cache key; None (with a warning: `part` stays fp32) when it
    cannot be read."""
    try:
        return hashlib.sha256(ranges.read_bytes()).hexdigest()[:12]
    except OSError as exc:
        warnings.warn(f"mmsent: {part} stays fp32: its int8 ranges could not be read ({exc})", stacklevel=5)
        return None


def _pad_features(f: Features, rows: int) -> Features:
    """The head's inputs, every tensor padded to `rows` rows (`_pad_rows`)."""
    return Features._make(None if x is None else _pad_rows(x, rows) for x in f)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, ...) -> (rows, ...): the last row repeated. A copy of a real row, not zeros: an all-masked caption or an
    all-zero feature row could make NaNs, which are harmless once cut off but trip anomaly checks."""
    extra = rows - len(x)
    return x if extra <= 0 else torch.cat([x, x[-1:].expand(extra, *x.shape[1:])])


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
