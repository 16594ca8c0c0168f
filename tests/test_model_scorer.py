"""The Scorer on the tiny-random preset: each fusion, missing modalities, padding, broken images, no network."""

from __future__ import annotations

import io
import json
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import mmsent
from mmsent import Scorer, ScoreResult
from mmsent.presets import from_config, preset_config

FUSIONS = ["concat", "gated", "attention"]


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(sum(color))
    arr = (rng.integers(0, 60, (size[1], size[0], 3)) + np.array(color) * 0.7).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=FUSIONS)
def scorer(request: pytest.FixtureRequest) -> Scorer:
    return Scorer(from_config(preset_config("tiny-random", fusion=request.param)))


def _close(a: ScoreResult, b: ScoreResult, atol: float = 1e-5) -> bool:
    return a.label == b.label and all(abs(a.scores[k] - b.scores[k]) < atol for k in a.scores)


def test_public_api_exports() -> None:
    for name in ("Scorer", "ScoreResult", "ImageEmbedding", "decode_image", "ImageDecodeError"):
        assert hasattr(mmsent, name)
    assert issubclass(mmsent.ImageDecodeError, ValueError)


def test_tiny_random_scores_a_batch_of_32() -> None:
    # Speed is measured by `mmsent bench`, not asserted here: a timed test fails on a busy CI machine.
    s = Scorer.load("tiny-random")
    posts = [{"text": f"post number {i} is lovely", "image": _jpeg((i * 7 % 255, 50, 90))} for i in range(32)]
    results = s.score(posts)
    assert len(results) == 32 and all(r.image_used for r in results)
    assert all(abs(sum(r.scores.values()) - 1) < 1e-6 for r in results)
    assert s.info["name"] == "mmsent-tiny-random" and "version" in s.info
    assert s.labels == ("negative", "neutral", "positive")


def test_each_fusion_scores_a_mixed_batch(scorer: Scorer) -> None:
    img = Image.new("RGB", (50, 40), (200, 30, 30))
    posts = [
        {"text": "so happy today", "image": img},
        {"text": "what a disaster", "image": _jpeg((10, 10, 200))},
        {"text": "no picture here", "image": None},
        {"text": "", "image": img},
        {"text": "missing key"},
    ]
    out = scorer.score(posts)
    assert len(out) == len(posts)
    assert [r.image_used for r in out] == [True, True, False, True, False]
    for r in out:
        assert set(r.scores) == {"negative", "neutral", "positive"}
        assert abs(sum(r.scores.values()) - 1.0) < 1e-6
        assert r.label == max(r.scores, key=r.scores.__getitem__)


def test_missing_image_and_missing_text_use_learned_paths(scorer: Scorer) -> None:
    """A missing modality is a learned embedding, not zeros: output differs from a real all-zero feature."""
    head = scorer.model.head
    assert head.missing_text.abs().sum() > 0 and head.missing_image.abs().sum() > 0
    text_only = scorer.score([{"text": "a caption", "image": None}])[0]
    image_only = scorer.score([{"text": "", "image": Image.new("RGB", (40, 40), (0, 255, 0))}])[0]
    both = scorer.score([{"text": "a caption", "image": Image.new("RGB", (40, 40), (0, 255, 0))}])[0]
    assert not text_only.image_used and image_only.image_used
    assert not _close(text_only, both, 1e-7) and not _close(image_only, both, 1e-7)
    # a zero embedding passed as if it were a real image is *not* what a missing image means
    zero = np.zeros(scorer.model.embedding_shape(), dtype=np.float32)
    as_zero = scorer.score([{"text": "a caption", "image": zero}])[0]
    assert as_zero.image_used and not _close(as_zero, text_only, 1e-7)


def test_dynamic_padding_gives_same_logits_as_unpadded(scorer: Scorer) -> None:
    short = {"text": "ok", "image": Image.new("RGB", (30, 30), (100, 100, 100))}
    long = {"text": " ".join(["really"] * 40) + " long caption", "image": None}
    alone = scorer.score([short])[0]
    padded = scorer.score([short, long])[0]
    assert _close(alone, padded), (alone, padded)
    enc = scorer.model.text_encoder.tokenize(["ok", "a much longer text than ok is"])
    assert enc["input_ids"].shape[1] < 64  # padded to the longest in the batch, not to max_length


