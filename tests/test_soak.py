"""Soak: a long stream through one consumer process while its memory (RSS) is sampled; memory must level off.

The core tier streams a few thousand posts; `make chaos` (the `slow` marker) streams tens of thousands.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import pytest

from tests.consumerutil import (
    ConsumerProcess,
    SteadyProducer,
    Topics,
    all_committed,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.imageserver import ImageServer, image, sample_image
from tests.kafkautil import create_topics
from tooling.reconcile import reconcile, render_table

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.samples: list[tuple[float, float]] = []
        self._pid, self._interval = pid, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            rss = _rss_mb(self._pid)
            if rss is not None:
                self.samples.append((time.monotonic() - self._started, rss))

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def _soak(posts: int, bootstrap: str, redis_url: str, server: ImageServer, name: str, tmp_path: Path) -> None:
    topics = Topics.named(name)
    create_topics(bootstrap, {topics.posts: 3, topics.sentiment: 3, topics.dlq: 1})
    urls = [server.route(f"/soak{i}.jpg", image(sample_image("JPEG", color=(i % 256, 60, 200 - i % 200))))
            for i in range(200)]
    values = synthetic_posts(posts, lambda i: urls[i % len(urls)] if i % 2 else None, prefix="soak")
    consumer = ConsumerProcess(settings_env(bootstrap, topics, redis_url, max_batch_size=32), tmp_path / "soak.log")
    assert wait_until(lambda: bool(consumer.assigned()), 90), consumer.tail()
    sampler = RssSampler(consumer.pid)
    started = time.monotonic()
    stream = SteadyProducer(bootstrap, topics.posts, values, per_burst=200, interval_s=0.02).start()
    try:
        stream.join(1200)
        assert wait_until(lambda: all_committed(bootstrap, topics), 1200, interval=1.0), consumer.tail()
    finally:
        samples = sampler.stop()
        consumer.stop()
    elapsed = time.monotonic() - started
    report = reconcile({"bootstrap.servers": bootstrap}, topics.posts, topics.sentiment, topics.dlq, timeout_s=120)
    rss = [mb for _, mb in samples]
    quarter = max(1, len(rss) // 4)
    second_quarter = statistics.mean(rss[quarter : 2 * quarter])
    last_quarter = statistics.mean(rss[-quarter:])
    timeline = " ".join(f"{t:.0f}s:{mb:.0f}" for t, mb in samples[:: max(1, len(samples) // 12)])
    print(f"\n[soak] posts={posts} seconds={elapsed:.1f} posts_per_s={posts / elapsed:.0f} "
          f"lost={report.total('lost')} repeats={report.total('repeats')} rss_mb 2nd-quarter={second_quarter:.0f} "
          f"last-quarter={last_quarter:.0f} max={max(rss):.0f}\n[soak] rss timeline (MB): {timeline}")
    assert report.ok and report.total("inputs") == posts, render_table(report)
    # Memory levels off: after warm-up, the last quarter grows less than 10% (or 40 MB) over the second.
    assert last_quarter - second_quarter < max(40.0, 0.10 * second_quarter), timeline


def test_soak_a_few_thousand_posts(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    _soak(4000, kafka_bootstrap, redis_url, image_server, unique_name, tmp_path)


@pytest.mark.slow
def test_soak_tens_of_thousands_of_posts(
    kafka_bootstrap: str, redis_url: str, image_server: ImageServer, unique_name: str, tmp_path: Path
) -> None:
    _soak(30_000, kafka_bootstrap, redis_url, image_server, unique_name, tmp_path)
