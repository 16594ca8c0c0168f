"""One error boundary per record (issue 25, items 1-3 and two faults of item 8), on the real broker with the real
`tiny-random` model: every record ends as one event or one dead letter that fits, the consumer goes on, offsets
commit to the end; what is fatal for every record is refused at start-up with exit code 2.

Size limits: noida-db honours a topic's `max.message.bytes` given at creation (describe_configs reports it, and a
larger record is answered `MSG_SIZE_TOO_LARGE`; its default is 1,048,588), so the output topics here are created with
a small limit and the records need not be megabytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from typing import Any

import pytest
import structlog
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from consumer.app import Application
from consumer.errors import EXIT_CONFIGURATION
from schemas import headers as wire
from tests.consumerutil import (
    Outcome,
    Topics,
    all_committed,
    app_in_thread,
    make_settings,
    post,
    settings_env,
    wait_until,
)
from tests.kafkautil import create_topics, produce, read_all

pytestmark = [pytest.mark.kafka]

SMALL_LIMIT = 64_000  # the output topics' max.message.bytes in these tests
CAPTION_KB = 760


def _create_small_topics(bootstrap: str, topics: Topics, limit: int = SMALL_LIMIT) -> None:
    create_topics(bootstrap, {topics.posts: 2})
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = {"max.message.bytes": str(limit)}
    futures = admin.create_topics([NewTopic(topics.sentiment, 2, 1, config=config),
                                   NewTopic(topics.dlq, 1, 1, config=config)])
    for future in futures.values():
        future.result(30)


class _MarkedScorer:
    """The real tiny-random model; a post whose text holds the marker gets `spoil(result)` instead (fault injection:
    a model that yields NaN, a label outside the contract)."""

    def __init__(self, marker: str, spoil: Any) -> None:
        from mmsent import Scorer

        self._scorer = Scorer.load("tiny-random")
        self._marker, self._spoil = marker, spoil
        self.info, self.labels = self._scorer.info, self._scorer.labels
        self.image_encoder_id = self._scorer.image_encoder_id
        self.embed_images = self._scorer.embed_images

    def score(self, posts: list[dict[str, Any]]) -> list[Any]:
        results = list(self._scorer.score(posts))
        marked = [self._marker in str(p.get("text")) for p in posts]
        return [self._spoil(r) if mark else r for mark, r in zip(marked, results, strict=True)]


def _nan_scores(result: Any) -> Any:
    return dataclasses.replace(result, scores={label: math.nan for label in result.scores})


def _label_outside_the_contract(result: Any) -> Any:
    return dataclasses.replace(result, label="furious")


def _drained(bootstrap: str, topics: Topics, values: list[bytes], *, isolation: str = "read_uncommitted",
             keys: list[bytes | None] | None = None, headers: list[list[tuple[str, bytes]]] | None = None,
             **kwargs: Any) -> tuple[Outcome, int | None]:
    """Produce, run one consumer until every offset is committed, stop it; the outcome and its exit code."""
    settings = make_settings(settings_env(bootstrap, topics, None, **kwargs.pop("env", {})))
    produce(bootstrap, topics.posts, values, keys=keys, headers=headers)
    with app_in_thread(settings, **kwargs) as app:
        assert wait_until(lambda: all_committed(bootstrap, topics), 120, interval=0.5), "offsets never reached the end"
        assert not app.stopping
    outcome = Outcome.read(bootstrap, topics, isolation_level=isolation)
    assert not outcome.missing() and outcome.repeats() == 0
    return outcome, app.rc  # type: ignore[attr-defined]


# -- start-up checks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["sentiment", "dlq"])
def test_a_missing_output_topic_is_refused_at_start_up(kafka_bootstrap: str, unique_name: str, missing: str) -> None:
    topics = Topics.named(unique_name)
    present = [name for name in ("posts", "sentiment", "dlq") if name != missing]
    create_topics(kafka_bootstrap, {getattr(topics, name): 1 for name in present})
    app = Application(make_settings(settings_env(kafka_bootstrap, topics, None)), serve_http=False)
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        rc = app.run()
    seconds = time.monotonic() - started
    failed = [entry for entry in logs if entry["event"] == "consumer_start_failed"]
    print(f"\n[missing {missing} topic] rc={rc} seconds={seconds:.2f} message={failed[0]['error'] if failed else None}")
    assert rc == EXIT_CONFIGURATION == 2
    assert seconds < 10
    assert failed and getattr(topics, missing) in failed[0]["error"]
    assert not app.started.is_set()  # refused before the model was loaded or the group joined


# -- outputs that always fit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_records_too_large_for_the_topics_each_end_as_one_dead_letter_that_fits(
    kafka_bootstrap: str, unique_name: str, guarantee: str
) -> None:
    topics = Topics.named(unique_name)
    _create_small_topics(kafka_bootstrap, topics)
    caption = post("big-caption", "x" * CAPTION_KB * 1000)  # a bad record (text over the limit), 760 KB
    many_headers = [(f"h{i:03}", b"v" * 1_000) for i in range(200)]  # 200 KB of headers on a good post
    values = [post(f"p{i}", "fine day") for i in range(30)]
    values[5], values[12], values[20] = caption, post("headers", "so many headers"), b"not json"
    keys: list[bytes | None] = [f"k{i}".encode() for i in range(len(values))]
    keys[20] = b"K" * 300_000  # a bad record with a huge key
    headers = [[("trace", b"t")] for _ in values]
    headers[12] = many_headers
    env = {"processing_guarantee": guarantee, "transactional_id": f"{unique_name}-tx"}
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"

    outcome, rc = _drained(kafka_bootstrap, topics, values, isolation=isolation, keys=keys, headers=headers, env=env)

    assert rc == 0
    letters = {(d.source.partition, d.source.offset): d for d in outcome.dead_letters}
    raw = read_all(kafka_bootstrap, topics.dlq, isolation_level=isolation)
    sizes = [len(r.value or b"") + len(r.key or b"") for r in raw]
    print(f"\n[{guarantee}] events={len(outcome.events)} dead_letters={len(letters)} dlq_record_bytes={sizes}")
    assert len(outcome.events) == len(values) - 3 and len(letters) == 3
    assert max(sizes) < SMALL_LIMIT
    by_code = {d.error.code: d for d in letters.values()}
    big = by_code["invalid_post"]
    assert big.value_truncated and big.value_size == len(caption) and not big.key_truncated
    assert caption.startswith(big.original_value() or b"!") and len(big.original_value() or b"") > 10_000
    refused = by_code["output_refused"]
    assert not refused.value_truncated and refused.original_value() == values[12]
    refused_raw = next(r for r in raw if dict(r.headers or []).get(wire.ERROR_CODE) == b"output_refused")
    kept = [name for name, _ in refused_raw.headers or [] if name.startswith("h")]
    assert kept == [f"h{i:03}" for i in range(len(kept))] and 0 < len(kept) < 200  # dropped last-first
    assert dict(refused_raw.headers or [])[wire.HEADERS_DROPPED] == str(200 - len(kept)).encode()
    keyed = by_code["invalid_json"]
    assert keyed.key_truncated and keyed.key_size == 300_000 and not keyed.value_truncated


# -- one boundary per record ----------------------------------------------------------------------------------------


def test_scores_that_are_not_probabilities_dead_letter_only_that_post(kafka_bootstrap: str, unique_name: str) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    values = [post(f"p{i}", f"a calm post {i}") for i in range(60)]
    values[33] = post("p33", "NANPLEASE now")

    with structlog.testing.capture_logs() as logs:
        outcome, rc = _drained(kafka_bootstrap, topics, values, scorer=_MarkedScorer("NANPLEASE", _nan_scores),
                               env={"max_batch_size": 16})

    assert rc == 0
    assert [(d.error.code, d.source.offset) for d in outcome.dead_letters] == [("non_finite_scores", 33)]
    assert outcome.dead_letters[0].original_value() == values[33]
    assert len(outcome.events) == len(values) - 1
    assert all(math.isfinite(p) for e in outcome.events for p in e.scores.model_dump().values())
    assert any(entry["event"] == "poison_post" for entry in logs)


def test_an_output_the_models_refuse_dead_letters_only_that_record_as_internal_error(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    values = [post(f"p{i}", f"post {i}") for i in range(40)]
    values[7] = post("p7", "BADLABEL here")

    with structlog.testing.capture_logs() as logs:
        outcome, rc = _drained(kafka_bootstrap, topics, values,
                               scorer=_MarkedScorer("BADLABEL", _label_outside_the_contract))

    assert rc == 0
    assert [(d.error.code, d.source.offset) for d in outcome.dead_letters] == [("internal_error", 7)]
    assert len(outcome.events) == len(values) - 1
    failed = [entry for entry in logs if entry["event"] == "record_failed"]
    assert failed and {failed[0]["topic"], failed[0]["partition"], failed[0]["offset"]} == {topics.posts, 0, 7}


# -- a transaction commit that fails once ------------------------------------------------------------------------


class _CommitFailsOnce(Producer):  # type: ignore[misc]
    """The real producer, whose first commit_transaction fails as a broker timeout would (abortable)."""

    failures = 0

    def commit_transaction(self, *args: Any) -> None:
        if _CommitFailsOnce.failures == 0:
            _CommitFailsOnce.failures += 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "injected: commit timed out",
                                            retriable=True, txn_requires_abort=True))
        super().commit_transaction(*args)


def test_a_transaction_commit_that_fails_once_aborts_and_outputs_each_input_once(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1})
    values = [post(f"p{i}", f"post number {i}") for i in range(120)]
    values[50] = b"not json"
    _CommitFailsOnce.failures = 0
    env = {"processing_guarantee": "exactly_once", "transactional_id": f"{unique_name}-tx"}

    with structlog.testing.capture_logs() as logs:
        outcome, rc = _drained(kafka_bootstrap, topics, values, isolation="read_committed", env=env,
                               producer_factory=_CommitFailsOnce)

    aborted = [entry for entry in logs if entry["event"] == "transaction_aborted"]
    print(f"\n[commit fails once] aborted={len(aborted)} events={len(outcome.events)} "
          f"dead_letters={len(outcome.dead_letters)}")
    assert rc == 0 and _CommitFailsOnce.failures == 1 and len(aborted) == 1
    assert any(entry["event"] == "rewound" for entry in logs)
    assert [d.original_value() for d in outcome.dead_letters] == [b"not json"]
    assert sorted(json.loads(v)["post_id"] for v in values if v != b"not json") == sorted(
        e.post_id for e in outcome.events)


def test_a_dead_letter_the_broker_refuses_for_its_size_is_sent_again_smaller(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """The limit learned from MSG_SIZE_TOO_LARGE: the consumer is made to forget what start-up read (as with a broker
    that will not describe its topics), so the first dead letter of a 760 KB caption is refused by the broker."""
    from consumer.fitting import SizeLimits

    topics = Topics.named(unique_name)
    _create_small_topics(kafka_bootstrap, topics)
    caption = post("big-caption", secrets.token_hex(CAPTION_KB * 500))  # random: lz4 cannot shrink it below the limit
    settings = make_settings(settings_env(kafka_bootstrap, topics, None))
    with structlog.testing.capture_logs() as logs, app_in_thread(settings) as app:
        assert app.started.wait(60)
        app.fitter.limits = SizeLimits()  # only the producer's 1,000,000 bytes known
        produce(kafka_bootstrap, topics.posts, [post("before", "hi"), caption, post("after", "hi")])
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 60, interval=0.5)
    outcome = Outcome.read(kafka_bootstrap, topics)
    refused = [entry for entry in logs if entry["event"] == "output_refused"]
    learned = [entry for entry in logs if entry["event"] == "output_size_limit_learned"]
    print(f"\n[size learned] refusals={len(refused)} learned={[e['max_bytes'] for e in learned]}")
    assert app.rc == 0  # type: ignore[attr-defined]
    assert not outcome.missing() and outcome.repeats() == 0 and len(outcome.events) == 2
    [letter] = outcome.dead_letters
    assert letter.error.code == "output_refused" and "invalid_post" in letter.error.message
    assert letter.value_truncated and letter.value_size == len(caption)
    assert refused and learned and learned[-1]["max_bytes"] < SMALL_LIMIT
