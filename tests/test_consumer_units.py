"""Unit tests of the consumer's small parts: offsets, pausing, batching, the model stage's bisection."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from consumer.batcher import Batch, MicroBatcher, ServingModel, WorkItem
from consumer.errors import Action, ErrorPolicy
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.pausing import RECONCILE_S, PausingManager
from consumer.stages import ImageStage, LoopThread, ModelStage, Pipeline, RecentEmbeddings
from schemas.models import ModelInfo, PostEvent

# -- offsets -------------------------------------------------------------------------------------------


def test_commits_only_the_contiguous_low_watermark() -> None:
    tracker = OffsetTracker()
    state = tracker.assign(("t", 0))
    for offset in (10, 11, 12, 14):  # 13 is a gap (a transaction marker, say): never read
        tracker.register(state, offset)
    assert tracker.committable() == {}
    tracker.done(state, 11)
    tracker.done(state, 12)
    assert tracker.committable() == {}  # 10 is still pending: nothing may be committed
    tracker.done(state, 10)
    assert tracker.committable() == {("t", 0): 14}  # up to the pending 14
    tracker.mark_committed({("t", 0): 14})
    assert tracker.committable() == {}
    tracker.done(state, 14)
    assert tracker.committable() == {("t", 0): 15}
    assert tracker.in_flight == 0


def test_work_of_a_revoked_generation_is_stale() -> None:
    tracker = OffsetTracker()
    old = tracker.assign(("t", 1))
    tracker.register(old, 5)
    tracker.revoke(("t", 1))
    new = tracker.assign(("t", 1))
    assert not tracker.done(old, 5)
    assert tracker.is_current(new) and not tracker.is_current(old)
    assert tracker.in_flight == 0


def test_failed_commit_is_retried_and_rewind_returns_committed_positions() -> None:
    tracker = OffsetTracker()
    state = tracker.assign(("t", 0))
    for offset in range(3):
        tracker.register(state, offset)
        tracker.done(state, offset)
    tracker.mark_committed({("t", 0): 3})
    tracker.mark_dirty([("t", 0)])
    assert tracker.committable() == {("t", 0): 3}
    tracker.register(state, 3)
    assert tracker.rewind() == {("t", 0): 3}
    assert tracker.in_flight == 0 and not tracker.is_current(state)


# -- pausing -------------------------------------------------------------------------------------------


class FakeConsumer:
    def __init__(self, partitions: list[int]) -> None:
        self.partitions = [TopicPartition("t", p) for p in partitions]
        self.paused: set[int] = set()
        self.calls: list[tuple[str, list[int]]] = []

    def assignment(self) -> list[TopicPartition]:
        return list(self.partitions)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in partitions}
        self.calls.append(("pause", sorted(tp.partition for tp in partitions)))

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in partitions}
        self.calls.append(("resume", sorted(tp.partition for tp in partitions)))

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 100 + tp.partition if tp.partition else -1001)
                for tp in partitions]

    def seek(self, partition: TopicPartition) -> None:
        self.calls.append(("seek", [partition.partition, partition.offset]))


def test_pausing_manager_pauses_at_high_resumes_at_low_and_pauses_new_partitions() -> None:
    consumer = FakeConsumer([0, 1])
    now = [0.0]
    manager = PausingManager(consumer, high=10, low=4, clock=lambda: now[0])
    assert not manager.update(9) and manager.room(9) == 1
    assert manager.update(10)
    assert consumer.paused == {0, 1} and manager.room(3) == 0
    assert manager.update(7)  # above low: still paused (hysteresis)
    consumer.partitions.append(TopicPartition("t", 2))  # assigned while paused, without on_assign
    manager.update(6)
    assert consumer.paused == {0, 1}, "the assignment is not asked for at every poll"
    now[0] += RECONCILE_S
    manager.update(6)
    assert consumer.paused == {0, 1, 2}
    assert not manager.update(4)  # room again
    assert consumer.paused == set() and manager.room(4) == 6
    assert manager.pauses == 1 and manager.resumes == 1
    # resumed, then each partition with a known position sought to it (wakes librdkafka's fetcher at once)
    assert consumer.calls == [("pause", [0, 1]), ("pause", [2]), ("resume", [0, 1, 2]), ("seek", [1, 101]),
                              ("seek", [2, 102])]


def test_pausing_for_good_is_never_undone() -> None:
    consumer = FakeConsumer([0])
    manager = PausingManager(consumer, high=4)
    manager.pause_for_good()
    assert manager.update(0)
    assert consumer.paused == {0}


# -- batching ------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _item(tracker: OffsetTracker, partition: int, offset: int, at: float, text: str = "x") -> WorkItem:
    state = tracker.state(("t", partition))
    tracker.register(state, offset)
    return WorkItem(state, "t", partition, offset, None, b"{}", at, None,
                    post=PostEvent(post_id=f"{partition}-{offset}", text=text))


def test_batches_are_cut_by_size_or_by_the_oldest_wait_across_partitions() -> None:
    clock, tracker = Clock(), OffsetTracker()
    batcher = MicroBatcher(max_size=3, max_wait_s=0.05, clock=clock)
    for offset in range(4):
        batcher.add(_item(tracker, offset % 2, offset, clock.now))
    [full] = batcher.ready()
    assert [(i.partition, i.offset) for i in full.items] == [(0, 0), (1, 1), (0, 2)]
    assert batcher.ready() == [] and batcher.time_to_deadline() == pytest.approx(0.05)
    clock.now += 0.06
    [partial] = batcher.ready()
    assert [i.offset for i in partial.items] == [3] and len(batcher) == 0
    assert full.full and not partial.full  # a full batch tells the pipeline there is a backlog


def test_a_busy_pipeline_holds_batches_back_and_the_next_one_grows() -> None:
    clock, tracker = Clock(), OffsetTracker()
    batcher = MicroBatcher(max_size=4, max_wait_s=0.05, clock=clock)
    for offset in range(2):
        batcher.add(_item(tracker, 0, offset, clock.now))
    clock.now += 0.06
    assert batcher.ready(limit=0) == [] and len(batcher) == 2  # due, but the pipeline is full
    for offset in range(2, 11):
        batcher.add(_item(tracker, 0, offset, clock.now))
    [first] = batcher.ready(limit=1)
    assert [i.offset for i in first.items] == [0, 1, 2, 3] and len(batcher) == 7
    clock.now += 0.06
    [second] = batcher.ready(limit=5, partial_limit=0)  # a backlog may fill the pipeline; a partial batch may not
    assert [i.offset for i in second.items] == [4, 5, 6, 7] and len(batcher) == 3
    [third] = batcher.ready(limit=5, partial_limit=1)
    assert [i.offset for i in third.items] == [8, 9, 10]


def test_revoked_partitions_leave_the_batcher() -> None:
    clock, tracker = Clock(), OffsetTracker()
    batcher = MicroBatcher(max_size=10, max_wait_s=1, clock=clock)
    for offset in range(6):
        batcher.add(_item(tracker, offset % 3, offset, clock.now))
    assert batcher.drop({("t", 1)}) == 2
    assert {i.partition for b in batcher.flush() for i in b.items} == {0, 2}


# -- the model stage -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeResult:
    label: str
    scores: dict[str, float]
    image_used: bool = False


def _neutral(n: int) -> list[FakeResult]:
    return [FakeResult("neutral", {"negative": 0.2, "neutral": 0.6, "positive": 0.2}) for _ in range(n)]


class PoisonScorer:
    """Raises for any batch holding a post whose text contains POISON; records the batch sizes it saw."""

    info = {"name": "fake", "version": "1"}
    image_encoder_id = "none"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def score(self, posts: list[dict[str, Any]]) -> list[FakeResult]:
        self.calls.append([p["text"] for p in posts])
        if any("POISON" in p["text"] for p in posts):
            raise ValueError("the model cannot take this")
        return _neutral(len(posts))

    def embed_images(self, images: list[Any]) -> list[Any]:
        raise AssertionError("no images here")


def test_a_poison_post_is_found_by_bisection_and_dead_lettered_the_rest_scored() -> None:
    tracker = OffsetTracker()
    items = [_item(tracker, 0, i, 0.0, text="ok " * (i % 5) + ("POISON" if i in (5, 11) else "")) for i in range(16)]
    scorer = PoisonScorer()
    stage = ModelStage(scorer, None, None, ErrorPolicy(), Metrics.get())
    stage.run(Batch(items=items, oldest_at=0.0, cut_at=0.0))
    poisoned = {item.offset for item in items if item.error is not None}
    assert poisoned == {5, 11}
    assert all(item.error.code == "model_error" and item.error.action is Action.DEAD_LETTER
               for item in items if item.error)
    assert all(item.result is not None for item in items if item.offset not in poisoned)
    assert len(scorer.calls) <= 2 * 2 * 4 + 1  # two poison posts: at most two root-to-leaf paths of splits


def test_an_image_being_embedded_by_one_batch_is_awaited_by_the_next_not_embedded_again() -> None:
    recent = RecentEmbeddings(size=2)
    assert recent.claim(["a", "b"]) == ({}, {}, ["a", "b"])
    known, computing, mine = recent.claim(["a", "c"])
    assert known == {} and list(computing) == ["a"] and mine == ["c"] and not computing["a"].done()
    recent.settle(["a", "b"], {"a": "emb-a"})  # b failed: no embedding
    assert computing["a"].result(timeout=0) == "emb-a"
    known, computing, mine = recent.claim(["a", "b"])
    assert known == {"a": "emb-a"} and computing == {} and mine == ["b"]  # a failure is not remembered
    recent.settle(["c", "b"], {"c": "emb-c", "b": "emb-b"})
    assert recent.claim(["a", "b", "c"])[2] == ["a"]  # size 2: the least recently used, a, was dropped


class GatedScorer:
    """The batch of "first" posts waits on the model (up to `wait_s`) for a batch of "second" posts to be scored
    beside it, then for `release_first`."""

    info = {"name": "fake", "version": "1"}
    image_encoder_id = "none"

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.second_done = threading.Event()
        self.release_first = threading.Event()
        self.overlapped: bool | None = None

    def score(self, posts: list[dict[str, Any]]) -> list[FakeResult]:
        if posts[0]["text"] == "first":
            self.overlapped = self.second_done.wait(self.wait_s)
            assert self.release_first.wait(10)
        else:
            self.second_done.set()
        return _neutral(len(posts))


def _two_batches(scorer: GatedScorer, *, full: bool) -> list[tuple[Batch, BaseException | None]]:
    """Two batches of 2 posts through a pipeline with two model threads; what it returns, in order."""
    tracker, io, metrics = OffsetTracker(), LoopThread(), Metrics.get()
    pipeline = Pipeline(io, ImageStage(None, None, lambda data: None, metrics),  # type: ignore[arg-type]
                        model_concurrency=2)
    model = ServingModel(scorer, ModelInfo(name="fake", version="1"),  # type: ignore[arg-type]
                         ModelStage(scorer, None, io, ErrorPolicy(), metrics), alert_threshold=0.9)
    try:
        assert (pipeline.room(full=True), pipeline.room(full=False)) == (3, 2)  # two on the model or one, + one
        for k, text in enumerate(("first", "second")):
            pipeline.submit(Batch(items=[_item(tracker, 0, 2 * k + j, 0.0, text=text) for j in range(2)],
                                  oldest_at=0.0, cut_at=0.0, full=full), model)
        assert (pipeline.room(full=True), pipeline.room(full=False)) == (1, 0)
        # only a full batch holds the model while the second is scored; below capacity the first times out of its
        # wait and may finish before this thread looks, so the head check would race
        if full and scorer.second_done.wait(scorer.wait_s):
            pipeline.wait_head(0.2)
            assert pipeline.completed() == []  # the second is scored, but the first still holds the head
        scorer.release_first.set()
        out: list[tuple[Batch, BaseException | None]] = []
        while len(out) < 2:
            pipeline.wait_head(10)
            out += pipeline.completed()
        return out
    finally:
        scorer.release_first.set()
        pipeline.close()
        io.close()


def test_under_a_backlog_two_full_batches_share_the_model_and_leave_in_submission_order() -> None:
    scorer = GatedScorer(wait_s=10)
    out = _two_batches(scorer, full=True)
    assert scorer.overlapped is True
    assert [batch.items[0].post.text for batch, _ in out] == ["first", "second"]  # type: ignore[union-attr]
    assert all(error is None and all(item.result for item in batch.items) for batch, error in out)


def test_below_capacity_smaller_batches_take_the_model_one_at_a_time() -> None:
    scorer = GatedScorer(wait_s=0.5)
    scorer.release_first.set()
    out = _two_batches(scorer, full=False)
    assert scorer.overlapped is False
    assert [batch.items[0].post.text for batch, _ in out] == ["first", "second"]  # type: ignore[union-attr]


# -- health and metrics endpoints ----------------------------------------------------------------------


def test_health_server_serves_metrics_liveness_and_readiness() -> None:
    import httpx

    from consumer.metrics import HealthServer

    state = {"ready": False}
    Metrics.get().records_consumed.inc(0)
    server = HealthServer("127.0.0.1", 0, lambda: state["ready"]).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 503
        state["ready"] = True
        assert httpx.get(f"{base}/readyz").status_code == 200
        body = httpx.get(f"{base}/metrics").text
        for name in ("mmsent_records_consumed_total", "mmsent_in_flight", "mmsent_ready",
                     "mmsent_batch_latency_seconds", "mmsent_end_to_end_latency_seconds"):
            assert name in body
    finally:
        server.close()


# -- commits rejected by a rebalance ---------------------------------------------------------------------


class RejectingConsumer:
    """commit() fails with the given errors first, then succeeds."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.committed: list[list[tuple[int, int]]] = []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> list[TopicPartition]:
        from confluent_kafka import KafkaError, KafkaException

        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        self.committed.append([(tp.partition, tp.offset) for tp in offsets])
        return offsets


