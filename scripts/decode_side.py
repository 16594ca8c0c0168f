"""What decoding photos at the model's own side costs in labels and saves in time, against every pixel.

The Scorer and the consumer decode a JPEG at the smallest DCT scale whose shorter side is still the model's
(`Scorer.decode_side`, mmsent/imaging.py); training decodes every pixel. For labelled posts this prints, per
precision, how often the label at each side is the full decode's, how far the probabilities move and the accuracy
on those posts, then the model alone from JPEG bytes (batch 32), the sides and precisions alternating over rounds:

    labelled posts ──Scorer.score (decode_side = None, then each side)──▶ labels, probabilities ──▶ agreement
    128 posts as JPEG bytes ──Scorer.score, batch 32, rounds alternating──▶ posts/s per side and precision

    .venv/bin/python scripts/decode_side.py [--posts 4000] [--sides 448 224] [--precisions fp32 int8]
        [--model DIR] [--rounds 8] [--data ../shared/data/mvsa-single/train.jsonl]

On the shipped model the posts are its training posts: the accuracy is in-sample, said so in what it prints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmsent import Scorer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvsa-single" / "train.jsonl"


def _probabilities(scorer: Scorer, posts: list[dict[str, object]], side: int | None) -> np.ndarray:
    scorer.decode_side = side
    out = []
    for start in tqdm(range(0, len(posts), 64), desc=f"{scorer.cpu_precision} at {side or 'every pixel'}",
                      leave=False):
        out += [[r.scores[label] for label in scorer.labels] for r in scorer.score(posts[start:start + 64])]
    return np.array(out)


def agreement(scorer: Scorer, posts: list[dict[str, object]], gold: np.ndarray, sides: list[int]) -> None:
    full = _probabilities(scorer, posts, None)
    print(f"{scorer.cpu_precision}, every pixel: accuracy {100 * (full.argmax(1) == gold).mean():.2f}")
    for side in sides:
        p = _probabilities(scorer, posts, side)
        moved = np.abs(p - full).max(1)
        print(f"{scorer.cpu_precision}, shorter side >= {side}: the full decode's label for "
              f"{100 * (p.argmax(1) == full.argmax(1)).mean():.2f}% of {len(posts)} posts; a post's largest "
              f"probability change mean {moved.mean():.4f}, p99 {np.quantile(moved, 0.99):.4f}, max {moved.max():.4f}; "
              f"accuracy {100 * (p.argmax(1) == gold).mean():.2f}")


def speed(scorers: list[Scorer], posts: list[dict[str, object]], sides: list[int | None], rounds: int) -> None:
    runs: dict[tuple[str, int | None], list[float]] = {}
    for scorer in scorers:
        scorer.score(posts[:32])  # warm: the graphs built, the first batch's allocations made
    for _ in tqdm(range(rounds), desc="model only, rounds", leave=False):
        for side in sides:
            for scorer in scorers:
                scorer.decode_side = side
                started = time.perf_counter()
                for start in range(0, len(posts), 32):
                    scorer.score(posts[start:start + 32])
                runs.setdefault((scorer.cpu_precision, side), []).append(len(posts) / (time.perf_counter() - started))
    for (precision, side), figures in runs.items():
        print(f"model only, {precision}, {f'shorter side >= {side}' if side else 'every pixel'}: "
              f"{statistics.median(figures):.1f} posts/s (median of {rounds}: "
              + " / ".join(f"{x:.1f}" for x in figures) + ")")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="labelled JSONL (text, label, image path)")
    parser.add_argument("--posts", type=int, default=4000, help="labelled posts for the agreement (0: none)")
    parser.add_argument("--sides", type=int, nargs="+", help="shorter sides to try (default: the model's own)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--model", help="model directory or preset (default: the packaged model)")
    parser.add_argument("--rounds", type=int, default=8, help="model-only rounds (0: no timing)")
    args = parser.parse_args(argv)

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    posts = [{"text": r["text"], "image": (args.data.parent / r["image"]).read_bytes()} for r in rows]
    scorers = [Scorer.load(args.model, cpu_precision=p) for p in args.precisions]
    sides = args.sides or [scorers[0].model.cfg.image.preprocess.source_side]
    print(f"{len(rows)} posts in {args.data}; the model's side {scorers[0].model.cfg.image.preprocess.source_side}; "
          "the accuracy is in-sample where the model was trained on these posts")
    if args.posts:
        gold = np.array([scorers[0].labels.index(r["label"]) for r in rows[: args.posts]])
        for scorer in scorers:
            agreement(scorer, posts[: args.posts], gold, sides)
    if args.rounds:
        speed(scorers, posts[:128], [None, *sides], args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
