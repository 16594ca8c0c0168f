"""The CPU fast paths of the Scorer: the encoders through ONNX Runtime, torch's resize, length-bucketed captions and
batch slices scored at once. Each must give the scores the plain PyTorch path gives. The ONNX tests export the real
EfficientNet-Lite0 and all-MiniLM-L6-v2 (pretrained weights from pip) once into a temporary cache dir (~20 s)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsent import Scorer
from mmsent.imaging import ImagePreprocess
from mmsent.presets import from_config, preset_config
from mmsent.runtime import inference_session
from tests.modelutil import structured_photo


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mmsent-cache")


@pytest.fixture(scope="module")
def default_pair(onnx_cache: Path) -> tuple[Scorer, Scorer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMSENT_CACHE_DIR", str(onnx_cache))
        fast = Scorer.load("default", cpu_runtime="onnx", cpu_precision="fp32")
    return Scorer.load("default", cpu_runtime="torch"), fast


def test_onnx_cnn_gives_pytorchs_features_and_scores(default_pair: tuple[Scorer, Scorer]) -> None:
    plain, fast = default_pair
    assert (plain.cpu_runtime, fast.cpu_runtime) == ("torch", "onnx")
    assert fast.model.text_encoder.onnx_model is not None and plain.model.text_encoder.onnx_model is None
    photos = [structured_photo(k) for k in range(6)]
    images = [fast._as_image(p) for p in photos]
    a = np.stack(plain.embed_images(images))  # type: ignore[arg-type]
    b = np.stack(fast.embed_images(images))  # type: ignore[arg-type]
    assert a.shape == b.shape == (6, 1, 1280)
    assert np.abs(a - b).max() < 1e-3, np.abs(a - b).max()
    captions = ["so proud of this team!!", "worst commute ever", "", "meh", "a long caption " * 12, "ok"]
    posts = [{"text": c, "image": p} for c, p in zip(captions, photos, strict=True)]
    for x, y in zip(plain.score(posts), fast.score(posts), strict=True):
        assert x.label == y.label and all(abs(x.scores[k] - y.scores[k]) < 1e-4 for k in x.scores)


def test_the_exported_graph_is_cached_and_reused(
    default_pair: tuple[Scorer, Scorer], onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [graph] = list((onnx_cache / "onnx").glob("cnn-*.onnx"))
    assert graph.stat().st_size > 10_000_000  # EfficientNet-Lite0's weights are in it
    [text_graph] = list((onnx_cache / "onnx").glob("text-*.onnx"))
    assert text_graph.stat().st_size > 80_000_000  # MiniLM's

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again although the graph was cached")

    monkeypatch.setenv("MMSENT_CACHE_DIR", str(onnx_cache))
    monkeypatch.setattr(torch.onnx, "export", no_export)
    again = Scorer.load("default", cpu_runtime="onnx", cpu_precision="fp32")
    assert again.cpu_runtime == "onnx"
    photo = [{"text": "x", "image": structured_photo(9)}]
    assert again.score(photo)[0].scores == pytest.approx(default_pair[1].score(photo)[0].scores, abs=1e-6)


def test_the_text_graph_runs_without_the_fusion_that_slows_it(
    default_pair: tuple[Scorer, Scorer], onnx_cache: Path, tmp_path: Path
) -> None:
    """SkipLayerNormFusion is off in the sessions the encoders run in (runtime.SLOWER_FUSIONS says why); without
    the list, ONNX Runtime fuses MiniLM's residual Adds into SkipLayerNormalization (the control)."""
    import onnx

    [text_graph] = list((onnx_cache / "onnx").glob("text-*.onnx"))

    def op_types(path: Path) -> set[str]:
        return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}

    ours = tmp_path / "ours.onnx"
    inference_session(str(text_graph), threads=1, optimized_to=ours)
    inference_session(str(text_graph), threads=1, optimized_to=tmp_path / "fused.onnx", disabled=())
    assert "SkipLayerNormalization" in op_types(tmp_path / "fused.onnx")
    assert "SkipLayerNormalization" not in op_types(ours) and "LayerNormalization" in op_types(ours)


def test_the_text_graph_drops_the_exporters_softmax_nan_guards(default_pair: tuple[Scorer, Scorer],
                                                               onnx_cache: Path) -> None:
    """runtime.without_softmax_nan_guards: the cached MiniLM graph keeps its softmaxes but not the guards after them;
    on a small attention graph masked as Hugging Face masks (float32's lowest value, one row of keys all masked),
    the outputs with and without the guards are the same to the bit."""
    import onnx
    from onnx import TensorProto, helper

    from mmsent.runtime import without_softmax_nan_guards

    [text_graph] = list((onnx_cache / "onnx").glob("text-*.onnx"))
    ops = [n.op_type for n in onnx.load(str(text_graph), load_external_data=False).graph.node]
    assert ops.count("Softmax") == 6 and "IsNaN" not in ops

    def attention() -> onnx.ModelProto:
        lowest = np.finfo(np.float32).min
        nodes = [helper.make_node("Where", ["keep", "zero", "lowest"], ["bias"]),
                 helper.make_node("Add", ["scores", "bias"], ["masked"]),
                 helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
                 helper.make_node("IsNaN", ["p"], ["nan"]),
                 helper.make_node("Where", ["nan", "zero", "p"], ["guarded"]),
                 helper.make_node("MatMul", ["guarded", "v"], ["out"])]
        graph = helper.make_graph(
            nodes, "attention",
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 4, 4]),
             helper.make_tensor_value_info("keep", TensorProto.BOOL, [2, 1, 4]),
             helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 4, 3])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 3])],
            [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("lowest", TensorProto.FLOAT, [], [float(lowest)])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    rng = np.random.default_rng(0)
    feed = {"scores": rng.normal(size=(2, 4, 4)).astype(np.float32), "v": rng.normal(size=(2, 4, 3)).astype(np.float32),
            "keep": np.array([[[True, True, False, False]], [[False, False, False, False]]])}
    guarded, unguarded = attention(), without_softmax_nan_guards(attention())
    assert [n.op_type for n in unguarded.graph.node] == ["Where", "Add", "Softmax", "MatMul"]
    before, after = (inference_session(m.SerializeToString(), threads=1).run(None, feed)[0]
                     for m in (guarded, unguarded))
    assert np.isfinite(after).all() and np.array_equal(before, after)


def test_an_unwritable_cache_keeps_the_graph_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir would be")
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(blocker))
    fast = Scorer(from_config(preset_config("tiny-random")), cpu_runtime="onnx")
    plain = Scorer(from_config(preset_config("tiny-random")), cpu_runtime="torch")
    posts = [{"text": "hello", "image": structured_photo(3, (80, 60))}]
    assert fast.score(posts)[0].scores == pytest.approx(plain.score(posts)[0].scores, abs=1e-5)
    assert blocker.read_text().startswith("a file")


