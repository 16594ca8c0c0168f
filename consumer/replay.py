"""`mmsent replay`: re-score the posts of a time window into another topic, under a consumer group of its own.

    --from T1 --to T2 ──▶ plan_window(): per partition, offsets_for_times(T1) .. offsets_for_times(T2) (or the end
                          as it stands now) ──▶ ReplayWindow
    Application(settings with the output topic, window=ReplayWindow):
        assigned ──▶ starts at the window (or where this replay's group committed: a rerun resumes)
        a record ──▶ in [T1, T2): scored, as the service scores it (fetch, cache, batches, dead letters)
                     in the offsets but out of time (out of order): skipped, done, no output
                     past the window's end: not read into the pipeline
        every partition's commit at its end ──▶ the application stops; exit 0

The window is an offset range found from record timestamps, so a record that a producer stamped out of order
(CreateTime) and that lies outside that range is not replayed; one inside it whose timestamp is outside [T1, T2)
is skipped. Alerts are off in a replay: old posts must not page anyone.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from tqdm import tqdm

from consumer.errors import Action, Decision

OUTSIDE_WINDOW = "outside_window"


@dataclass
class ReplayWindow:
    """Per partition, the offsets [start, end) whose records with timestamps in [from_ms, to_ms) are replayed; a
    rerun of the same replay starts where its group committed."""

    topic: str
    from_ms: int
    to_ms: int | None
    starts: dict[int, int]
    ends: dict[int, int]
    progress: Any = field(default=None, repr=False)  # a tqdm bar over the window's records

    @property
    def size(self) -> int:
        return sum(max(0, self.ends[p] - self.starts[p]) for p in self.ends)

    def start_offsets(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.starts[tp.partition]) for tp in partitions]

    def past_end(self, partition: int, offset: int) -> bool:
        return offset >= self.ends.get(partition, 0)

    def decision(self, timestamp_ms: int | None) -> Decision | None:
        """None: replay it. A skip for a record in the window's offsets whose timestamp is outside it."""
        in_time = timestamp_ms is not None and timestamp_ms >= self.from_ms and (
            self.to_ms is None or timestamp_ms < self.to_ms)
        return None if in_time else Decision(Action.SKIP, OUTSIDE_WINDOW, "record timestamp outside the window")

    def finished(self, committed: Mapping[int, int]) -> bool:
        """Every partition of the window committed up to its end."""
        return all(committed.get(p, -1) >= end for p, end in self.ends.items() if end > self.starts[p])

    def advance(self, records: int) -> None:
        if self.progress is not None:
            self.progress.update(records)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 time with its zone (`2026-12-01T00:00:00Z`); ValueError otherwise."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; RFC 3339 times end in Z or +HH:MM")
    return moment


def plan_window(client_config: dict[str, Any], topic: str, start: datetime, end: datetime | None, *,
                group: str = "mmsent-replay-planner", progress: bool = True) -> ReplayWindow:
    """The window's offsets, from the broker's index of record timestamps (ListOffsets by time), and where the
    replay's `group` had committed, asked before it joins (never inside a rebalance callback)."""
    from_ms = int(start.timestamp() * 1000)
    to_ms = None if end is None else int(end.timestamp() * 1000)
    consumer = Consumer({**client_config, "group.id": group, "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise LookupError(f"topic {topic!r} does not exist")
        partitions = sorted(metadata.topics[topic].partitions)
        highs = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        starts = _offsets_at(consumer, topic, from_ms, highs)
        ends = highs if to_ms is None else _offsets_at(consumer, topic, to_ms, highs)
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        consumer.close()
    for tp in committed:  # a rerun resumes where it stopped
        starts[tp.partition] = min(ends[tp.partition], max(starts[tp.partition], tp.offset))
    window = ReplayWindow(topic, from_ms, to_ms, starts, ends)
    window.progress = tqdm(total=window.size, unit="post", desc="replay", file=sys.stderr, disable=not progress)
    return window


def _offsets_at(consumer: Consumer, topic: str, at_ms: int, highs: Mapping[int, int]) -> dict[int, int]:
    """Per partition, the first offset whose timestamp is at or after `at_ms`; the end when there is none (-1)."""
    asked = [TopicPartition(topic, p, at_ms) for p in sorted(highs)]
    offsets = {tp.partition: highs[tp.partition] if tp.offset < 0 else tp.offset
               for tp in consumer.offsets_for_times(asked, timeout=10)}
    for partition, offset in offsets.items():
        if offset < highs[partition]:
            _check_stamp(consumer, TopicPartition(topic, partition, offset), at_ms)
    return offsets


def _check_stamp(consumer: Consumer, answer: TopicPartition, at_ms: int) -> None:
    """The record at the broker's answer must be stamped at or after `at_ms`: a broker that does not index
    timestamps (Tansu 0.6.0 answers 0 whatever the time) would otherwise make the window silently wrong."""
    consumer.assign([answer])
    message = consumer.poll(10)
    stamp = None if message is None or message.error() else message.timestamp()[1]
    if stamp is None or stamp < at_ms:
        raise LookupError(
            f"the broker answered offset {answer.offset} of {answer.topic}[{answer.partition}] for the time {at_ms} "
            f"ms, but that record is stamped {stamp}: it cannot find records by time (ListOffsets), so no window "
            "can be planned on it")
