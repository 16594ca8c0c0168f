"""The fixtures themselves: a record round-trips through the broker, a key through Redis."""

from __future__ import annotations

import pytest
import redis

from tests.kafkautil import committed_offsets, create_topics, end_offsets, produce, read_all
from tooling.embedded import RedisProcess


def test_record_round_trips_through_the_broker(kafka_bootstrap: str, unique_name: str) -> None:
    create_topics(kafka_bootstrap, {unique_name: 3})
    values = [f"value-{i}".encode() for i in range(30)]
    keys = [f"key-{i}".encode() for i in range(30)]

    assert produce(kafka_bootstrap, unique_name, values, keys) == 30

    records = read_all(kafka_bootstrap, unique_name, expected=30)
    assert sorted(r.value for r in records if r.value) == sorted(values)
    assert {r.key: r.value for r in records} == dict(zip(keys, values, strict=True))
    assert sum(end_offsets(kafka_bootstrap, unique_name).values()) == 30
    # No group has committed anything on a fresh topic.
    assert all(offset < 0 for offset in committed_offsets(kafka_bootstrap, unique_name, unique_name).values())


def test_key_round_trips_through_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("mmsent:test", b"\x00\xffbytes", ex=60)
    assert client.get("mmsent:test") == b"\x00\xffbytes"
    assert client.ttl("mmsent:test") > 0


def test_redis_stops_and_starts_again(redis_server: RedisProcess) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_connect_timeout=0.5)
    assert client.ping()
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    redis_server.start()
    assert client.ping()


def test_read_topic_reads_a_partitions_last_batch_whole_on_tansu(tansu_bootstrap: str, unique_name: str) -> None:
    """Tansu 0.6.0 lists a partition's end as its last batch's base offset + 1; `read_topic` (behind `read_all` and
    `mmsent reconcile`) must still read the whole last batch, and `end_offsets` must report the true end."""
    from confluent_kafka import Producer

    create_topics(tansu_bootstrap, {unique_name: 1})
    produce(tansu_bootstrap, unique_name, [b"alone"])
    # 3,000 records in few batches: the reader takes at most 1,000 a call, so a short listed end stops it early
    producer = Producer({"bootstrap.servers": tansu_bootstrap, "linger.ms": 500})
    for i in range(3000):
        producer.produce(unique_name, value=f"batched-{i}".encode(), partition=0)
    assert producer.flush(30) == 0
    values = [r.value for r in read_all(tansu_bootstrap, unique_name)]
    assert values == [b"alone"] + [f"batched-{i}".encode() for i in range(3000)]
    assert end_offsets(tansu_bootstrap, unique_name) == {0: 3001}
