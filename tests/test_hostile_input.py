"""Hostile input: arbitrary bytes into the record decoder and arbitrary captions into the text normalisation
(property-based), images crafted to hurt and the SSRF list replayed through the whole consumer. Nothing may crash,
hang or be lost."""

from __future__ import annotations

import io
import json
import math
import time
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmsent.textnorm import normalize_tweet
from schemas import BadRecord, PostEvent, decode_post
from tests.consumerutil import Outcome, Topics, all_committed, app_in_thread, make_settings, settings_env, wait_until
from tests.imageserver import ImageServer, image, png_bomb, sample_image
from tests.kafkautil import create_topics, produce
from tests.netguard import NetGuard
from tests.test_fetch import loopback_spellings

MAX_SECONDS_PER_RECORD = 0.25

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
post_like = st.fixed_dictionaries(
    {},
    optional={
        "post_id": st.one_of(st.text(max_size=300), st.integers(), st.none(), json_values),
        "text": st.one_of(st.text(), st.integers(), st.lists(st.text(max_size=3)), st.none()),
        "image_url": st.one_of(st.text(max_size=2100), st.none(), st.integers()),
        "created_at": st.one_of(st.text(max_size=40), st.datetimes().map(lambda d: d.isoformat()), st.integers()),
        "extra": json_values,
    },
)


def _decode_bounded(value: bytes) -> PostEvent | BadRecord:
    started = time.perf_counter()
    try:
        result: PostEvent | BadRecord = decode_post(value)
    except BadRecord as bad:
        assert bad.code and bad.message
        result = bad
    assert time.perf_counter() - started < MAX_SECONDS_PER_RECORD, f"{len(value)} bytes took too long"
    return result


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_decode_to_a_post_or_a_bad_record(value: bytes) -> None:
    _decode_bounded(value)


@settings(max_examples=400, deadline=None)
@given(post_like)
def test_post_shaped_json_either_validates_or_names_the_field(obj: dict[str, Any]) -> None:
    result = _decode_bounded(json.dumps(obj).encode("utf-8", "surrogatepass"))
    if isinstance(result, PostEvent):
        assert isinstance(obj["post_id"], str) and 1 <= len(obj["post_id"]) <= 256
        # A post that decodes can always be written back out as UTF-8 JSON.
        result.model_dump_json().encode("utf-8")
    elif result.code == "invalid_post":
        assert any(name in result.message for name in ("post_id", "text", "image_url", "created_at"))


@pytest.mark.parametrize(
    "value",
    [
        b"[" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        json.dumps({"post_id": "p", "text": "x" * 9_999}).encode(),
        json.dumps({"post_id": "p", "text": "\U0001f600" * 20_000}).encode(),
        b'{"post_id": "p", "text": "\\udfff\\ud800"}',
        b'{"post_id": "p", "text": "ok", "post_id": 5}',
        b"\xef\xbb\xbf" + json.dumps({"post_id": "bom"}).encode(),
        b'{"post_id": "p", "image_url": "javascript:alert(1)"}',
        b"\x00" * 1000,
        b"1e999999",
    ],
    ids=["deep-array", "deep-object", "long-text", "long-emoji", "surrogates", "dup-key", "bom", "js-url", "nul",
         "huge-number"],
)
def test_known_nasty_records_are_bounded(value: bytes) -> None:
    _decode_bounded(value)


def _normalize_bounded(text: str) -> str:
    """Normalised within the bound, by the faster of at most two calls: a hostile input costs its time on every call,
    while a one-off stall of this 2-core machine does not (a fresh-clone CI once timed one character at 0.33 s on the
    first call and well under the bound on the next)."""
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        out = normalize_tweet(text)
        seconds.append(time.perf_counter() - started)
        if seconds[-1] < MAX_SECONDS_PER_RECORD:
            break
    assert min(seconds) < MAX_SECONDS_PER_RECORD, f"{len(text)} characters took {seconds} s"
    return out


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_any_caption_normalises_to_clean_utf8(text: str) -> None:
    out = _normalize_bounded(text)
    out.encode("utf-8")  # lone surrogates never reach the tokenizer
    assert not any(unicodedata.category(c) == "Cc" for c in out), out
    assert "\ufffd" not in out and out == out.strip() and "  " not in out


@pytest.mark.parametrize(
    "text",
    ["\U0001f600" * 20_000, "donâ€™t " * 20_000, "Ã©" * 50_000, "\x93\x94\x85" * 20_000, "\udfff\ud800" * 10_000,
     "@a " * 30_000, "http://x" * 20_000],
    ids=["emoji", "mojibake", "latin1-mojibake", "c1-controls", "surrogates", "mentions", "urls"],
)
def test_long_hostile_captions_normalise_in_bounded_time(text: str) -> None:
    _normalize_bounded(text).encode("utf-8")


def _cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 120, 120, 0)).save(out, "JPEG")
    return out.getvalue()


def _png_16bit() -> bytes:
    out = io.BytesIO()
    Image.new("I;16", (40, 30), 40_000).save(out, "PNG")
    return out.getvalue()


