"""`mmsent demo`: the whole pipeline on this machine, with nothing else installed.

An embedded broker (and a Redis, unless one answers on localhost), a loopback HTTP server with generated sample
images, a few hundred synthetic posts (repeated images, a broken image, a missing one, URLs the fetch policy
refuses, and records that are not posts at all), the consumer with the model and, beside it, the live console
(`mmsent inspect`, its URL printed), the events as they arrive, then a summary: events per label, image status,
dead letters, cache, throughput and latency percentiles, and what the console saw. `linger_s` keeps the console
open that long after the summary, to look at it.
"""

from __future__ import annotations

import gc
import io
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Producer
from PIL import Image, ImageDraw
from prometheus_client import REGISTRY

from consumer.app import Application
from consumer.inspect import Inspector
from consumer.logging import configure_logging
from consumer.settings import Settings
from tooling.embedded import EmbeddedServices, create_topics
from tooling.localimages import LoopbackImageServer

INPUT, OUTPUT, DLQ, ALERTS = "posts", "sentiment", "sentiment.dlq", "sentiment.alerts"

CAPTIONS = {
    "positive": [
        "What a gorgeous morning at the beach, feeling grateful",
        "Best birthday ever, thank you all so much!",
        "Our puppy learned to sit today, so proud",
        "This coffee is perfect and the view is amazing",
        "Finally finished the marathon, happy tears",
        "Love this little garden we built together",
    ],
    "negative": [
        "Worst service I have ever had, never coming back",
        "My flight got cancelled again, this is awful",
        "The package arrived broken and nobody answers",
        "Terrible day, everything went wrong",
        "I hate how loud the construction is at 6am",
        "So disappointed with this phone, it died in a week",
    ],
    "neutral": [
        "Train to the office, arriving at 9",
        "Meeting notes are in the shared folder",
        "The store opens at ten on Sundays",
        "Picture of the new bus stop on Main Street",
        "Weather today: cloudy, 14 degrees",
        "Updated my profile photo",
    ],
}

# name -> (colour, pattern): small generated pictures, ours to redistribute
SAMPLE_IMAGES = {
    "sunset": ((250, 140, 40), "stripes"),
    "sea": ((30, 110, 200), "waves"),
    "forest": ((40, 140, 60), "dots"),
    "storm": ((70, 70, 90), "stripes"),
    "rose": ((210, 40, 80), "dots"),
    "snow": ((235, 235, 245), "waves"),
}


def _render(colour: tuple[int, int, int], pattern: str, fmt: str) -> bytes:
    image = Image.new("RGB", (160, 120), colour)
    draw = ImageDraw.Draw(image)
    for step in range(0, 160, 16):
        if pattern == "stripes":
            draw.rectangle((step, 0, step + 6, 120), fill=tuple(255 - c for c in colour))
        elif pattern == "dots":
            draw.ellipse((step, (step * 3) % 100, step + 12, (step * 3) % 100 + 12), fill=(255, 255, 255))
        else:
            draw.arc((step - 20, 30, step + 20, 90), 0, 180, fill=(255, 255, 255), width=3)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def sample_image_files() -> dict[str, tuple[bytes, str]]:
    """The sample images (JPEG and PNG), plus a broken one; `/gone.jpg` is left missing on purpose."""
    files: dict[str, tuple[bytes, str]] = {}
    for name, (colour, pattern) in SAMPLE_IMAGES.items():
        fmt, kind = ("JPEG", "image/jpeg") if len(name) % 2 else ("PNG", "image/png")
        files[f"/{name}.{fmt.lower()}"] = (_render(colour, pattern, fmt), kind)
    files["/broken.jpg"] = (b"\xff\xd8\xff\xe0 truncated, not really a JPEG", "image/jpeg")
    return files


def _image_urls(images: LoopbackImageServer) -> list[str]:
    return [images.base + path for path in images.files if path != "/broken.jpg"]