def test_cpu_runtime_is_checked_and_a_torch_scorer_detaches_a_handed_over_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(tmp_path))
    model = from_config(preset_config("tiny-random"))
    with pytest.raises(ValueError, match="cpu_runtime"):
        Scorer(model, cpu_runtime="tensorrt")
    assert Scorer(model, cpu_runtime="onnx").model.image_encoder.onnx_trunk is not None
    plain = Scorer(model, cpu_runtime="torch")  # the same model object, handed over
    assert plain.cpu_runtime == "torch" and plain.model.image_encoder.onnx_trunk is None


def test_training_drops_the_exported_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSENT_CACHE_DIR", str(tmp_path))
    scorer = Scorer(from_config(preset_config("tiny-random")), cpu_runtime="onnx")
    encoder = scorer.model.image_encoder
    assert encoder.onnx_trunk is not None
    encoder.set_trainable(1)  # its weights may now change: the graph would be stale
    assert encoder.onnx_trunk is None


def test_length_buckets_give_the_scores_of_one_padded_batch() -> None:
    scorer = Scorer(from_config(preset_config("tiny-random")), cpu_runtime="torch")
    words = ["good", "bad", "fine", "awful", "lovely", "grim", "okay"]
    posts = [{"text": " ".join(words[(k + j) % 7] for j in range(1 + (k * 13) % 50)), "image": None}
             for k in range(29)]
    bucketed = scorer.score(posts)
    scorer.length_bucket = None
    whole = scorer.score(posts)
    alone = [scorer.score([p])[0] for p in posts]
    for x, y, z in zip(bucketed, whole, alone, strict=True):
        assert x.label == y.label == z.label
        assert x.scores == pytest.approx(y.scores, abs=1e-5) and x.scores == pytest.approx(z.scores, abs=1e-5)


@pytest.mark.parametrize("crop", [True, False])
def test_torch_resize_is_within_one_level_of_pillow(crop: bool) -> None:
    pre = ImagePreprocess(size=224, resize=256, crop=crop)
    im = Image.open(io.BytesIO(structured_photo(5, (551, 325)))).convert("RGB")
    ours = pre.to_uint8(im).permute(1, 2, 0).numpy().astype(int)
    w, h = im.size
    if crop:
        scale = 256 / min(w, h)
        nw, nh = round(w * scale), round(h * scale)
        left, top = (nw - 224) // 2, (nh - 224) // 2
        ref_im = im.resize((nw, nh), Image.Resampling.BILINEAR).crop((left, top, left + 224, top + 224))
    else:
        ref_im = im.resize((224, 224), Image.Resampling.BILINEAR)
    ref = np.asarray(ref_im).astype(int)
    assert ours.shape == ref.shape == (224, 224, 3)
    assert np.abs(ours - ref).max() <= 1 and np.abs(ours - ref).mean() < 0.1
    flipped = pre.to_uint8(im, hflip=True).permute(1, 2, 0).numpy().astype(int)
    assert np.array_equal(flipped, ours[:, ::-1])


def test_cpu_workers_score_slices_at_once_and_keep_every_posts_own_result() -> None:
    model = from_config(preset_config("tiny-random"))
    sliced = Scorer(model, cpu_runtime="torch", cpu_workers=2)
    assert sliced._pool is not None and sliced._pool.submit(torch.get_num_threads).result() == 1
    words = ["calm", "storm", "joy", "grief", "meh"]
    posts = [{"text": " ".join(words[(k * j) % 5] for j in range(1 + (k * 7) % 40)),
              "image": structured_photo(k, (64 + k, 48)) if k % 3 else None} for k in range(27)]
    together = sliced.score(posts)
    plain = Scorer(from_config(preset_config("tiny-random")), cpu_runtime="torch", cpu_workers=1)
    assert plain._pool is None
    for x, y in zip(together, plain.score(posts), strict=True):
        assert x.label == y.label and x.image_used == y.image_used
        assert x.scores == pytest.approx(y.scores, abs=1e-5)
    images = [Image.open(io.BytesIO(structured_photo(k, (70, 50)))).convert("RGB") for k in range(11)]
    assert np.allclose(np.stack(sliced.embed_images(images)), np.stack(plain.embed_images(images)), atol=1e-5)
