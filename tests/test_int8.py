"""int8 on the CPU (mmsent/quantize.py, `mmsent quantize`, `Scorer.load(cpu_precision=)`): what `auto` picks, by the
CPU's flags and by what the model directory says; that int8 gives fp32's labels, for the tiny-random model (its CNN:
the tiny-random text encoder is not a Hugging Face one and stays in PyTorch) and for the packaged default model (both
encoders: all-MiniLM-L6-v2 and EfficientNet-Lite0, pretrained weights from pip, with the ranges and the measurement
it ships); that a quantized graph is cached, keyed by the weights, the recipe and the ranges, and reused; and that a
model directory's int8 files, which come from outside, never stop a load."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmsent.serving.scorer as scorer_module
from mmsent import Scorer
from mmsent.evaluation.int8 import kept_parts, passes_bar, quantize_model
from mmsent.presets import from_config, model_directory, preset_config
from mmsent.quantize import (
    INT8_FILE,
    RANGES_FILE,
    TEXT_RANGES_FILE,
    Int8Model,
    Int8Recipe,
    choose_precision,
    cpu_int8_flags,
)
from tests.modelutil import structured_photo

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f {extra}\n"
LABELS = ("negative", "neutral", "positive")


# --- choosing --------------------------------------------------------------------------------------------------
def test_the_int8_flags_are_read_from_cpuinfo() -> None:
    assert cpu_int8_flags(CPUINFO.format(extra="avx512_vnni amx_int8")) == ("avx512_vnni", "amx_int8")
    assert cpu_int8_flags(CPUINFO.format(extra="avx_vnni")) == ("avx_vnni",)
    assert cpu_int8_flags(CPUINFO.format(extra="avx512_bf16")) == ()
    assert cpu_int8_flags("no flags line at all") == ()


def test_auto_takes_int8_only_with_the_instructions_and_a_measurement() -> None:
    measured = Int8Model(Int8Recipe(), Path("int8-ranges.json"), {"parts": {"text": "int8", "cnn": "int8"}},
                         text_ranges=Path("int8-text-ranges.json"))
    no_cnn_ranges = Int8Model(Int8Recipe(), None, measured.measured, text_ranges=measured.text_ranges)
    assert no_cnn_ranges.int8_parts == ("text",), "no ranges: the CNN in fp32"
    unmeasured = Int8Model(Int8Recipe(), None, None)
    text_only = Int8Model(Int8Recipe(text_smoothing=0.0), None, {"parts": {"text": "int8", "cnn": "fp32"}})
    assert choose_precision("auto", ("avx512_vnni",), measured).parts == ("text", "cnn")
    assert choose_precision("auto", ("amx_int8",), text_only).parts == ("text",)
    no_vnni = choose_precision("auto", (), measured)
    assert no_vnni.precision == "fp32" and "VNNI" in no_vnni.note
    assert choose_precision("auto", ("avx512_vnni",), unmeasured).precision == "fp32"
    assert choose_precision("int8", (), unmeasured).parts == ("text", "cnn"), "int8 asked for is int8 anywhere"
    assert choose_precision("fp32", ("avx512_vnni",), measured).precision == "fp32"
    with pytest.raises(ValueError, match="cpu_precision"):
        choose_precision("int4", (), measured)


# --- the tiny-random model, quantized by `mmsent quantize` -------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mmsent-cache")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, Path]:
    """A tiny-random model directory after `quantize_model` on 40 labelled posts with photos (labels drawn at
    random: the measurement is of agreement, not of skill)."""
    root = tmp_path_factory.mktemp("int8")
    model_dir = from_config(preset_config("tiny-random")).save(root / "model")
    (root / "images").mkdir()
    rows = []
    for k in range(40):
        (root / "images" / f"{k}.jpg").write_bytes(structured_photo(k, (96, 72)))
        rows.append({"id": str(k), "text": f"post {k} " + "so good" * (k % 3), "label": LABELS[k % 3],
                     "image": f"images/{k}.jpg"})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMSENT_CACHE_DIR", str(cache))
        measured = quantize_model(data, model_dir, calibration_images=16, log=lambda _: None)
    assert measured["posts"] == 40 and measured["calibration_photos"] == 16
    return model_dir, data


def test_quantize_writes_the_ranges_and_what_it_measured(quantized: tuple[Path, Path]) -> None:
    model_dir, _ = quantized
    int8 = Int8Model.load(model_dir)
    assert int8.problem is None and int8.ranges == model_dir / RANGES_FILE
    assert int8.measured is not None and 0.0 <= int8.measured["agreement"] <= 1.0
    assert set(int8.measured["fp32"]) >= {"accuracy", "weighted_f1", "per_class"}
    kept = int8.measured["agreement"] >= 0.98 and all(
        int8.measured["fp32"][k] - int8.measured["int8"][k] <= 0.005 for k in ("accuracy", "weighted_f1"))
    assert int8.int8_parts == (("text", "cnn") if kept else ())


def test_int8_gives_fp32s_labels_on_the_tiny_random_model(quantized: tuple[Path, Path], cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, _ = quantized
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(cache))
    fp32 = Scorer.load(model_dir, cpu_precision="fp32")
    int8 = Scorer.load(model_dir, cpu_precision="int8")
    assert (fp32.cpu_precision, int8.cpu_precision) == ("fp32", "int8")
    posts = [{"text": f"caption {k}", "image": structured_photo(100 + k, (120, 90))} for k in range(24)]
    a, b = fp32.score(posts), int8.score(posts)
    assert np.mean([x.label == y.label for x, y in zip(a, b, strict=True)]) >= 0.9
    assert any(x.scores != y.scores for x, y in zip(a, b, strict=True)), "the int8 graph is not the fp32 one"


def test_auto_follows_the_cpu_flags_and_the_model_directory(quantized: tuple[Path, Path], cache: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = shutil.copytree(quantized[0], tmp_path / "model")
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(cache))
    measured = json.loads((model_dir / INT8_FILE).read_text())
    measured["measured"]["parts"] = {"text": "int8", "cnn": "int8"}
    (model_dir / INT8_FILE).write_text(json.dumps(measured))
    monkeypatch.setattr(scorer_module, "cpu_int8_flags", lambda: ("avx512_vnni",))
    assert Scorer.load(model_dir).cpu_precision == "int8"
    monkeypatch.setattr(scorer_module, "cpu_int8_flags", lambda: ())
    without = Scorer.load(model_dir)
    assert without.cpu_precision == "fp32" and "VNNI" in without.precision_note
    measured["measured"]["parts"] = {"text": "fp32", "cnn": "fp32"}
    (model_dir / INT8_FILE).write_text(json.dumps(measured))
    monkeypatch.setattr(scorer_module, "cpu_int8_flags", lambda: ("amx_int8",))
    assert Scorer.load(model_dir).cpu_precision == "fp32", "not kept by the measurement: fp32"


def test_the_quantized_graph_is_cached_keyed_by_weights_recipe_and_ranges(
        quantized: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, _ = quantized
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(tmp_path / "cache"))
    Scorer.load(model_dir, cpu_precision="int8")
    [first] = list((tmp_path / "cache" / "onnx").glob("cnn-*-int8-*.onnx"))

    def no_quantize(*args: object) -> None:
        raise AssertionError("quantized again although the int8 graph was cached")

    monkeypatch.setattr(scorer_module, "quantize_cnn", no_quantize)
    assert Scorer.load(model_dir, cpu_precision="int8").cpu_precision == "int8"
    monkeypatch.undo()
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(tmp_path / "cache"))
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    ranges = json.loads((other / RANGES_FILE).read_text())
    for entry in ranges["data"].values():
        entry["highest"]["data"] = [v * 2 for v in entry["highest"]["data"]]
    (other / RANGES_FILE).write_text(json.dumps(ranges))
    Scorer.load(other, cpu_precision="int8")
    graphs = sorted((tmp_path / "cache" / "onnx").glob("cnn-*-int8-*.onnx"))
    assert len(graphs) == 2 and first in graphs, "other ranges: another int8 graph"
    assert Int8Recipe(text_fp32_ffn_layers=2).digest() != Int8Recipe().digest()


@pytest.mark.parametrize("ranges", [
    "not json", '{"data": {}}', '{"data": {"x": {"lowest": NaN, "highest": 1.0}}}',
    '{"data": {"x": {"lowest": {"data": [0.0]}, "highest": {"data": [Infinity]}}}}',
    '{"data": {"x": {"lowest": "0", "highest": 1.0}}}', "[" * 100_000,  # too deep for the parser
])
def test_bad_ranges_never_stop_a_load(quantized: tuple[Path, Path], tmp_path: Path, cache: Path, ranges: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, _ = quantized
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(cache))
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / RANGES_FILE).write_text(ranges)
    int8 = Int8Model.load(bad)
    assert int8.ranges is None and int8.problem is not None and RANGES_FILE in int8.problem
    monkeypatch.setattr(scorer_module, "cpu_int8_flags", lambda: ("avx512_vnni",))
    scorer = Scorer.load(bad)  # auto: the measurement is ignored with its ranges
    assert scorer.cpu_precision == "fp32" and RANGES_FILE in scorer.precision_note
    assert scorer.score([{"text": "still scores", "image": Image.new("RGB", (40, 30))}])[0].label in LABELS


def test_ranges_of_another_graph_leave_the_cnn_in_fp32(quantized: tuple[Path, Path], tmp_path: Path, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, _ = quantized
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(cache))
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    ranges = json.loads((other / RANGES_FILE).read_text())
    ranges["data"] = {f"renamed_{name}": entry for name, entry in ranges["data"].items()}
    (other / RANGES_FILE).write_text(json.dumps(ranges))
    with pytest.warns(UserWarning, match="stays fp32"):
        scorer = Scorer.load(other, cpu_precision="int8")
    assert scorer.cpu_precision == "fp32" and "nothing" in scorer.precision_note


# --- the packaged default model -----------------------------------------------------------------------------------
def test_the_default_model_ships_its_int8_measurement() -> None:
    int8 = Int8Model.load(model_directory("default"))
    assert int8.problem is None and int8.ranges is not None and int8.measured is not None
    assert int8.measured["posts"] == 4000
    out_of_fold = int8.measured["out_of_fold"]  # the bar is held to the 5 fold models' out-of-fold figures
    assert out_of_fold["folds"] == 5 and out_of_fold["posts"] == 4000
    assert int8.measured["parts"] == kept_parts(out_of_fold)
    assert int8.int8_parts == tuple(p for p, precision in kept_parts(out_of_fold).items() if precision == "int8")


def test_int8_gives_fp32s_labels_on_the_default_model(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(cache))
    fp32 = Scorer.load("default", cpu_precision="fp32")
    int8 = Scorer.load("default", cpu_precision="int8")
    assert (fp32.cpu_precision, int8.cpu_precision) == ("fp32", "int8")
    assert ":int8-" in int8.image_encoder_id and int8.image_encoder_id.startswith(fp32.image_encoder_id), (
        "an int8 CNN's embeddings must not be shared with fp32 pods through the embedding cache")
    captions = ["so proud of this team!!", "worst commute ever", "", "meh", "what a beautiful morning",
                "this is broken again", "thanks for nothing", "best day with friends"]
    posts = [{"text": captions[k % len(captions)] + f" #{k}", "image": structured_photo(k)} for k in range(48)]
    a, b = fp32.score(posts), int8.score(posts)
    agreement = np.mean([x.label == y.label for x, y in zip(a, b, strict=True)])
    assert agreement >= 0.95, agreement
    assert max(abs(x.scores[k] - y.scores[k]) for x, y in zip(a, b, strict=True) for k in x.scores) > 0
    auto = Scorer.load("default")
    kept = Int8Model.load(model_directory("default")).int8_parts
    assert auto.int8_parts == (kept if cpu_int8_flags() else ()), auto.precision_note


CAPTIONS = ["so proud of this team!!", "worst commute ever", "meh", "what a beautiful morning", "broken again",
            "thanks for nothing", "best day with friends", "can't believe they did this to us", "love love love it",
            "the queue at the airport is endless", "new shoes, who dis", "rain rain go away", "happy birthday mum!"]


def test_smoothing_cuts_the_text_encoders_int8_error_and_its_ranges_key_the_graph(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A smoothing recipe (SmoothQuant's α 0.5) with channel maxima taken on some captions: on others, MiniLM's int8
    hidden states are nearer fp32's than without it (a wrong rescaling would be far off), and other maxima make
    another cached graph."""
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(cache))
    smoothed_dir = shutil.copytree(model_directory("default"), tmp_path / "smoothed")
    fp32 = Scorer.load(smoothed_dir, cpu_precision="fp32")
    assert fp32.collect_text_ranges([f"{c} #{k}" for k in range(4) for c in CAPTIONS], smoothed_dir / TEXT_RANGES_FILE
                                    ) == 4 * len(CAPTIONS)
    plain_dir = shutil.copytree(smoothed_dir, tmp_path / "plain")
    for directory, alpha in ((smoothed_dir, 0.5), (plain_dir, 0.0)):
        stored = json.loads((directory / INT8_FILE).read_text())
        stored["recipe"]["text_smoothing"] = alpha
        (directory / INT8_FILE).write_text(json.dumps(stored))
        assert Int8Model.load(directory).recipe.text_smoothing == alpha
    smoothed = Scorer.load(smoothed_dir, cpu_precision="int8", int8_parts=("text",))
    plain = Scorer.load(plain_dir, cpu_precision="int8", int8_parts=("text",))
    assert smoothed.int8_parts == plain.int8_parts == ("text",)
    tokens = fp32.model.text_encoder.tokenize([f"{c}, again" for c in reversed(CAPTIONS)])

    def error(scorer: Scorer) -> float:
        with torch.inference_mode():  # the ONNX Runtime graphs (with grad on, the encoders run in PyTorch)
            reference = fp32.model.text_encoder(**tokens)
            return float(((scorer.model.text_encoder(**tokens) - reference).norm() / reference.norm()).item())

    assert error(smoothed) < 0.9 * error(plain), (error(smoothed), error(plain))
    pattern = f"text-*-int8-text-{Int8Model.load(smoothed_dir).recipe.digest()}-*.onnx"
    digest = hashlib.sha256((smoothed_dir / TEXT_RANGES_FILE).read_bytes()).hexdigest()[:12]
    before = set((cache / "onnx").glob(pattern))
    assert any(graph.name.endswith(f"-{digest}.onnx") for graph in before), "keyed by the ranges"
    other_dir = shutil.copytree(smoothed_dir, tmp_path / "other")
    ranges = json.loads((other_dir / TEXT_RANGES_FILE).read_text())
    ranges["data"] = {name: [2 * v for v in maxima] for name, maxima in ranges["data"].items()}
    (other_dir / TEXT_RANGES_FILE).write_text(json.dumps(ranges))
    Scorer.load(other_dir, cpu_precision="int8", int8_parts=("text",))
    assert len(set((cache / "onnx").glob(pattern)) - before) == 1, "other ranges, another graph"


