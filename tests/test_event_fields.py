"""The event fields that say more than the label: `modalities_agree`, `language`, `language_supported`, and the
`mmsent_posts_by_language_total` metric, through a running consumer on a real broker with loopback images; and the
language detector on its own, on the hand-written short captions of `scripts/language_samples.py`.

The model is `tiny-random` (random weights: its labels mean nothing, but they are deterministic): the caption
"lovely" alone says neutral where its image says positive, the others agree with their image."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumer.language import LanguageDetector, detection_text
from consumer.metrics import Metrics
from scripts.language_samples import NO_LANGUAGE, SHORT_CAPTIONS
from tests.consumerutil import Topics, all_committed, app_in_thread, make_settings, post, settings_env, wait_until
from tests.imageserver import ImageServer, image, sample_image
from tests.kafkautil import create_topics, produce, read_all

CAPTIONS: dict[str, tuple[str, str | None]] = {  # post_id -> (caption, the language it must be told as)
    "en": ("What a beautiful morning at the beach with my best friends!", "en"),
    "es": ("¡Qué día tan bonito hemos pasado en la playa con los amigos!", "es"),
    "de": ("Was für ein schöner Morgen am Strand mit meinen besten Freunden!", "de"),
    "emoji": ("😍😍🔥🔥 💯", None),
    "empty": ("", None),
    "mention": ("@someone http://t.co/xyz #tbt", None),
}


def test_the_detector_tells_short_captions_and_is_unsure_of_what_tells_nothing() -> None:
    detector = LanguageDetector()
    told = [(lang, found) for lang, captions in SHORT_CAPTIONS.items() for found in detector.detect(captions)]
    right = sum(lang == found for lang, found in told)
    wrong = sum(found is not None and found != lang for lang, found in told)
    assert right / len(told) >= 0.9, told  # measured: 97.3%, none wrong (scripts/language_bench.py)
    assert wrong <= 1, [pair for pair in told if pair[1] is not None and pair[0] != pair[1]]
    assert detector.detect(NO_LANGUAGE) == [None] * len(NO_LANGUAGE)


def test_links_mentions_and_hashtag_marks_are_not_the_language() -> None:
    assert detection_text("RT @maria ¡Qué bonito! #playa http://t.co/a1 2026") == "¡Qué bonito! playa"
    assert len(detection_text("a" * 50_000)) == 1_000  # the cost per caption is bounded


@pytest.mark.kafka
def test_events_say_whether_modalities_agree_and_which_language_the_caption_is_in(
    kafka_bootstrap: str, image_server: ImageServer, unique_name: str
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    photo = image_server.route("/photo.jpg", image(sample_image("JPEG", color=(200, 120, 40))))
    values = [post(f"text-{pid}", caption) for pid, (caption, _) in CAPTIONS.items()]
    values += [post(f"image-{pid}", caption, photo) for pid, (caption, _) in CAPTIONS.items()]
    values += [post(f"image-{word}", word, photo) for word in ("great day", "lovely", "sad broken thing")]
    produce(kafka_bootstrap, topics.posts, values)
    by_language = Metrics.get().posts_by_language
    before = {lang: by_language.labels(lang)._value.get() for lang in ("en", "es", "de", "unknown")}

    with app_in_thread(make_settings(settings_env(kafka_bootstrap, topics, None))) as app:
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    assert app.rc == 0  # type: ignore[attr-defined]

    events = {e["post_id"]: e for e in (json.loads(r.value) for r in read_all(kafka_bootstrap, topics.sentiment))}
    assert len(events) == len(values)
    for pid, (_caption, language) in CAPTIONS.items():
        for kind in ("text", "image"):
            event = events[f"{kind}-{pid}"]
            assert event["language"] == language, (pid, event)
            assert event["language_supported"] is (language in (None, "en")), (pid, event)
    assert all(e["image_status"] == "ok" for pid, e in events.items() if pid.startswith("image-"))
    # one modality: null; the empty caption with its image is the image alone
    assert all(events[f"text-{pid}"]["modalities_agree"] is None for pid in CAPTIONS)
    assert events["image-empty"]["modalities_agree"] is None
    assert set(events["image-empty"]["scores_by_modality"]) == {"image"}
    both = [e for e in events.values() if {"text", "image"} <= set(e["scores_by_modality"])]
    assert all(e["modalities_agree"] is (_top(e, "text") == _top(e, "image")) for e in both)
    assert events["image-lovely"]["modalities_agree"] is False and events["image-great day"]["modalities_agree"] is True

    counted = {lang: by_language.labels(lang)._value.get() - before[lang] for lang in before}
    told = [e["language"] or "unknown" for e in events.values()]
    assert counted == {lang: told.count(lang) for lang in before}
    assert counted["es"] == 2 and counted["de"] == 2


def _top(event: dict[str, Any], modality: str) -> str:
    scores = event["scores_by_modality"][modality]
    return max(scores, key=scores.get)