def test_corrupt_image_bytes_score_text_only_and_never_break_the_batch(scorer: Scorer) -> None:
    good = _jpeg((200, 100, 0))
    posts = [
        {"text": "fine", "image": good},
        {"text": "fine", "image": b"\xff\xd8\xff\xe0 not really a jpeg"},
        {"text": "fine", "image": b"GIF89a"},
        {"text": "fine", "image": good[: len(good) // 3]},
        {"text": "fine", "image": b""},
        {"text": "fine", "image": None},
    ]
    out = scorer.score(posts)
    assert [r.image_used for r in out] == [True, False, False, False, False, False]
    for r in out[1:]:
        assert _close(r, out[-1])  # exactly the text-only score


def test_image_bytes_are_decoded_at_the_models_side_as_the_consumer_decodes_them(scorer: Scorer) -> None:
    """A 480 x 640 JPEG for the tiny model (a 36 px shorter side): scored from its bytes as from the PIL image that
    `decode_image` gives at that side (the DCT scale 1/8, 60 x 80), not as from every pixel."""
    from mmsent import decode_image

    data = _jpeg((40, 160, 220), size=(480, 640))
    side = scorer.model.cfg.image.preprocess.source_side
    assert side == 36 and decode_image(data, min_side=side).size == (60, 80)
    from_bytes, at_side, full = scorer.score([{"text": "look", "image": image} for image in (
        data, decode_image(data, min_side=side), decode_image(data))])
    assert _close(from_bytes, at_side, 1e-6)
    assert max(abs(from_bytes.scores[k] - full.scores[k]) for k in full.scores) > 1e-6  # the full decode differs


def test_the_decode_side_script_compares_labels_and_speed_with_every_pixel(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/decode_side.py on the tiny model and 6 labelled posts of 480 x 640 photos: one agreement line per side
    and precision, with a share of labels that is a percentage, and one model-only line per side and precision."""
    from scripts.decode_side import main

    rows = []
    for k in range(6):
        (tmp_path / f"{k}.jpg").write_bytes(_jpeg((40 * k, 160, 220 - 30 * k), size=(480, 640)))
        rows.append({"text": f"post {k}", "label": ["negative", "neutral", "positive"][k % 3], "image": f"{k}.jpg"})
    data = tmp_path / "posts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--data", str(data), "--model", "tiny-random", "--posts", "6", "--sides", "36", "72",
                 "--precisions", "fp32", "--rounds", "1"]) == 0
    printed = capsys.readouterr().out
    shares = [float(x) for x in re.findall(r"the full decode's label for ([0-9.]+)% of 6 posts", printed)]
    assert len(shares) == 2 and all(0 <= x <= 100 for x in shares), printed
    assert len(re.findall(r"model only, fp32, .*: [0-9.]+ posts/s", printed)) == 3, printed  # every pixel, 36, 72


def test_embed_images_matches_scoring_from_pixels(scorer: Scorer) -> None:
    img = Image.new("RGB", (64, 64), (10, 180, 90))
    [emb] = scorer.embed_images([img])
    assert emb.dtype == np.float32 and emb.shape == scorer.model.embedding_shape()
    a = scorer.score([{"text": "hello", "image": img}])[0]
    b = scorer.score([{"text": "hello", "image": emb}])[0]
    c = scorer.score([{"text": "hello", "image": emb.astype(np.float16)}])[0]
    assert _close(a, b) and _close(a, c, 1e-2)
    assert isinstance(scorer.image_encoder_id, str) and scorer.image_encoder_id


def test_deterministic_across_loads() -> None:
    posts = [{"text": "same input", "image": _jpeg((1, 2, 3))}]
    a = Scorer.load("tiny-random").score(posts)[0]
    b = Scorer.load("tiny-random").score(posts)[0]
    assert a == b


def test_no_code_path_reaches_the_network(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and self.family != socket.AF_UNIX:
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(AssertionError(a)))
    for name in ("tiny-random", None):
        s = Scorer.load(name)
        out = s.score([{"text": "offline please", "image": _jpeg((5, 5, 5))}, {"text": "x", "image": None}])
        assert len(out) == 2
    with torch.inference_mode():
        assert s.embed_images([Image.new("RGB", (32, 32))])[0].shape == s.model.embedding_shape()


# --- scores_by_modality --------------------------------------------------------------------------------------------
def test_scores_by_modality_has_the_contracts_keys(scorer: Scorer) -> None:
    img = Image.new("RGB", (50, 40), (200, 30, 30))
    posts: list[dict[str, Any]] = [
        {"text": "so happy today", "image": img},  # both: text and image
        {"text": "no picture here", "image": None},  # text only
        {"text": "", "image": _jpeg((10, 10, 200))},  # empty caption: image only
        {"text": "broken picture", "image": b"\xff\xd8\xff\xe0 not a jpeg"},  # image not used: text only
        {"text": "", "image": None},  # neither
        {"image": img},  # no text key at all
    ]
    out = scorer.score(posts)
    expected = [{"text", "image"}, {"text"}, {"image"}, {"text"}, set(), {"image"}]
    assert [set(r.scores_by_modality) for r in out] == expected
    for r in out:
        assert ("image" in r.scores_by_modality) == r.image_used
        for scores in r.scores_by_modality.values():
            assert set(scores) == {"negative", "neutral", "positive"}
            assert abs(sum(scores.values()) - 1.0) < 1e-6 and all(0 <= v <= 1 for v in scores.values())
    # a post with one modality: what that modality alone says is its score
    assert out[1].scores_by_modality["text"] == out[1].scores
    assert out[2].scores_by_modality["image"] == out[2].scores
    # with both, each modality alone says something else than the two together
    assert out[0].scores_by_modality["text"] != out[0].scores != out[0].scores_by_modality["image"]


def test_each_modality_alone_is_the_post_without_the_other(scorer: Scorer) -> None:
    """The text-only score of a post is the full score of the post with its image removed (the same head pass on the
    learned missing-image embedding), and the image-only score the post with its caption removed."""
    img = _jpeg((30, 160, 220))
    posts: list[dict[str, Any]] = [{"text": "what a lovely morning by the sea", "image": img},
             {"text": "terrible news again", "image": Image.new("RGB", (40, 40), (90, 10, 10))},
             {"text": "", "image": None}]
    out = scorer.score(posts)
    for post, r in zip(posts[:2], out[:2], strict=True):
        text_alone = scorer.score([{"text": post["text"], "image": None}])[0]
        image_alone = scorer.score([{"text": "", "image": post["image"]}])[0]
        for got, want in ((r.scores_by_modality["text"], text_alone.scores),
                          (r.scores_by_modality["image"], image_alone.scores)):
            assert all(abs(got[k] - want[k]) < 1e-5 for k in want), (got, want)
        assert text_alone.scores_by_modality == {"text": text_alone.scores}
        assert image_alone.scores_by_modality == {"image": image_alone.scores}


def test_scores_by_modality_does_not_change_the_fused_scores(scorer: Scorer) -> None:
    """The extra head rows ride in the same head call; the posts' own scores are what the head gives them alone."""
    img = Image.new("RGB", (40, 40), (0, 200, 90))
    both = {"text": "a caption", "image": img}
    mixed = scorer.score([both, {"text": "another", "image": None}, {"text": "", "image": img}])
    assert _close(mixed[0], scorer.score([both])[0])
    logits = scorer.logits([both])
    assert logits.shape == (1, 3) and logits.dtype == np.float32
    assert np.allclose(torch.softmax(torch.from_numpy(logits), -1).numpy()[0],
                       [mixed[0].scores[k] for k in scorer.labels], atol=1e-5)
