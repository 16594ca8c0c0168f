"""End-to-end fine-tuning (mmsent/training/finetune.py) on a tiny random model on the CPU: which weights move, resuming,
the saved directory, the `mmsent train --device cpu` command, the learning-rate schedule and the device choice."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmsent import Scorer
from mmsent.cli import app
from mmsent.data import Example, collate, load_examples
from mmsent.device import resolve_device
from mmsent.model import MMSentModel
from mmsent.presets import from_config, preset_config
from mmsent.training import loop
from mmsent.training.config import TrainConfig
from mmsent.training.finetune import finetune, lr_factor, predict
from tests.test_model_training import COLOURS, LABELS, WORDS, make_dataset

# The tiny CNN's blocks are [conv, relu, conv, relu]: the last two hold its second convolution.
TUNED = {"text_trainable_layers": 1, "image_trainable_blocks": 2}
FAST = TrainConfig(epochs=3, batch_size=8, lr=1e-2, encoder_lr=1e-2, patience=99, progress=False, device="cpu")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(tmp_path / "cache"))


def tiny(**changes: int) -> MMSentModel:
    """The tiny random model (the same weights on every call) with the last text layer and CNN block unfrozen."""
    return from_config(dataclasses.replace(preset_config("tiny-random"), **{**TUNED, **changes}))


def examples(tmp_path: Path, n: int = 24) -> list[Example]:
    return load_examples(make_dataset(tmp_path, n), LABELS)


def test_fine_tuning_moves_the_unfrozen_weights_only(tmp_path: Path) -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    ex = examples(tmp_path)
    model, hist = finetune(model, ex[:18], ex[18:], FAST)
    moved = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}  # each parameter once
    assert {k for k in moved if not k.startswith("head.")} == {k for k in trainable if not k.startswith("head.")}
    assert any(k.startswith("text_encoder.model.encoder.layers.1.") for k in moved)  # the last of two text layers
    assert not any(k.startswith("text_encoder.model.encoder.layers.0.") for k in moved)
    assert any(k.startswith("image_encoder.trunk.net.2.") for k in moved)  # the second convolution
    assert not any(k.startswith("image_encoder.trunk.net.0.") for k in moved)
    assert [h["epoch"] for h in hist] == [0.0, 1.0, 2.0]
    assert all(h["samples_per_s"] > 0 and 0 <= h["val_macro_f1"] <= 1 for h in hist)
    assert next(model.parameters()).device.type == "cpu" and not model.training


def test_resumed_run_reaches_the_uninterrupted_runs_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = examples(tmp_path)
    whole, whole_hist = finetune(tiny(), ex[:18], ex[18:], FAST, state_path=tmp_path / "whole.pt")

    save = loop.save_checkpoint

    def save_then_stop(path: Path, state: dict[str, Any]) -> None:
        save(path, state)
        raise KeyboardInterrupt  # the run dies after its first checkpoint

    state = tmp_path / "cut.pt"
    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny(), ex[:18], ex[18:], FAST, state_path=state)
    saved = torch.load(state, weights_only=False)
    assert saved["epoch"] == 0 and saved["opt"]["state"] and saved["sched"]["last_epoch"] == 3  # 18 rows / 8
    torch.manual_seed(12345)  # a new process: the checkpoint's RNGs, not these, carry on
    resumed, hist = finetune(tiny(), ex[:18], ex[18:], FAST, state_path=state)
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in whole_hist]
    for k, v in whole.trainable_state().items():
        assert torch.equal(v, resumed.trainable_state()[k]), k


def test_saved_directory_reloads_with_the_same_outputs(tmp_path: Path) -> None:
    ex = examples(tmp_path)
    model, _ = finetune(tiny(), ex[:18], ex[18:], dataclasses.replace(FAST, epochs=2))
    loaded = MMSentModel.load(model.save(tmp_path / "m"))
    batch = collate(ex, model.text_encoder.tokenize, model.cfg.image.preprocess)
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))
    assert (predict(model, ex, FAST) == predict(loaded, ex, FAST)).all()
    posts = [{"text": WORDS[lab], "image": Image.new("RGB", (40, 30), COLOURS[lab])} for lab in LABELS]
    mine = Scorer(model, device="cpu", cpu_runtime="torch").score(posts)
    theirs = Scorer.load(tmp_path / "m", device="cpu", cpu_runtime="torch").score(posts)
    assert [r.label for r in mine] == [r.label for r in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert all(abs(a.scores[k] - b.scores[k]) < 1e-6 for k in a.scores)


def test_mmsent_train_device_cpu_writes_a_model_directory_and_resumes(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, 30)
    out = tmp_path / "model"
    base = ["train", str(data), "--out", str(out), "--preset", "tiny-random", "--text-layers", "1"]
    base += ["--image-blocks", "2", "--device", "cpu", "--workers", "0", "--quiet", "--patience", "99"]
    res = CliRunner().invoke(app, [*base, "--epochs", "2", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert {"config.json", "model.safetensors", "labels.json", "training.png", "train_state.pt"} <= {
        p.name for p in out.iterdir()
    }
    assert "posts/s" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["text_trainable_layers"], cfg["image_trainable_blocks"]) == (1, 2)
    assert cfg["extra"]["train_config"]["device"] == "cpu"
    res = CliRunner().invoke(app, [*base, "--epochs", "3", "--batch-size", "8", "--resume"])
    assert res.exit_code == 0, res.output
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["epoch"] == 2 and len(state["history"]) == 3
    assert len(Scorer.load(out).score([{"text": "great", "image": None}])) == 1


def test_loader_workers_make_the_same_batches_shape(tmp_path: Path) -> None:
    ex = examples(tmp_path, 12)
    model, hist = finetune(tiny(), ex, None, dataclasses.replace(FAST, epochs=1, workers=2))
    assert len(hist) == 1 and hist[0]["train_loss"] > 0


def test_learning_rate_warms_up_then_decays() -> None:
    cosine = [lr_factor(s, total=100, warmup=10, decay="cosine") for s in range(100)]
    linear = [lr_factor(s, total=100, warmup=10, decay="linear") for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == 1.0 == linear[10]
    assert all(a <= b for a, b in itertools.pairwise(cosine[:11]))  # up
    assert all(a >= b for a, b in itertools.pairwise(cosine[10:]))  # then down
    assert linear[55] == pytest.approx(0.5) and cosine[55] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="decay"):
        finetune(tiny(), [], None, dataclasses.replace(FAST, decay="step"))


def test_auto_device_is_the_gpu_when_there_is_one() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fine_tuning_on_cuda_in_bf16_returns_a_cpu_model(tmp_path: Path) -> None:
    ex = examples(tmp_path)
    cfg = dataclasses.replace(FAST, device="cuda", workers=2)
    model, hist = finetune(tiny(), ex[:18], ex[18:], cfg, state_path=tmp_path / "state.pt")
    assert len(hist) == 3 and next(model.parameters()).device.type == "cpu"
    loaded = MMSentModel.load(model.save(tmp_path / "m"))
    assert (predict(model, ex, FAST) == predict(loaded, ex, FAST)).all()
