"""Language detectors on short captions: accuracy and speed, and the chosen one's share of a 32-post batch.

    .venv/bin/python -m scripts.language_bench [--data ../shared/data] [--model-share]

Candidates: py3langid (the project's) and lingua-language-detector in its low- and high-accuracy modes when it is
installed (it is not a dependency: `pip install lingua-language-detector` into a scratch environment that also sees
the project). Each sees the caption as consumer/language.py prepares it (`detection_text`; fewer than MIN_LETTERS
letters is None) and answers (code, confidence); a code below the threshold is None.

  tweeteval_en    1,000 TweetEval tweets (English): right / None
  short7          the 112 hand-written short captions in 7 languages of scripts/language_samples.py: right / wrong
  no_language     scripts/language_samples.NO_LANGUAGE: how many are None
  posts_per_s     1,000 MVSA captions, one after another on one thread
  --model-share   the default model scoring 32 MVSA posts with their images on the CPU, against detecting their
                  captions' languages (consumer.language.LanguageDetector), best of 5 each
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumer.language import MIN_LETTERS, LanguageDetector, detection_text
from scripts.language_samples import NO_LANGUAGE, SHORT_CAPTIONS

Detect = Callable[[str], tuple[str | None, float]]
THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 0.9)


def _py3langid() -> Detect:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return lambda text: identifier.classify(text)


def _lingua(low_accuracy: bool) -> Detect:
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages()
    detector = (builder.with_low_accuracy_mode() if low_accuracy else builder).with_preloaded_language_models().build()

    def detect(text: str) -> tuple[str | None, float]:
        values = detector.compute_language_confidence_values(text)
        return (values[0].language.iso_code_639_1.name.lower(), values[0].value) if values else (None, 0.0)

    return detect


def _candidates() -> dict[str, Callable[[], Detect]]:
    found: dict[str, Callable[[], Detect]] = {"py3langid": _py3langid}
    try:
        import lingua  # noqa: F401
    except ImportError:
        return found
    found["lingua-low"] = lambda: _lingua(True)
    found["lingua-high"] = lambda: _lingua(False)
    return found


def _told(detect: Detect, captions: list[str], threshold: float) -> list[str | None]:
    out = []
    for caption in captions:
        text = detection_text(caption)
        code, confidence = detect(text) if sum(c.isalpha() for c in text) >= MIN_LETTERS else (None, 0.0)
        out.append(code if confidence >= threshold else None)
    return out


def _texts(path: Path, n: int) -> list[str]:
    with path.open() as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n), strict=False)]


def compare(data: Path) -> list[dict[str, Any]]:
    tweets = _texts(data / "tweeteval-sentiment" / "val.jsonl", 1_000)
    captions = _texts(data / "mvsa-single" / "train.jsonl", 1_000)
    labelled = [(lang, caption) for lang, texts in SHORT_CAPTIONS.items() for caption in texts]
    rows = []
    for name, build in _candidates().items():
        started = time.perf_counter()
        detect = build()
        row: dict[str, Any] = {"detector": name, "load_s": round(time.perf_counter() - started, 2)}
        for threshold in THRESHOLDS:
            en = _told(detect, tweets, threshold)
            short = _told(detect, [caption for _, caption in labelled], threshold)
            truth = [lang for lang, _ in labelled]
            row[f"at_{threshold}"] = {
                "tweeteval_en_right": round(en.count("en") / len(en), 3),
                "tweeteval_en_none": round(en.count(None) / len(en), 3),
                "short7_right": round(sum(t == f for t, f in zip(truth, short, strict=True)) / len(short), 3),
                "short7_wrong": round(sum(f is not None and t != f for t, f in zip(truth, short, strict=True))
                                      / len(short), 3),
                "no_language_none": f"{_told(detect, list(NO_LANGUAGE), threshold).count(None)}/{len(NO_LANGUAGE)}",
            }
        prepared = [detection_text(c) for c in captions]
        started = time.perf_counter()
        for text in prepared:
            detect(text)
        row["posts_per_s"] = round(len(prepared) / (time.perf_counter() - started))
        rows.append(row)
    return rows


def model_share(data: Path) -> dict[str, float]:
    from mmsent import Scorer

    with (data / "mvsa-single" / "train.jsonl").open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(32), strict=False)]
    posts = [{"text": r["text"], "image": (data / "mvsa-single" / r["image"]).read_bytes()} for r in rows]
    scorer, detector = Scorer.load(), LanguageDetector()
    scorer.warm_up()

    def best(work: Callable[[], Any]) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return min(times)

    model_s = best(lambda: scorer.score(posts))
    detect_s = best(lambda: detector.detect([p["text"] for p in posts]))
    return {"model_ms": round(model_s * 1000, 1), "detect_ms": round(detect_s * 1000, 2),
            "detect_share": round(detect_s / (model_s + detect_s), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--model-share", action="store_true")
    args = parser.parse_args()
    for row in compare(args.data):
        print(json.dumps(row))
    if args.model_share:
        print(json.dumps({"batch_of_32": model_share(args.data)}))


if __name__ == "__main__":
    main()