def synthetic_stream(count: int, images: LoopbackImageServer, seed: int = 7) -> list[tuple[bytes, bytes | None]]:
    """(key, value) records: posts with and without images, and a few records that are not posts."""
    rng = random.Random(seed)
    urls = _image_urls(images)
    records: list[tuple[bytes, bytes | None]] = []
    for index in range(count):
        sentiment = rng.choice(list(CAPTIONS))
        roll = rng.random()
        if roll < 0.30:
            image_url: str | None = None
        elif roll < 0.85:
            image_url = rng.choice(urls)  # the same few images again and again: the cache's work
        elif roll < 0.90:
            image_url = images.base + "/broken.jpg"
        elif roll < 0.94:
            image_url = images.base + "/gone.jpg"
        elif roll < 0.97:
            image_url = "http://10.20.30.40/internal.png"  # a private address: the fetch policy refuses it
        else:
            image_url = "file:///etc/passwd"  # not http(s): refused, never fetched
        post = {"post_id": f"demo-{index:04d}", "text": rng.choice(CAPTIONS[sentiment]), "image_url": image_url,
                "created_at": datetime.now(UTC).isoformat(), "author": f"user{rng.randrange(50)}"}
        records.append((f"user{index % 17}".encode(), json.dumps(post).encode()))
    bad: list[bytes | None] = [b"this is not JSON", b'["a", "list"]', b'{"text": "a post without an id"}',
                               json.dumps({"post_id": "x" * 300, "text": "id too long"}).encode(), None]
    for offset, value in enumerate(bad):
        records.insert(min(len(records), (offset + 1) * max(1, count // (len(bad) + 1))), (b"bad", value))
    return records


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class _Watcher:
    """Reads the output and dead-letter topics and prints each record as it arrives."""

    def __init__(self, bootstrap: str, live_rows: int) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"mmsent-demo-watch-{os.getpid()}",
                                   "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self._consumer.subscribe([OUTPUT, DLQ, ALERTS])
        self.events: list[dict[str, Any]] = []
        self.dead_letters: list[dict[str, Any]] = []
        self.alerts = 0
        self.latencies: list[float] = []
        self.live_rows = live_rows
        self._printed = 0
        self.produced_at: dict[str, float] = {}

    def poll(self, timeout: float = 0.2) -> None:
        for message in self._consumer.consume(500, timeout):
            value = message.value()
            if message.error() or value is None:
                continue
            body = json.loads(value)
            if message.topic() == ALERTS:
                self.alerts += 1
            elif message.topic() == DLQ:
                self.dead_letters.append(body)
                self._row("DEAD LETTER", body["error"]["code"], "", body["source"], body["error"]["message"][:46])
            else:
                self.events.append(body)
                sent = self.produced_at.get(body["post_id"])
                if sent is not None:
                    scored = datetime.fromisoformat(body["scored_at"].replace("Z", "+00:00")).timestamp()
                    self.latencies.append(max(0.0, scored - sent))
                top = body["scores"][body["label"]]
                self._row(body["post_id"], body["label"], f"{top:.2f}", body["source"], body["image_status"])

    def _row(self, first: str, second: str, third: str, source: dict[str, Any], last: str) -> None:
        self._printed += 1
        if self._printed <= self.live_rows:
            where = f"{source['partition']}@{source['offset']}"
            print(f"  {first:<14} {second:<14} {third:>5}  {where:>8}  {last}", flush=True)
        elif self._printed == self.live_rows + 1:
            print("  ... (the rest streams on; summary below)", flush=True)

    def close(self) -> None:
        self._consumer.close()


@contextmanager
def _running(app: Application) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=app.run, name="mmsent-consumer", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        app.stop()
        thread.join(60)


def run_demo(posts: int = 300, live_rows: int = 40, timeout_s: float = 300.0, linger_s: float = 0.0) -> int:
    """Run the demo; returns the exit code (0 when every record was accounted for)."""
    configure_logging(os.environ.get("MMSENT_LOG_LEVEL", "ERROR"), json_logs=False)
    print(f"mmsent demo: {posts} posts through an embedded broker, Redis, image server and the model\n", flush=True)
    with EmbeddedServices() as services, LoopbackImageServer(sample_image_files()) as images:
        print(f"  broker {services.kafka_bootstrap}   redis {services.redis_url}   images {images.base}", flush=True)
        create_topics(services.kafka_bootstrap, {INPUT: 3, OUTPUT: 3, DLQ: 1, ALERTS: 1})
        settings = Settings(
            kafka_bootstrap_servers=services.kafka_bootstrap,
            redis_url=services.redis_url,
            input_topic=INPUT,
            output_topic=OUTPUT,
            dlq_topic=DLQ,
            group_id="mmsent-demo",
            model=os.environ.get("MMSENT_MODEL") or None,
            fetch_allow_private=False,
            fetch_allow_cidrs="127.0.0.1/32",  # type: ignore[arg-type]  # parsed by the validator
            fetch_retries=0,
            metrics_port=int(os.environ.get("MMSENT_METRICS_PORT", "0")),
            metrics_host="127.0.0.1",
            alert_topic=ALERTS,
            alert_label="negative",
            alert_min_probability=float(os.environ.get("MMSENT_ALERT_MIN_PROBABILITY", "0.6")),
            shutdown_grace_s=10,
            inspect_port=int(os.environ.get("MMSENT_INSPECT_PORT", "0")),  # 0: a free one
        )
        with Inspector(settings) as inspector:
            print(f"  console {inspector.url}   (mmsent inspect: the scored stream, live)", flush=True)
            rc = _stream(settings, services.kafka_bootstrap, images, posts, live_rows, timeout_s, inspector)
            if linger_s > 0:
                print(f"\n  the console stays open at {inspector.url} for {linger_s:.0f} s", flush=True)
                time.sleep(linger_s)
        return rc


def _stream(settings: Settings, bootstrap: str, images: LoopbackImageServer, posts: int, live_rows: int,
            timeout_s: float, inspector: Inspector) -> int:
    """The consumer on the synthetic stream, the events as they come, then the summary; the exit code."""
    app = Application(settings)
    watcher = _Watcher(bootstrap, live_rows)
    records = synthetic_stream(posts, images)
    started_loading = time.monotonic()
    with _running(app) as thread:
        while not app.ready and thread.is_alive() and time.monotonic() - started_loading < timeout_s:
            watcher.poll(0.1)
        if not app.ready:
            print("the consumer did not start; see the log above", flush=True)
            return 1
        print(f"  model {dict(app.model_info or {})} ready in {time.monotonic() - started_loading:.1f}s\n",
              flush=True)
        print(f"  {'post':<14} {'label/code':<14} {'p':>5}  {'part@off':>8}  image / reason", flush=True)
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
        started = time.monotonic()
        for index, (key, value) in enumerate(records):  # a stream, not a backlog: bursts of 25
            if value is not None and value.startswith(b'{"post_id": "demo-'):
                watcher.produced_at[json.loads(value)["post_id"]] = time.time()
            producer.produce(INPUT, value=value, key=key)
            if index % 25 == 24:
                producer.flush(10)
                watcher.poll(0.02)
        producer.flush(30)
        del producer  # gone before the broker stops
        expected = len(records)
        deadline = time.monotonic() + timeout_s
        while len(watcher.events) + len(watcher.dead_letters) < expected and time.monotonic() < deadline:
            watcher.poll(0.2)
        elapsed = time.monotonic() - started
    for _ in range(3):
        watcher.poll(0.2)  # late alerts
    watcher.close()
    gc.collect()
    rc = app_rc = 0 if not thread.is_alive() else 1
    _await_console(inspector, len(watcher.events) + len(watcher.dead_letters))
    _summary(watcher, images, expected, elapsed, inspector)
    if len(watcher.events) + len(watcher.dead_letters) < expected:
        print(f"\nonly {len(watcher.events) + len(watcher.dead_letters)} of {expected} records accounted for",
              flush=True)
        rc = 1
    return rc or app_rc


def _await_console(inspector: Inspector, outputs: int, timeout_s: float = 10.0) -> None:
    """Give the console (which tails on its own) a moment to have seen what the watcher saw."""
    seen = inspector.feed.charts.totals
    deadline = time.monotonic() + timeout_s
    while seen["events"] + seen["dead_letters"] < outputs and time.monotonic() < deadline:
        time.sleep(0.1)


def _summary(watcher: _Watcher, images: LoopbackImageServer, expected: int, elapsed: float,
             inspector: Inspector) -> None:
    events, letters = watcher.events, watcher.dead_letters
    labels = Counter(e["label"] for e in events)
    statuses = Counter(e["image_status"] for e in events)
    codes = Counter(d["error"]["code"] for d in letters)
    sources = {label: _sample("mmsent_image_source_total", source=label)
               for label in ("embedding_cache", "recent_embedding", "bytes_cache", "fetch")}
    downloads = sum(count for path, count in images.hits.items())
    rows: list[tuple[str, str]] = [("records in", str(expected)), ("events out", str(len(events)))]
    rows += [(f"  label {name}", str(labels.get(name, 0))) for name in ("negative", "neutral", "positive")]
    rows += [(f"  image {name}", str(statuses.get(name, 0))) for name in ("ok", "none", "unavailable", "blocked")]
    rows.append(("dead letters", str(len(letters))))
    rows += [(f"  {code}", str(n)) for code, n in sorted(codes.items())]
    rows.append(("alerts (negative)", str(watcher.alerts)))
    rows.append(("images: cache hits (embedding)", f"{sources['embedding_cache'] + sources['recent_embedding']:.0f}"))
    rows.append(("images: cache hits (bytes)", f"{sources['bytes_cache']:.0f}"))
    rows.append(("images: fetches / downloads", f"{sources['fetch']:.0f} / {downloads}"))
    rows.append(("images: through the CNN", f"{_sample('mmsent_cnn_images_total'):.0f}"))
    rows.append(("throughput", f"{len(events) / elapsed:.1f} posts/s" if elapsed > 0 else "-"))
    p50, p95 = (_percentile(watcher.latencies, q) * 1000 for q in (0.5, 0.95))
    rows.append(("latency p50 / p95 (produce to scored)", f"{p50:.0f} / {p95:.0f} ms"))
    seen = inspector.feed.charts.totals
    rows.append(("console: events / dead letters seen", f"{seen['events']} / {seen['dead_letters']}"))
    width = max(len(name) for name, _ in rows) + 2
    print("\n  summary\n  " + "-" * (width + 16), flush=True)
    for name, value in rows:
        print(f"  {name:<{width}}{value:>16}", flush=True)
    print("  " + "-" * (width + 16), flush=True)


def _sample(name: str, **labels: str) -> float:
    """A counter's value from the process's Prometheus registry (0 before its first count)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