def test_a_smoothing_recipe_runs_the_text_encoder_in_int8_only_with_its_ranges(quantized: tuple[Path, Path],
                                                                               tmp_path: Path) -> None:
    model_dir = shutil.copytree(quantized[0], tmp_path / "model")
    stored = json.loads((model_dir / INT8_FILE).read_text())
    stored["recipe"]["text_smoothing"] = 0.5
    stored["measured"]["parts"] = {"text": "int8", "cnn": "int8"}
    (model_dir / INT8_FILE).write_text(json.dumps(stored))
    assert Int8Model.load(model_dir).int8_parts == ("cnn",), "no text ranges: the text encoder in fp32"
    for bad in ("not json", '{"format": "mmsent-text-ranges/1", "data": {"x": [1.0, -2.0]}}',
                '{"format": "mmsent-text-ranges/1", "data": {"x": [NaN]}}', '{"data": {"x": [1.0]}}', "[" * 100_000):
        (model_dir / TEXT_RANGES_FILE).write_text(bad)
        int8 = Int8Model.load(model_dir)
        assert int8.int8_parts == ("cnn",) and int8.problem is not None and TEXT_RANGES_FILE in int8.problem, bad
    (model_dir / TEXT_RANGES_FILE).write_text('{"format": "mmsent-text-ranges/1", "data": {"x": [1.0, 0.0]}}')
    assert Int8Model.load(model_dir).int8_parts == ("text", "cnn")
    stored["recipe"]["text_smoothing"] = 1.5
    (model_dir / INT8_FILE).write_text(json.dumps(stored))
    assert Int8Model.load(model_dir).int8_parts == () and "text_smoothing" in str(Int8Model.load(model_dir).problem)


