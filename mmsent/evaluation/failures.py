"""Where a model fails, from its out-of-fold predictions: each path's accuracy and weighted-F1 over the CV folds,
which negative posts the fused path misses (and what its text-only and image-only paths, and the annotators, say of
them), negative recall by caption length, image status and whether the two single-modality paths agree, negative
recall at the calibration's alert thresholds, and what neutral posts are called instead.

    examples (label, annotators' pair, caption, image) ──┐
    oof {"both", "text", "image"}: (N, K) probabilities ──┼── failure_report ──▶ dict ── render_failures ──▶ Markdown
    calibration (temperature, thresholds by precision) ───┘       (folds given: each path's fold means, and the
                                                                    thresholds also cross-fitted)

The probabilities are the cross-validation's (`mmsent train --folds`, oof.npz): every row scored by a fold model that
never trained on it. Argmax figures use them as they are; the alert figures apply the calibration's temperature
first, as the Scorer does (softmax(log p / T): softmax ignores the constant that log p differs from the logits by).
Caption length counts whitespace-separated words of the normalised caption (mentions `@user`, URLs `http`: what the
model reads), not tokenizer tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmsent.data import Example
from mmsent.evaluation.calibrate import precision_thresholds
from mmsent.evaluation.metrics import compute_metrics
from mmsent.model import MODALITY_PAIRS, pair_label
from mmsent.serving.calibration import Calibration, Threshold, calibrated_probabilities

__all__ = ["LENGTH_BUCKETS", "PATHS", "caption_words", "failure_report", "image_file_present", "render_failures"]

PATHS = ("both", "text", "image")  # the fused path, then the model with the image / the caption removed
LENGTH_BUCKETS: tuple[tuple[str, int, int | None], ...] = (  # (name, fewest words, most words or None)
    ("≤ 5", 0, 5), ("6-10", 6, 10), ("11-20", 11, 20), ("> 20", 21, None))
IMAGE_PRESENT, IMAGE_MISSING = "image present", "image missing or undecodable"
PATHS_DISAGREE = "paths disagree: text-only ≠ image-only"


def caption_words(text: str) -> int:
    return len(text.split())


def image_file_present(example: Example) -> bool:
    """The cheap image status: the file exists (`mmsent.data.load_image(e.image) is not None` also decodes it)."""
    return example.image is not None and example.image.is_file()


# ------------------------------------------------------------------------------------------------------- report
def failure_report(examples: Sequence[Example], oof: Mapping[str, np.ndarray], calibration: Calibration, *,
                   image_status: Callable[[Example], bool] = image_file_present,
                   folds: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
    """The failure analysis of out-of-fold probabilities `oof` (PATHS -> (N, K), row k = examples[k], columns in
    `calibration.labels`, which must name negative and neutral). `folds` (the CV fold of each row) adds thresholds
    cross-fitted over them: each fold's rows alerted by thresholds fitted on the other folds' rows."""
    labels = list(calibration.labels)
    y = np.asarray([-1 if e.label is None else e.label for e in examples], dtype=np.int64)
    probs = {path: np.asarray(oof[path], dtype=np.float64) for path in PATHS}
    for path, p in probs.items():
        if p.shape != (len(y), len(labels)):
            raise ValueError(f"oof[{path!r}] is {p.shape}, not ({len(y)}, {len(labels)}): one row per example")
    if (y < 0).any():
        raise ValueError("every example needs a label")
    if folds is not None and len(folds) != len(y):
        raise ValueError(f"{len(folds)} folds for {len(y)} examples: one fold per example")
    pred = {path: p.argmax(1) for path, p in probs.items()}
    neg, neu = labels.index("negative"), labels.index("neutral")
    fused = calibrated_probabilities(np.log(np.clip(probs["both"], 1e-12, None)), calibration.temperature)
    caught = {path: p == neg for path, p in pred.items()}
    negative = label_failures(neg, y, pred, labels, examples)
    negative |= {
        "by_annotators": grouped_recall(y == neg, caught, *annotator_groups(examples, labels, neg)),
        "by_length": grouped_recall(y == neg, caught, *length_groups(examples)),
        "by_image": grouped_recall(y == neg, caught, *image_groups(examples, image_status)),
        "by_agreement": grouped_recall(y == neg, caught, *agreement_groups(pred, labels, neg)),
        "alerts": alert_figures(fused, y, neg, calibration, folds),
    }
    return {
        "n": len(y),
        "labels": labels,
        "temperature": calibration.temperature,
        "fold_means": fold_means(probs, y, labels, folds) if folds is not None else None,
        "confusion": confusion(y, pred["both"], len(labels)),
        "negative": negative,
        "neutral": label_failures(neu, y, pred, labels, examples),
    }


def fold_means(probs: Mapping[str, np.ndarray], y: np.ndarray, labels: Sequence[str],
               folds: Sequence[int] | np.ndarray) -> dict[str, dict[str, float]]:
    """Per path, the mean over the CV folds of each fold's accuracy and weighted-F1 (argmax): the figures cv.json
    summarises, here for any out-of-fold probabilities (an ensemble's averaged ones, say)."""
    fold_of = np.asarray(folds)
    out = {}
    for path, p in probs.items():
        per_fold = [compute_metrics(y[fold_of == f], p[fold_of == f], labels) for f in np.unique(fold_of)]
        out[path] = {name: float(np.mean([m[name] for m in per_fold])) for name in ("accuracy", "weighted_f1")}
    return out


def label_failures(k: int, y: np.ndarray, pred: Mapping[str, np.ndarray], labels: Sequence[str],
                   examples: Sequence[Example]) -> dict[str, Any]:
    """For the posts labelled `labels[k]`: what the fused path calls them, each path's recall, and for the ones it
    misses what the text-only and image-only paths call them and what the annotators said of caption and image."""
    mine = y == k
    missed = mine & (pred["both"] != k)
    pairs = annotator_pairs(examples)
    return {
        "label": labels[k],
        "support": int(mine.sum()),
        "called": {lab: int((mine & (pred["both"] == j)).sum()) for j, lab in enumerate(labels)},
        "recall": {path: ratio(int((mine & (p == k)).sum()), int(mine.sum())) for path, p in pred.items()},
        "missed": int(missed.sum()),
        # rows: what the text-only path says, columns: what the image-only path says
        "missed_by_paths": crosstab(pred["text"][missed], pred["image"][missed], len(labels)),
        # rows: the annotators' text_label, columns: their image_label (-1: the row has no pair)
        "missed_by_annotators": crosstab(pairs[missed, 0], pairs[missed, 1], len(labels)),
        "missed_without_pair": int((missed & (pairs[:, 0] < 0)).sum()),
    }


def alert_figures(fused: np.ndarray, y: np.ndarray, k: int, calibration: Calibration,
                  folds: Sequence[int] | np.ndarray | None) -> list[dict[str, Any]]:
    """Per target precision of the calibration: its threshold applied to the calibrated fused probabilities (alerts,
    precision, recall), what calibration.json recorded at fitting, and, with `folds`, the same target cross-fitted."""
    label = calibration.labels[k]
    out = []
    for stored in calibration.thresholds.get(label, ()):
        row: dict[str, Any] = {"target": stored.target, "threshold": stored.threshold,
                               **alert_counts(fused[:, k], y == k, stored.threshold),
                               "recorded": {"alerts": stored.alerts, "recall": stored.recall,
                                            "precision": stored.precision}}
        if folds is not None:
            row["cross_fitted"] = cross_fitted_alerts(fused, y, k, calibration.labels, stored.target,
                                                      np.asarray(folds))
        out.append(row)
    return out


def alert_counts(p: np.ndarray, is_label: np.ndarray, threshold: float | None) -> dict[str, Any]:
    alerts = p >= threshold if threshold is not None else np.zeros(len(p), dtype=bool)
    hits = int((alerts & is_label).sum())
    return {"alerts": int(alerts.sum()), "hits": hits, "precision": ratio(hits, int(alerts.sum())),
            "recall": ratio(hits, int(is_label.sum()))}


def cross_fitted_alerts(probs: np.ndarray, y: np.ndarray, k: int, labels: Sequence[str], target: float,
                        folds: np.ndarray) -> dict[str, Any]:
    """The target's threshold fitted (`precision_thresholds`, as calibration.json's) on all folds but one and
    applied to that one, for every fold; alerts and hits summed. The figure a threshold earns on posts it was not
    fitted on, where calibration.json's is measured on the posts it was fitted on."""
    alerts = hits = 0
    per_fold = []
    for f in np.unique(folds):
        test = folds == f
        fitted: Threshold = precision_thresholds(probs[~test], y[~test], labels, (target,))[labels[k]][0]
        counts = alert_counts(probs[test, k], y[test] == k, fitted.threshold)
        alerts, hits = alerts + counts["alerts"], hits + counts["hits"]
        per_fold.append({"threshold": fitted.threshold, **counts})
    return {"alerts": alerts, "hits": hits, "precision": ratio(hits, alerts),
            "recall": ratio(hits, int((y == k).sum())), "per_fold": per_fold}


# ------------------------------------------------------------------------------------------------------- groups
def annotator_pairs(examples: Sequence[Example]) -> np.ndarray:
    """(N, 2): each post's annotated (text label, image label), (-1, -1) where it has none."""
    return np.asarray([MODALITY_PAIRS[e.pair] if e.pair is not None else (-1, -1) for e in examples],
                      dtype=np.int64).reshape(len(examples), 2)


Groups = tuple[list[str], list[str]]  # each post's group, and the groups in the order they are shown


def annotator_groups(examples: Sequence[Example], labels: Sequence[str], k: int) -> Groups:
    """By the annotators' (text label, image label), the pairs whose post label is labels[k] (MVSA's rule: the
    non-neutral one of the two)."""
    def name(t: int, i: int) -> str:
        return f"annotators: text {labels[t]}, image {labels[i]}" if t >= 0 else "annotators: no pair"

    names = [name(t, i) for t, i in annotator_pairs(examples)]
    shown = [name(t, i) for t, i in MODALITY_PAIRS if pair_label(t, i) == k]
    return names, shown + ([name(-1, -1)] if name(-1, -1) in names else [])


def length_groups(examples: Sequence[Example]) -> Groups:
    def bucket(words: int) -> str:
        return next(name for name, low, high in LENGTH_BUCKETS if words >= low and (high is None or words <= high))

    return [f"caption {bucket(caption_words(e.text))} words" for e in examples], \
        [f"caption {name} words" for name, _, _ in LENGTH_BUCKETS]


def image_groups(examples: Sequence[Example], image_status: Callable[[Example], bool]) -> Groups:
    return [IMAGE_PRESENT if image_status(e) else IMAGE_MISSING for e in examples], [IMAGE_PRESENT, IMAGE_MISSING]


def agreement_groups(pred: Mapping[str, np.ndarray], labels: Sequence[str], k: int) -> Groups:
    """Text-only and image-only paths agreeing on labels[k], agreeing on another label, or disagreeing."""
    on_label, on_other = f"paths agree: both say {labels[k]}", "paths agree: both say another label"
    names = [(on_label if t == k else on_other) if t == i else PATHS_DISAGREE
             for t, i in zip(pred["text"], pred["image"], strict=True)]
    return names, [on_label, on_other, PATHS_DISAGREE]


def grouped_recall(is_label: np.ndarray, caught: Mapping[str, np.ndarray], groups: Sequence[str],
                   shown: Sequence[str]) -> list[dict[str, Any]]:
    """Per shown group: its posts, those with the label (support), and the recall of each path on them (`caught`:
    path -> the posts it calls the label). Groups not shown are left out; shown ones with no post stay, empty."""
    names = np.asarray(groups, dtype=object)
    out = []
    for name in shown:
        mine = is_label & (names == name)
        hits = {path: int((mine & c).sum()) for path, c in caught.items()}
        out.append({"group": name, "posts": int((names == name).sum()), "support": int(mine.sum()),
                    "caught": hits["both"], "recall": {path: ratio(h, int(mine.sum())) for path, h in hits.items()}})
    return out


def crosstab(rows: np.ndarray, cols: np.ndarray, k: int) -> list[list[int]]:
    """(k, k) counts of (row, column) value pairs; values outside [0, k) are left out."""
    table = np.zeros((k, k), dtype=np.int64)
    ok = (rows >= 0) & (rows < k) & (cols >= 0) & (cols < k)
    np.add.at(table, (rows[ok], cols[ok]), 1)
    return table.tolist()


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> list[list[int]]:
    return crosstab(y, pred, k)


def ratio(a: int, b: int) -> float | None:
    return a / b if b else None


# ------------------------------------------------------------------------------------------------------- render
def render_failures(report: Mapping[str, Any]) -> str:
    """The report as Markdown: a heading per question, a table each."""
    labels = report["labels"]
    neg, neu = report["negative"], report["neutral"]
    means = report.get("fold_means")
    parts = [
        *(["### Accuracy and weighted-F1, means over the CV folds (argmax)", fold_means_table(means)] if means else []),
        f"### Where the fused path misses negative posts ({report['n']} posts out of fold, argmax)",
        f"{neg['support']} negative posts: called "
        + ", ".join(f"{lab} {neg['called'][lab]}" for lab in labels)
        + f" (recall: fused {fmt(neg['recall']['both'])}, text-only {fmt(neg['recall']['text'])}, "
          f"image-only {fmt(neg['recall']['image'])}).",
        f"The {neg['missed']} missed negatives, by what the text-only path (rows) and the image-only path (columns) "
        "call them:",
        table_3x3(neg["missed_by_paths"], labels, "text-only says", "image-only says"),
        f"The same {neg['missed']}, by the annotators' `text_label` (rows) and `image_label` (columns)"
        + (f"; {neg['missed_without_pair']} without a pair:" if neg["missed_without_pair"] else ":"),
        table_3x3(neg["missed_by_annotators"], labels, "text_label", "image_label"),
        "Negative recall by group (argmax of each path; posts: all posts in the group, negatives: its negative posts; "
        "caption length in whitespace-separated words of the normalised caption):",
        recall_table(neg["by_annotators"] + neg["by_length"] + neg["by_image"] + neg["by_agreement"]),
        f"### Negative alerts at the calibration's thresholds (T = {report['temperature']:.4f})",
        alerts_table(neg["alerts"]),
        f"### Neutral ({neu['support']} posts)",
        f"Recall: fused {fmt(neu['recall']['both'])}, text-only {fmt(neu['recall']['text'])}, image-only "
        f"{fmt(neu['recall']['image'])}. The fused path calls them "
        + ", ".join(f"{lab} {neu['called'][lab]}" for lab in labels)
        + f". The {neu['missed']} missed, by what the text-only (rows) and image-only (columns) paths call them:",
        table_3x3(neu["missed_by_paths"], labels, "text-only says", "image-only says"),
    ]
    return "\n\n".join(parts) + "\n"


def fold_means_table(means: Mapping[str, Mapping[str, float]]) -> str:
    rows = [f"| {path} | {100 * m['accuracy']:.2f} | {100 * m['weighted_f1']:.2f} |" for path, m in means.items()]
    return "\n".join(["| path | accuracy | weighted-F1 |", "| --- | --- | --- |", *rows])


def table_3x3(counts: Sequence[Sequence[int]], labels: Sequence[str], row_name: str, col_name: str) -> str:
    lines = [f"| {row_name} \\ {col_name} | " + " | ".join(labels) + " | total |",
             "| --- | " + " | ".join("---" for _ in labels) + " | --- |"]
    lines += [f"| {lab} | " + " | ".join(str(c) for c in row) + f" | {sum(row)} |"
              for lab, row in zip(labels, counts, strict=True)]
    totals = [sum(col) for col in zip(*counts, strict=True)]
    lines.append("| total | " + " | ".join(str(t) for t in totals) + f" | {sum(totals)} |")
    return "\n".join(lines)


def recall_table(groups: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| group | posts | negatives | caught (fused) | recall fused | text-only | image-only |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {g['group']} | {g['posts']} | {g['support']} | {g['caught']} | **{fmt(g['recall']['both'])}** | "
              f"{fmt(g['recall']['text'])} | {fmt(g['recall']['image'])} |" for g in groups]
    return "\n".join(lines)


def alerts_table(rows: Sequence[Mapping[str, Any]]) -> str:
    cross = any("cross_fitted" in r for r in rows)
    head = "| target precision | threshold | alerts | precision | recall | calibration.json recorded |"
    lines = [head + (" cross-fitted over the CV folds: alerts, precision, recall |" if cross else ""),
             "| --- | --- | --- | --- | --- | --- |" + (" --- |" if cross else "")]
    for r in rows:
        rec = r["recorded"]
        line = (f"| {r['target']:.1f} | {fmt(r['threshold'])} | {r['alerts']} | {fmt(r['precision'])} | "
                f"{fmt(r['recall'])} | {rec['alerts']} alerts, recall {fmt(rec['recall'])} |")
        if cross:
            c = r["cross_fitted"]
            line += f" {c['alerts']}, {fmt(c['precision'])}, {fmt(c['recall'])} |"
        lines.append(line)
    return "\n".join(lines)


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"