CRAFTED: dict[str, tuple[bytes, str, set[str]]] = {
    # name: (body, content type, acceptable image_status)
    "good.jpg": (sample_image("JPEG"), "image/jpeg", {"ok"}),
    "truncated.jpg": (sample_image("JPEG", size=(400, 300))[:300], "image/jpeg", {"unavailable", "ok"}),
    "huge.png": (png_bomb(60_000, 60_000), "image/png", {"unavailable"}),
    "bomb.png": (png_bomb(), "image/png", {"unavailable"}),
    "cmyk.jpg": (_cmyk_jpeg(), "image/jpeg", {"ok"}),
    "16bit.png": (_png_16bit(), "image/png", {"ok"}),
    "animated.gif": (sample_image("GIF"), "image/gif", {"ok"}),
    "html.jpg": (b"<html><script>alert(1)</script></html>", "image/jpeg", {"unavailable"}),
    "empty.png": (b"", "image/png", {"unavailable"}),
}


def _run_consumer(bootstrap: str, topics: Topics, redis_url: str, values: list[bytes], **overrides: Any) -> Outcome:
    env = settings_env(bootstrap, topics, redis_url, **overrides)
    produce(bootstrap, topics.posts, values)
    with app_in_thread(make_settings(env)):
        assert wait_until(lambda: all_committed(bootstrap, topics), 120, interval=0.5)
    return Outcome.read(bootstrap, topics)


def test_crafted_images_through_the_consumer(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1})
    urls = {name: image_server.route(f"/{name}", image(data, mime)) for name, (data, mime, _) in CRAFTED.items()}
    values = [json.dumps({"post_id": name, "text": "look", "image_url": url}).encode() for name, url in urls.items()]

    outcome = _run_consumer(kafka_bootstrap, topics, redis_url, values)

    assert not outcome.missing() and not outcome.dead_letters
    statuses = {e.post_id: e.image_status.value for e in outcome.events}
    print("\n[crafted images]", statuses)
    for name, (_, _, acceptable) in CRAFTED.items():
        assert statuses[name] in acceptable, (name, statuses[name])


def test_the_ssrf_list_through_the_whole_consumer_reaches_no_server(
    kafka_bootstrap: str, redis_url: str, loopback_servers: ImageServer, netguard: NetGuard, unique_name: str
) -> None:
    netguard.add_host("loop.test", "127.0.0.1")
    netguard.add_host("mixed.test", "93.184.216.34", "127.0.0.1")
    loopback_servers.route("/a.jpg", image(sample_image("JPEG")))
    urls = loopback_spellings(loopback_servers.port)
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    values = [json.dumps({"post_id": f"s{i}", "text": "hi", "image_url": url}).encode() for i, url in enumerate(urls)]

    # Default fetch policy: nothing private allowed, no allow-listed networks.
    outcome = _run_consumer(kafka_bootstrap, topics, redis_url, values, fetch_allow_cidrs="")

    statuses = {e.post_id: e.image_status.value for e in outcome.events}
    assert statuses == {f"s{i}": "blocked" for i in range(len(urls))}, statuses
    assert loopback_servers.requests == []
    assert loopback_servers.connections == []
    print(f"\n[ssrf through the consumer] urls={len(urls)} blocked={len(statuses)} requests=0")


# -- the decoder raises only BadRecord (issue 25, item 1) ----------------------------------------------------------

# Where a hostile token goes inside an otherwise valid post: a field of its own, a field the post needs, deep inside.
_HOSTILE_SLOTS = (
    '{{"post_id": "p", "text": "hi", "extra": {token}}}',
    '{{"post_id": {token}, "text": "hi"}}',
    '{{"post_id": "p", "text": "hi", "extra": [1, {{"a": [{token}]}}]}}',
    '{{"post_id": "p", "text": {token}}}',
    "{token}",
)


def _decode_refused(value: bytes) -> BadRecord:
    result = _decode_bounded(value)
    assert isinstance(result, BadRecord), result
    return result


@settings(max_examples=60, deadline=None)
@given(digits=st.integers(min_value=4_301, max_value=20_000), sign=st.sampled_from(["", "-"]),
       slot=st.sampled_from(_HOSTILE_SLOTS))
def test_numbers_past_the_int_digit_limit_are_bad_records(digits: int, sign: str, slot: str) -> None:
    token = sign + "9" * digits
    assert _decode_refused(slot.format(token=token).encode()).code == "invalid_json"


@settings(max_examples=60, deadline=None)
@given(literal=st.sampled_from(["NaN", "Infinity", "-Infinity"]), slot=st.sampled_from(_HOSTILE_SLOTS))
def test_non_finite_literals_are_bad_records(literal: str, slot: str) -> None:
    bad = _decode_refused(slot.format(token=literal).encode())
    assert bad.code == "invalid_json" and literal.lstrip("-") in bad.message


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(min_value=65, max_value=5_000), opener=st.sampled_from(['[', '{"a":']),
       slot=st.sampled_from(_HOSTILE_SLOTS))
def test_nesting_at_any_depth_past_the_limit_is_a_bad_record(depth: int, opener: str, slot: str) -> None:
    closer = "]" if opener == "[" else "}"
    token = opener * depth + "1" + closer * depth
    assert _decode_refused(slot.format(token=token).encode()).code == "too_deep"


def _holds_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_holds_non_finite(v) for v in value.values())
    return isinstance(value, list) and any(_holds_non_finite(v) for v in value)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(_HOSTILE_SLOTS))
def test_any_json_value_anywhere_in_a_post_decodes_or_is_a_bad_record(value: Any, slot: str) -> None:
    # json.dumps writes NaN/Infinity for non-finite floats (allow_nan): wherever they are, the record is refused.
    result = _decode_bounded(slot.format(token=json.dumps(value)).encode("utf-8", "surrogatepass"))
    if _holds_non_finite(value):
        assert isinstance(result, BadRecord) and result.code == "invalid_json", result
