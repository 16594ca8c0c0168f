"""Hostile streams through the whole consumer, on a real broker, a real Redis and a loopback image server.

* A property test: generated records (arbitrary bytes, JSON with huge numbers, non-finite literals, deep nesting,
  huge strings and keys, invalid UTF-8, many and large headers) streamed through one running consumer; every record
  ends as exactly one event or dead letter, the consumer never stops, its offsets commit to the end.
* The hostile-stream test: 1,000 good posts interleaved with every kind of hostile record, image,
  cache entry and model roll-out, through ONE consumer process; afterwards `mmsent reconcile` finds nothing lost,
  the process never restarted, no event holds a non-finite score, and its peak memory is under the CPU pod's limit.

The model is `tiny-random` (random weights: the plumbing, not the scores).
"""

from __future__ import annotations

import io
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from consumer.app import Application
from schemas.models import DeadLetter
from tests.consumerutil import (
    Topics,
    all_committed,
    app_in_thread,
    make_settings,
    settings_env,
    started_member,
    wait_until,
)
from tests.imageserver import ImageServer, image, png_bomb, sample_image, slow
from tests.kafkautil import Record, create_topics, produce, read_all
from tests.modelutil import point, poisoned, save_tiny_model
from tooling.reconcile import reconcile, render_table

# The CPU overlay's memory limit (k8s/overlays/cpu/statefulset-cpu.yaml): the consumer must stay under it.
POD_MEMORY_LIMIT_BYTES = 4 * 1024**3
# What the test producer and the input topic take (librdkafka's default message.max.bytes is 1,000,000).
MAX_INPUT_RECORD_BYTES = 900_000


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite literal {name} in an output")


def _strict_json(value: bytes | None) -> Any:
    """An output's JSON, refusing NaN/Infinity literals (what the contract's readers would choke on)."""
    return json.loads(value or b"", parse_constant=_refuse_constant)


def _post(post_id: str, text: str = "a post", **other: Any) -> bytes:
    return json.dumps({"post_id": post_id, "text": text, **other}, ensure_ascii=False).encode()


# -- the kinds of hostile record ------------------------------------------------------------------------------

HOSTILE_VALUES: dict[str, bytes | None] = {
    "huge_integer": b'{"post_id": "h1", "text": "x", "extra": ' + b"9" * 5000 + b"}",
    "huge_integer_id": b'{"post_id": ' + b"7" * 6000 + b', "text": "x"}',
    "nan_literal": b'{"post_id": "h2", "text": "x", "extra": NaN}',
    "infinity_literal": b'{"post_id": "h3", "text": "x", "extra": -Infinity}',
    "deep_nesting": b'{"post_id": "h4", "text": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "huge_caption": _post("h5", "é" * 380_000),  # 760 KB of UTF-8
    "invalid_utf8": b'{"post_id": "h6", "text": "\xff\xfe bad"}',
    "lone_surrogate": b'{"post_id": "h7", "text": "\\ud800"}',
    "tombstone": None,
    "empty": b"",
    "not_an_object": b"[1, 2, 3]",
}
HOSTILE_KEYS: dict[str, bytes] = {"huge_key": b"k" * 600_000}
HOSTILE_HEADERS: dict[str, list[tuple[str, bytes]]] = {
    "many_headers": [(f"h{i}", b"v" * 2000) for i in range(200)],
    "large_header": [("big", b"x" * 700_000)],
}


# -- the property test ---------------------------------------------------------------------------------------

_json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30))
_json_like = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_post_shaped = st.builds(
    lambda post_id, text, url, extra: json.dumps(
        {"post_id": post_id, "text": text, "image_url": url, "extra": extra}).encode(),
    st.one_of(st.text(min_size=1, max_size=40), st.integers()),
    st.text(max_size=200),
    st.one_of(st.none(), st.text(max_size=60)),
    _json_like,
)
_values = st.one_of(
    st.binary(max_size=2048),
    _post_shaped,
    st.integers(4300, 30_000).map(lambda digits: b'{"post_id": "n", "text": "t", "n": ' + b"8" * digits + b"}"),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"]).map(
        lambda literal: b'{"post_id": "f", "text": "t", "x": ' + literal + b"}"),
    st.integers(50, 20_000).map(lambda depth: b'{"post_id": "d", "text": "t", "x": ' + b"{\"a\":" * depth + b"1"
                                + b"}" * depth + b"}"),
    st.builds(lambda size, char: _post("s", char * size), st.integers(1000, 400_000), st.sampled_from("aé😀\u202e")),
    st.binary(min_size=1, max_size=64).map(lambda junk: b'{"post_id": "u", "text": "' + junk + b'"}'),
    st.none(),
)
_keys = st.one_of(st.none(), st.binary(max_size=64), st.integers(1000, 300_000).map(lambda size: b"k" * size))
_headers = st.lists(
    st.tuples(st.text(max_size=30), st.one_of(st.binary(max_size=200),
                                               st.integers(1000, 200_000).map(lambda size: b"h" * size))),
    max_size=40,
)
_record = st.tuples(_values, _keys, _headers).filter(
    lambda r: len(r[0] or b"") + len(r[1] or b"") + sum(len(n.encode()) + len(v) for n, v in r[2])
    < MAX_INPUT_RECORD_BYTES)


