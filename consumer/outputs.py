"""What one input record produces: its event (and alert), or its dead letter; each with its headers.

    WorkItem ──▶ OutputBuilder.build() ──┬──▶ event        output topic; the alert topic too when `alerts()` says so
                                         │                 (+ the shadow model's event on the shadow topic)
                                         ├──▶ dead letter  DLQ topic (cut to fit by `consumer.fitting`)
                                         └──▶ nothing      a record the error policy skips

Headers: the input record's, in order, narrowed by `MMSENT_HEADERS_ALLOW` / `MMSENT_HEADERS_DENY` (names compared
without case), then mmsent's own (`schemas.headers`). An input header that borrows one of mmsent's own names is
never carried: a dead letter's error code must be the one mmsent wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from consumer.batcher import WorkItem
from consumer.errors import Action
from consumer.settings import Settings
from consumer.tracing import Tracing
from schemas import headers as wire
from schemas.models import (
    DeadLetter,
    ImageStatus,
    ModelInfo,
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
        event = self._event(item, item.result, item.scored_by.info, s.output_topic)
        outputs = [event]
        if s.alert_topic and self.alerts(item):
            outputs.append(replace(event, topic=s.alert_topic))
        if s.shadow_topic and item.shadow_result is not None:
            shadow = self._event(item, item.shadow_result, item.shadow_by, s.shadow_topic)
            outputs.append(replace(shadow, best_effort=True))
        return outputs

    def alerts(self, item: WorkItem) -> bool:
        """The alert rule: the post's label is the alert label, at its model's alert threshold or above
        (MMSENT_ALERT_MIN_PROBABILITY, or the calibrated threshold for MMSENT_ALERT_MIN_PRECISION)."""
        s, result = self._settings, item.result
        return result is not None and result.label == s.alert_label and (
            float(dict(result.scores).get(s.alert_label, 0.0)) >= item.scored_by.alert_threshold
        )

    def _event(self, item: WorkItem, result: Any, model: ModelInfo, topic: str) -> Output:
        assert item.post is not None
        event = SentimentEvent(
            post_id=item.post.post_id,
            label=result.label,
            scores=Scores(**{name: float(p) for name, p in dict(result.scores).items()}),
            image_status=_image_status(item, result),
            scores_by_modality=_by_modality(item, result),
            model=model,
            source=_source(item),
            scored_at=datetime.now(UTC),
        )
        headers = self.carried(item) + [(wire.MODEL, f"{model.name}:{model.version}".encode())]
        return Output(topic, item.post.post_id.encode(), event.to_json_bytes(), headers)

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


def _image_status(item: WorkItem, result: Any) -> ImageStatus:
    """The item's, unless this result could not use the image the item had (a shadow without its pixels)."""
    used = getattr(result, "image_used", True)
    return ImageStatus.UNAVAILABLE if item.image_status is ImageStatus.OK and not used else item.image_status


def _by_modality(item: WorkItem, result: Any) -> ScoresByModality:
    """The result's per-modality scores, as the contract keeps them: text for a non-empty caption, image when the
    image was used."""
    found = dict(getattr(result, "scores_by_modality", None) or {})
    text = found.get("text") if item.post is not None and item.post.text else None
    image = found.get("image") if _image_status(item, result) is ImageStatus.OK else None
    return ScoresByModality(text=None if text is None else Scores(**text),
                            image=None if image is None else Scores(**image))


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
