"""Fine-tuning on the CPU from cached activations (features.extract_activations, finetune.ActivationRows): the cut
below the tuned layers changes no output, only the tuned weights move, a run resumes to the same weights, the
model reloads with the outputs it trained to, and `mmsent train --folds` calibrates on out-of-fold probabilities.
Tiny random models (and EfficientNet-Lite0 with random weights for the cut) on the CPU."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmsent import Reference, Scorer
from mmsent.cli import app
from mmsent.data import Example, collate, load_examples, load_image
from mmsent.encoders import ImageEncoder, ImageSpec, RandomWeightsWarning
from mmsent.evaluation.failures import confusion
from mmsent.model import MODALITY_PAIRS, Features, MMSentModel
from mmsent.presets import from_config, preset_config
from mmsent.training import loop
from mmsent.training.config import TrainConfig
from mmsent.training.features import extract_activations
from mmsent.training.finetune import ActivationRows, AuxHeads, finetune, predict
from mmsent.training.train import finetune_soup
from scripts.oof_failures import main as oof_failures_main
from tests.test_model_training import LABELS, make_dataset

FAST = TrainConfig(epochs=3, batch_size=8, lr=1e-2, encoder_lr=1e-2, patience=99, progress=False, device="cpu")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(tmp_path / "cache"))


def tiny(text_layers: int = 1, image_blocks: int = 2) -> MMSentModel:
    cfg = preset_config("tiny-random")
    cfg = dataclasses.replace(cfg, text_trainable_layers=text_layers, image_trainable_blocks=image_blocks,
                              head=dataclasses.replace(cfg.head, modality_pairs=True))
    return from_config(cfg)


def labelled(tmp_path: Path, n: int = 24) -> list[Example]:
    """make_dataset's posts with MVSA's per-modality labels: the caption's label, the image neutral."""
    path = make_dataset(tmp_path, n)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["text_label"], row["image_label"] = row["label"], "neutral"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_examples(path, LABELS)


def rows(acts: object, idx: range) -> ActivationRows:
    return ActivationRows(acts, torch.tensor(list(idx)))  # type: ignore[arg-type]


@pytest.mark.parametrize("n_last", [0, 1, 2])
def test_the_cut_changes_no_output(tmp_path: Path, n_last: int) -> None:
    model = tiny(n_last, n_last)
    ex = labelled(tmp_path, 12)
    acts = extract_activations(model, ex, progress=False)
    full = collate(ex, model.text_encoder.tokenize, model.cfg.image.preprocess)
    cut = acts.batch(torch.arange(len(ex)))
    with torch.no_grad():
        assert (model(full) - model(cut)).abs().max() < 5e-3  # the activations are stored in float16


def test_efficientnet_stages_rebuild_its_trunk() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        enc = ImageEncoder(ImageSpec(arch="efficientnet-lite0"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        whole = enc._trunk_map(x)
        for n_last in (1, 3, len(enc.blocks())):
            assert torch.equal(enc.map_through(enc.map_below(x, n_last), n_last), whole)
    with pytest.raises(ValueError, match="--no-cache"):
        enc.map_below(x, -1)


def test_cached_tuning_moves_the_tuned_weights_only(tmp_path: Path) -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acts = extract_activations(model, labelled(tmp_path), progress=False)
    model, hist = finetune(model, rows(acts, range(18)), rows(acts, range(18, 24)), FAST)
    moved = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    tuned = {k for k, p in model.named_parameters() if p.requires_grad}
    assert {k for k in moved if not k.startswith("head.")} == {k for k in tuned if not k.startswith("head.")}
    assert any(k.startswith("text_encoder.model.encoder.layers.1.") for k in moved)
    assert not any(k.startswith("text_encoder.model.encoder.layers.0.") for k in moved)
    assert not any(k.startswith("image_encoder.trunk.net.0.") for k in moved)
    assert len(hist) == 3 and all(0 <= h["val_macro_f1"] <= 1 for h in hist)


def test_a_cached_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    acts = extract_activations(tiny(), labelled(tmp_path), progress=False)
    train, val = rows(acts, range(18)), rows(acts, range(18, 24))
    whole, whole_hist = finetune(tiny(), train, val, FAST, state_path=tmp_path / "whole.pt")
    save = loop.save_checkpoint

    def save_then_stop(path: Path, state: dict[str, Any]) -> None:
        save(path, state)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny(), train, val, FAST, state_path=tmp_path / "cut.pt")
    torch.manual_seed(999)
    resumed, hist = finetune(tiny(), train, val, FAST, state_path=tmp_path / "cut.pt")
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in whole_hist]
    for k, v in whole.trainable_state().items():
        assert torch.equal(v, resumed.trainable_state()[k]), k


def test_a_soup_is_the_mean_of_runs_from_one_start(tmp_path: Path) -> None:
    acts = extract_activations(tiny(), labelled(tmp_path), progress=False)
    train, val = rows(acts, range(18)), rows(acts, range(18, 24))
    runs = [finetune(tiny(), train, val, dataclasses.replace(FAST, seed=seed))[0].trainable_state()
            for seed in (3, 1003)]
    souped = tiny()
    hist, best_epoch = finetune_soup(souped, train, val, dataclasses.replace(FAST, seed=3, soup=2))
    assert len(hist) == 3 and 0 <= best_epoch < 3
    differs = False
    for k, v in souped.trainable_state().items():
        assert torch.allclose(v, (runs[0][k] + runs[1][k]) / 2, atol=1e-6), k
        differs = differs or not torch.equal(runs[0][k], runs[1][k])
    assert differs  # the two runs went different ways: the mean is not one of them
    with pytest.raises(ValueError, match="soup must be 1 run or more"):
        finetune_soup(tiny(), train, val, dataclasses.replace(FAST, soup=0))


