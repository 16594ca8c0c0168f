"""`mmsent bench smoke`: every part of the benchmark runs and reports figures (their values mean nothing here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def test_bench_smoke_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "bench", "smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["matmul_flops_per_s"] > 1e8
    figures = result["model_only"][0]["figures"]
    assert {f["padding"] for f in figures} == {"dynamic", "pad-128"}
    assert all(f["posts_per_s"] > 0 for f in figures)
    full, half = result["end_to_end"]
    assert full["posts"] == 48 and full["posts_per_s"] > 0 and full["latency_ms_p99"] >= full["latency_ms_p50"]
    assert half["offered_per_s"] == pytest.approx(full["posts_per_s"] / 2)
    assert full["image_requests"] > 0, "the posts' images were never fetched"
    shares = full["cpu_shares"]  # where the cores went: every role measured, the shares adding up to the whole
    assert set(shares) == {"consumer", "broker", "redis", "bench (producer, image server)", "other", "idle"}
    assert shares["consumer"] > 0 and shares["broker"] > 0
    assert 0.8 < sum(shares.values()) < 1.2, shares
    assert result["naive"]["image_requests"] == result["naive"]["posts"], "the naive consumer downloads every time"
    assert result["ratio_vs_naive"] > 0
    assert result["naive"]["cpu_runtime"] == "torch", "the naive consumer runs eager PyTorch"
    assert result["naive_fast"]["cpu_runtime"] == "onnx" and result["naive_fast"]["posts"] == result["naive"]["posts"]
    assert "| tiny-random |" in done.stdout and "Where the cores went" in done.stdout


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    """`mmsent bench ARGS` in a process of its own, which must succeed."""
    done = subprocess.run([sys.executable, "-m", "consumer", "bench", *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_bench_shadow_measures_the_primary_alone_and_with_a_shadow() -> None:
    done = _bench("shadow", "--model", "tiny-random", "--batch-size", "4", "--rounds", "2")
    figures = re.search(r"(\d+) ms per batch alone, (\d+) ms with the shadow .*: x(\d+\.\d+)", done.stdout)
    assert figures, done.stdout
    assert float(figures[3]) > 0


def test_bench_models_times_models_side_by_side() -> None:
    done = _bench("models", "tiny-random", "tiny-random", "--batch-size", "4", "--rounds", "2")
    rows = re.findall(r"(\d+\.\d) posts/s  x(\d+\.\d+)  tiny-random", done.stdout)
    assert len(rows) == 2 and rows[0][1] == "1.00" and float(rows[1][0]) > 0, done.stdout


def test_bench_device_reports_the_model_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "device.json"
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "bench", "device", "--device", "cpu", "--arch", "default",
         "--batch-size", "2", "--seconds", "0.1", "--json", str(out)], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["archs"]["default"]["posts_per_s"]["bf16"]["2"] > 0
    assert result["decode"]["pil_photos_per_s"] > 0


def test_the_bottleneck_names_what_limits_end_to_end() -> None:
    """`scripts/device-check`'s end-to-end run: end to end against the model alone, and the consumer's stage totals."""
    from tooling.bench import EndToEnd, bottleneck

    def limit(posts_per_s: float, **stages: float) -> str:
        full = EndToEnd("full", 1000, None, posts_per_s, 10, 20, 30, 700, {"consumer": 0.5})
        totals = {"batches": 10.0, "posts": 1000.0, "wait": 0.1, "fetch": 1.0, "model": 2.0} | stages
        found = bottleneck(full, totals, 1000.0, 100)
        assert found["share_of_model_only"] == pytest.approx(posts_per_s / 1000)
        return str(found["limit"])

    # 1000 posts at 400/s: 2.5 s, two model threads
    assert limit(900) == "the model"  # 90% of the model alone
    assert limit(400, batches=40).startswith("input: batches held 25% of 100 posts")
    assert limit(400, model=4.5).startswith("the model stage in the consumer: its 2 threads 90% busy, 2.25 ms a post "
                                            "against 1.00 alone")
    assert limit(400, fetch=2.2).startswith("fetch and decode: a batch in the image stage (cache, download, CPU "
                                            "decode; on the I/O loop) 88% of the time")
    assert limit(400, model=3.6, fetch=2.4).startswith("fetch and decode")  # both busy: the busier
    assert limit(400, model=3.6).startswith("the model stage")  # 72%: a short run's tails leave it some idle time
    assert limit(400).startswith("the consumer's I/O loop or the broker (poll, batching, produce, commit: not timed "
                                 "by the metrics): the model threads 40% busy, a batch being fetched 40% of the time")
