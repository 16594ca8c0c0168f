"""Frozen encoder features, extracted once and cached in the user cache dir (never in the repository).

Head-only training then runs on these tensors in seconds. The cache key covers the encoders' identities, the
examples (ids, normalised texts, image files with size and mtime) and the feature options.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from mmsent.data import Example, load_image
from mmsent.model import Batch, Features, MMSentModel
from mmsent.presets import cache_dir

__all__ = ["ActivationSet", "FeatureSet", "extract_activations", "extract_features"]

FEATURE_VERSION = 4  # 4: resize in torch (antialiased bilinear on uint8), not Pillow
Cached = TypeVar("Cached", "FeatureSet", "ActivationSet")  # what the feature cache holds, labels aside


@dataclass
class FeatureSet:
    text: torch.Tensor  # (N, Dt) float32 pooled text
    image: torch.Tensor  # (N, R, C) image embedding (R = 1 pooled)
    image_flip: torch.Tensor  # (N, R, C) the mirrored image's embedding (augmentation / TTA)
    has_text: torch.Tensor  # (N,) bool
    has_image: torch.Tensor  # (N,) bool
    # (N,) long, -100 unlabelled; set from the examples, never cached (see `_with_labels`)
    labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    pairs: torch.Tensor | None = None  # (N,) long index into MODALITY_PAIRS, -100 where unknown
    text_tokens: torch.Tensor | None = None  # (N, T, H) float16, attention fusion only
    text_mask: torch.Tensor | None = None  # (N, T)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, *, flip: torch.Tensor | None = None, tta: bool = False) -> Features:
        """Features for rows `idx`. `flip` (bool per row) picks the mirrored image; `tta` averages both."""
        img = self.image[idx].float()
        if tta:
            img = 0.5 * (img + self.image_flip[idx].float())
        elif flip is not None:
            img = torch.where(flip[:, None, None], self.image_flip[idx].float(), img)
        tokens = self.text_tokens[idx].float() if self.text_tokens is not None else None
        mask = self.text_mask[idx] if self.text_mask is not None else None
        return Features(
            text=self.text[idx].float(),
            image=img.mean(1),
            has_text=self.has_text[idx],
            has_image=self.has_image[idx],
            text_tokens=tokens,
            text_mask=mask,
            image_regions=img if tokens is not None else None,
        )


def _key(model: MMSentModel, examples: Sequence[Example], regions: bool) -> str:
    h = hashlib.sha256()
    # both the image and its mirror are always extracted, so the cache does not depend on `tta_flip`
    image_ident = replace(model.cfg.image, tta_flip=False).ident
    h.update(json.dumps([FEATURE_VERSION, model.cfg.text.ident, image_ident, regions]).encode())
    for e in examples:
        stat = ""
        if e.image is not None and e.image.exists():
            st = e.image.stat()
            stat = f"{st.st_size}:{int(st.st_mtime)}"
        h.update(f"\x00{e.id}\x01{e.text}\x02{e.image}\x03{stat}".encode())
    return h.hexdigest()[:24]


@torch.inference_mode()
def extract_features(
    model: MMSentModel,
    examples: Sequence[Example],
    *,
    regions: bool = False,
    batch_size: int = 32,
    use_cache: bool = True,
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    path = cache_dir() / "features" / f"{_key(model, examples, regions)}.pt"
    if use_cache and path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return _with_labels(FeatureSet(**cached), examples)
    model.eval()
    n = len(examples)
    enc_t, enc_i = model.text_encoder, model.image_encoder
    max_len = model.cfg.text.max_length
    text = torch.zeros(n, enc_t.out_dim)
    tokens = torch.zeros(n, max_len, enc_t.hidden_size, dtype=torch.float16) if regions else None
    tmask = torch.zeros(n, max_len, dtype=torch.long) if regions else None
    order = sorted(range(n), key=lambda k: len(examples[k].text))  # similar lengths together: less padding
    for s in tqdm(range(0, n, 64), desc=f"{desc}: text", disable=not progress, leave=False):
        idx = order[s : s + 64]
        enc = enc_t.tokenize([examples[k].text for k in idx])
        tok, pooled = model.encode_text(enc["input_ids"], enc["attention_mask"])  # (b, T, H), (b, Dt)
        text[idx] = pooled.float()
        if tokens is not None and tmask is not None:
            t = tok.shape[1]
            tokens[idx, :t] = tok.half()
            tmask[idx, :t] = enc["attention_mask"]
    pre = model.cfg.image.preprocess
    has_image = torch.zeros(n, dtype=torch.bool)
    image: torch.Tensor | None = None
    image_flip: torch.Tensor | None = None
    for s in tqdm(range(0, n, batch_size), desc=f"{desc}: images", disable=not progress, leave=False):
        ims = [(k, load_image(examples[k].image)) for k in range(s, min(n, s + batch_size))]
        present = [(k, im) for k, im in ims if im is not None]
        if not present:
            continue
        pixels = pre.batch([im for _, im in present])
        emb = enc_i.regions(pixels)  # (b, R, C)
        emb_f = enc_i.regions(pixels, mirrored=True)
        if not regions:
            emb, emb_f = emb.mean(1, keepdim=True), emb_f.mean(1, keepdim=True)
        if image is None or image_flip is None:
            image = torch.zeros(n, *emb.shape[1:], dtype=torch.float16 if regions else torch.float32)
            image_flip = torch.zeros_like(image)
        rows = torch.tensor([k for k, _ in present])
        image[rows] = emb.to(image.dtype)
        image_flip[rows] = emb_f.to(image.dtype)
        has_image[rows] = True
    if image is None or image_flip is None:
        shape = (n, 1, enc_i.out_dim)
        image, image_flip = torch.zeros(shape), torch.zeros(shape)
    fs = FeatureSet(
        text=text,
        image=image,
        image_flip=image_flip,
        has_text=torch.tensor([bool(e.text) for e in examples]),
        has_image=has_image,
        text_tokens=tokens,
        text_mask=tmask,
    )
    if use_cache:
        _save_unlabelled(fs, path)
    return _with_labels(fs, examples)


def _with_labels(rows: Cached, examples: Sequence[Example]) -> Cached:
    """Labels come from the examples, never from the cache (the key covers the inputs, not the labels)."""
    rows.labels = torch.tensor([e.label if e.label is not None else -100 for e in examples], dtype=torch.long)
    rows.pairs = torch.tensor([e.pair if e.pair is not None else -100 for e in examples], dtype=torch.long)
    return rows


def _save_unlabelled(rows: FeatureSet | ActivationSet, path: Path) -> None:
    """Atomically: a concurrent reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v for k, v in rows.__dict__.items() if k not in ("labels", "pairs")}, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------ activations below a cut
