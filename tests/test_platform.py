"""What a platform team needs around the scores, on a real broker and a real Redis, in this process: headers
carried through, mmsent's own headers on events and dead letters.

The `Application` runs on a thread with the `tiny-random` model (random weights: the plumbing, not the scores).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from consumer.metrics import Metrics
from schemas import headers as wire
from tests.consumerutil import (
    ConsumerProcess,
    SteadyProducer,
    Topics,
    all_committed,
    app_in_thread,
    committed_total,
    make_settings,
    post,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.imageserver import ImageServer, image, sample_image
from tests.kafkautil import create_topics, produce, read_all
from tests.modelutil import point, save_tiny_model
from tooling.reconcile import reconcile, render_table

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.fixture(scope="module")
def scorer() -> Any:
    from mmsent import Scorer

    return Scorer.load("tiny-random")


def _by_source(records: list[Any]) -> dict[int, Any]:
    return {json.loads(r.value)["source"]["offset"]: r for r in records}


def test_headers_travel_in_order_to_events_and_dead_letters_with_mmsents_own(
    kafka_bootstrap: str, redis_url: str, unique_name: str, scorer: Any
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    values = [post("h0", "a fine day"), b"not json", post("h2", "an awful day"), post("h3", "x" * 50)]
    headers = [
        [("tenant", b"acme"), ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
         ("tenant", b"second value, same name"), ("secret", b"never carried")],
        [("tenant", b"beta"), ("z-last", b"")],
        [("mmsent.model", b"forged:0"), ("Tenant", b"gamma")],
        [("tenant", b"delta")],
    ]
    timestamps = [int(time.time() * 1000) - 60_000 + i for i in range(len(values))]  # recent: inside retention
    produce(kafka_bootstrap, topics.posts, values, headers=headers, timestamps_ms=timestamps)

    env = settings_env(kafka_bootstrap, topics, None, headers_deny="secret", max_text_chars=20)
    with app_in_thread(make_settings(env), scorer=scorer) as app:
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60), "not all offsets committed"
    assert app.rc == 0  # type: ignore[attr-defined]

    events = _by_source(read_all(kafka_bootstrap, topics.sentiment))
    letters = _by_source(read_all(kafka_bootstrap, topics.dlq))
    assert sorted(events) == [0, 2] and sorted(letters) == [1, 3]
    model = f"{scorer.info['name']}:{scorer.info['version']}".encode()
    # the input's headers in order (a repeated name kept twice), the deny-list's dropped, then mmsent's own
    assert events[0].headers == headers[0][:3] + [(wire.MODEL, model)]
    # a forged mmsent header is not carried; names are kept as written
    assert events[2].headers == [("Tenant", b"gamma"), (wire.MODEL, model)]
    assert letters[1].headers == [
        ("tenant", b"beta"), ("z-last", b""),
        (wire.ERROR_CODE, b"invalid_json"), (wire.ERROR_MESSAGE, letters[1].headers[3][1]),
        (wire.SOURCE_TIMESTAMP, str(timestamps[1]).encode()),
    ]
    assert letters[1].headers[3][1] and json.loads(letters[1].value)["error"]["message"].startswith(
        letters[1].headers[3][1].decode())
    assert dict(letters[3].headers)[wire.ERROR_CODE] == b"invalid_post"
    assert dict(letters[3].headers)[wire.SOURCE_TIMESTAMP] == str(timestamps[3]).encode()


def test_the_allow_list_carries_only_its_headers(
    kafka_bootstrap: str, redis_url: str, unique_name: str, scorer: Any
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    headers = [[("a", b"1"), ("tenant", b"acme"), ("b", b"2"), ("TRACEPARENT", b"t")]]
    produce(kafka_bootstrap, topics.posts, [post("a0", "hello")], headers=headers)
    env = settings_env(kafka_bootstrap, topics, None, headers_allow="tenant, traceparent")
    with app_in_thread(make_settings(env), scorer=scorer):
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    [event] = read_all(kafka_bootstrap, topics.sentiment)
    assert [name for name, _ in event.headers] == ["tenant", "TRACEPARENT", wire.MODEL]


# -- model rollout without leaving the group --------------------------------------------------------------------


def _versions(records: list[Any]) -> list[str]:
    return [json.loads(r.value)["model"]["version"] for r in records]


def test_a_model_flipped_mid_stream_is_swapped_in_and_a_broken_one_refused_with_nothing_lost(
    kafka_bootstrap: str, redis_url: str, unique_name: str, tmp_path: Path
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1})
    v1, v2 = save_tiny_model(tmp_path / "v1", "1"), save_tiny_model(tmp_path / "v2", "2")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    current = tmp_path / "current"
    current.symlink_to(v1)
    env = settings_env(kafka_bootstrap, topics, None, model=str(current), model_watch_s=0.2)
    values = synthetic_posts(3000, lambda i: None)
    reloads = Metrics.get().model_reloads
    loaded_before, refused_before = reloads.labels("loaded")._value.get(), reloads.labels("refused")._value.get()
    stream = SteadyProducer(kafka_bootstrap, topics.posts, values, per_burst=10, interval_s=0.05).start()
    with app_in_thread(make_settings(env)) as app:
        assert wait_until(lambda: committed_total(kafka_bootstrap, topics) >= 300, 60), "no progress on v1"
        point(current, v2)
        assert wait_until(lambda: app.model_info is not None and app.model_info.version == "2", 60)
        assert wait_until(lambda: committed_total(kafka_bootstrap, topics) >= 1200, 60), "no progress after v2"
        point(current, broken)
        assert wait_until(lambda: reloads.labels("refused")._value.get() > refused_before, 30)
        stream.join(120)
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 60), "not all offsets committed"
    assert app.rc == 0  # type: ignore[attr-defined]
    assert app.model_info is not None and app.model_info.version == "2"  # the broken model never served
    assert reloads.labels("loaded")._value.get() == loaded_before + 1

    events = read_all(kafka_bootstrap, topics.sentiment)
    report = reconcile({"bootstrap.servers": kafka_bootstrap}, topics.posts, topics.sentiment, topics.dlq)
    assert report.ok and report.as_dict()["totals"]["inputs"] == len(values), render_table(report)
    for partition in (0, 1):  # per partition, in offset order: version 1, then version 2 from one event on
        ordered = sorted((r for r in events if r.partition == partition), key=lambda r: r.offset)
        versions = _versions(ordered)
        assert set(versions) == {"1", "2"} and versions == sorted(versions), versions[:: max(1, len(versions) // 20)]
    for record in events:  # the header names the model the body does
        assert dict(record.headers)[wire.MODEL] == f"mmsent-tiny-random:{_versions([record])[0]}".encode()
    print(f"\n[hot reload] {len(values)} posts -> {len(events)} events, "
          f"{_versions(events).count('1')} by v1 and {_versions(events).count('2')} by v2; a broken model refused")


def test_sighup_reloads_the_model_in_a_running_consumer(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    env = settings_env(kafka_bootstrap, topics, None, model_watch_s=0)  # watching off: only the signal reloads
    member = ConsumerProcess(env, tmp_path / "consumer.log")
    try:
        assert wait_until(lambda: bool(member.assigned()), 90), member.tail()
        member.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: bool(member.events("model_reloaded")), 60), member.tail()
        produce(kafka_bootstrap, topics.posts, [post("s0", "still scoring")])
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 60), member.tail()
    finally:
        member.stop()
    assert member.process.returncode == 0, member.tail()
    assert member.events("model_reload_started")[0]["reason"] == "signal"
    assert len(member.events("partitions_assigned")) == 1  # it never left the group


# -- the shadow model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("same_image_encoder", [True, False])
def test_a_shadow_model_scores_every_post_into_its_topic_beside_the_primary(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path,
    scorer: Any, same_image_encoder: bool,
) -> None:
    topics = Topics.named(unique_name)
    shadow_topic = f"{unique_name}-shadow"
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1, shadow_topic: 2})
    shadow_dir = save_tiny_model(tmp_path / "shadow", "7", name="mmsent-shadow", fusion="gated",
                                  squash=not same_image_encoder)
    urls = [image_server.route(f"/s{i}.png", image(sample_image("PNG", color=(i * 40, 80, 20)), "image/png"))
            for i in range(5)]
    values = synthetic_posts(200, lambda i: urls[i % 5] if i % 2 else None) + [b"not a post"]
    produce(kafka_bootstrap, topics.posts, values)
    agreement = Metrics.get().shadow_agreement
    before = sum(agreement.labels(flag)._value.get() for flag in ("true", "false"))
    env = settings_env(kafka_bootstrap, topics, redis_url, shadow_model=str(shadow_dir), shadow_topic=shadow_topic)
    with app_in_thread(make_settings(env), scorer=scorer):
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=90), "not all offsets committed"

    events = {json.loads(r.value)["post_id"]: json.loads(r.value) for r in read_all(kafka_bootstrap, topics.sentiment)}
    shadows = [json.loads(r.value) for r in read_all(kafka_bootstrap, shadow_topic)]
    assert len(events) == 200 and sorted(s["post_id"] for s in shadows) == sorted(events)  # one each
    for shadow in shadows:
        primary = events[shadow["post_id"]]
        assert shadow["model"]["name"] == "mmsent-shadow" and shadow["model"]["version"] == "7"
        assert primary["model"]["name"] == scorer.info["name"]
        assert shadow["source"] == primary["source"] and shadow["image_status"] == primary["image_status"]
    assert {e["image_status"] for e in events.values()} == {"ok", "none"}
    assert sum(agreement.labels(flag)._value.get() for flag in ("true", "false")) - before == 200
    assert len(read_all(kafka_bootstrap, topics.dlq)) == 1  # the bad record: a dead letter, no shadow event


def test_a_shadow_that_raises_never_fails_the_primary(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path, scorer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumer.shadow import ShadowStage

    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1, f"{unique_name}-sh": 1})

    def broken(self: ShadowStage, item: Any) -> dict[str, object]:
        raise RuntimeError("the shadow model is broken")

    monkeypatch.setattr(ShadowStage, "_post", broken)
    produce(kafka_bootstrap, topics.posts, synthetic_posts(40, lambda i: None))
    failures = Metrics.get().shadow_failures
    before = failures._value.get()
    env = settings_env(kafka_bootstrap, topics, None, shadow_model=str(save_tiny_model(tmp_path / "s", "1")),
                       shadow_topic=f"{unique_name}-sh")
    with app_in_thread(make_settings(env), scorer=scorer) as app:
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    assert app.rc == 0  # type: ignore[attr-defined]
    assert len(read_all(kafka_bootstrap, topics.sentiment)) == 40
    assert read_all(kafka_bootstrap, f"{unique_name}-sh") == []
    assert failures._value.get() > before


# -- tracing ----------------------------------------------------------------------------------------------------


def test_spans_per_batch_and_stage_link_the_posts_and_the_event_continues_their_trace(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, scorer: Any
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from consumer.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    url = image_server.route("/t.png", image(sample_image("PNG"), "image/png"))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    posts = [post("t0", "traced", url), post("t1", "not traced"), b"traced, not a post"]
    headers = [[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode()), ("tenant", b"a")], [],
               [("traceparent", f"00-{trace_id}-00f067aa0ba902b8-01".encode())]]
    produce(kafka_bootstrap, topics.posts, posts, headers=headers)
    env = settings_env(kafka_bootstrap, topics, redis_url)
    with app_in_thread(make_settings(env), scorer=scorer, tracing=Tracing(provider)):
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)

    spans = exporter.get_finished_spans()
    names = [span.name for span in spans]
    assert {"mmsent.batch", "mmsent.fetch", "mmsent.embed", "mmsent.score", "mmsent.produce"} <= set(names)
    batches = [span for span in spans if span.name == "mmsent.batch"]
    for span in spans:
        if span.name in ("mmsent.fetch", "mmsent.embed", "mmsent.score", "mmsent.produce"):
            assert span.parent is not None and span.parent.span_id in {b.context.span_id for b in batches}
    linked = {format(link.context.trace_id, "032x") for b in batches for link in b.links}
    assert linked == {trace_id}  # the batch is linked to the posts' trace
    [event] = [r for r in read_all(kafka_bootstrap, topics.sentiment) if json.loads(r.value)["post_id"] == "t0"]
    traceparent = dict(event.headers)["traceparent"].decode()
    _version, carried_trace, parent_span, _flags = traceparent.split("-")
    assert carried_trace == trace_id and parent_span != "00f067aa0ba902b7"  # continued, not copied
    post_spans = {format(s.context.span_id, "016x"): s for s in spans if s.name == "mmsent.post"}
    assert format(post_spans[parent_span].parent.span_id, "016x") == "00f067aa0ba902b7"
    assert [name for name, _ in event.headers] == ["tenant", "traceparent", wire.MODEL]
    [letter] = read_all(kafka_bootstrap, topics.dlq)
    assert dict(letter.headers)["traceparent"].decode().split("-")[1] == trace_id
    [untraced] = [r for r in read_all(kafka_bootstrap, topics.sentiment) if json.loads(r.value)["post_id"] == "t1"]
    assert "traceparent" not in dict(untraced.headers)


def test_tracing_is_off_unless_an_exporter_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumer.tracing import Tracing

    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert not Tracing.from_environment().enabled
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not Tracing.from_environment().enabled
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracing = Tracing.from_environment()
    assert tracing.enabled
    tracing.close()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")  # not one mmsent knows: a log line, and tracing off
    assert not Tracing.from_environment().enabled


def test_a_shadow_model_that_fails_to_load_leaves_the_primary_serving_alone(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path, scorer: Any
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1, f"{unique_name}-sh": 1})
    produce(kafka_bootstrap, topics.posts, synthetic_posts(10, lambda i: None))
    env = settings_env(kafka_bootstrap, topics, None, shadow_model=str(tmp_path / "no-such-model"),
                       shadow_topic=f"{unique_name}-sh")
    with app_in_thread(make_settings(env), scorer=scorer) as app:
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    assert app.rc == 0  # type: ignore[attr-defined]
    assert len(read_all(kafka_bootstrap, topics.sentiment)) == 10
    assert read_all(kafka_bootstrap, f"{unique_name}-sh") == []


def test_events_carry_what_each_modality_alone_says(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, scorer: Any
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    url = image_server.route("/m.png", image(sample_image("PNG"), "image/png"))
    posts = [post("both", "a lovely day", url), post("text", "words only"), post("image", "", url),
             post("neither", ""), post("blocked", "a caption", "http://10.0.0.1/x.png")]
    produce(kafka_bootstrap, topics.posts, posts)
    with app_in_thread(make_settings(settings_env(kafka_bootstrap, topics, redis_url)), scorer=scorer):
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), timeout=60)
    events = {e["post_id"]: e for e in (json.loads(r.value) for r in read_all(kafka_bootstrap, topics.sentiment))}
    keys = {post_id: sorted(event["scores_by_modality"]) for post_id, event in events.items()}
    assert keys == {"both": ["image", "text"], "text": ["text"], "image": ["image"], "neither": [],
                    "blocked": ["text"]}
    for event in events.values():
        for scores in event["scores_by_modality"].values():
            assert set(scores) == {"negative", "neutral", "positive"} and abs(sum(scores.values()) - 1) < 1e-6
    assert events["text"]["scores_by_modality"]["text"] == pytest.approx(events["text"]["scores"])  # one modality
