"""Helpers for the consumer tests: synthetic posts, settings, the consumer in a thread or in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumer.app import Application
from consumer.settings import Settings
from schemas.models import DeadLetter, SentimentEvent
from tests.kafkautil import Record, committed_offsets, end_offsets, read_all

REPO = Path(__file__).resolve().parents[1]
# Which broker `kafka_bootstrap` is (tests/conftest.py): noida-db unless the environment names another.
ON_NOIDA_DB = not os.environ.get("MMSENT_TEST_KAFKA_BOOTSTRAP") and os.environ.get("MMSENT_TEST_KAFKA") not in (
    "testcontainers", "tansu")
# noida-db 0.2.3 never completes cooperative-sticky's second join round (a joining member waits in JoinGroup for
# good), so groups on it run eager; every other broker runs the service's default, cooperative-sticky.
# tests/test_rebalance.py runs both strategies on Tansu.
TEST_ASSIGNMENT_STRATEGY = "range" if ON_NOIDA_DB else "cooperative-sticky"


@dataclass
class Topics:
    posts: str
    sentiment: str
    dlq: str
    alerts: str
    group: str

    @classmethod
    def named(cls, prefix: str) -> Topics:
        return cls(f"{prefix}-posts", f"{prefix}-sentiment", f"{prefix}-dlq", f"{prefix}-alerts", f"{prefix}-group")


def settings_env(bootstrap: str, topics: Topics, redis_url: str | None, **extra: Any) -> dict[str, str]:
    """The MMSENT_* variables of a consumer for these topics (images from 127.0.0.1 allowed, nothing else)."""
    env = {
        "MMSENT_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MMSENT_INPUT_TOPIC": topics.posts,
        "MMSENT_OUTPUT_TOPIC": topics.sentiment,
        "MMSENT_DLQ_TOPIC": topics.dlq,
        "MMSENT_GROUP_ID": topics.group,
        "MMSENT_REDIS_URL": redis_url or "",
        "MMSENT_MODEL": "tiny-random",
        "MMSENT_METRICS_PORT": "0",
        "MMSENT_METRICS_HOST": "127.0.0.1",
        "MMSENT_FETCH_ALLOW_PRIVATE": "false",
        "MMSENT_FETCH_ALLOW_CIDRS": "127.0.0.1/32",
        "MMSENT_FETCH_RETRIES": "0",
        "MMSENT_MAX_BATCH_SIZE": "16",
        "MMSENT_MAX_WAIT_MS": "20",
        "MMSENT_SHUTDOWN_GRACE_S": "10",
        "MMSENT_KAFKA_ASSIGNMENT_STRATEGY": TEST_ASSIGNMENT_STRATEGY,
    }
    env.update({f"MMSENT_{name.upper()}": str(value) for name, value in extra.items()})
    return env


def make_settings(env: dict[str, str]) -> Settings:
    values: dict[str, Any] = {k.removeprefix("MMSENT_").lower(): v for k, v in env.items()}
    if not values.get("redis_url"):
        values["redis_url"] = None
    return Settings(**values)


def post(post_id: str, text: str, image_url: str | None = None, **other: Any) -> bytes:
    return json.dumps({"post_id": post_id, "text": text, "image_url": image_url, **other}).encode()


def synthetic_posts(count: int, image_url: Callable[[int], str | None], prefix: str = "p") -> list[bytes]:
    words = ["great", "awful", "fine", "sunny", "sad", "lovely", "broken", "okay", "happy", "angry"]
    return [
        post(f"{prefix}{i}", " ".join(words[(i + j) % len(words)] for j in range(1 + i % 13)), image_url(i),
             created_at="2026-01-01T00:00:00Z", extra_field=i)
        for i in range(count)
    ]


def keys_for(values: Sequence[bytes | None], prefix: str = "k") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(len(values))]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def all_committed(bootstrap: str, topics: Topics) -> bool:
    """Every record of the input topic is committed. A partition that never held a record has nothing to commit
    (and no committed offset), so only partitions with records count."""
    committed = committed_offsets(bootstrap, topics.group, topics.posts)
    return all(committed.get(partition, -1) >= end for partition, end in end_offsets(bootstrap, topics.posts).items()
               if end > 0)


def committed_total(bootstrap: str, topics: Topics) -> int:
    return sum(max(0, offset) for offset in committed_offsets(bootstrap, topics.group, topics.posts).values())


@contextlib.contextmanager
def app_in_thread(settings: Settings, *, serve_http: bool = False, **kwargs: Any) -> Iterator[Application]:
    """An `Application` running on a thread; stopped (drain, commit, close) on exit; its exit code is `.rc`."""
    app = Application(settings, serve_http=serve_http, **kwargs)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", app.run()), name="app", daemon=True)
    thread.start()
    try:
        yield app
    finally:
        app.stop()
        thread.join(60)
        app.rc = result.get("rc")  # type: ignore[attr-defined]
    assert not thread.is_alive(), "the application did not stop within 60 s"


class ConsumerProcess:
    """`python -m consumer consume` with the given environment; its JSON log lines go to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MMSENT_")}
        full_env.update(env)
        full_env["PYTHONUNBUFFERED"] = "1"
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumer", "consume"],
            cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if name is None or entry.get("event") == name:
                        lines.append(entry)
        return lines

    def assigned(self) -> list[int]:
        """The member's partitions after its latest assignment change (each change logs the whole assignment)."""
        latest: list[int] = []
        for entry in self.events():
            if entry.get("event") in ("partitions_assigned", "partitions_revoked", "partitions_lost"):
                latest = list(entry["assignment"])
        return latest

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def started_member(env: dict[str, str], log_path: Path, timeout_s: float = 90) -> ConsumerProcess:
    """A consumer process that has joined its group and got partitions (it imports torch and loads the model
    first, hence the long default); the test fails with its log otherwise."""
    import pytest

    member = ConsumerProcess(env, log_path)
    if not wait_until(lambda: bool(member.assigned()), timeout_s):
        member.kill()
        pytest.fail(f"the consumer never got partitions\n{member.tail()}")
    return member


