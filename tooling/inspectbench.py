"""`mmsent bench inspect`: does the console keep up? Posts and their events (5% alerts, 1% dead letters) produced
at a steady rate to a real broker for a while, `mmsent inspect` in its own process tailing them with one page
open on its live feed; every second its lag behind the topic end (events written and acknowledged less events it
has counted, read from its /api/charts) and, over the run, its CPU share (psutil).

    producer (this process) ──posts + events──▶ embedded broker ──▶ mmsent inspect (subprocess) ──SSE──▶ page reader
                 └──────── acknowledged events ──┐                         │ /api/charts totals
                                                 └──── lag = acknowledged - counted, every second
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import psutil
from confluent_kafka import Producer

from tooling.embedded import EmbeddedServices, create_topics, free_port

INPUT, OUTPUT, DLQ, ALERTS = "bench-posts", "bench-sentiment", "bench-sentiment.dlq", "bench-alerts"
GROUP = "bench-inspect-group"
TICK_S = 0.05


@dataclass
class Sample:
    at_s: float
    acknowledged: int
    counted: int

    @property
    def lag(self) -> int:
        return max(0, self.acknowledged - self.counted)


@dataclass
class InspectBench:
    rate: float
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    rss_mb: float = 0.0
    cards_to_page: int = 0
    catch_up_s: float | None = None
    final_lag: int = 0
    acknowledged: int = 0
    broker: str = "embedded noida-db"


class Acks:
    """Acknowledged events (the output topic's records the broker has taken), counted by delivery callbacks."""

    def __init__(self) -> None:
        self.events = 0

    def on_delivery(self, err: Any, msg: Any) -> None:
        if err is None and msg.topic() == OUTPUT:
            self.events += 1


def _records(index: int) -> list[tuple[str, bytes, list[tuple[str, bytes]]]]:
    """A post's event (or dead letter) and, every 20th, its alert; the post itself is produced first, apart."""
    label = ("negative", "neutral", "positive")[index % 3]
    source = {"topic": INPUT, "partition": 0, "offset": index}
    if index % 100 == 99:
        letter = {"schema_version": 1, "error": {"code": "invalid_json", "message": "not JSON"}, "source": source,
                  "value_b64": None}
        return [(DLQ, json.dumps(letter).encode(), [("mmsent.error.code", b"invalid_json")])]
    event = {"schema_version": 1, "post_id": f"b{index}", "label": label,
             "scores": {"negative": 0.2, "neutral": 0.2, "positive": 0.2, label: 0.6}, "image_status": "none",
             "model": {"name": "bench", "version": "1"}, "source": source,
             "scored_at": datetime.now(UTC).isoformat(),
             "scores_by_modality": {"text": {"negative": 0.1, "neutral": 0.1, "positive": 0.8}}}
    headers = [("traceparent", f"00-{index:032x}-{index:016x}-01".encode()), ("mmsent.model", b"bench:1")]
    records = [(OUTPUT, json.dumps(event).encode(), headers)]
    if index % 20 == 0:
        alert = {**event, "alert": {"rule": "min_probability", "label": label, "probability": 0.6,
                                    "threshold": 0.5, "min_precision": None, "calibration": None}}
        records.append((ALERTS, json.dumps(alert).encode(), headers))
    return records


@contextmanager
def _console(bootstrap: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "MMSENT_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "MMSENT_INPUT_TOPIC": INPUT,
           "MMSENT_OUTPUT_TOPIC": OUTPUT, "MMSENT_DLQ_TOPIC": DLQ, "MMSENT_ALERT_TOPIC": ALERTS,
           "MMSENT_GROUP_ID": GROUP, "MMSENT_REDIS_URL": "", "MMSENT_INSPECT_PORT": str(port),
           "MMSENT_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "consumer", "inspect"], env=env, stdout=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(30)


def _counted(client: httpx.Client, base: str) -> int:
    totals = client.get(base + "api/charts?window=60").json()["totals"]
    return int(totals.get("events", 0))


def _page_reader(base: str, stop: threading.Event, result: InspectBench) -> None:
    """An open page: reads the live feed and counts the cards it is sent."""
    timeout = httpx.Timeout(10, read=60)  # the stream sends a keep-alive every 15 s
    with httpx.Client(timeout=timeout) as client, client.stream("GET", base + "api/stream") as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                result.cards_to_page += len(json.loads(line[6:]))
            if stop.is_set():
                return


def _warm_up(producer: Any, client: httpx.Client, base: str) -> None:
    """Until the console is up and has assigned its topics: one event at a time, until it counts one."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for topic, value, headers in _records(1):
            producer.produce(topic, value=value, headers=headers)
        producer.flush(10)
        try:
            if _counted(client, base) > 0:
                time.sleep(2)  # the last warm-up events land too
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError("mmsent inspect did not start within 120 s")


@contextmanager
def _broker(bootstrap: str | None) -> Iterator[str]:
    """The broker given, or an embedded one (noida-db: it answers an empty fetch at once instead of holding it
    for fetch.wait.max.ms, so an idle reader's librdkafka thread spins on it; a real Kafka or Tansu does not)."""
    if bootstrap:
        yield bootstrap
        return
    with EmbeddedServices(redis_url=None) as services:
        yield services.kafka_bootstrap


def run_inspect_bench(rate: float = 500.0, seconds: float = 30.0, bootstrap: str | None = None) -> InspectBench:
    result = InspectBench(rate, seconds, broker=bootstrap or "embedded noida-db")
    with _broker(bootstrap) as kafka:
        create_topics(kafka, {INPUT: 1, OUTPUT: 3, DLQ: 1, ALERTS: 1})
        port = free_port()
        base = f"http://127.0.0.1:{port}/"
        acks = Acks()
        producer = Producer({"bootstrap.servers": kafka, "linger.ms": 20, "on_delivery": acks.on_delivery})
        with _console(kafka, port) as console, httpx.Client(timeout=10) as client:
            _warm_up(producer, client, base)
            stop = threading.Event()
            threading.Thread(target=_page_reader, args=(base, stop, result), daemon=True).start()
            process = psutil.Process(console.pid)
            base_acked, base_counted = acks.events, _counted(client, base)
            cpu_start, started = sum(process.cpu_times()[:2]), time.monotonic()
            _produce_steadily(producer, client, base, result, (base_acked, base_counted), acks, started)
            result.wall_s = time.monotonic() - started
            result.cpu_s = sum(process.cpu_times()[:2]) - cpu_start
            result.rss_mb = process.memory_info().rss / 2**20
            _drain(client, base, result, (base_acked, base_counted), acks, started)
            stop.set()
        del producer
    return result


def _sample(client: httpx.Client, base: str, bases: tuple[int, int], acks: Acks, started: float) -> Sample:
    return Sample(time.monotonic() - started, acks.events - bases[0], _counted(client, base) - bases[1])


def _produce_steadily(producer: Any, client: httpx.Client, base: str, result: InspectBench, bases: tuple[int, int],
                      acks: Acks, started: float) -> None:
    index, next_sample = 2, 1.0
    while (elapsed := time.monotonic() - started) < result.seconds:
        due = int(elapsed * result.rate) + 2
        while index < due:  # the post first, then what the consumer wrote for it
            producer.produce(INPUT, value=json.dumps({"post_id": f"b{index}", "text": f"caption {index}"}).encode())
            for topic, value, headers in _records(index):
                producer.produce(topic, value=value, headers=headers)
            index += 1
        producer.poll(0)
        if elapsed >= next_sample:
            result.samples.append(_sample(client, base, bases, acks, started))
            next_sample += 1.0
        time.sleep(TICK_S)
    producer.flush(30)


def _drain(client: httpx.Client, base: str, result: InspectBench, bases: tuple[int, int], acks: Acks,
           started: float) -> None:
    """After the last event: how long until the console has counted every one."""
    deadline = time.monotonic() + 60
    sample = _sample(client, base, bases, acks, started)
    while sample.lag > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        sample = _sample(client, base, bases, acks, started)
    result.final_lag, result.acknowledged = sample.lag, sample.acknowledged
    result.catch_up_s = None if sample.lag else sample.at_s - result.wall_s


def render_inspect_bench(result: InspectBench, command: str) -> str:
    lags = sorted(sample.lag for sample in result.samples)
    produced = result.acknowledged
    p50 = lags[len(lags) // 2] if lags else 0
    cores = psutil.cpu_count() or 1
    share = result.cpu_s / result.wall_s if result.wall_s else 0.0
    lines = [
        f"## mmsent inspect under load ({command}, {datetime.now(UTC):%Y-%m-%d}, {cores} cores, broker: "
        f"{result.broker})",
        "",
        f"- events produced and acknowledged: {produced} in {result.wall_s:.1f} s "
        f"({produced / result.wall_s:.0f}/s; target {result.rate:.0f}/s, with their posts, 5% alerts, 1% dead "
        "letters)",
        f"- lag behind the topic end, sampled every second: median {p50}, max {lags[-1] if lags else 0} events",
        f"- after the last event: counted every one in {result.catch_up_s:.2f} s" if result.catch_up_s is not None
        else f"- after the last event: {result.final_lag} events never counted within 60 s",
        f"- CPU: {result.cpu_s:.1f} s over {result.wall_s:.1f} s = {100 * share:.0f}% of one core "
        f"({100 * share / cores:.0f}% of the machine); RSS {result.rss_mb:.0f} MiB",
        f"- cards sent to the open page: {result.cards_to_page} (the feed is sampled; the charts count all)",
    ]
    return "\n".join(lines)
