"""The precision benchmark (mmsent/benchmarks/precision.py) on the tiny random model: every variant is built, timed
and compared with the reference, and the comparison is a real one (a scorer with other labels is caught)."""

from __future__ import annotations

import json

import pytest
import torch

from mmsent.benchmarks.precision import (
    Variant,
    compare_precisions,
    cpu_flags,
    measure_variants,
    precision_variants,
    render_precision,
)
from mmsent.model import MMSentModel
from mmsent.presets import build_model
from mmsent.serving.scorer import Scorer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # int8 ranges from generated pictures: expected


@pytest.fixture(scope="module")
def result() -> dict:
    return compare_precisions("tiny-random", [4, 8], posts=24, rounds=1)


def test_every_variant_is_timed_at_every_batch_size(result: dict) -> None:
    names = [v["name"] for v in result["variants"]]
    assert names == [v.name for v in precision_variants()]
    assert result["reference"] == names[0] == "fp32-onnx"
    for variant in result["variants"]:
        assert [s["batch_size"] for s in variant["speed"]] == [4, 8]
        assert all(s["posts_per_s"] > 0 and s["batch_ms_p50"] > 0 for s in variant["speed"])
    assert all(s["of_reference"] == 1.0 for s in result["variants"][0]["speed"])
    assert sum(result["reference_labels"].values()) == result["posts"] == 24
    # the tiny random head gives nearly every post one label: centred, so that agreement can be lost
    assert result["head_centred"] and max(result["reference_labels_uncentred"].values()) > 0.8 * 24
    assert max(result["reference_labels"].values()) < 0.8 * 24
    json.dumps(result)  # what `mmsent bench precision --json` writes


def test_each_variant_runs_what_it_says(result: dict) -> None:
    by_name = {v["name"]: v for v in result["variants"]}
    assert by_name["fp32-onnx"]["cpu_runtime"] == "onnx" and by_name["fp32-onnx"]["cpu_precision"] == "fp32"
    assert by_name["fp32-torch"]["cpu_runtime"] == "torch"
    assert by_name["int8"]["cpu_runtime"] == "onnx" and by_name["int8"]["cpu_precision"] == "int8"
    # the same weights in fp32 on two runtimes: the same probabilities to float precision
    assert by_name["fp32-torch"]["max_prob_diff"] < 1e-4
    # bf16 really ran: its probabilities moved (a wrapper the Scorer did not call would leave them exactly fp32's),
    # but only by bf16's rounding
    assert by_name["bf16"]["cpu_precision"] == "bf16"
    for name in ("bf16-autocast", "bf16"):
        assert by_name[name]["cpu_runtime"] == "torch"
        assert 0 < by_name[name]["max_prob_diff"] < 0.05, name
    # the hybrid's CNN left ONNX Runtime for bf16 eager: its probabilities moved too
    assert 0 < by_name["int8-text+bf16-cnn"]["max_prob_diff"] < 0.05


def test_a_perturbed_scorer_lowers_agreement() -> None:
    """A scorer whose encoders are off (noise of half their spread on every weight: far more than bf16's rounding)
    gives other labels and other probabilities, and the comparison must say so."""

    def perturbed(model: MMSentModel) -> Scorer:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in [*model.text_encoder.parameters(), *model.image_encoder.parameters()]:
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=generator))
        return Scorer(model, cpu_runtime="torch")

    variants = [precision_variants()[1], Variant("perturbed", perturbed, "noisy encoders")]
    result = measure_variants(build_model("tiny-random"), variants, [4], posts=32, rounds=1)
    same, off = result["variants"]
    assert same["label_agreement"] == 1.0 and same["max_prob_diff"] == 0.0
    assert off["label_agreement"] < 0.9, off
    assert off["max_prob_diff"] > 0.01, off  # bf16 moves them by ~2e-4 here
    assert off["flipped_max_margin"] > 0 and same["flipped_max_margin"] == 0
    assert 0 < result["reference_margin"]["p10"] <= result["reference_margin"]["p50"]


def test_the_table_has_a_row_per_variant(result: dict) -> None:
    table = render_precision(result)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [v["name"] for v in result["variants"]]
    assert "posts/s @4 (× ref)" in table and "posts/s @8 (× ref)" in table


def test_cpu_flags_reads_the_name_and_the_precision_flags() -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512_vnni amx_bf16 amx_tile\n"
    assert cpu_flags(cpuinfo=cpuinfo) == ("Some Xeon", "amx_bf16 amx_tile avx512_vnni")
    assert cpu_flags(cpuinfo="") == ("unknown", "")