def _figures(agreement: float, accuracy: float, weighted_f1: float) -> dict[str, object]:
    return {"agreement": agreement, "int8": {"accuracy": accuracy, "weighted_f1": weighted_f1}}


def test_the_bar_keeps_both_parts_or_the_one_that_passes_alone() -> None:
    fp32 = {"accuracy": 0.75, "weighted_f1": 0.73}
    both_pass = {**_figures(0.985, 0.748, 0.728), "fp32": fp32}
    assert kept_parts(both_pass) == {"text": "int8", "cnn": "int8"}
    assert not passes_bar(_figures(0.979, 0.75, 0.73), fp32), "under 98% of labels kept"
    assert not passes_bar(_figures(0.99, 0.744, 0.73), fp32), "0.6 points of accuracy lost"
    together_fail = {**_figures(0.976, 0.747, 0.727), "fp32": fp32,
                     "alone": {"text": _figures(0.979, 0.748, 0.728), "cnn": _figures(0.991, 0.749, 0.729)}}
    assert kept_parts(together_fail) == {"text": "fp32", "cnn": "int8"}
    together_fail["alone"]["cnn"] = _figures(0.991, 0.74, 0.729)  # type: ignore[index]
    assert kept_parts(together_fail) == {"text": "fp32", "cnn": "fp32"}


def test_ranges_that_vanish_before_quantizing_leave_the_cnn_in_fp32(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(tmp_path / "cache"))
    gone = Int8Model(Int8Recipe(), tmp_path / RANGES_FILE, None)  # read, then removed by a roll-out under way
    with pytest.warns(UserWarning, match="could not be read"):
        scorer = Scorer(from_config(preset_config("tiny-random")), cpu_precision="int8", int8=gone)
    assert scorer.cpu_precision == "fp32" and scorer.int8_parts == ()
    assert scorer.score([{"text": "still scores", "image": Image.new("RGB", (40, 30))}])[0].label in LABELS
