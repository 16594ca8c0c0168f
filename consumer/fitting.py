"""Outputs that always fit: one error boundary per record, and outputs the broker will take.

    WorkItem ──▶ OutputFitter.outputs() ─┬─ refused by the broker before? ──▶ output_refused dead letter
                                         │                                    (the second time: value, key and
                                         │                                     input headers all left out)
                                         ├─ OutputBuilder.build() raised ───▶ internal_error dead letter
                                         ├─ a dead letter ──────────────────▶ fit_dead_letter()
                                         └─ events ── one over SizeLimits ──▶ output_refused dead letter
                                                     (a shadow event: left out)

    fit_dead_letter: the whole record when it fits; else the room left beside the error is shared out among the
    value, the key and the input headers (the smallest first, each at most an equal share of what is left): value and
    key cut (`value_truncated` / `key_truncated`, with the original sizes), input headers dropped last-first
    (`mmsent.headers.dropped` says how many).

`SizeLimits` holds the most bytes each output topic takes: the producer's `message.max.bytes` and the topics'
`max.message.bytes` (read at start-up, `consumer.preflight`), lowered when the broker answers `MSG_SIZE_TOO_LARGE`.
`Refusals` remembers the records whose output the broker refused (any size or content code), so that the next
build of the record, in this pass (at least once) or after the transaction's abort (exactly once), is the smaller
dead letter: nothing loops, nothing raises on the poll thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaError

from consumer.batcher import WorkItem
from consumer.errors import INTERNAL_ERROR, OUTPUT_REFUSED, Action, Decision
from consumer.kafkaconfig import PRODUCER_MESSAGE_MAX_BYTES
from consumer.outputs import Keep, Output, OutputBuilder

log = structlog.get_logger("consumer")

# What a record costs beyond its key, value and header bytes (batch header, varints, attributes), generously.
RECORD_OVERHEAD = 512
HEADER_OVERHEAD = 16  # per header: its varints
# A size refusal lowers the topic's limit to this share of the refused output: from the producer's 1 MB to a topic
# of 64 KB in four refusals, once per topic.
SHRINK_ON_REFUSAL = 0.5
# From this refusal of one record on, its dead letter keeps nothing of it (a broker that refuses its content).
BARE_AFTER = 6
MAX_MESSAGE_CHARS = 2_000
REMEMBERED_REFUSALS = 10_000

# The broker (or the client, before sending) refuses this output, not the producer: a smaller dead letter will do.
SIZE_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})
REFUSAL_CODES = SIZE_CODES | {KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG, KafkaError.POLICY_VIOLATION,
                              KafkaError._BAD_MSG, KafkaError._INVALID_ARG}


def is_refusal(error: KafkaError) -> bool:
    """The broker (or the client) refuses this one output for its size or content; other outputs go on."""
    return error.code() in REFUSAL_CODES


def output_size(output: Output) -> int:
    """What the record weighs against `message.max.bytes` / `max.message.bytes`, before compression."""
    return len(output.key or b"") + len(output.value) + _headers_size(output.headers)


def _headers_size(headers: Sequence[tuple[str, str | bytes | None]]) -> int:
    return sum(_header_size(header) for header in headers)


def _header_size(header: tuple[str, str | bytes | None]) -> int:
    name, value = header
    return len(name.encode()) + len(value.encode() if isinstance(value, str) else value or b"") + HEADER_OVERHEAD


def _b64_size(count: int) -> int:
    return 4 * ((count + 2) // 3)


class SizeLimits:
    """The most bytes an output record may have, per topic: learned at start-up, lowered by refusals."""

    def __init__(self, producer_max: int = PRODUCER_MESSAGE_MAX_BYTES, topics: Mapping[str, int] | None = None):
        self._producer_max = producer_max
        self._topics = dict(topics or {})

    def budget(self, topic: str) -> int:
        return min(self._producer_max, self._topics.get(topic, self._producer_max)) - RECORD_OVERHEAD

    def fits(self, output: Output) -> bool:
        return output_size(output) <= self.budget(output.topic)

    def learn(self, output: Output) -> None:
        """The broker refused `output` for its size: the topic takes less than we thought."""
        limit = int((output_size(output) + RECORD_OVERHEAD) * SHRINK_ON_REFUSAL)
        self._topics[output.topic] = min(limit, self._topics.get(output.topic, self._producer_max))
        log.warning("output_size_limit_learned", topic=output.topic, max_bytes=self._topics[output.topic])


@dataclass(frozen=True, slots=True)
class Refusal:
    count: int  # how many outputs of this record the broker refused
    reason: str


class Refusals:
    """The records whose outputs the broker refused, by input coordinates (bounded: the oldest are forgotten)."""

    def __init__(self, size: int = REMEMBERED_REFUSALS) -> None:
        self._size = size
        self._refused: OrderedDict[tuple[str, int, int], Refusal] = OrderedDict()

    def add(self, item: WorkItem, reason: str) -> None:
        key = (item.topic, item.partition, item.offset)
        before = self._refused.pop(key, None)  # its reason stays: it names what the record first was
        self._refused[key] = Refusal(1, reason) if before is None else Refusal(before.count + 1, before.reason)
        while len(self._refused) > self._size:
            self._refused.popitem(last=False)

    def get(self, item: WorkItem) -> Refusal | None:
        return self._refused.get((item.topic, item.partition, item.offset))

    def forget(self, item: WorkItem) -> None:
        self._refused.pop((item.topic, item.partition, item.offset), None)


def internal_error(exc: BaseException, item: WorkItem, during: str) -> Decision:
    """An unexpected exception while handling one record: that record is dead-lettered, the loop goes on."""
    log.error("record_failed", code=INTERNAL_ERROR, during=during, error=repr(exc)[:500], **item.log_fields())
    return Decision(Action.DEAD_LETTER, INTERNAL_ERROR, f"{during}: {type(exc).__name__}: {exc}"[:MAX_MESSAGE_CHARS])


class OutputFitter:
    """What a record produces, never raising and always within the topics' size limits."""

    def __init__(self, builder: OutputBuilder, limits: SizeLimits, refusals: Refusals | None = None) -> None:
        self.builder = builder
        self.limits = limits
        self.refusals = refusals or Refusals()

    def outputs(self, item: WorkItem) -> list[Output]:
        refusal = self.refusals.get(item)
        if refusal is not None:
            item.error = Decision(Action.DEAD_LETTER, OUTPUT_REFUSED, refusal.reason[:MAX_MESSAGE_CHARS])
            return [self.dead_letter(item, bare=refusal.count >= BARE_AFTER)]
        try:
            outputs = self.builder.build(item)
        except Exception as exc:  # a value the output models refuse, a bug: this record's, not the loop's
            item.error = internal_error(exc, item, "building its outputs")
            return [self.dead_letter(item)]
        if item.error is not None:
            return [self.dead_letter(item)] if outputs else []
        return self._events_that_fit(item, outputs)

    def refused(self, item: WorkItem, output: Output, error: KafkaError) -> None:
        """The broker (or the client) refused one of the record's outputs: its next build is a smaller dead letter."""
        if error.code() in SIZE_CODES:
            self.limits.learn(output)
        what = "dead letter" if item.error is not None else "event"
        was = f" (it was a dead letter for {item.error.code})" if item.error is not None else ""
        self.refusals.add(item, f"the broker refused its {what} to {output.topic} of {output_size(output)} bytes"
                                f"{was}: {error.str()}")

    def _events_that_fit(self, item: WorkItem, outputs: list[Output]) -> list[Output]:
        too_big = [o for o in outputs if not o.best_effort and not self.limits.fits(o)]
        if too_big:
            first = too_big[0]
            reason = (f"its event is {output_size(first)} bytes, more than the {self.limits.budget(first.topic)} "
                      f"that {first.topic} takes")
            item.error = Decision(Action.DEAD_LETTER, OUTPUT_REFUSED, reason)
            log.warning("output_too_large", reason=reason, **item.log_fields())
            return [self.dead_letter(item)]
        for shadow in (o for o in outputs if o.best_effort and not self.limits.fits(o)):
            log.warning("shadow_event_too_large", bytes=output_size(shadow), **item.log_fields())
        return [o for o in outputs if not o.best_effort or self.limits.fits(o)]

    def dead_letter(self, item: WorkItem, *, bare: bool = False) -> Output:
        """The record's dead letter, whole when it fits, else cut to fit (`bare`: value, key, input headers left
        out). A dead letter the builder cannot make at all (a policy's odd decision) is an internal error's."""
        try:
            return self._fitted(item, bare=bare)
        except Exception as exc:
            item.error = internal_error(exc, item, "building its dead letter")
            return self._fitted(item, bare=True)

    def _fitted(self, item: WorkItem, *, bare: bool) -> Output:
        if not bare:
            whole = self.builder.dead_letter(item)
            if self.limits.fits(whole):
                return whole
        headers = self.builder.carried(item)
        least = self.builder.dead_letter(item, Keep(value=0, key=0, headers=0))
        if bare:
            return least
        room = self.limits.budget(least.topic) - output_size(least)
        keep = _share_out(room, item.value or b"", item.key or b"", headers)
        return self.builder.dead_letter(item, keep)