@dataclass
class SteadyProducer:
    """Produces `values` in small bursts on a thread, so that the consumers work on a stream, not a backlog."""

    bootstrap: str
    topic: str
    values: list[bytes]
    per_burst: int = 20
    interval_s: float = 0.05
    key_prefix: str = "s"
    produced: int = 0
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self) -> SteadyProducer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        try:
            for start in range(0, len(self.values), self.per_burst):
                if self._stop.is_set():
                    return
                chunk = self.values[start : start + self.per_burst]
                for index, value in enumerate(chunk):
                    producer.produce(self.topic, value=value, key=f"{self.key_prefix}{start + index}".encode())
                if producer.flush(30):
                    raise RuntimeError("the steady producer's records were not acknowledged")
                self.produced += len(chunk)
                time.sleep(self.interval_s)
        finally:
            producer.flush(30)

    def join(self, timeout: float = 120) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self.join()


@dataclass
class Outcome:
    """What the output topics hold, checked against the input."""

    events: list[SentimentEvent]
    dead_letters: list[DeadLetter]
    inputs: list[Record]

    @classmethod
    def read(cls, bootstrap: str, topics: Topics, isolation_level: str = "read_uncommitted") -> Outcome:
        events = [SentimentEvent.model_validate_json(r.value or b"")
                  for r in read_all(bootstrap, topics.sentiment, isolation_level=isolation_level)]
        letters = [DeadLetter.model_validate_json(r.value or b"")
                   for r in read_all(bootstrap, topics.dlq, isolation_level=isolation_level)]
        return cls(events, letters, read_all(bootstrap, topics.posts))

    def repeats(self) -> int:
        seen = Counter((e.source.partition, e.source.offset) for e in self.events)
        seen.update((d.source.partition, d.source.offset) for d in self.dead_letters)
        return sum(count - 1 for count in seen.values() if count > 1)

    def missing(self) -> list[tuple[int, int]]:
        """Input coordinates with neither an event nor a dead letter."""
        covered = {(e.source.partition, e.source.offset) for e in self.events}
        covered |= {(d.source.partition, d.source.offset) for d in self.dead_letters}
        return [(r.partition, r.offset) for r in self.inputs if (r.partition, r.offset) not in covered]

    def covered_below(self, committed: dict[int, int]) -> list[tuple[int, int]]:
        """Inputs below the committed offsets that have no output: must be empty (nothing lost)."""
        covered = {(e.source.partition, e.source.offset) for e in self.events}
        covered |= {(d.source.partition, d.source.offset) for d in self.dead_letters}
        return [(r.partition, r.offset) for r in self.inputs
                if r.offset < committed.get(r.partition, -1) and (r.partition, r.offset) not in covered]
