"""Model directories for the roll-out tests: a tiny-random model saved as a directory, the poisons a careless (or
hostile) roll-out could bring, each with the reason `mmsent.ModelRefused` must give, and the atomic symlink flip a
Kubernetes volume update does. Shared by test_rollout.py, test_platform.py and test_hostile_stream.py; and a photo
with structure for the runtime and int8 tests."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmsent import RefusalReason
from mmsent.presets import from_config, preset_config

Poison = Callable[[Path], None]


def structured_photo(seed: int, size: tuple[int, int] = (420, 300)) -> bytes:
    """A JPEG with structure at several scales (gradients, blocks, noise), unlike a flat colour."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * (seed + 1)) % 256, (y * 3 + seed * 40) % 256, ((x // 37 + y // 23) % 2) * 200], axis=-1)
    arr = (arr + rng.integers(0, 40, arr.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def save_tiny_model(directory: Path, version: str, *, name: str = "mmsent-tiny-random", fusion: str = "concat",
                    squash: bool = False) -> Path:
    """A tiny-random model directory; `squash` changes its image preprocessing, and so its image encoder."""
    cfg = preset_config("tiny-random", fusion=fusion)
    if squash:
        cfg = replace(cfg, image=replace(cfg.image, preprocess=replace(cfg.image.preprocess, crop=False)))
    return from_config(replace(cfg, name=name, version=version)).save(directory)


def edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Poison:
    def poison(directory: Path) -> None:
        path = directory / "model.safetensors"
        state = load_file(str(path))
        change(state)
        save_file(state, str(path))
    return poison


def edit_json(name: str, change: Callable[[dict[str, Any]], None]) -> Poison:
    def poison(directory: Path) -> None:
        path = directory / name
        document = json.loads(path.read_text()) if path.exists() else {}
        change(document)
        path.write_text(json.dumps(document))  # NaN and Infinity written as JSON's non-standard literals
    return poison


def _nan_weight(state: dict[str, torch.Tensor]) -> None:
    state["head.mlp.3.weight"][0, 0] = math.nan


def _wrong_shape(state: dict[str, torch.Tensor]) -> None:
    state["head.mlp.0.weight"] = torch.zeros(7, 5)


def _overflowing(state: dict[str, torch.Tensor]) -> None:
    """Finite weights whose products are not: the logits overflow to infinity, the softmax gives NaN."""
    for name in ("head.mlp.0.weight", "head.mlp.3.weight"):
        state[name] = state[name] * 1e38


def _wide(config: dict[str, Any]) -> None:  # a 10^6-wide, 10^6-token text encoder: about 9 * 10^12 parameters
    config["text_encoder"]["config"].update(hidden_size=1_000_000, vocab_size=1_000_000)


def _deep(config: dict[str, Any]) -> None:  # a billion layers: counted without building a billion layers
    config["text_encoder"]["config"]["num_layers"] = 1_000_000_000


def _nan_calibration(calibration: dict[str, Any]) -> None:
    calibration.update(format="mmsent-calibration/1", temperature=1.0, labels=["negative", "neutral", "positive"],
                       model_sha256=None, thresholds={"negative": [{"target": 0.9, "threshold": math.nan}]})


def _garbage_weights(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)


POISONS: dict[str, tuple[Poison, RefusalReason]] = {
    "nan_weights": (edit_weights(_nan_weight), RefusalReason.NON_FINITE_WEIGHTS),
    "wrong_shape": (edit_weights(_wrong_shape), RefusalReason.WRONG_SHAPES),
    "overflowing_weights": (edit_weights(_overflowing), RefusalReason.NON_FINITE_SCORES),
    "huge_config": (edit_json("config.json", _wide), RefusalReason.TOO_MANY_PARAMETERS),
    "deep_config": (edit_json("config.json", _deep), RefusalReason.TOO_MANY_PARAMETERS),
    "nan_calibration": (edit_json("calibration.json", _nan_calibration), RefusalReason.BAD_CALIBRATION),
    "garbage_weights": (_garbage_weights, RefusalReason.UNREADABLE_WEIGHTS),
    "bad_config": (lambda d: (d / "config.json").write_text("{not json"), RefusalReason.BAD_CONFIG),
}


def poisoned(good: Path, name: str, into: Path) -> Path:
    target = into / name
    shutil.copytree(good, target)
    POISONS[name][0](target)
    return target


def point(link: Path, target: Path) -> None:
    """Flip a symlink atomically, as a Kubernetes volume update does."""
    staging = link.with_name(link.name + ".new")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    os.replace(staging, link)
