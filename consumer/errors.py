"""Typed failures of the consumer, and the typed callbacks that decide what a failure means for one record.

Three outcomes for a record that cannot be scored normally: `dead_letter` (the default: the record goes to the
dead-letter topic with a stable code, and its offset counts as done), `skip` (counted done, nothing produced) and
`fatal` (the service stops; nothing past the last committed offset is lost, it is redelivered).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError

if TYPE_CHECKING:
    from schemas.decode import BadRecord


class ConsumerError(Exception):
    """Base of the consumer's own exceptions."""


class FatalError(ConsumerError):
    """The service cannot go on safely; it stops, commits what is done and exits non-zero."""


class DeliveryFailed(FatalError):
    """The broker did not acknowledge an output after the producer's own retries."""


class ConfigurationError(FatalError):
    """Fatal for every record, found at start-up: a topic that does not exist, credentials the broker refuses.
    `Application.run()` returns `EXIT_CONFIGURATION` for it."""


class InvalidScores(ConsumerError):
    """The model gave a post scores that are not probabilities (NaN, infinite, negative, not summing to 1).
    Raised inside the model stage's bisection, so the post that causes them is found."""


EXIT_FAILURE = 1  # a fatal error while running (the records past the last commit are read again)
EXIT_CONFIGURATION = 2  # refused at start-up: fatal for every record, restarting cannot help


class Action(StrEnum):
    DEAD_LETTER = "dead_letter"
    SKIP = "skip"
    FATAL = "fatal"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    code: str
    message: str


MODEL_ERROR = "model_error"  # the model raised on this post alone
NON_FINITE_SCORES = "non_finite_scores"  # the model gave this post alone scores that are not probabilities
INTERNAL_ERROR = "internal_error"  # an unexpected exception while handling this record (decoding, building outputs)
OUTPUT_REFUSED = "output_refused"  # the broker refused this record's event or dead letter (size, content)


def dead_letter_bad_records(error: BadRecord, record: Any) -> Decision:
    """Default for records that are not posts: dead-letter with the decoder's stable code."""
    return Decision(Action.DEAD_LETTER, error.code, error.message)


def dead_letter_poison_posts(error: BaseException, record: Any) -> Decision:
    """Default for a single post that makes the model raise or give scores that are not probabilities (found by
    bisecting its batch)."""
    code = NON_FINITE_SCORES if isinstance(error, InvalidScores) else MODEL_ERROR
    return Decision(Action.DEAD_LETTER, code, f"{type(error).__name__}: {error}"[:2000])


def stop_on_delivery_failure(error: KafkaError, record: Any) -> Decision:
    """Default for an output the broker refused for good: stop (at-least-once redelivers the record)."""
    return Decision(Action.FATAL, "delivery_failed", str(error))


DecodeErrorCallback = Callable[["BadRecord", Any], Decision]
ModelErrorCallback = Callable[[BaseException, Any], Decision]
DeliveryErrorCallback = Callable[[KafkaError, Any], Decision]


@dataclass(frozen=True, slots=True)
class ErrorPolicy:
    """The three typed callbacks, in one place; `Application` takes one."""

    on_bad_record: DecodeErrorCallback = dead_letter_bad_records
    on_model_error: ModelErrorCallback = dead_letter_poison_posts
    on_delivery_error: DeliveryErrorCallback = stop_on_delivery_failure


# Commit failures that only mean "a rebalance happened under you": log them, the records are redelivered.
_REBALANCE_CODE_NAMES = (
    "ILLEGAL_GENERATION",
    "REBALANCE_IN_PROGRESS",
    "UNKNOWN_MEMBER_ID",
    "FENCED_INSTANCE_ID",
    "STALE_MEMBER_EPOCH",
    "_ASSIGNMENT_LOST",
    "_STATE",
)
REBALANCE_COMMIT_CODES = frozenset(
    getattr(KafkaError, name) for name in _REBALANCE_CODE_NAMES if hasattr(KafkaError, name)
)


def is_rebalance_error(error: KafkaError | None) -> bool:
    return error is not None and error.code() in REBALANCE_COMMIT_CODES
