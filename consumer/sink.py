"""The producer side: events, dead letters and alerts, acknowledged by all in-sync replicas.

At least once: an idempotent producer (acks=all, no duplicates from its own retries, order kept per partition);
the poll loop learns of each acknowledgement through the delivery callback, on its own thread (`poll`).
Exactly once: a transactional producer; the input offsets go into the same transaction
(`send_offsets_to_transaction` with the consumer's group metadata), so outputs and offsets commit together.
The producer's configuration is `consumer.kafkaconfig.producer_config`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.offsets import TopicPartitionKey
from consumer.outputs import Output

log = structlog.get_logger(__name__)

DeliveryCallback = Callable[[KafkaError | None, Message], None]

TRANSACTION_TIMEOUT_S = 10.0


class Sink:
    def __init__(self, config: Mapping[str, Any], *, producer_factory: Callable[..., Producer] = Producer) -> None:
        self._producer = producer_factory(dict(config))
        self._in_transaction = False

    # -- at least once and exactly once ---------------------------------------------------------------

    def produce(self, output: Output, on_delivery: DeliveryCallback | None = None) -> None:
        while True:
            try:
                self._producer.produce(
                    output.topic, value=output.value, key=output.key, headers=output.headers, on_delivery=on_delivery
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # the local queue is full: serve acknowledgements, then again

    def poll(self, timeout: float = 0.0) -> int:
        return int(self._producer.poll(timeout))

    def flush(self, timeout: float) -> int:
        """Wait for every acknowledgement (firing the callbacks); returns how many are still outstanding."""
        return int(self._producer.flush(max(0.0, timeout)))

    def abandon(self) -> None:
        """Drop a failed producer's queue without waiting or firing callbacks; the records will be redone."""
        # A producer in a fatal state may refuse even this; it is dropped all the same.
        with contextlib.suppress(KafkaException):
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)

    def __len__(self) -> int:
        return len(self._producer)

    # -- exactly once -----------------------------------------------------------------------------------

    def init_transactions(self, timeout: float = 30.0) -> None:
        """Registers the transactional id: fences any older producer with it and aborts its open transaction."""
        self._producer.init_transactions(timeout)

    def begin(self) -> None:
        self._producer.begin_transaction()
        self._in_transaction = True

    def send_offsets(self, offsets: Mapping[TopicPartitionKey, int], group_metadata: Any) -> None:
        partitions = [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]
        self._producer.send_offsets_to_transaction(partitions, group_metadata, TRANSACTION_TIMEOUT_S)

    def commit(self) -> None:
        self._producer.commit_transaction(TRANSACTION_TIMEOUT_S)
        self._in_transaction = False

    def abort(self) -> None:
        """Abort the open transaction (if any); retried while the client says the error is retriable."""
        if not self._in_transaction:
            return
        for _attempt in range(5):
            try:
                self._producer.abort_transaction(TRANSACTION_TIMEOUT_S)
                self._in_transaction = False
                return
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable():
                    raise
                log.warning("transaction_abort_retry", error=str(error))
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "abort_transaction kept timing out"))

    def close(self, timeout: float = 5.0) -> None:
        if self._in_transaction:
            try:
                self.abort()
            except KafkaException as exc:
                log.warning("transaction_abort_on_close_failed", error=str(exc))
        remaining = self.flush(timeout)
        if remaining:
            log.warning("producer_closed_with_unacknowledged", count=remaining)
