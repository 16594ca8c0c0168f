"""`mmsent reconcile` against a real broker: it finds the lost record, the repeat and the dead letter."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from consumer.cli import app
from tests.kafkautil import create_topics, produce
from tooling.reconcile import reconcile


def _source(partition: int, offset: int, topic: str) -> dict[str, object]:
    return {"topic": topic, "partition": partition, "offset": offset}


def test_reconcile_counts_events_dead_letters_repeats_and_lost(kafka_bootstrap: str, unique_name: str) -> None:
    posts, events, dlq = f"{unique_name}-posts", f"{unique_name}-events", f"{unique_name}-dlq"
    create_topics(kafka_bootstrap, {posts: 1, events: 1, dlq: 1})
    produce(kafka_bootstrap, posts, [json.dumps({"post_id": f"p{i}"}).encode() for i in range(5)], partition=0)
    # offsets 0, 1 scored (1 twice: a repeat), 2 dead-lettered, 3 both, 4 lost
    produce(
        kafka_bootstrap,
        events,
        [json.dumps({"source": _source(0, o, posts)}).encode() for o in (0, 1, 1, 3)] + [b"not json"],
    )
    produce(kafka_bootstrap, dlq, [json.dumps({"source": _source(0, o, posts)}).encode() for o in (2, 3)])

    report = reconcile({"bootstrap.servers": kafka_bootstrap}, posts, events, dlq, timeout_s=30)

    totals = report.as_dict()["totals"]
    assert totals == {"inputs": 5, "events": 3, "dead_letters": 2, "both": 1, "lost": 1, "repeats": 2}
    assert report.partitions[0].lost_offsets == [4]
    assert report.unknown_outputs == 1
    assert not report.ok

    result = CliRunner().invoke(
        app, ["reconcile", "--bootstrap", kafka_bootstrap, "--input", posts, "--output", events, "--dlq", dlq, "--json"]
    )
    assert result.exit_code == 1, result.output
    assert json.loads(result.output)["totals"]["lost"] == 1


def test_reconcile_passes_when_every_record_has_an_output(kafka_bootstrap: str, unique_name: str) -> None:
    posts, events, dlq = f"{unique_name}-posts", f"{unique_name}-events", f"{unique_name}-dlq"
    create_topics(kafka_bootstrap, {posts: 2, events: 1, dlq: 1})
    produce(kafka_bootstrap, posts, [b"{}"] * 3, partition=0)
    produce(kafka_bootstrap, posts, [b"{}"] * 2, partition=1)
    produce(kafka_bootstrap, events, [json.dumps({"source": _source(0, o, posts)}).encode() for o in range(3)])
    produce(kafka_bootstrap, dlq, [json.dumps({"source": _source(1, o, posts)}).encode() for o in range(2)])

    result = CliRunner().invoke(
        app, ["reconcile", "--bootstrap", kafka_bootstrap, "--input", posts, "--output", events, "--dlq", dlq]
    )
    assert result.exit_code == 0, result.output
    assert "OK: nothing lost" in result.output
