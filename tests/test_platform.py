"""What a platform team needs around the scores, on a real broker and a real Redis, in this process: headers
carried through, mmsent's own headers on events and dead letters.

The `Application` runs on a thread with the `tiny-random` model (random weights: the plumbing, not the scores).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from schemas import headers as wire
from tests.consumerutil import Topics, all_committed, app_in_thread, make_settings, post, settings_env, wait_until
from tests.kafkautil import create_topics, produce, read_all

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
