"""What one input record produces: its event (and alert), or its dead letter; each with its headers.

    WorkItem ──▶ OutputBuilder.build() ──┬──▶ event        output topic; the alert topic too when `alerts()` says so
                                         ├──▶ dead letter  DLQ topic
                                         └──▶ nothing      a record the error policy skips

Headers: the input record's, in order, narrowed by `MMSENT_HEADERS_ALLOW` / `MMSENT_HEADERS_DENY` (names compared
without case), then mmsent's own (`schemas.headers`). An input header that borrows one of mmsent's own names is
never carried: a dead letter's error code must be the one mmsent wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from consumer.batcher import WorkItem
from consumer.errors import Action
from consumer.settings import Settings
from schemas import headers as wire
from schemas.models import DeadLetter, ModelInfo, Scores, SentimentEvent, SourceCoordinates


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: wire.Headers


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
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._headers = HeaderFilter(settings.headers_allow, settings.headers_deny)

    def build(self, item: WorkItem) -> list[Output]:
        """Everything this record produces; empty for a skipped record."""
        if item.error is not None:
            return [] if item.error.action is Action.SKIP else [self._dead_letter(item)]
        assert item.post is not None and item.result is not None and item.scored_by is not None
        event = self._event(item, item.scored_by)
        if self._settings.alert_topic and self.alerts(item):
            return [event, Output(self._settings.alert_topic, event.key, event.value, event.headers)]
        return [event]

    def alerts(self, item: WorkItem) -> bool:
        """The alert rule: the post's label is the alert label, at the minimum probability or above."""
        s, result = self._settings, item.result
        return result is not None and result.label == s.alert_label and (
            float(dict(result.scores).get(s.alert_label, 0.0)) >= s.alert_min_probability
        )

    def _event(self, item: WorkItem, model: ModelInfo) -> Output:
        assert item.post is not None
        event = SentimentEvent(
            post_id=item.post.post_id,
            label=item.result.label,
            scores=Scores(**{name: float(p) for name, p in dict(item.result.scores).items()}),
            image_status=item.image_status,
            model=model,
            source=_source(item),
            scored_at=datetime.now(UTC),
        )
        headers = self._headers.carried(item.headers) + [(wire.MODEL, f"{model.name}:{model.version}".encode())]
        return Output(self._settings.output_topic, item.post.post_id.encode(), event.to_json_bytes(), headers)

    def _dead_letter(self, item: WorkItem) -> Output:
        assert item.error is not None
        letter = DeadLetter.for_record(
            code=item.error.code,
            message=item.error.message,
            source=_source(item),
            value=item.value,
            key=item.key,
            failed_at=datetime.now(UTC),
        )
        headers = self._headers.carried(item.headers) + _error_headers(item)
        return Output(self._settings.dlq_topic, item.key, letter.to_json_bytes(), headers)


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