def test_a_tuned_model_reloads_and_scores_posts_as_it_trained(tmp_path: Path) -> None:
    ex = labelled(tmp_path)
    acts = extract_activations(tiny(), ex, progress=False)
    model, _ = finetune(tiny(), rows(acts, range(24)), None, dataclasses.replace(FAST, epochs=2))
    loaded = MMSentModel.load(model.save(tmp_path / "m"))
    served = predict(loaded, ex, FAST)  # from the posts themselves, every layer
    trained = predict(model, rows(acts, range(24)), FAST)  # from the cached activations
    assert abs(served - trained).max() < 1e-4


def test_auxiliary_heads_learn_each_modalitys_own_label() -> None:
    aux = AuxHeads(4, 5, 3)
    pair = MODALITY_PAIRS.index((2, 1))  # the caption positive, the image neutral
    f = Features(text=torch.randn(3, 4), image=torch.randn(3, 5), has_text=torch.tensor([True, True, False]),
                 has_image=torch.tensor([True, False, True]))
    loss = aux.loss(f, torch.tensor([pair, -100, pair]))
    aux.eval()
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(aux.text(f.text[:1]), torch.tensor([2]))
        want = want + torch.nn.functional.cross_entropy(aux.image(f.image[[0, 2]]), torch.tensor([1, 1]))
        assert torch.allclose(aux.loss(f, torch.tensor([pair, -100, pair])), want)
    assert loss > 0 and aux.loss(f, torch.full((3,), -100)) == 0


def test_train_with_folds_tunes_from_activations_and_calibrates_out_of_fold(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = make_dataset(tmp_path, 60)
    out = tmp_path / "model"
    args = ["train", str(data), "--out", str(out), "--preset", "tiny-random", "--text-layers", "1",
            "--image-blocks", "2", "--folds", "2", "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.2",
            "--quiet", "--modality-pairs", "--device", "cpu", "--soup", "2", "--keep-folds"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "activations below the tuned layers" in res.output and "2-fold cross-validation" in res.output
    cal = json.loads((out / "calibration.json").read_text())
    assert "out-of-fold" in cal["source"] and cal["temperature"] > 0
    assert {"reliability-before.png", "reliability-after.png", "cv.json"} <= {p.name for p in out.iterdir()}
    assert "oof" not in json.loads((out / "cv.json").read_text())
    with np.load(out / "oof.npz") as oof:  # kept apart: every post's out-of-fold probabilities, per modality
        assert set(oof.files) == {"both", "text", "image"}
        assert all(oof[m].shape == (60, 3) and np.allclose(oof[m].sum(1), 1, atol=1e-5) for m in oof.files)
    reference = Reference.load(out)  # the drift reference, from the same out-of-fold predictions
    assert reference is not None and reference.n == 60 and "out-of-fold" in reference.source
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["extra"]["cv"]["folds"] == 2 and "oof" not in cfg["extra"]["cv"]
    assert cfg["extra"]["train_config"]["soup"] == 2
    # --keep-folds: each fold's model, which made those out-of-fold probabilities, with the rows it never saw
    heldout = {k: json.loads((out / "folds" / str(k) / "heldout.json").read_text())["rows"] for k in (1, 2)}
    assert sorted(heldout[1] + heldout[2]) == list(range(60))
    examples = load_examples(data, LABELS)
    fold = Scorer.load(out / "folds" / "1", cpu_precision="fp32")
    again = fold.score([{"text": examples[r].text, "image": load_image(examples[r].image)} for r in heldout[1]])
    with np.load(out / "oof.npz") as oof:
        want = oof["both"][heldout[1]]
    assert np.abs(np.array([[s.scores[lab] for lab in LABELS] for s in again]) - want).max() < 1e-3
    # ... which `mmsent quantize --folds` scores again, both ways
    res = CliRunner().invoke(app, ["quantize", str(data), "--model", str(out), "--folds", str(out / "folds"),
                                   "--calibration-images", "8", "--json"])
    assert res.exit_code == 0, res.output
    measured = json.loads(res.output.strip().splitlines()[-1])
    assert measured["out_of_fold"]["folds"] == 2 and measured["out_of_fold"]["posts"] == 60
    assert measured["posts"] == 60 and {"fp32", "int8", "agreement"} <= set(measured["out_of_fold"])
    # ... and keeps what it scored: the fused path out of fold, each way; fp32's is the cross-validation's own
    with np.load(out / "int8-oof.npz") as served, np.load(out / "oof.npz") as oof:
        assert {"fp32", "int8"} <= set(served.files)
        assert all(served[w].shape == (60, 3) and not np.isnan(served[w]).any() for w in served.files)
        assert np.abs(served["fp32"] - oof["both"]).max() < 1e-3
        int8_fused = served["int8"]
    # which the failure analysis reads for the alerts as served in int8
    capsys.readouterr()
    assert oof_failures_main(["--model", str(out), "--data", str(data), "--fused", "int8", "--json", "--folds",
                              "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["confusion"] == confusion(np.array([e.label for e in examples]), int8_fused.argmax(1), 3)
    with pytest.raises(SystemExit, match="has no 'int8-both'"):
        oof_failures_main(["--model", str(out), "--data", str(data), "--fused", "int8-both"])
    # a run without folds measures nothing out of fold: the file of the run before goes
    res = CliRunner().invoke(app, ["quantize", str(data), "--model", str(out), "--calibration-images", "8", "--json"])
    assert res.exit_code == 0, res.output
    assert not (out / "int8-oof.npz").exists()
