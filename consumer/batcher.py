"""Micro-batches across partitions: cut at `max_size` records or when the oldest has waited `max_wait_s`.

A `WorkItem` is one input record on its way through the stages: its coordinates, its partition generation (so
that work for a revoked partition can be recognised and dropped), the decoded post or the reason it is bad, and
what the stages found (image, result). A `Batch` keeps the `ServingModel` it was submitted with.

Hand-written on purpose: the batching in stream libraries is per partition or per poll; a model wants one batch
across partitions, cut by size or by the oldest record's wait.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from consumer.errors import Decision
from consumer.offsets import PartitionState, TopicPartitionKey
from consumer.protocols import ScoreResultLike, ScorerLike, ScoringModel
from schemas.models import Alert, ImageStatus, ModelInfo, PostEvent


@dataclass(slots=True, eq=False)
class WorkItem:
    state: PartitionState
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    received_at: float  # time.monotonic() when read
    timestamp_ms: int | None  # the record's Kafka timestamp, when it has one
    headers: list[tuple[str, str | bytes | None]] | None = None  # the record's headers, in order
    post: PostEvent | None = None
    error: Decision | None = None  # set: the record is dead-lettered (or skipped) instead of scored
    image: Any = None  # what the model gets: an embedding, a PIL image, header-checked bytes (a GPU scorer), or None
    image_status: ImageStatus = ImageStatus.NONE
    image_url_key: str | None = None  # the URL whose embedding this item's image is
    image_bytes: int = 0  # size of the encoded image, when it was had as bytes
    result: ScoreResultLike | None = None
    scored_by: ServingModel | None = None  # the model that scored it (a reload may swap models between batches)
    shadow_image: Any = None  # the decoded image, kept for a shadow model with another image encoder
    shadow_result: ScoreResultLike | None = None  # the shadow model's, when one is configured and did not fail
    shadow_by: ScoringModel | None = None  # the shadow.ShadowStage that scored it (its `info`, its `scorer`)
    language: str | None = None  # the caption's, ISO 639-1 (consumer/language.py), None when it cannot be told
    alert: Alert | None = None  # why it alerts, decided once when its batch completes (OutputBuilder.alert)

    @property
    def tp(self) -> TopicPartitionKey:
        return (self.topic, self.partition)

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"topic": self.topic, "partition": self.partition, "offset": self.offset}
        if self.post is not None:
            fields["post_id"] = self.post.post_id
        return fields


_batch_ids = itertools.count(1)


@dataclass(slots=True, eq=False)
class Batch:
    items: list[WorkItem]
    oldest_at: float
    cut_at: float
    full: bool = False  # cut at the size limit: there is a backlog
    model: ServingModel | None = None  # the model that scores it, set when it is submitted
    trace: Any = None  # its OpenTelemetry span, when tracing is on (consumer/tracing.py)
    batch_id: int = field(default_factory=lambda: next(_batch_ids))
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)


class BatchStage(Protocol):
    """What scores a batch: `stages.ModelStage`."""

    def run(self, batch: Batch) -> Batch: ...


@dataclass(frozen=True)
class ServingModel:
    """A loaded model as the pipeline uses it: its scorer, what its events say of it, and its own model stage (and
    so its own memory of recent embeddings). A batch keeps the one it was submitted with: a model reloaded meanwhile
    never mixes into it."""

    scorer: ScorerLike
    info: ModelInfo
    stage: BatchStage
    alert_threshold: float  # the alert label's probability at which a post it scores alerts

    @property
    def label(self) -> str:
        """`name:version`, as the `mmsent.model` header and the logs say it."""
        return f"{self.info.name}:{self.info.version}"


class MicroBatcher:
    def __init__(self, max_size: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: list[WorkItem] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: WorkItem) -> None:
        self._items.append(item)

    def time_to_deadline(self) -> float | None:
        """Seconds until the partial batch is due; None when empty."""
        if not self._items:
            return None
        return max(0.0, self._items[0].received_at + self.max_wait_s - self._clock())

    def ready(self, limit: int | None = None, partial_limit: int | None = None) -> list[Batch]:
        """Full batches, and the partial one when its oldest record has waited long enough; at most `limit`
        batches, and the partial one only as one of the first `partial_limit`.

        Records not cut stay here and the next batch grows: while the model is busy, waiting records make one
        bigger batch rather than a queue of small ones, which on a CPU cost more per post."""
        batches: list[Batch] = []
        room = len(self._items) if limit is None else limit
        while len(self._items) >= self.max_size and len(batches) < room:
            batches.append(self._cut(self.max_size))
        partial_room = room if partial_limit is None else min(room, partial_limit)
        due = self._items and self._clock() - self._items[0].received_at >= self.max_wait_s
        if due and len(batches) < partial_room:
            batches.append(self._cut(len(self._items)))
        return batches

    def flush(self) -> list[Batch]:
        batches: list[Batch] = []
        while self._items:
            batches.append(self._cut(min(self.max_size, len(self._items))))
        return batches

    def drop(self, keys: Collection[TopicPartitionKey] | None = None) -> int:
        """Forget the waiting records of these partitions (all when None); returns how many."""
        before = len(self._items)
        self._items = [] if keys is None else [item for item in self._items if item.tp not in keys]
        return before - len(self._items)

    def _cut(self, size: int) -> Batch:
        items, self._items = self._items[:size], self._items[size:]
        return Batch(items=items, oldest_at=items[0].received_at, cut_at=self._clock(), full=size == self.max_size)