@dataclass
class ActivationSet:
    """What enters the tuned layers, for fine-tuning the last layers of both encoders on the CPU: everything below
    them runs once here, and each training step runs only the layers that learn (features.py's cache, its own key).

        examples ─> text layers below the cut ─> states (N, T, H) ─┐
                 ─> CNN stem + blocks below the cut ─> maps (N, C, h, w), and the mirror's ─> ActivationSet.batch
    """

    text_states: torch.Tensor  # (N, T, H) float16, padded to the text encoder's max_length
    text_mask: torch.Tensor  # (N, T) 1 = real token
    image_map: torch.Tensor  # (N, C, h, w) float16; zeros where there is no image
    image_map_flip: torch.Tensor  # (N, C, h, w) the mirrored image's (augmentation)
    has_text: torch.Tensor  # (N,) bool
    has_image: torch.Tensor  # (N,) bool
    labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # from the examples
    pairs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, *, flip: torch.Tensor | None = None) -> Batch:
        """Rows `idx` as a Batch for MMSentModel, trimmed to their longest text; `flip` (bool per row) picks the
        mirrored image."""
        mask = self.text_mask[idx]
        width = max(int(mask.sum(1).max()), 1)
        maps = self.image_map[idx]
        if flip is not None:
            maps = torch.where(flip[:, None, None, None], self.image_map_flip[idx], maps)
        return Batch(
            input_ids=torch.zeros_like(mask[:, :width]),  # unused: the states below stand in for the tokens
            attention_mask=mask[:, :width],
            has_text=self.has_text[idx],
            has_image=self.has_image[idx],
            image_map=maps.float(),
            labels=self.labels[idx],
            pairs=self.pairs[idx],
            text_states=self.text_states[idx, :width].float(),
        )


