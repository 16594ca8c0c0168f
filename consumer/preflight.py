"""Start-up checks of what would be fatal for every record, made before the model loads and the first record is read.

    Settings ──▶ AdminClient.list_topics() ──┬─ credentials refused (SASL) ─────────────▶ ConfigurationError (exit 2)
                 (again every few seconds     ├─ an output topic missing ───────────────▶ ConfigurationError (exit 2)
                  while no broker answers,    ├─ the feedback topic (when set) missing ─▶ ConfigurationError (exit 2)
                  until stop)                 └─ describe_configs(max.message.bytes) ───▶ SizeLimits
                                                 (a broker that will not say: the producer's limit alone)

The output topics are the event, dead-letter, alert and shadow topics (the last two when set). A broker that does not
answer (down, or a TLS handshake that fails) is waited for, not refused: it may come back, and the consumer is simply
not ready meanwhile; a stop request ends the wait.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from consumer.errors import ConfigurationError
from consumer.fitting import SizeLimits
from consumer.kafkaconfig import PRODUCER_MESSAGE_MAX_BYTES, LibrdkafkaLog, client_config
from consumer.settings import Settings

log = structlog.get_logger("consumer")

METADATA_TIMEOUT_S = 5.0
AUTHENTICATION_CODES = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})


def output_topics(settings: Settings) -> list[str]:
    """Every topic the consumer produces to."""
    optional = [settings.alert_topic, settings.shadow_topic]
    return [settings.output_topic, settings.dlq_topic, *(topic for topic in optional if topic)]


def preflight(settings: Settings, stop: threading.Event) -> SizeLimits | None:
    """The output topics' size limits, once a broker has said that they all exist; None when stopped first.
    Raises `ConfigurationError` when the credentials are refused or a topic is missing."""
    refused: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        if error.code() in AUTHENTICATION_CODES:
            refused.append(error)

    config: dict[str, Any] = {**client_config(settings), "logger": LibrdkafkaLog(), "error_cb": on_error}
    admin = AdminClient(config)
    topics = output_topics(settings)
    while not stop.is_set():
        try:
            metadata = admin.list_topics(timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            admin.poll(0)  # serve error_cb: an authentication failure comes that way
            if refused or exc.args[0].code() in AUTHENTICATION_CODES:
                reason = refused[0] if refused else exc.args[0]
                raise ConfigurationError(f"the broker refused the credentials: {reason.str()}") from None
            log.warning("broker_not_answering", bootstrap=settings.kafka_bootstrap_servers, error=str(exc))
            continue
        missing = [t for t in topics if t not in metadata.topics or metadata.topics[t].error is not None]
        if missing:
            raise ConfigurationError(f"output topic(s) {', '.join(missing)} do not exist on "
                                     f"{settings.kafka_bootstrap_servers}: create them (mmsent never does)")
        feedback = settings.feedback_topic
        if feedback and (feedback not in metadata.topics or metadata.topics[feedback].error is not None):
            raise ConfigurationError(f"the feedback topic {feedback} (MMSENT_FEEDBACK_TOPIC) does not exist on "
                                     f"{settings.kafka_bootstrap_servers}: create it, or unset MMSENT_FEEDBACK_TOPIC")
        return SizeLimits(PRODUCER_MESSAGE_MAX_BYTES, _max_message_bytes(admin, topics))
    return None


def _max_message_bytes(admin: AdminClient, topics: list[str]) -> dict[str, int]:
    """Each topic's `max.message.bytes`, as far as the broker says (a topic it will not describe: unknown)."""
    limits: dict[str, int] = {}
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic) for topic in topics])
    for resource, future in futures.items():
        try:
            entry = future.result(METADATA_TIMEOUT_S).get("max.message.bytes")
            if entry is not None and entry.value is not None:
                limits[resource.name] = int(entry.value)
        except (KafkaException, ValueError, TimeoutError) as exc:
            log.warning("topic_size_limit_unknown", topic=resource.name, error=str(exc))
    log.info("output_size_limits", max_message_bytes=limits, producer_message_max_bytes=PRODUCER_MESSAGE_MAX_BYTES)
    return limits
