"""What one input record produces: its event (and alert), or its dead letter; each with its headers.

    WorkItem ──▶ OutputBuilder.build() ──┬──▶ event        output topic; with `alert`, the alert topic too when the
                                         │                 item's alert (decided once by `alert()`) is set
                                         │                 (+ the shadow model's event on the shadow topic)
                                         ├──▶ dead letter  DLQ topic (cut to fit by `consumer.fitting`)
                                         └──▶ nothing      a record the error policy skips

An event says whether the caption alone and the image alone agree (`modalities_agree`), the caption's language
(`item.language`, told by consumer/language.py when the batch was cut) and whether the model that scored it was
trained for that language (its scorer's `languages`).

Headers: the input record's, in order, narrowed by `MMSENT_HEADERS_ALLOW` / `MMSENT_HEADERS_DENY` (names compared
without case), then mmsent's own (`schemas.headers`). An input header that borrows one of mmsent's own names is
never carried: a dead letter's error code must be the one mmsent wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from consumer.batcher import WorkItem
from consumer.errors import Action
from consumer.language import is_supported
from consumer.protocols import ScoreResultLike, ScoringModel
from consumer.settings import Settings
from consumer.tracing import Tracing
from schemas import headers as wire
from schemas.models import (
    LABELS,
    Alert,
    AlertRule,
    DeadLetter,
    ImageStatus,
    Label,
    Scores,
    ScoresByModality,
    SentimentEvent,
    SourceCoordinates,
)


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: wire.Headers
    best_effort: bool = False  # a shadow event: the broker refusing it fails nothing


@dataclass(frozen=True, slots=True)
class Keep:
    """How much of the input record a dead letter keeps; None: all of it."""

    value: int | None = None  # the value's first bytes
    key: int | None = None  # the key's first bytes (in the letter and as the dead letter's own key)
    headers: int | None = None  # the first carried input headers


class HeaderFilter:
    """Which input headers are carried: all, or the allow-list's, never the deny-list's nor mmsent's own."""

    def __init__(self, allow: Sequence[str], deny: Sequence[str]) -> None:
        self._allow = frozenset(name.lower() for name in allow)
        self._deny = frozenset(name.lower() for name in deny) | wire.OWN

    def carried(self, headers: wire.Headers | None) -> wire.Headers:
        return [(name, value) for name, value in headers or () if self._carries(name.lower())]

    def _carries(self, name: str) -> bool:
        return name not in self._deny and (not self._allow or name in self._allow)


