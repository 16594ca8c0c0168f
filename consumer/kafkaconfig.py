"""Every librdkafka configuration of the service, in one place: the consumer's, the producer's, the security
settings (librdkafka's names), this member's identity, and librdkafka's own log lines as structlog lines.

    Settings ──▶ client_config() ──┬──▶ consumer_config()  (group, static membership, manual commits)
                                   ├──▶ feedback_consumer_config()  (the verdicts' own group, stored offsets)
                                   └──▶ producer_config()  (idempotent, acks=all; transactional in exactly-once)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import KafkaError
from pydantic import SecretStr

from consumer.settings import ProcessingGuarantee, Settings

log = structlog.get_logger("consumer")

# The settings that go to librdkafka under their own names: kafka_security_protocol=SASL_SSL becomes
# {"security.protocol": "SASL_SSL"}.
SECURITY_PREFIXES = ("kafka_security_", "kafka_sasl_", "kafka_ssl_")
# The most bytes one produced record may have (librdkafka's default, set explicitly: `consumer.fitting` fits every
# output under it and under the topics' own `max.message.bytes`).
PRODUCER_MESSAGE_MAX_BYTES = 1_000_000


class LibrdkafkaLog:
    """librdkafka's own log lines, as structlog lines."""

    def log(self, level: int, message: str, *args: Any) -> None:
        text = message % args if args else message
        if level >= 40:
            log.error("librdkafka", detail=text)
        elif level >= 30:
            log.warning("librdkafka", detail=text)
        else:
            log.debug("librdkafka", detail=text)


def client_config(settings: Settings) -> dict[str, str]:
    """What consumer, producer and admin share: the brokers and the security settings that are set."""
    config = {"bootstrap.servers": settings.kafka_bootstrap_servers}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name.startswith(SECURITY_PREFIXES) and value is not None:
            secret = value.get_secret_value() if isinstance(value, SecretStr) else value
            config[name.removeprefix("kafka_").replace("_", ".")] = secret
    return config


def member_identity(settings: Settings) -> str:
    """A stable name for this process: the static member id, else the pod or host name."""
    return (
        settings.group_instance_id or os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
    )


def transactional_id(settings: Settings) -> str:
    """`MMSENT_TRANSACTIONAL_ID`, or one derived from the group and this member's stable identity.

    Stable across restarts, so a restarted member fences its dead predecessor and aborts its open transaction
    at once; distinct per member, so two live members never fence each other (on one host, set it per process).
    """
    return settings.transactional_id or f"mmsent-{settings.group_id}-{member_identity(settings)}"


def consumer_config(settings: Settings, **callbacks: Any) -> dict[str, Any]:
    """Manual, contiguous commits (the offset tracker decides what is done); read_committed for exactly-once inputs;
    cooperative rebalancing by default (incremental assign and revoke: partitions that stay put keep flowing).

    `MMSENT_GROUP_INSTANCE_ID` makes the membership static (KIP-345): a restarted member with the same id takes
    its partitions back at once, without a rebalance."""
    config: dict[str, Any] = {
        **client_config(settings),
        "group.id": settings.group_id,
        "client.id": f"mmsent-{member_identity(settings)}-{os.getpid()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "partition.assignment.strategy": settings.kafka_assignment_strategy,
        "heartbeat.interval.ms": 1_000,
        "max.poll.interval.ms": 300_000,
        "statistics.interval.ms": 5_000,
        "fetch.wait.max.ms": 100,
        "logger": LibrdkafkaLog(),
        **callbacks,
    }
    if settings.group_instance_id:
        config["group.instance.id"] = settings.group_instance_id
    return config


def feedback_consumer_config(settings: Settings, **callbacks: Any) -> dict[str, Any]:
    """The feedback joiner's consumer (consumer/feedback.py): a group of its own, `<group>.feedback`, whose
    offsets are stored once a verdict is counted and committed in the background (at least once); a new group
    starts at the topic's end."""
    config = {
        **consumer_config(settings, **callbacks),
        "group.id": f"{settings.group_id}.feedback",
        "client.id": f"mmsent-feedback-{member_identity(settings)}-{os.getpid()}",
        "enable.auto.commit": True,
        "auto.offset.reset": "latest",
        "statistics.interval.ms": 0,
    }
    config.pop("group.instance.id", None)  # static membership is the scoring group's
    return config


def producer_config(settings: Settings, error_cb: Callable[[KafkaError], None] | None = None) -> dict[str, Any]:
    """Idempotent, acks=all (no duplicates from its own retries, order kept per partition); transactional in
    exactly-once mode."""
    config: dict[str, Any] = {
        **client_config(settings),
        "client.id": f"mmsent-producer-{member_identity(settings)}-{os.getpid()}",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "message.max.bytes": PRODUCER_MESSAGE_MAX_BYTES,
        "logger": LibrdkafkaLog(),
    }
    if settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE:
        config["transactional.id"] = transactional_id(settings)
        config["transaction.timeout.ms"] = 60_000
    if error_cb is not None:
        config["error_cb"] = error_cb
    return config