@pytest.fixture(scope="module")
def running_consumer(kafka_bootstrap: str, redis_url: str) -> Iterator[tuple[Topics, Application]]:
    """One consumer for every generated example: a hostile record must not stop it for the records after."""
    topics = Topics.named("hostile-property")
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 1, topics.dlq: 1})
    with app_in_thread(make_settings(settings_env(kafka_bootstrap, topics, redis_url))) as app:
        yield topics, app
    assert app.rc == 0  # type: ignore[attr-defined]


def _produce_records(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None, Any]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                         "message.max.bytes": 1_000_000})
    errors: list[str] = []
    for value, key, headers in records:
        producer.produce(topic, value=value, key=key, headers=headers,
                         on_delivery=lambda err, _msg: errors.append(str(err)) if err else None)
        producer.poll(0)
    assert producer.flush(30) == 0 and not errors, errors


def _outputs_by_source(records: list[Record]) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for record in records:
        source = _strict_json(record.value)["source"]
        key = (int(source["partition"]), int(source["offset"]))
        counts[key] = counts.get(key, 0) + 1
    return counts


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(records=st.lists(_record, min_size=1, max_size=12))
def test_generated_records_through_a_real_consumer_each_end_as_one_output(
    kafka_bootstrap: str, running_consumer: tuple[Topics, Application],
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
) -> None:
    topics, app = running_consumer
    _produce_records(kafka_bootstrap, topics.posts, records)
    assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 60, interval=0.2), "offsets not committed"
    assert app.ready, "the consumer stopped"

    inputs = read_all(kafka_bootstrap, topics.posts)
    events, letters = read_all(kafka_bootstrap, topics.sentiment), read_all(kafka_bootstrap, topics.dlq)
    outputs = _outputs_by_source(events)
    for key, count in _outputs_by_source(letters).items():
        outputs[key] = outputs.get(key, 0) + count
    assert {(r.partition, r.offset): outputs.get((r.partition, r.offset), 0) for r in inputs} == {
        (r.partition, r.offset): 1 for r in inputs}
    for letter in letters:
        DeadLetter.model_validate_json(letter.value or b"")
    for event in events:
        assert np.isfinite(list(_strict_json(event.value)["scores"].values())).all()


# -- the hostile-stream test ------------------------------------------------------------------------------------


