"""Records the log deletes before the consumer reads them (retention, here DeleteRecords on the real broker) are
counted (`mmsent_records_lost_to_retention_total`), logged, and reported by `mmsent reconcile`, never skipped
silently: once when the group's committed offset is already below the log start at assignment, once when the
running consumer's position falls below it (librdkafka's reset to the log start, seen as the gap it leaves)."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from consumer.cli import app as cli
from tests.consumerutil import (
    Topics,
    all_committed,
    app_in_thread,
    make_settings,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.kafkautil import create_topics, produce
from tooling.reconcile import EXIT_LOST_TO_RETENTION, reconcile

pytestmark = pytest.mark.kafka


def lost_counted(partition: int = 0) -> float:
    return REGISTRY.get_sample_value("mmsent_records_lost_to_retention_total", {"partition": str(partition)}) or 0.0


def delete_before(bootstrap: str, topic: str, offset: int) -> int:
    """DeleteRecords: the partition's log now starts at `offset` (what retention does to old segments)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    (future,) = admin.delete_records([TopicPartition(topic, 0, offset)]).values()
    return int(future.result(10).low_watermark)


def reconcile_cli(bootstrap: str, topics: Topics) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["reconcile", "--bootstrap", bootstrap, "--input", topics.posts,
                                      "--output", topics.sentiment, "--dlq", topics.dlq, "--json"])
    return result.exit_code, json.loads(result.output)


def test_committed_offset_below_the_log_start_at_assignment(kafka_bootstrap: str, unique_name: str) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    settings = make_settings(settings_env(kafka_bootstrap, topics, None))
    produce(kafka_bootstrap, topics.posts, synthetic_posts(10, lambda i: None, prefix="a"), partition=0)
    with app_in_thread(settings):
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 90)
    # While no consumer runs: 20 more posts, and the log deletes the first 10 of them (offsets 10-19), unread.
    produce(kafka_bootstrap, topics.posts, synthetic_posts(20, lambda i: None, prefix="b"), partition=0)
    assert delete_before(kafka_bootstrap, topics.posts, 20) == 20
    before = lost_counted()
    with app_in_thread(settings):
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 90)
    assert lost_counted() - before == 10

    report = reconcile({"bootstrap.servers": kafka_bootstrap}, topics.posts, topics.sentiment, topics.dlq)
    assert report.total("lost") == 0  # the 10 records still in the log were all scored
    assert report.total("lost_to_retention") == 10  # offsets 10-19; 0-9 were scored before the deletion
    assert report.unknown_outputs == 0  # the outputs of 0-9 name deleted inputs: no mystery
    code, printed = reconcile_cli(kafka_bootstrap, topics)
    assert code == EXIT_LOST_TO_RETENTION and printed["lost_to_retention"] == 10 and not printed["ok"]


class HeldScorer:
    """The real tiny-random scorer, except that a batch with `marker` in a text waits for `release`."""

    def __init__(self, scorer: Any, marker: str) -> None:
        self._scorer = scorer
        self._marker = marker
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scorer, name)

    def score(self, posts: Sequence[Mapping[str, Any]]) -> list[Any]:
        if any(self._marker in str(p["text"]) for p in posts):
            self.release.wait(120)
        return list(self._scorer.score(posts))


def test_a_running_consumer_whose_position_falls_below_the_log_start(kafka_bootstrap: str, unique_name: str) -> None:
    from mmsent import Scorer

    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    # 4 records in flight at most: the 4 held ones pause the partition, so nothing after them is read
    settings = make_settings(settings_env(kafka_bootstrap, topics, None, max_in_flight=4, max_batch_size=2))
    scorer = HeldScorer(Scorer.load("tiny-random"), marker="HOLD")
    before = lost_counted()
    with app_in_thread(settings, scorer=scorer) as app:
        assert wait_until(lambda: app.ready, 90)
        produce(kafka_bootstrap, topics.posts,
                [json.dumps({"post_id": f"h{i}", "text": f"HOLD {i}"}).encode() for i in range(4)], partition=0)
        assert wait_until(lambda: app.pausing is not None and app.pausing.paused, 30)
        produce(kafka_bootstrap, topics.posts, synthetic_posts(20, lambda i: None, prefix="c"), partition=0)
        assert delete_before(kafka_bootstrap, topics.posts, 14) == 14  # offsets 4-13 go unread
        scorer.release.set()
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 90)
        assert wait_until(lambda: lost_counted() - before == 10, 10)
    report = reconcile({"bootstrap.servers": kafka_bootstrap}, topics.posts, topics.sentiment, topics.dlq)
    assert (report.total("lost"), report.total("lost_to_retention"), report.total("events")) == (0, 10, 10)
    assert reconcile_cli(kafka_bootstrap, topics)[0] == EXIT_LOST_TO_RETENTION