class OutputBuilder:
    def __init__(self, settings: Settings, tracing: Tracing | None = None) -> None:
        self._settings = settings
        self._headers = HeaderFilter(settings.headers_allow, settings.headers_deny)
        self._tracing = tracing or Tracing()

    def build(self, item: WorkItem) -> list[Output]:
        """Everything this record produces; empty for a skipped record."""
        if item.error is not None:
            return [] if item.error.action is Action.SKIP else [self.dead_letter(item)]
        assert item.post is not None and item.result is not None and item.scored_by is not None
        s = self._settings
        event = self._event(item, item.result, item.scored_by)
        outputs = [self._output(item, event, s.output_topic)]
        if s.alert_topic and item.alert is not None:
            outputs.append(self._output(item, event.model_copy(update={"alert": item.alert}), s.alert_topic))
        if s.shadow_topic and item.shadow_result is not None and item.shadow_by is not None:
            shadow = self._event(item, item.shadow_result, item.shadow_by)
            outputs.append(replace(self._output(item, shadow, s.shadow_topic), best_effort=True))
        return outputs

    def alert(self, item: WorkItem) -> Alert | None:
        """The alert rule, for a scored item: its label is the alert label, at its model's alert threshold or above
        (MMSENT_ALERT_MIN_PROBABILITY, or the calibrated threshold for MMSENT_ALERT_MIN_PRECISION). None: no alert
        (or no alert topic). Called once per item, when its batch completes; the item keeps the answer."""
        s, result, by = self._settings, item.result, item.scored_by
        if not s.alert_topic or result is None or by is None or result.label != s.alert_label:
            return None
        probability = float(dict(result.scores).get(s.alert_label, 0.0))
        threshold = float(by.alert_threshold)
        if probability < threshold:
            return None
        calibrated = s.alert_min_precision is not None
        return Alert(
            rule=AlertRule.MIN_PRECISION if calibrated else AlertRule.MIN_PROBABILITY,
            label=Label(result.label),
            probability=probability,
            threshold=threshold,
            min_precision=s.alert_min_precision,
            # the calibration in force: its temperature shaped the probability, and under min_precision it gave
            # the threshold too. Test doubles of a scorer have none.
            calibration=getattr(by.scorer, "calibration_digest", None),
        )

    def _event(self, item: WorkItem, result: ScoreResultLike, by: ScoringModel) -> SentimentEvent:
        assert item.post is not None
        by_modality = _by_modality(item, result)
        return SentimentEvent(
            post_id=item.post.post_id,
            label=Label(result.label),
            scores=Scores(**{name: float(p) for name, p in dict(result.scores).items()}),
            image_status=_image_status(item, result),
            scores_by_modality=by_modality,
            modalities_agree=_agree(by_modality),
            language=item.language,
            # a scorer that names no languages (a test double) is trained for none that can be told
            language_supported=is_supported(item.language, getattr(by.scorer, "languages", ())),
            model=by.info,
            source=_source(item),
            scored_at=datetime.now(UTC),
        )

    def _output(self, item: WorkItem, event: SentimentEvent, topic: str) -> Output:
        headers = self.carried(item) + [(wire.MODEL, f"{event.model.name}:{event.model.version}".encode())]
        return Output(topic, event.post_id.encode(), event.to_json_bytes(), headers)

    def dead_letter(self, item: WorkItem, keep: Keep | None = None) -> Output:
        """The record's dead letter: whole, or keeping only what `keep` says (`consumer.fitting` decides how much
        fits); input headers left out are counted in `mmsent.headers.dropped`."""
        assert item.error is not None
        keep = keep or Keep()
        letter = DeadLetter.for_record(
            code=item.error.code,
            message=item.error.message,
            source=_source(item),
            value=item.value,
            key=item.key,
            failed_at=datetime.now(UTC),
            keep_value=keep.value,
            keep_key=keep.key,
        )
        carried = self.carried(item)
        kept = carried[: keep.headers] if keep.headers is not None else carried
        headers = kept + _error_headers(item)
        if len(kept) < len(carried):
            headers.append((wire.HEADERS_DROPPED, str(len(carried) - len(kept)).encode()))
        key = item.key[: keep.key] if item.key is not None and keep.key is not None else item.key
        return Output(self._settings.dlq_topic, key, letter.to_json_bytes(), headers)

    def carried(self, item: WorkItem) -> wire.Headers:
        """The input's headers this output carries; its `traceparent` continued when tracing is on."""
        return self._tracing.continue_post(self._headers.carried(item.headers))


def _image_status(item: WorkItem, result: ScoreResultLike) -> ImageStatus:
    """The item's, unless this result could not use the image the item had (a shadow without its pixels)."""
    used = getattr(result, "image_used", True)
    return ImageStatus.UNAVAILABLE if item.image_status is ImageStatus.OK and not used else item.image_status


def _by_modality(item: WorkItem, result: ScoreResultLike) -> ScoresByModality:
    """The result's per-modality scores, as the contract keeps them: text for a non-empty caption, image when the
    image was used."""
    found = dict(getattr(result, "scores_by_modality", None) or {})
    text = found.get("text") if item.post is not None and item.post.text else None
    image = found.get("image") if _image_status(item, result) is ImageStatus.OK else None
    return ScoresByModality(text=None if text is None else Scores(**text),
                            image=None if image is None else Scores(**image))


def _agree(by_modality: ScoresByModality) -> bool | None:
    """Whether the caption alone and the image alone give the same label; None unless both were used."""
    text, image = by_modality.text, by_modality.image
    return None if text is None or image is None else _top(text) == _top(image)


def _top(scores: Scores) -> str:
    return max(LABELS, key=lambda label: float(getattr(scores, label)))


def _source(item: WorkItem) -> SourceCoordinates:
    return SourceCoordinates(topic=item.topic, partition=item.partition, offset=item.offset)


def _error_headers(item: WorkItem) -> wire.Headers:
    """The dead letter's own headers, in the manner of Kafka's KIP-1034: what failed, and when the input was written."""
    assert item.error is not None
    message = item.error.message.encode()[: wire.MAX_ERROR_MESSAGE_BYTES].decode(errors="ignore").encode()
    headers: wire.Headers = [(wire.ERROR_CODE, item.error.code.encode()), (wire.ERROR_MESSAGE, message)]
    if item.timestamp_ms is not None:
        headers.append((wire.SOURCE_TIMESTAMP, str(item.timestamp_ms).encode()))
    return headers
