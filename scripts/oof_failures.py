"""Where a model fails, from its cross-validation's out-of-fold probabilities: prints the Markdown of
`mmsent.evaluation.failures` (numpy only, no model is loaded: seconds).

    .venv/bin/python scripts/oof_failures.py [--model mmsent/models/default]
        [--data ../shared/data/mvsa-single/train.jsonl] [--folds 5 --seed 0] [--decode] [--json] [--fused WAY]
        [--with DIR2 ...]

    DIR/oof.npz + DIR/calibration.json + DATA ──failure_report──▶ render_failures ──▶ stdout

`--with DIR2` (repeatable) scores an ensemble: each path's probabilities the mean of DIR's and DIR2's oof.npz (both
models cross-validated on the same data with the same folds and seed), the calibration refitted on the mean fused
path (`fit_calibration`, DIR's target precisions), as an ensemble that averages its members' probabilities would be
served.

`--fused WAY` reads the fused path's probabilities from DIR/int8-oof.npz (what `mmsent quantize --folds` scored:
`fp32`, `int8`, `int8-cnn`, `int8-text`) instead of oof.npz's: what the alerts catch as served in int8. The
single-modality paths stay oof.npz's (fp32).

oof.npz row k is DATA's k-th post (`mmsent train --folds` writes it so). `--folds`/`--seed` rebuild the training's
folds (`mmsent.training.train.fold_splits`, the split `mmsent train --folds` uses) so that
the alert thresholds are also cross-fitted; `--folds 0` skips that. `--decode` checks each image by decoding it
(`mmsent.data.load_image`, about a minute on 2 cores) instead of by the file's existence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mmsent.data import Example, load_examples, load_image
from mmsent.evaluation.calibrate import fit_calibration
from mmsent.evaluation.failures import failure_report, image_file_present, render_failures
from mmsent.evaluation.int8 import INT8_OOF_FILE
from mmsent.serving.calibration import CALIBRATION_FILE, Calibration
from mmsent.training.train import fold_splits

ROOT = Path(__file__).resolve().parents[1]


def training_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold in `mmsent train --folds N` (its default seed 0): training's own split."""
    fold_of = np.full(len(y), -1, dtype=np.int64)
    for f, (_, test) in enumerate(fold_splits(y, folds, seed)):
        fold_of[test] = f
    return fold_of


def image_decodes(example: Example) -> bool:
    return load_image(example.image) is not None


def quantized_fused(model: Path, way: str) -> np.ndarray:
    """The fused out-of-fold probabilities `way` of `mmsent quantize --folds`; SystemExit when absent or partial."""
    path = model / INT8_OOF_FILE
    if not path.is_file():
        raise SystemExit(f"{path}: missing; `mmsent quantize DATA --model {model} --folds FOLDS` writes it")
    with np.load(path) as npz:
        if way not in npz.files:
            raise SystemExit(f"{path} has no {way!r}: it has {', '.join(npz.files)}")
        fused = npz[way]
    if np.isnan(fused).any():
        raise SystemExit(f"{path}: {way!r} leaves {int(np.isnan(fused).any(1).sum())} posts unscored (no fold held "
                         "them out)")
    return fused


def load_oof(model: Path) -> dict[str, np.ndarray]:
    with np.load(model / "oof.npz") as npz:
        return {name: npz[name] for name in npz.files}


def ensemble(oofs: list[dict[str, np.ndarray]], y: np.ndarray, calibration: Calibration
             ) -> tuple[dict[str, np.ndarray], Calibration]:
    """The mean of several models' out-of-fold probabilities, path by path, and a calibration refitted on the mean
    fused path at `calibration`'s target precisions."""
    for other in oofs[1:]:
        if {m: p.shape for m, p in other.items()} != {m: p.shape for m, p in oofs[0].items()}:
            raise SystemExit("--with: the models' oof.npz differ in paths or rows (the same data and folds?)")
    mean = {path: np.mean([oof[path] for oof in oofs], axis=0) for path in oofs[0]}
    targets = sorted({t.target for thresholds in calibration.thresholds.values() for t in thresholds})
    refitted = fit_calibration(np.log(np.clip(mean["both"], 1e-12, None)), y, calibration.labels, targets,
                               metrics={"source": f"the mean of {len(oofs)} models' out-of-fold probabilities"})
    return mean, refitted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "mmsent" / "models" / "default")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mvsa-single" / "train.jsonl")
    ap.add_argument("--folds", type=int, default=5, help="the CV's fold count (0: no cross-fitted thresholds)")
    ap.add_argument("--seed", type=int, default=0, help="the CV's seed (mmsent train --seed)")
    ap.add_argument("--decode", action="store_true", help="image status by decoding, not by the file's existence")
    ap.add_argument("--json", action="store_true", help="print the report's dict as JSON instead of Markdown")
    ap.add_argument("--fused", metavar="WAY", help=f"the fused path from DIR/{INT8_OOF_FILE} (mmsent quantize "
                                                   "--folds): fp32, int8, int8-cnn or int8-text")
    ap.add_argument("--with", dest="members", metavar="DIR2", type=Path, action="append", default=[],
                    help="another model directory with an oof.npz of the same data and folds: report the ensemble "
                         "(the mean of the models' probabilities)")
    args = ap.parse_args(argv)
    if args.fused and args.members:
        raise SystemExit("--fused and --with: one at a time (int8's fused path is one model's)")

    calibration = Calibration.from_dict(json.loads((args.model / CALIBRATION_FILE).read_text()))
    examples = load_examples(args.data, calibration.labels)
    y = np.asarray([e.label for e in examples], dtype=np.int64)
    oof = load_oof(args.model)
    if args.fused:
        oof["both"] = quantized_fused(args.model, args.fused)
    if args.members:
        oof, calibration = ensemble([oof, *(load_oof(member) for member in args.members)], y, calibration)
    report = failure_report(examples, oof, calibration,
                            image_status=image_decodes if args.decode else image_file_present,
                            folds=training_folds(y, args.folds, args.seed) if args.folds else None)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_failures(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
