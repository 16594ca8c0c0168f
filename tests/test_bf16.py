"""bf16 on the CPU (`Scorer(cpu_precision="bf16")`, `MMSENT_CPU_PRECISION=bf16`): the Scorer's CUDA recipe on the
CPU (weights cast to bf16 once, every call under bf16 autocast, eager PyTorch). It really runs in bf16 (the weights
are bf16 and the probabilities move by bf16's rounding, no more), it says why in its note, it is refused where it
cannot run (ONNX Runtime), and it gives the default model's fp32 labels on a sample of posts. Real model code: the
tiny random model, and the packaged default model (all-MiniLM-L6-v2 and EfficientNet-Lite0, pretrained weights from
pip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from consumer.settings import Settings
from mmsent import Scorer
from mmsent.presets import from_config, preset_config
from mmsent.quantize import Int8Model, bf16_note, choose_precision
from tests.modelutil import structured_photo

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f {extra}\n"


def _posts(n: int) -> list[dict[str, object]]:
    captions = ["so proud of this team!!", "worst commute ever", "", "meh", "what a beautiful morning",
                "this is broken again", "thanks for nothing", "best day with friends"]
    return [{"text": captions[k % len(captions)] + f" #{k}", "image": structured_photo(k) if k % 5 else None}
            for k in range(n)]


def test_the_note_says_whether_the_cpu_has_bf16_units() -> None:
    with_units = bf16_note(CPUINFO.format(extra="avx512_bf16 amx_bf16"))
    assert with_units == "bf16: asked for; the CPU has avx512_bf16, amx_bf16"
    assert "slower than fp32" in bf16_note(CPUINFO.format(extra="avx512_vnni amx_int8"))
    with pytest.raises(ValueError, match="auto, fp32 or int8"):  # bf16 never reaches the int8 chooser
        choose_precision("bf16", ("amx_int8",), Int8Model.load(None))


def test_the_setting_takes_bf16_and_refuses_what_it_does_not_know() -> None:
    assert Settings(cpu_precision="bf16").cpu_precision == "bf16"
    with pytest.raises(ValueError, match="cpu_precision"):
        Settings(cpu_precision="fp16")


def test_bf16_runs_the_tiny_model_in_bf16_near_fp32() -> None:
    fp32 = Scorer(from_config(preset_config("tiny-random")), cpu_precision="fp32")
    bf16 = Scorer(from_config(preset_config("tiny-random")), cpu_precision="bf16")
    assert (bf16.cpu_precision, bf16.cpu_runtime) == ("bf16", "torch") and bf16.precision_note.startswith("bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    posts = [*_posts(16), {"text": "", "image": Image.new("RGB", (40, 30))}, {"text": "", "image": b"not an image"}]
    a, b = fp32.score(posts), bf16.score(posts)
    diffs = [abs(x.scores[k] - y.scores[k]) for x, y in zip(a, b, strict=True) for k in x.scores]
    assert 0 < max(diffs) < 0.05, max(diffs)  # it moved (bf16 ran), by rounding only
    assert all(abs(sum(r.scores.values()) - 1) < 1e-5 for r in b)
    assert [r.image_used for r in b] == [r.image_used for r in a]
    emb = bf16.embed_images([structured_photo(1)])[0]  # what the embedding cache stores: float32, not bf16
    assert emb is not None and emb.dtype == np.float32
    with pytest.raises(ValueError, match="bf16"):
        Scorer(from_config(preset_config("tiny-random")), cpu_precision="bf16", cpu_runtime="onnx")


def test_bf16_gives_fp32s_labels_on_the_default_model() -> None:
    fp32 = Scorer.load("default", cpu_precision="fp32")
    bf16 = Scorer.load("default", cpu_precision="bf16")
    posts = _posts(48)
    a, b = fp32.score(posts), bf16.score(posts)
    agreement = np.mean([x.label == y.label for x, y in zip(a, b, strict=True)])
    assert agreement >= 0.95, agreement
    assert max(abs(x.scores[k] - y.scores[k]) for x, y in zip(a, b, strict=True) for k in x.scores) > 0
