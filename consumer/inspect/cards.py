"""From Kafka records to the console's cards: the join of each event (or dead letter) with its input post.

    input record ──▶ PostCache.remember()    (partition, offset) -> Post, bounded (the oldest go first)
    event / alert / dead letter ──▶ Record ──▶ Joiner.add() ──▶ Card (caption, image URL, latency from the post)
                                                  └─ post not read yet: waits in `pending` up to JOIN_WAIT_S

Nothing here trusts a record: a value that is not JSON, an object of the wrong shape, huge strings, every one
ends as a card (or, for an input, as a post without a caption); nothing raises. A card is plain JSON for the
browser, which renders every string it holds as text.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from schemas import headers as wire

# What a card keeps of strangers' text: enough to read, never megabytes.
MAX_CAPTION_CHARS = 2_000
MAX_URL_CHARS = 2_048
MAX_HEADER_CHARS = 512
MAX_HEADERS = 32
MAX_VALUE_BYTES = 256 * 1024  # an input or event value larger than this is not parsed (its card says so)
MAX_PREVIEW_CHARS = 4_000  # a dead letter's base64 value, as shown
JOIN_WAIT_S = 3.0  # an event whose post has not been read yet waits this long for it, then shows without it


class Kind(StrEnum):
    EVENT = "event"
    ALERT = "alert"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record, as the tail read it (the client's message, copied out)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    value: bytes | None
    headers: Sequence[tuple[str, str | bytes | None]] = ()


@dataclass(frozen=True, slots=True)
class Post:
    """What the console keeps of an input record: its caption and image URL (cut), and when it was written."""

    post_id: str | None
    caption: str | None
    image_url: str | None
    timestamp_ms: int | None


def parse_object(value: bytes | None) -> dict[str, Any] | None:
    """A JSON object from a record value, or None: absent, too large, not JSON, not an object."""
    if value is None or len(value) > MAX_VALUE_BYTES:
        return None
    try:
        # NaN and Infinity literals become null: the browser's JSON.parse would refuse the whole batch.
        parsed = json.loads(value, parse_constant=lambda _literal: None)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return parsed if isinstance(parsed, dict) else None


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def post_of(record: Record) -> Post:
    body = parse_object(record.value) or {}
    return Post(_text(body.get("post_id"), 256), _text(body.get("text"), MAX_CAPTION_CHARS),
                _text(body.get("image_url"), MAX_URL_CHARS), record.timestamp_ms)


class PostCache:
    """The recent input posts by (partition, offset), at most `capacity`; the oldest are forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._posts: OrderedDict[tuple[int, int], Post] = OrderedDict()

    def remember(self, record: Record) -> tuple[int, int]:
        key = (record.partition, record.offset)
        self._posts[key] = post_of(record)
        self._posts.move_to_end(key)
        while len(self._posts) > self.capacity:
            self._posts.popitem(last=False)
        return key

    def get(self, partition: int, offset: int) -> Post | None:
        return self._posts.get((partition, offset))

    def __len__(self) -> int:
        return len(self._posts)


def card_id(partition: int, offset: int) -> str:
    """The card's id: its input record's coordinates (an event and its alert share it)."""
    return f"{partition}-{offset}"


def _headers(record: Record) -> list[list[str]]:
    shown = []
    for name, raw in list(record.headers)[:MAX_HEADERS]:
        value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or "")
        shown.append([str(name)[:MAX_HEADER_CHARS], value[:MAX_HEADER_CHARS]])
    return shown


def _header(record: Record, name: str) -> str | None:
    for key, raw in record.headers:
        if key == name:
            return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return None


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header (version-traceid-spanid-flags), or None."""
    parts = (traceparent or "").strip().split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return parts[1]
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _top(scores: Any) -> tuple[str | None, float | None]:
    """The label with the highest probability of a scores object, and that probability."""
    if not isinstance(scores, Mapping):
        return None, None
    numbers = {str(k): v for k, v in scores.items() if _number(v) is not None}
    if not numbers:
        return None, None
    label = max(numbers, key=lambda k: numbers[k])
    return label, float(numbers[label])


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _source(body: Mapping[str, Any]) -> tuple[int, int] | None:
    source = _mapping(body.get("source"))
    partition, offset = source.get("partition"), source.get("offset")
    if isinstance(partition, int) and isinstance(offset, int) and not isinstance(partition, bool) \
            and not isinstance(offset, bool) and partition >= 0 and offset >= 0:
        return partition, offset
    return None


def _agreement(body: Mapping[str, Any], text_label: str | None, image_label: str | None) -> bool | None:
    """The event's `modalities_agree` when it has one; else what its per-modality scores say (null with one)."""
    if "modalities_agree" in body:
        agree = body["modalities_agree"]
        return agree if isinstance(agree, bool) else None
    return None if text_label is None or image_label is None else text_label == image_label


