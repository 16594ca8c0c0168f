"""Backpressure: pause every assigned partition while too much work is in flight, resume when there is room.

The poll loop keeps calling `consume()` while paused (paused partitions return nothing), so heartbeats, rebalance
callbacks and `max.poll.interval.ms` are served and the group never evicts a slow consumer. Hysteresis: pause at
`high`, resume at `low`. Partitions assigned while paused are paused too: `on_assign` pauses them, and `update`
reconciles the whole assignment at the pause and then at most once every RECONCILE_S (asking librdkafka for the
assignment at every poll of a paused backlog cost the poll loop 6% of its time, py-spy, 2026-12-06).

Hand-written on purpose: librdkafka offers pause/resume, not a policy; the policy is this service's in-flight count.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from confluent_kafka import KafkaException, TopicPartition

RECONCILE_S = 1.0  # while paused, how often the assignment is checked for partitions that escaped `on_assign`


class PausableConsumer(Protocol):
    def assignment(self) -> list[TopicPartition]: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...
    def seek(self, partition: TopicPartition) -> None: ...


class PausingManager:
    def __init__(self, consumer: PausableConsumer, high: int, low: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if high < 1:
            raise ValueError("high must be at least 1")
        self._consumer = consumer
        self.high = high
        self.low = max(0, min(high - 1, high // 2 if low is None else low))
        self.paused = False
        self.forced = False  # paused for good (shutting down): never resumed by `update`
        self._paused_keys: set[tuple[str, int]] = set()
        self._clock = clock
        self._reconciled_at = -float("inf")
        self.pauses = 0
        self.resumes = 0

    @property
    def paused_partitions(self) -> int:
        return len(self._paused_keys)

    def room(self, in_flight: int) -> int:
        """How many more records may be read now."""
        return 0 if self.paused else max(0, self.high - in_flight)

    def update(self, in_flight: int) -> bool:
        """Pause or resume for the current amount of work in flight; returns whether consumption is paused."""
        if not self.paused and in_flight >= self.high:
            self.paused = True
            self.pauses += 1
            self._reconciled_at = -float("inf")  # pause everything now
        elif self.paused and not self.forced and in_flight <= self.low:
            self.paused = False
            self.resumes += 1
            self._resume_all()
        if self.paused and self._clock() - self._reconciled_at >= RECONCILE_S:
            self._pause_unpaused()
        return self.paused

    def pause_for_good(self) -> None:
        self.forced = True
        if not self.paused:
            self.paused = True
            self.pauses += 1
        self._pause_unpaused()

    def on_assign(self, partitions: Sequence[TopicPartition]) -> None:
        """Newly assigned (and already `assign()`ed) partitions get the current state explicitly: librdkafka
        keeps a partition's pause flag across a revoke and a re-assignment, so a partition paused before a
        rebalance would otherwise stay paused for good."""
        if not partitions:
            return
        if self.paused:
            self._consumer.pause(list(partitions))
            self._paused_keys.update((tp.topic, tp.partition) for tp in partitions)
        else:
            self._consumer.resume(list(partitions))

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions revoked: they are no longer ours to pause or resume."""
        for tp in partitions:
            self._paused_keys.discard((tp.topic, tp.partition))

    def _pause_unpaused(self) -> None:
        self._reconciled_at = self._clock()
        missing = [tp for tp in self._consumer.assignment() if (tp.topic, tp.partition) not in self._paused_keys]
        if missing:
            self._consumer.pause(missing)
            self._paused_keys.update((tp.topic, tp.partition) for tp in missing)

    def _resume_all(self) -> None:
        assigned = self._consumer.assignment()
        if assigned:
            self._consumer.resume(assigned)
            # librdkafka notices a resume only at its fetcher's next wake-up (up to a second); a seek to the
            # current position (nothing past it was handed out: pausing purged the prefetched records) wakes it.
            for tp in self._consumer.position(assigned):
                if tp.offset >= 0:
                    with contextlib.suppress(KafkaException):
                        self._consumer.seek(tp)
        self._paused_keys.clear()