def _activation_key(model: MMSentModel, examples: Sequence[Example]) -> str:
    cut = (model.cfg.text_trainable_layers, model.cfg.image_trainable_blocks)
    return f"act-{cut[0]}-{cut[1]}-{_key(model, examples, regions=False)}"


@torch.inference_mode()
def extract_activations(
    model: MMSentModel, examples: Sequence[Example], *, use_cache: bool = True, progress: bool = True
) -> ActivationSet:
    """The activations entering `model`'s trainable text layers and image blocks, for `examples`; cached like
    `extract_features` (a few hundred MB for MVSA's 4,000 posts, in the user cache dir)."""
    path = cache_dir() / "features" / f"{_activation_key(model, examples)}.pt"
    if use_cache and path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return _with_labels(ActivationSet(**cached), examples)
    model.eval()
    states, mask = _text_states(model, examples, progress)
    maps, maps_flip, has_image = _image_maps(model, examples, progress)
    acts = ActivationSet(states, mask, maps, maps_flip, torch.tensor([bool(e.text) for e in examples]), has_image)
    if use_cache:
        _save_unlabelled(acts, path)
    return _with_labels(acts, examples)


def _text_states(model: MMSentModel, examples: Sequence[Example], progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    enc_t, n_last = model.text_encoder, model.cfg.text_trainable_layers
    n, width = len(examples), model.cfg.text.max_length
    states = torch.zeros(n, width, enc_t.hidden_size, dtype=torch.float16)  # (N, T, H)
    mask = torch.zeros(n, width, dtype=torch.long)
    order = sorted(range(n), key=lambda k: len(examples[k].text))  # similar lengths together: less padding
    for s in tqdm(range(0, n, 64), desc="activations: text", disable=not progress, leave=False):
        idx = order[s : s + 64]
        enc = enc_t.tokenize([examples[k].text for k in idx])
        t = enc["input_ids"].shape[1]
        states[idx, :t] = enc_t.states_below(enc["input_ids"], enc["attention_mask"], n_last).half()
        mask[idx, :t] = enc["attention_mask"]
    return states, mask


def _image_maps(
    model: MMSentModel, examples: Sequence[Example], progress: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc_i, n_last, pre = model.image_encoder, model.cfg.image_trainable_blocks, model.cfg.image.preprocess
    n = len(examples)
    probe = enc_i.map_below(torch.zeros(1, 3, pre.size, pre.size), n_last)  # (1, C, h, w)
    maps = torch.zeros(n, *probe.shape[1:], dtype=torch.float16)
    maps_flip, has_image = torch.zeros_like(maps), torch.zeros(n, dtype=torch.bool)
    step = enc_i.cpu_micro_batch  # small calls: large ones page-fault their activations afresh (encoders.py)
    for s in tqdm(range(0, n, step), desc="activations: images", disable=not progress, leave=False):
        present = [(k, im) for k in range(s, min(n, s + step)) if (im := load_image(examples[k].image)) is not None]
        if present:
            rows, pixels = torch.tensor([k for k, _ in present]), pre.batch([im for _, im in present])
            maps[rows] = enc_i.map_below(pixels, n_last).half()
            maps_flip[rows] = enc_i.map_below(pixels.flip(-1), n_last).half()
            has_image[rows] = True
    return maps, maps_flip, has_image