def _shown_event(body: dict[str, Any]) -> dict[str, Any]:
    """The event as the card's detail shows it: a dead letter's base64 value cut to a preview."""
    value = body.get("value_b64")
    if isinstance(value, str) and len(value) > MAX_PREVIEW_CHARS:
        return {**body, "value_b64": value[:MAX_PREVIEW_CHARS] + "..."}
    return body


def build_card(record: Record, kind: Kind, post: Post | None) -> dict[str, Any]:
    """The card of one output record, joined with its post when the post is known. Never raises."""
    body = parse_object(record.value)
    if body is None:
        body = {"unreadable": True, "size": len(record.value or b"")}
    source = _source(body)
    by_modality = _mapping(body.get("scores_by_modality"))
    text_label, _ = _top(by_modality.get("text"))
    image_label, _ = _top(by_modality.get("image"))
    label = _text(body.get("label"), 32)
    scores, model, error = _mapping(body.get("scores")), _mapping(body.get("model")), _mapping(body.get("error"))
    alert = body.get("alert") if isinstance(body.get("alert"), Mapping) else None
    source_ms = post.timestamp_ms if post else _int(_header(record, wire.SOURCE_TIMESTAMP))
    latency = record.timestamp_ms - source_ms if record.timestamp_ms and source_ms else None
    return {
        "id": card_id(*source) if source else f"x-{record.topic}-{record.partition}-{record.offset}",
        "kind": Kind.DEAD_LETTER.value if kind is Kind.DEAD_LETTER else Kind.EVENT.value,
        "alert": kind is Kind.ALERT,
        "reason": alert,
        "post_id": _text(body.get("post_id"), 256) or (post.post_id if post else None),
        "joined": post is not None,
        "caption": post.caption if post else None,
        "image_url": post.image_url if post else None,  # shown as text; the page loads /thumb/<id> instead
        "label": label,
        "probability": _number(scores.get(label)) if label else None,
        "text_label": text_label,
        "image_label": image_label,
        "agree": _agreement(body, text_label, image_label),
        "image_status": _text(body.get("image_status"), 32),
        "model": _text(model.get("name"), 128),
        "model_version": _text(model.get("version"), 128),
        "has_language": "language" in body,  # events before the field existed: shown as absent, not as unsure
        "language": _text(body.get("language"), 16),
        "language_supported": body.get("language_supported") if isinstance(body.get("language_supported"),
                                                                          bool) else None,
        "latency_ms": latency if latency is None or latency >= 0 else 0,
        "source": {"partition": source[0], "offset": source[1]} if source else None,
        "at": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
        "time_ms": record.timestamp_ms,
        "error_code": _text(error.get("code"), 128),
        "error_message": _text(error.get("message"), 1_024),
        "headers": _headers(record),
        "trace_id": trace_id(_header(record, wire.TRACEPARENT)),
        "event": _shown_event(body),
    }


def _int(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() else None


@dataclass
class Joiner:
    """Joins output records with the posts of the `PostCache`; what cannot be joined yet waits a little."""

    posts: PostCache
    wait_s: float = JOIN_WAIT_S
    pending: dict[tuple[int, int], list[tuple[float, Record, Kind]]] = field(default_factory=dict)

    def add(self, record: Record, kind: Kind, now: float | None = None) -> dict[str, Any] | None:
        """The card, or None while it waits for its post."""
        body = parse_object(record.value)
        source = _source(body) if body else None
        post = self.posts.get(*source) if source else None
        if source is None or post is not None:
            return build_card(record, kind, post)
        self.pending.setdefault(source, []).append((time.monotonic() if now is None else now, record, kind))
        return None

    def settle(self, now: float | None = None) -> Iterator[dict[str, Any]]:
        """The cards whose post has arrived since, and those that waited long enough (without their post)."""
        now = time.monotonic() if now is None else now
        for source in list(self.pending):
            post = self.posts.get(*source)
            waiting = self.pending[source]
            if post is None and now - waiting[0][0] < self.wait_s:
                continue
            del self.pending[source]
            for _since, record, kind in waiting:
                yield build_card(record, kind, post)
