"""Prometheus metrics of the consumer, and the HTTP server for `/metrics`, `/healthz` and `/readyz`.

The metrics live in the default registry (once per process), next to the fetcher's and the cache's own counters
(`mmsent_image_fetch_*`, `mmsent_cache_*`), so one scrape sees them all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

log = structlog.get_logger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every metric of the poll loop and the stages. Create with `Metrics.get()` (one per process)."""

    _instance: Metrics | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.records_consumed = Counter("mmsent_records_consumed_total", "Input records read from Kafka.")
        self.events_produced = Counter(
            "mmsent_events_produced_total", "Sentiment events acknowledged by the broker.", ["label"]
        )
        self.dead_letters = Counter(
            "mmsent_dead_letters_total", "Records dead-lettered (acknowledged), by error code.", ["code"]
        )
        self.skipped = Counter("mmsent_records_skipped_total", "Records counted done without output.", ["code"])
        self.alerts = Counter("mmsent_alerts_total", "Events also routed to the alert topic.")
        self.shadow_agreement = Counter(
            "mmsent_shadow_agreement_total", "Posts scored by the shadow model, by whether its label agreed with the "
            "primary's (agree: true or false).", ["agree"],
        )
        self.shadow_failures = Counter(
            "mmsent_shadow_failures_total", "Batches the shadow model failed on (the primary's events went out) or "
            "shadow events the broker refused.",
        )
        self.image_status = Counter("mmsent_image_status_total", "Scored posts by image status.", ["status"])
        self.image_source = Counter(
            "mmsent_image_source_total",
            "Where each distinct image of a batch came from: embedding_cache (no fetch, no CNN), "
            "bytes_cache (no fetch), fetch.",
            ["source"],
        )
        self.model_reloads = Counter(
            "mmsent_model_reloads_total",
            "Model reloads (SIGHUP or a changed model directory): loaded (swapped in) or refused (failed to load or "
            "warm up; the serving model goes on).",
            ["outcome"],
        )
        self.cnn_images = Counter("mmsent_cnn_images_total", "Images run through the image encoder.")
        self.batch_size = Histogram(
            "mmsent_batch_size", "Posts per micro-batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        )
        self.batch_latency = Histogram(
            "mmsent_batch_latency_seconds", "From a batch's cut to its results being ready.", buckets=_LATENCY_BUCKETS
        )
        self.stage_latency = Histogram(
            "mmsent_stage_latency_seconds",
            "Time per stage and batch: wait (oldest record to cut), fetch (images), model (CNN + scoring).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
        )
        self.end_to_end_latency = Histogram(
            "mmsent_end_to_end_latency_seconds",
            "From the input record's timestamp to its output's acknowledgement.",
            buckets=_LATENCY_BUCKETS,
        )
        self.consumer_lag = Gauge("mmsent_consumer_lag", "Records behind the end of each partition.", ["partition"])
        self.in_flight = Gauge("mmsent_in_flight", "Records read and not yet done (output acknowledged).")
        self.paused_partitions = Gauge("mmsent_paused_partitions", "Partitions paused for backpressure.")
        self.ready = Gauge("mmsent_ready", "1 when the model is loaded and partitions are assigned.")
        self.commits = Counter("mmsent_commits_total", "Offset commits (or transactions), by outcome.", ["outcome"])
        self.rebalances = Counter("mmsent_rebalances_total", "Partition assignment changes.", ["kind"])
        self.producer_replacements = Counter(
            "mmsent_producer_replacements_total", "Producers replaced after a fatal error (at least once)."
        )
        self.model_splits = Counter("mmsent_model_batch_splits_total", "Batches split to find a poison post.")

    @classmethod
    def get(cls) -> Metrics:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance


class HealthServer:
    """`/metrics` (Prometheus text), `/healthz` (the process is alive) and `/readyz` (`is_ready()`), on a thread.

    Port 0 binds a free port (see `.port`); the server is a daemon thread and `close()` stops it.
    """

    def __init__(self, host: str, port: int, is_ready: Callable[[], bool], registry: Any = REGISTRY) -> None:
        server_ref = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    ready = server_ref.is_ready()
                    self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server API)
                return

        self.is_ready = is_ready
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="mmsent-metrics", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("metrics_listening", port=self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
