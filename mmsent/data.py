"""Labelled posts: JSONL or CSV with mappable columns, image loading, augmentation, dynamic-padding batches.

Default columns are the shared data's (`id`, `text`, `label`, `image`); the tutorial's dataframe columns map with
`ColumnMap(text="review_text", label="sentiment_label", image="image_path")`. Image paths are relative to the data
file. Image URLs are *not* fetched here (training never touches the network): such rows train text-only.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mmsent.imaging import ImageDecodeError, ImagePreprocess, decode_image
from mmsent.model import LABELS, MODALITY_PAIRS, Batch, pair_label
from mmsent.textnorm import normalize_tweet

__all__ = ["ColumnMap", "Example", "augmentation", "collate", "load_examples", "load_image"]

LABEL_ALIASES = {
    "neg": "negative",
    "pos": "positive",
    "neu": "neutral",
    "0": "negative",
    "1": "neutral",
    "2": "positive",
}


@dataclass(frozen=True)
class ColumnMap:
    id: str = "id"
    text: str = "text"
    label: str = "label"
    image: str = "image"
    text_label: str = "text_label"  # optional per-modality labels (MVSA has them): train a modality-pairs head
    image_label: str = "image_label"

    @classmethod
    def parse(cls, spec: str | None) -> ColumnMap:
        """`"text=review_text,label=sentiment_label,image=image_path"` -> ColumnMap."""
        if not spec:
            return cls()
        kw: dict[str, str] = {}
        for part in spec.split(","):
            key, _, value = part.partition("=")
            if key.strip() not in cls.__dataclass_fields__ or not value.strip():
                raise ValueError(f"bad column mapping {part!r}; use e.g. text=review_text,label=sentiment_label")
            kw[key.strip()] = value.strip()
        return cls(**kw)


@dataclass(frozen=True)
class Example:
    id: str
    text: str  # normalised
    label: int | None  # index into labels; None when unlabelled
    image: Path | None  # local file, or None
    pair: int | None = None  # index into model.MODALITY_PAIRS when the row has both per-modality labels


def _rows(path: Path) -> list[dict[str, object]]:
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: not a JSON object")
                out.append(row)
    return out


def load_examples(
    path: str | Path, labels: Sequence[str], columns: ColumnMap | None = None, *, require_labels: bool = True
) -> list[Example]:
    path = Path(path)
    cols = columns or ColumnMap()
    index = {lab: k for k, lab in enumerate(labels)}
    examples = []
    pairs = {pair: k for k, pair in enumerate(MODALITY_PAIRS)} if tuple(labels) == LABELS else {}

    def label_of(n: int, raw: object) -> int | None:
        if raw is None or str(raw) == "":
            return None
        name = LABEL_ALIASES.get(str(raw).strip().lower(), str(raw).strip().lower())
        if name not in index:
            raise ValueError(f"{path}: row {n}: unknown label {raw!r} (labels: {', '.join(labels)})")
        return index[name]

    for n, row in enumerate(_rows(path)):
        label = label_of(n, row.get(cols.label))
        if label is None and require_labels:
            raise ValueError(f"{path}: row {n} has no {cols.label!r}")
        t, i = label_of(n, row.get(cols.text_label)), label_of(n, row.get(cols.image_label))
        pair = None  # a row that breaks the labelling rule trains on its label alone
        if t is not None and i is not None and (t, i) in pairs and label in (None, pair_label(t, i)):
            pair = pairs[(t, i)]
        img = row.get(cols.image)
        image: Path | None = None
        if isinstance(img, str) and img and not img.startswith(("http://", "https://")):
            image = (path.parent / img).resolve()
        ident = str(row.get(cols.id, n))
        examples.append(Example(ident, normalize_tweet(str(row.get(cols.text) or "")), label, image, pair))
    return examples


def load_image(path: Path | None) -> Image.Image | None:
    """The image of an example, via the safe decoder; None when absent or undecodable."""
    if path is None:
        return None
    try:
        return decode_image(path.read_bytes(), max_pixels=40_000_000, max_side=12_000)
    except (OSError, ImageDecodeError):
        return None


def augmentation(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Training augmentation of preprocessed uint8 pixels (3, size, size): random resized crop (70-100% of the
    area), horizontal flip, mild colour jitter. It runs after the serving preprocess, so that a training image is
    the served one, moved a little; and it draws from torch's RNG, which DataLoader seeds per worker (and a
    checkpoint saves), so that a run repeats."""
    from torchvision.transforms import v2  # ~2.6 s to import (dev VM): only when training augments, never to serve

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.15, contrast=0.15),
        ]
    )


def collate(
    examples: Sequence[Example],
    tokenize: object,
    preprocess: ImagePreprocess,
    *,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    use_text: bool = True,
    use_image: bool = True,
) -> Batch:
    """Examples -> a Batch padded to the longest text in it; `augment` (see `augmentation`) moves each image."""
    texts = [e.text if use_text else "" for e in examples]
    enc = tokenize(texts)  # type: ignore[operator]
    images = [load_image(e.image) if use_image else None for e in examples]
    pixels = torch.zeros(len(examples), 3, preprocess.size, preprocess.size)
    for k, im in enumerate(images):
        if im is not None:
            u8 = preprocess.to_uint8(im)  # (3, S, S)
            pixels[k] = preprocess.normalize((augment(u8) if augment else u8).unsqueeze(0))[0]
    labels = torch.tensor([e.label if e.label is not None else -100 for e in examples], dtype=torch.long)
    return Batch(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        has_text=torch.tensor([bool(t) for t in texts]),
        has_image=torch.tensor([im is not None for im in images]),
        pixels=pixels,
        labels=labels,
        pairs=torch.tensor([e.pair if e.pair is not None else -100 for e in examples], dtype=torch.long),
    )
