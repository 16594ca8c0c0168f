"""Per-partition done offsets; what may be committed is the contiguous low watermark.

Every record read is registered as pending; when its output (or dead letter) is acknowledged it is marked done.
The offset to commit for a partition is the lowest still-pending offset, or one past the highest done when
nothing is pending: never past a record whose output is not yet safe. Offsets may have gaps (transaction
markers, compaction), so "contiguous" is over the records read, not over the integers.

Each assignment of a partition gets a fresh `PartitionState`; work that carries a state which is no longer the
current one (the partition was revoked, or rewound) is stale and is dropped by the caller.

Hand-written on purpose: the stream libraries (quix-streams, faust) commit what was *read*, per poll; this service
must commit only what was *acknowledged*, out of order across concurrent batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING

TopicPartitionKey = tuple[str, int]


class PartitionState:
    """One assignment (a generation) of one partition."""

    __slots__ = ("committed", "dirty", "expected", "highest", "key", "pending", "uncommitted")

    def __init__(self, key: TopicPartitionKey) -> None:
        self.key = key
        self.pending: set[int] = set()
        self.highest = -1  # highest offset read in this generation
        self.committed: int | None = None  # the next offset to consume, as committed (or where reading began)
        self.dirty = False  # a commit failed: commit again even without progress
        # The offset the next record read should have: the committed offset at assignment, then one past the last
        # read. A record past it means records were skipped (consumer/lag.py tells retention from markers).
        self.expected: int | None = None
        # (offset, timestamp ms) of the records read and not yet committed, in offset order: the time lag
        self.uncommitted: deque[tuple[int, int]] = deque()

    def position(self) -> int | None:
        """The offset of the next record to read (the consumer's position in this generation), when known."""
        return self.highest + 1 if self.highest >= 0 else self.expected

    def oldest_uncommitted_ms(self) -> int | None:
        """The timestamp of the oldest record read and not yet committed; None when there is none."""
        return min((ts for _offset, ts in self.uncommitted), default=None)

    def low_watermark(self) -> int | None:
        if self.pending:
            return min(self.pending)
        if self.highest < 0:
            return None
        return self.highest + 1


class OffsetTracker:
    def __init__(self) -> None:
        self._states: dict[TopicPartitionKey, PartitionState] = {}

    def assign(self, key: TopicPartitionKey) -> PartitionState:
        state = PartitionState(key)
        self._states[key] = state
        return state

    def revoke(self, key: TopicPartitionKey) -> PartitionState | None:
        return self._states.pop(key, None)

    def state(self, key: TopicPartitionKey) -> PartitionState:
        """The current generation of a partition, creating one for a partition read without an assignment."""
        state = self._states.get(key)
        return state if state is not None else self.assign(key)

    def is_current(self, state: PartitionState) -> bool:
        return self._states.get(state.key) is state

    def register(self, state: PartitionState, offset: int, timestamp_ms: int | None = None) -> int | None:
        """Count a record read. Returns the offset it was expected at when records before it were skipped (a
        reset past deleted records, transaction markers, compaction), else None."""
        skipped_from = state.expected if state.expected is not None and offset > state.expected else None
        state.expected = offset + 1
        if state.committed is None:
            state.committed = offset  # everything before the first record read was committed already
        state.pending.add(offset)
        if offset > state.highest:
            state.highest = offset
        if timestamp_ms is not None:
            state.uncommitted.append((offset, timestamp_ms))
        return skipped_from

    def done(self, state: PartitionState, offset: int) -> bool:
        """Mark one record done; False when its partition generation is gone (the work was dropped)."""
        if not self.is_current(state):
            return False
        state.pending.discard(offset)
        return True

    @property
    def in_flight(self) -> int:
        return sum(len(state.pending) for state in self._states.values())

    def committable(self, keys: Iterable[TopicPartitionKey] | None = None) -> dict[TopicPartitionKey, int]:
        """Offsets (next to consume) that are ahead of what was committed, per partition."""
        result: dict[TopicPartitionKey, int] = {}
        for key in self._states if keys is None else keys:
            state = self._states.get(key)
            if state is None:
                continue
            low = state.low_watermark()
            if low is None or state.committed is None:
                continue
            if low > state.committed or (state.dirty and low >= state.committed):
                result[key] = low
        return result

    def committed_offsets(self, topic: str) -> dict[int, int]:
        """Per partition of `topic` read in this generation: the next offset to consume, as committed."""
        return {t_p[1]: state.committed for t_p, state in self._states.items()
                if t_p[0] == topic and state.committed is not None}

    def mark_committed(self, offsets: dict[TopicPartitionKey, int]) -> None:
        for key, offset in offsets.items():
            state = self._states.get(key)
            if state is not None and (state.committed is None or offset >= state.committed):
                state.committed = offset
                state.dirty = False
                while state.uncommitted and state.uncommitted[0][0] < offset:
                    state.uncommitted.popleft()

    def mark_dirty(self, keys: Iterable[TopicPartitionKey]) -> None:
        for key in keys:
            state = self._states.get(key)
            if state is not None:
                state.dirty = True

    def rewind(self) -> dict[TopicPartitionKey, int]:
        """Forget all work in flight: every partition gets a new generation. Returns where to seek each one."""
        positions: dict[TopicPartitionKey, int] = {}
        for key, state in list(self._states.items()):
            # Never committed: start over from the beginning, as `auto.offset.reset=earliest` did.
            positions[key] = state.committed if state.committed is not None else OFFSET_BEGINNING
            fresh = self.assign(key)
            fresh.committed = fresh.expected = state.committed
        return positions
