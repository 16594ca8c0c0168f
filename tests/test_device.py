"""The model on a device: precision, the GPU serving path, and the prepared device check (scripts/device-check).

GPU-only tests are marked `gpu` and skip cleanly without CUDA; `scripts/device-check` runs them on the GPU host.
The models here are the presets' architectures with random weights (speed and numerics need no trained weights).
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmsent import Scorer, decode_image
from mmsent.benchmarks.device import bench_device, label_agreement, random_architecture
from mmsent.benchmarks.host import sample_photos, synthetic_captions
from mmsent.model import MMSentModel
from mmsent.presets import from_config, preset_config

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_bf16_autocast_on_the_cpu_gives_fp32s_labels() -> None:
    assert label_agreement(random_architecture("default"), "cpu", "bf16", posts=64) >= 0.99


@pytest.mark.gpu
@needs_cuda
def test_bf16_on_the_gpu_gives_the_labels_of_fp32_on_the_cpu() -> None:
    assert label_agreement(random_architecture("default"), "cuda", "bf16", posts=1024) >= 0.99


@pytest.mark.gpu
@needs_cuda
def test_the_seed_architecture_runs_on_the_gpu_in_both_precisions() -> None:
    figures = bench_device("cuda", archs=("seed",), batch_sizes=(8,), seconds=0.2)["archs"]["seed"]["posts_per_s"]
    assert figures["fp32"]["8"] > 0 and figures["bf16"]["8"] > 0


def test_the_device_check_runs_its_whole_flow_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run([str(ROOT / "scripts" / "device-check"), "--cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "device-check.json").read_text())
    assert set(result) == {"mode", "env", "pytest", "bench", "label_agreement", "seconds"}
    assert result["mode"] == "cpu" and result["env"]["cuda"] is False
    assert "skipped" in result["pytest"]["summary"] or "deselected" in result["pytest"]["summary"]
    default = result["bench"]["archs"]["default"]
    assert all(v > 0 for dtype in ("fp32", "bf16") for v in default["posts_per_s"][dtype].values())
    assert default["posts_per_s"]["compiled"] == {"8": None}  # the key as on a GPU; not measured on the CPU
    assert default["gpu_utilization_percent"] is None
    assert default["flops_per_post"] > 1e9  # MiniLM + EfficientNet-Lite0: about 1.4 GFLOPs a post
    serving = result["bench"]["serving"]
    assert serving["batch_size"] == 32 and serving["posts_per_s"] > 0 and serving["gpu_utilization_percent"] is None
    assert 0 < serving["half_load"]["p50_ms"] <= serving["half_load"]["p99_ms"]
    assert result["bench"]["training"]["samples_per_s"] > 0
    assert result["label_agreement"]["bf16_vs_cpu_fp32"] >= 0.99
    decode = result["bench"]["decode"]
    assert decode["batched_on_device_photos_per_s"] > 0 and decode["pil_photos_per_s"] > 0
    # end to end: the consumer process through the embedded broker and Redis, at the serving batch size
    e2e = result["bench"]["end_to_end"]
    assert "error" not in e2e, e2e
    assert e2e["batch_size"] == serving["batch_size"] and e2e["full"]["posts"] == 160
    assert e2e["posts_per_s"] > 0 and 0 < e2e["half"]["latency_ms_p50"] <= e2e["half_load_p99_ms"]
    assert e2e["full"]["image_requests"] < 160, "30% of the posts repeat an image: not every one is downloaded"
    assert e2e["stages"]["posts"] == 160 and e2e["stages"]["model"] > 0 and e2e["stages"]["fetch"] > 0
    assert e2e["bottleneck"]["limit"] and e2e["bottleneck"]["share_of_model_only"] > 0
    assert e2e["bottleneck"]["model_only_posts_per_s"] == serving["posts_per_s"]
    assert (tmp_path / "device-check.log").read_text() and (tmp_path / "consumer.log").exists()


# --- the GPU serving path (mmsent/serving/scorer.py on CUDA) -------------------------------------------------------


def _default_random() -> MMSentModel:
    return from_config(random_architecture("default"))


def _tiny() -> MMSentModel:
    return from_config(preset_config("tiny-random"))


def _posts(n: int, images: list[Any]) -> list[dict[str, Any]]:
    return [{"text": text, "image": image} for text, image in zip(synthetic_captions(n), itertools.cycle(images))]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (90, 60), (10, 200, 90)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.gpu
@needs_cuda
def test_the_gpu_scorer_serves_bf16_weights_with_the_labels_of_fp32_on_the_cpu() -> None:
    model = _default_random()
    cpu = Scorer(copy.deepcopy(model), device="cpu", cpu_runtime="torch")
    gpu = Scorer(model, device="cuda")
    assert next(gpu.model.parameters()).dtype == torch.bfloat16 and gpu.buckets is not None
    photos = [decode_image(data) for data in sample_photos(32)[0]]  # the same host preprocessing on both
    posts = _posts(256, photos + [None])
    agree = [a.label == b.label for a, b in zip(cpu.score(posts), gpu.score(posts), strict=True)]
    assert sum(agree) / len(agree) >= 0.99


@pytest.mark.gpu
@needs_cuda
def test_jpeg_bytes_are_decoded_in_batches_on_the_gpu_and_the_rest_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmsent.serving.gpudecode

    decoded_on: list[str] = []
    batched = mmsent.serving.gpudecode.decode_jpeg

    def spy(data: Any, **kwargs: Any) -> Any:
        decoded_on.append(str(kwargs.get("device")))
        return batched(data, **kwargs)

    monkeypatch.setattr(mmsent.serving.gpudecode, "decode_jpeg", spy)
    gpu = Scorer(_default_random(), device="cuda")
    assert gpu.wants_image_bytes
    jpegs = sample_photos(16)[0]
    from_bytes = gpu.embed_images([*jpegs, _png(), b"\xff\xd8\xff not a jpeg"])
    assert decoded_on and all(device.startswith("cuda") for device in decoded_on)
    assert from_bytes[-2] is not None and from_bytes[-1] is None  # PNG: the CPU decoder; garbage: no image
    from_pil = gpu.embed_images([decode_image(data) for data in jpegs])
    for a, b in zip(from_bytes[: len(jpegs)], from_pil, strict=True):
        assert a is not None and b is not None
        cosine = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cosine > 0.98  # nvJPEG and resizing on the device against PIL: close, not equal
    scored = gpu.score([{"text": "a photo", "image": jpegs[0]}, {"text": "garbage", "image": b"\xff\xd8 no"}])
    assert [r.image_used for r in scored] == [True, False]


@pytest.mark.gpu
@needs_cuda
def test_cached_embeddings_skip_the_cnn_on_the_gpu() -> None:
    gpu = Scorer(_tiny(), device="cuda")
    photo = Image.new("RGB", (40, 30), (200, 20, 20))
    [embedding] = gpu.embed_images([photo])
    assert embedding is not None and embedding.dtype == np.float32
    cnn_calls: list[int] = []
    embed = gpu._calls.embed_pixels
    gpu._calls = gpu._calls._replace(embed_pixels=lambda pixels: cnn_calls.append(len(pixels)) or embed(pixels))
    from_cache = gpu.score([{"text": "red", "image": embedding}])[0]
    assert cnn_calls == []
    from_pixels = gpu.score([{"text": "red", "image": photo}])[0]
    assert cnn_calls and from_cache.scores == pytest.approx(from_pixels.scores, abs=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_two_model_threads_score_on_their_own_streams_and_each_gets_its_own_results() -> None:
    gpu = Scorer(_tiny(), device="cuda", batch_size=64)
    gpu.warm_up()
    photos = [Image.new("RGB", (40, 30), (k * 20, 90, 30)) for k in range(8)]
    batches = [_posts(64, photos[k:] + [None]) for k in range(8)]
    expected = [gpu.score(batch) for batch in batches]
    both = threading.Barrier(2)

    def score_all(part: list[list[dict[str, Any]]]) -> tuple[Any, list[Any]]:
        both.wait()  # the two threads really at once
        return gpu._threads.stream, [gpu.score(batch) for batch in part]

    with ThreadPoolExecutor(2) as pool:
        (s0, r0), (s1, r1) = pool.map(score_all, [batches[0::2], batches[1::2]])
    assert s0 is not s1 and torch.cuda.default_stream() not in (s0, s1)
    got = [r for pair in zip(r0, r1, strict=True) for r in pair]
    for want, have in zip(expected, got, strict=True):
        assert [r.label for r in want] == [r.label for r in have]
        assert all(a.scores == pytest.approx(b.scores, abs=1e-3) for a, b in zip(want, have, strict=True))


@pytest.mark.gpu
@needs_cuda
def test_compiled_with_cuda_graphs_on_the_gpu_compiles_only_while_warming_up() -> None:
    from torch._dynamo.utils import counters

    eager = Scorer(_tiny(), device="cuda", batch_size=16)
    compiled = Scorer(_tiny(), device="cuda", batch_size=16, compile=True)
    posts = _posts(40, [Image.new("RGB", (40, 30), (9, 9, 200)), None])
    compiled.warm_up()
    frames = counters["frames"]["total"]

    def on_a_model_thread() -> list[Any]:
        compiled.warm_up()  # CUDA graphs are recorded per thread; the compiled code is there already
        return compiled.score(posts)

    with ThreadPoolExecutor(1) as pool:
        other_thread = pool.submit(on_a_model_thread).result()
    results = compiled.score(posts)
    assert counters["frames"]["total"] == frames, "a post triggered a compilation"
    want = eager.score(posts)
    for have in (results, other_thread):
        agree = [a.label == b.label for a, b in zip(want, have, strict=True)]
        assert sum(agree) / len(agree) >= 0.95  # tiny random heads sit near ties; bf16 either way


def test_latency_at_load_cuts_batches_as_the_consumer_does() -> None:
    from mmsent.benchmarks.device import latency_at_load

    class Fake:
        sizes: list[int] = []

        def score(self, posts: list[Any]) -> None:
            self.sizes.append(len(posts))

    fake = Fake()
    figures = latency_at_load(fake, [{}], rate=400, seconds=0.5, max_batch=16, max_wait_s=0.02)
    assert sum(fake.sizes) == figures["posts"] == 200 and max(fake.sizes) <= 16
    assert len(fake.sizes) > 200 / 16  # cut by the wait as well as by size: 8 arrive in 20 ms
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] < 200