def _share_out(room: int, value: bytes, key: bytes, headers: Sequence[tuple[str, str | bytes | None]]) -> Keep:
    """How much of the value, key and input headers fit in `room` bytes beside the rest of the dead letter: the
    smallest demand first, each taking at most an equal share of what is left (what it leaves goes to the others).
    The value costs its base64; the key its base64 in the letter and itself as the record's key."""
    costs = [_header_size(header) for header in headers]

    def take_headers(share: int) -> tuple[int, int]:
        kept, used = 0, 0
        while kept < len(costs) and used + costs[kept] <= share:
            used += costs[kept]
            kept += 1
        return kept, used

    def take_value(share: int) -> tuple[int, int]:
        kept = min(len(value), share // 4 * 3)
        return kept, _b64_size(kept)

    def take_key(share: int) -> tuple[int, int]:
        kept = min(len(key), share * 3 // 7)
        while kept and kept + _b64_size(kept) > share:
            kept -= 1
        return kept, kept + _b64_size(kept)

    parts: dict[str, tuple[int, Callable[[int], tuple[int, int]]]] = {
        "headers": (sum(costs), take_headers),
        "value": (_b64_size(len(value)), take_value),
        "key": (len(key) + _b64_size(len(key)), take_key),
    }
    kept: dict[str, int] = {}
    left = max(0, room)
    for index, (name, (_demand, take)) in enumerate(sorted(parts.items(), key=lambda part: part[1][0])):
        kept[name], used = take(left // (len(parts) - index))
        left -= used
    return Keep(value=kept["value"], key=kept["key"], headers=kept["headers"])
