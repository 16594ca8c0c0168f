"""What ONNX Runtime's graph fusions cost or save on the encoders' cached graphs: each graph timed with every
optimisation on, and with the named ones off, in alternating rounds in one process (one thread each, as a scoring
slice runs), and how far the outputs move.

    graph.onnx ──InferenceSession (all fusions)──────────────┐
               └─InferenceSession (disabled_optimizers=...)──┴─▶ ms per call, rounds alternating ──▶ median, min

    .venv/bin/python scripts/ort_fusions.py GRAPH.onnx [GRAPH.onnx ...] [--disable SkipLayerNormFusion ...]
        [--rounds 8] [--batch 32] [--tokens 40]

GRAPH: a graph from the cache dir (~/.cache/mmsent/onnx, MMSENT_CACHE_DIR): a text encoder's takes (ids, mask) of
random token ids, batch x tokens; a CNN's random pixels, batch x 3 x S x S. mmsent.runtime.SLOWER_FUSIONS came from
it (BENCHMARKS.md, 2026-12-07).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mmsent.runtime import inference_session


def feed(s: ort.InferenceSession, batch: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = s.get_inputs()
    if len(inputs) == 2:  # a text encoder: token ids and the attention mask
        return {inputs[0].name: rng.integers(1000, 20000, (batch, tokens)).astype(np.int64),
                inputs[1].name: np.ones((batch, tokens), np.int64)}
    side = inputs[0].shape[-1]
    return {inputs[0].name: rng.random((batch, 3, side, side), dtype=np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--disable", nargs="+", default=["SkipLayerNormFusion"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    print(f"| graph | all fusions: median / min ms | without {', '.join(args.disable)} | largest output change |")
    print("| --- | --- | --- | --- |")
    for graph in args.graphs:
        pair = [inference_session(str(graph), threads=1, disabled=disabled) for disabled in ((), tuple(args.disable))]
        inputs = feed(pair[0], args.batch, args.tokens)
        outputs = [s.run(None, inputs)[0] for s in pair]  # also the warm-up
        times: list[list[float]] = [[], []]
        for _ in range(args.rounds):
            for s, own in zip(pair, times, strict=True):
                start = time.perf_counter()
                s.run(None, inputs)
                own.append(1000 * (time.perf_counter() - start))
        cells = [f"{statistics.median(t):.1f} / {min(t):.1f}" for t in times]
        print(f"| ...{graph.name[-44:]} | {cells[0]} | {cells[1]} | {np.abs(outputs[0] - outputs[1]).max():.2g} |")


if __name__ == "__main__":
    main()