def test_a_commit_rejected_by_a_rebalance_is_logged_survived_and_retried() -> None:
    from confluent_kafka import KafkaError

    from consumer.app import Application
    from consumer.settings import Settings

    app = Application(Settings(redis_url=None, metrics_port=0), serve_http=False)
    fake = RejectingConsumer(KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS)
    app.consumer = fake  # type: ignore[assignment]
    state = app.tracker.assign(("posts", 0))
    for offset in range(5):
        app.tracker.register(state, offset)
        app.tracker.done(state, offset)
    app._maybe_commit(force=True)  # ILLEGAL_GENERATION: survived
    app._maybe_commit(force=True)  # REBALANCE_IN_PROGRESS: survived
    assert fake.committed == [] and app.tracker.committable() == {("posts", 0): 5}
    app._maybe_commit(force=True)
    assert fake.committed == [[(0, 5)]] and app.tracker.committable() == {}


def test_partitions_assigned_after_a_rebalance_get_the_current_pause_state() -> None:
    consumer = FakeConsumer([0, 1])
    manager = PausingManager(consumer, high=4)
    manager.update(4)  # paused
    manager.forget(consumer.partitions)  # revoked while paused (librdkafka keeps their pause flag)
    consumer.partitions = []
    manager.update(0)  # room again, nothing assigned at this moment
    consumer.partitions = [TopicPartition("t", 1)]
    manager.on_assign(consumer.partitions)  # re-assigned: resumed explicitly
    assert consumer.calls[-1] == ("resume", [1]) and not manager.paused
    manager.update(4)
    manager.on_assign([TopicPartition("t", 2)])
    assert {1, 2} <= consumer.paused


def test_mmsent_device_chooses_where_the_model_runs() -> None:
    import torch

    from consumer.rollout import load_vetted
    from consumer.settings import Settings

    assert [Settings(device=d).device for d in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    with pytest.raises(ValueError, match="device"):
        Settings(device="gpu")
    assert load_vetted(Settings(device="cpu"), "tiny-random").device.type == "cpu"
    auto = load_vetted(Settings(device="auto"), "tiny-random").device.type
    assert auto == ("cuda" if torch.cuda.is_available() else "cpu")
