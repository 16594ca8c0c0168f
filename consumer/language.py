"""Which language a post's caption is in: an ISO 639-1 code, or None when it cannot be told.

    batch cut ──▶ LanguageDetector.tag(items) ──▶ for each decoded post's caption:
                    detection_text(): URLs, mentions, `RT`, `#`, `_` and digits out; the first 1,000 characters
                    ├── fewer than MIN_LETTERS letters (empty, emoji only, `lol`) ──────────────▶ None
                    └── py3langid, normalised probabilities ──┬── below MIN_CONFIDENCE ─────────▶ None
                                                              ├── a code with no ISO 639-1 form ─▶ None
                                                              └── otherwise ─────────────────────▶ "en", "es", ...

Why py3langid (langid.py's model, 142 languages, offline, numpy only): on short captions it is as accurate as
lingua's high-accuracy mode at 47 times its speed and a tenth of its memory, and more accurate than lingua's
low-accuracy mode at 7 times its speed (`python -m scripts.language_bench`, BENCHMARKS.md; one core of the
loaded 2-core VM, 2026-12-06):

    detector             TweetEval, 1,000 (en)   112 short captions, 7 languages   MVSA captions/s   memory
    py3langid            99.2%                   99.1%                             21,105            121 MB
    lingua, low acc.     97.2%                   90.2%                              2,775             73 MB
    lingua, high acc.    99.3%                   98.2%                                452          1,237 MB

(right answers at no confidence threshold; memory: resident growth on loading, numpy included for py3langid.)
MIN_CONFIDENCE = 0.3 leaves 0.5% of the English tweets null and 2.7% of the short captions, with no wrong answer
left on the short set (without it: 0.9% wrong). The short set is small and written for this: a guide, not a proof.

Where: on the poll thread, when a batch is cut (`Application._submit`), once per batch. 32 MVSA captions take
2.6 ms against 996 ms for the default model to score the 32 posts with their images on the CPU (0.26%); on the
model thread it would add to the one serial stage whose time sets the throughput (on a GPU a 256-post batch takes
tens of milliseconds, to which 256 detections would add about 20), while on the poll thread it overlaps the batch
before it on the model. And the language is known before the post is scored: the ground a multilingual model (or a
router between models) will stand on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import structlog
from py3langid.langid import MODEL_FILE, LanguageIdentifier

from consumer.batcher import WorkItem

__all__ = ["MIN_CONFIDENCE", "MIN_LETTERS", "LanguageDetector", "detection_text", "is_supported"]

log = structlog.get_logger(__name__)

MIN_CONFIDENCE = 0.3  # py3langid's normalised probability below which the language is not told
MIN_LETTERS = 4  # fewer letters than this (after detection_text) tell no language: "ok", "lol", "#tbt"
MAX_DETECTION_CHARS = 1_000  # a caption's first characters are enough to tell; the cost stays bounded per post
# What is not the caption's language: links, mentions, retweet marks, hashtag marks and digits
_NOT_WORDS = re.compile(r"(?:https?://|www\.)\S*|\bt\.co/\S*|(?<![\w@])@\w+|\bRT\b|[#_\d]+", re.IGNORECASE)
_ISO_639_1 = re.compile(r"[a-z]{2}")


def detection_text(caption: str) -> str:
    """The words of a caption that tell its language: links, mentions, `RT`, `#`, `_` and digits removed."""
    return " ".join(_NOT_WORDS.sub(" ", caption[:MAX_DETECTION_CHARS]).split())


def is_supported(language: str | None, languages: Sequence[str]) -> bool:
    """Whether a model trained for `languages` was trained for a post in `language`. A post whose language cannot
    be told (None: no caption, emoji only) is: nothing says it is in another language, and the model was trained on
    such posts too."""
    return language is None or language in languages


class LanguageDetector:
    """Tells captions' languages, a batch at a time. Never raises: a caption it cannot read has no language."""

    def __init__(self, min_confidence: float = MIN_CONFIDENCE) -> None:
        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self._min_confidence = min_confidence

    def detect(self, captions: Sequence[str]) -> list[str | None]:
        return [self._language(caption) for caption in captions]

    def tag(self, items: Sequence[WorkItem]) -> None:
        """Set `item.language` on the items that hold a decoded post."""
        posts = [item for item in items if item.post is not None]
        for item, language in zip(posts, self.detect([item.post.text for item in posts if item.post]), strict=True):
            item.language = language

    def _language(self, caption: str) -> str | None:
        text = detection_text(caption)
        if sum(ch.isalpha() for ch in text) < MIN_LETTERS:
            return None
        try:
            code, confidence = self._identifier.classify(text)
        except Exception as exc:  # a library bug on some text must not stop the loop: that post has no language
            log.warning("language_detection_failed", error=repr(exc)[:300])
            return None
        return code if confidence >= self._min_confidence and _ISO_639_1.fullmatch(code) else None