def _worst_case_png(side: int) -> bytes:
    """A real, complete PNG of side x side RGB pixels that compresses to a few tens of KB (decoding it costs
    side*side*3 bytes and more)."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (90, 90, 90)).save(out, "PNG", compress_level=9)
    return out.getvalue()


def _progressive_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (3000, 3000), (10, 120, 200)).save(out, "JPEG", progressive=True, quality=95)
    return out.getvalue()


def _poisoned_models(base: Path, good: Path) -> dict[str, Path]:
    """Model directories a careless (or hostile) roll-out could flip `MMSENT_MODEL` to (tests/modelutil.py's)."""
    candidates = {name: poisoned(good, name, base) for name in
                  ("nan_weights", "wrong_shape", "overflowing_weights", "huge_config", "nan_calibration")}
    dangling = base / "dangling"
    dangling.symlink_to(base / "does-not-exist")
    return {**candidates, "dangling_link": dangling}


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def _peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


def _poison_cache(redis_url: str, model: Path, good_url: str, other_url: str) -> None:
    """Entries no consumer wrote: another image's bytes copied under a key, and garbage under an embedding key."""
    from consumer.cache import ImageCache, encode_image
    from mmsent import Scorer

    encoder_id = Scorer.load(str(model)).image_encoder_id
    cache = ImageCache.from_settings(make_settings({"MMSENT_REDIS_URL": redis_url}))
    client = redis.Redis.from_url(redis_url)
    good_key, other_key = cache.image_key(good_url), cache.image_key(other_url)
    other_embedding_key = cache.embedding_key(other_url, encoder_id)
    assert good_key and other_key and other_embedding_key
    client.set(good_key, encode_image(sample_image("PNG", color=(0, 0, 0)), good_key))
    client.set(other_key, client.get(good_key) or b"")
    client.set(other_embedding_key, b"\x00" * 64)


def test_a_hostile_stream_through_one_process_loses_nothing_and_never_restarts(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 3, topics.sentiment: 3, topics.dlq: 1})
    good_urls = [image_server.route(f"/good{i}.jpg", image(sample_image("JPEG", color=(20 * i, 90, 200))))
                 for i in range(8)]
    worst = _worst_case_png(3990)  # just under the 16 MP per-image limit
    hostile_images = {
        "over_limit.png": image(_worst_case_png(4100), "image/png"),
        "bomb.png": image(png_bomb(), "image/png"),
        "truncated.jpg": image(sample_image("JPEG", size=(400, 300))[:300]),
        "html.jpg": image(b"<html><script>alert(1)</script></html>"),
        "progressive.jpg": image(_progressive_jpeg()),
        "stalled.jpg": slow(30, image(sample_image("JPEG"))),
    }
    hostile_urls = [image_server.route(f"/{name}", responder) for name, responder in hostile_images.items()]
    worst_urls = [image_server.route(f"/worst{i}.png", image(worst, "image/png")) for i in range(32)]
    v1, v2 = save_tiny_model(tmp_path / "v1", "1"), save_tiny_model(tmp_path / "v2", "2")
    _poison_cache(redis_url, v1, good_urls[0], good_urls[1])
    rollouts = _poisoned_models(tmp_path, v1)
    current = tmp_path / "current"
    current.symlink_to(v1)

    values: list[bytes | None] = []
    keys: list[bytes | None] = []
    headers: list[list[tuple[str, bytes]]] = []
    hostile = [(v, None, []) for v in HOSTILE_VALUES.values()]
    hostile += [(_post(f"key-{n}"), k, []) for n, k in HOSTILE_KEYS.items()]
    hostile += [(_post(f"hdr-{n}"), None, h) for n, h in HOSTILE_HEADERS.items()]
    for i in range(1000):
        url = (good_urls[i % len(good_urls)] if i % 3 else
               hostile_urls[i % len(hostile_urls)] if i % 2 else worst_urls[(i // 6) % len(worst_urls)])
        values.append(_post(f"g{i}", f"post number {i}", image_url=url))
        keys.append(f"g{i}".encode())
        headers.append([("tenant", b"t1")])
        if i % 40 == 7:
            value, key, hdrs = hostile[(i // 40) % len(hostile)]
            values.append(value)
            keys.append(key)
            headers.append(hdrs)

    env = settings_env(kafka_bootstrap, topics, redis_url, model=str(current), model_watch_s=0.3,
                       max_batch_size=32, fetch_read_timeout_s=1, fetch_total_timeout_s=2)
    env.pop("MMSENT_METRICS_PORT")
    from tooling.embedded import free_port

    port = free_port()
    env["MMSENT_METRICS_PORT"] = str(port)
    env["MALLOC_ARENA_MAX"] = "2"  # as the image and the pod set it (Dockerfile, k8s/base/statefulset.yaml)
    member = started_member(env, tmp_path / "consumer.log")
    try:
        half = len(values) // 2
        produce(kafka_bootstrap, topics.posts, values[:half], keys=keys[:half], headers=headers[:half])
        for target in rollouts.values():  # each roll-out is refused; the serving model goes on
            point(current, target)
            refused = len(member.events("model_reload_refused"))
            assert wait_until(lambda: len(member.events("model_reload_refused")) > refused, 60), member.tail()
        point(current, v2)
        produce(kafka_bootstrap, topics.posts, values[half:], keys=keys[half:], headers=headers[half:])
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 300, interval=1), member.tail()
        assert member.process.poll() is None, "the consumer exited"
        peak = _peak_rss_bytes(member.pid)
        corrupt = _metric(port, "mmsent_cache_corrupt_total")
    finally:
        member.stop()
    assert member.process.returncode == 0, member.tail()
    assert len(member.events("consumer_started")) == 1, "the consumer restarted"

    report = reconcile({"bootstrap.servers": kafka_bootstrap}, topics.posts, topics.sentiment, topics.dlq)
    assert report.ok and report.as_dict()["totals"]["inputs"] == len(values), render_table(report)
    events = read_all(kafka_bootstrap, topics.sentiment)
    for event in events:
        assert np.isfinite(list(_strict_json(event.value)["scores"].values())).all()
    versions = {_strict_json(e.value)["model"]["version"] for e in events}
    assert versions <= {"1", "2"} and "2" in versions, versions
    letters = [DeadLetter.model_validate_json(r.value or b"") for r in read_all(kafka_bootstrap, topics.dlq)]
    codes = sorted({letter.error.code for letter in letters})
    assert corrupt >= 1, corrupt  # the entry copied under another URL's key (at least) was refused
    assert peak < POD_MEMORY_LIMIT_BYTES, peak
    print(f"\n[hostile stream] {len(values)} records -> {len(events)} events, {len(letters)} dead letters {codes}; "
          f"{len(rollouts)} poisoned roll-outs refused; cache entries refused {corrupt:.0f}; "
          f"peak RSS {peak / 2**20:.0f} MiB (pod limit {POD_MEMORY_LIMIT_BYTES / 2**30:.0f} GiB); one process, "
          f"exit 0")


def test_the_hostile_kinds_are_what_the_docs_list() -> None:
    """docs/testing.md lists every hostile record kind this module streams, by name."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    for name in [*HOSTILE_VALUES, *HOSTILE_KEYS, *HOSTILE_HEADERS]:
        assert f"`{name}`" in doc, name
