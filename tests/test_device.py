"""The model on a device: precision and the prepared device check (scripts/device-check).

GPU-only tests are marked `gpu` and skip cleanly without CUDA; `scripts/device-check` runs them on the GPU host.
The models here are the presets' architectures with random weights (speed and numerics need no trained weights).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from mmsent.devicebench import bench_device, label_agreement, random_architecture

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
    assert default["flops_per_post"] > 1e9  # MiniLM + EfficientNet-Lite0: about 1.4 GFLOPs a post
    assert result["label_agreement"]["bf16_vs_cpu_fp32"] >= 0.99
    decode = result["bench"]["decode"]
    assert decode["batched_on_device_photos_per_s"] > 0 and decode["pil_photos_per_s"] > 0
    assert (tmp_path / "device-check.log").read_text()
