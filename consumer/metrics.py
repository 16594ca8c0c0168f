"""Prometheus metrics of the consumer, and the HTTP server for `/metrics`, `/healthz` and `/readyz`.

The server is bounded: one thread and an asyncio loop, a deadline per request, a cap on open connections
(`HealthServer`); prometheus_client's own `start_http_server` is a thread per connection, which idle sockets exhaust.

The metrics live in the default registry (once per process), next to the fetcher's and the cache's own counters
(`mmsent_image_fetch_*`, `mmsent_cache_*`), so one scrape sees them all.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import h11
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from mmsent import TOP_PROBABILITY_EDGES

log = structlog.get_logger(__name__)

# A probe's or a scrape's request head is a few hundred bytes; anything near this is not one.
_MAX_REQUEST_HEAD = 8 * 1024
_READ_CHUNK = 4 * 1024
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every metric of the poll loop and the stages. Create with `Metrics.get()` (one per process)."""

    _instance: Metrics | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.records_consumed = Counter("mmsent_records_consumed_total", "Input records read from Kafka.")
        self.events_produced = Counter(
            "mmsent_events_produced_total", "Sentiment events acknowledged by the broker, by label and model "
            "(name:version).", ["label", "model"],
        )
        # what the model says (consumer/drift.py) and what moderators say of it (consumer/feedback.py)
        self.top_probability = Histogram(
            "mmsent_top_probability", "The predicted label's probability, by label and model.", ["label", "model"],
            buckets=TOP_PROBABILITY_EDGES,
        )
        self.modality_disagreements = Counter(
            "mmsent_modality_disagreements_total", "Posts whose text alone and image alone give different labels.",
            ["model"],
        )
        self.prediction_drift = Gauge(
            "mmsent_prediction_drift", "Jensen-Shannon distance (base 2) between the model's last MMSENT_DRIFT_WINDOW "
            "predictions (label x top-probability bin) and its reference.json.", ["model"],
        )
        self.feedback = Counter(
            "mmsent_feedback_total", "Moderators' verdicts joined to this group's events: the model, the label it "
            "predicted, the label a person gave.", ["model", "predicted", "actual"],
        )
        self.feedback_unmatched = Counter(
            "mmsent_feedback_unmatched_total", "Verdicts not counted in mmsent_feedback_total: unknown (no recent "
            "event of that post: never scored by this group, or too old) or invalid (not a verdict).", ["reason"],
        )
        self.dead_letters = Counter(
            "mmsent_dead_letters_total", "Records dead-lettered (acknowledged), by error code.", ["code"]
        )
        self.skipped = Counter("mmsent_records_skipped_total", "Records counted done without output.", ["code"])
        self.alerts = Counter("mmsent_alerts_total", "Events also routed to the alert topic.")
        self.posts_by_language = Counter(
            "mmsent_posts_by_language_total", "Sentiment events acknowledged, by the caption's language (ISO 639-1; "
            "unknown when it cannot be told: consumer/language.py).", ["language"],
        )
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
        self.lag_seconds = Gauge(
            "mmsent_lag_seconds",
            "Age of the oldest record per partition: kind uncommitted (read, not yet committed) or unread (the next "
            "record at the consumer's position; 0 when there is none). consumer/lag.py says how each is measured.",
            ["partition", "kind"],
        )
        self.lost_to_retention = Counter(
            "mmsent_records_lost_to_retention_total",
            "Records the log deleted before they were scored (the consumer's offset fell below the log start).",
            ["partition"],
        )
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
    """`/metrics` (Prometheus text), `/healthz` (`is_live()`) and `/readyz` (`is_ready()`), on an asyncio loop of
    its own thread.

        accept ──▶ idle (waiting for its request; the oldest dropped past `max_connections`)
               ──▶ request head read within `request_timeout_s` (h11 parses it) ──▶ answer ──▶ close

    One thread whatever the connections: an idle or slow client costs a coroutine and a socket, never a thread,
    and is dropped after `request_timeout_s`; past `max_connections` open at once the oldest idle one is dropped,
    so a probe that has just connected is always served. Port 0 binds a free port (see `.port`); `close()` stops
    the server.
    """

    def __init__(
        self,
        host: str,
        port: int,
        is_ready: Callable[[], bool],
        registry: Any = REGISTRY,
        *,
        is_live: Callable[[], bool] = lambda: True,
        request_timeout_s: float = 10.0,
        max_connections: int = 256,
    ) -> None:
        self.is_ready = is_ready
        self.is_live = is_live
        self._registry = registry
        self._request_timeout_s = request_timeout_s
        self._max_connections = max_connections
        self._idle: dict[asyncio.StreamWriter, None] = {}  # insertion order: the oldest first
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, host, port, limit=_MAX_REQUEST_HEAD))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._thread = threading.Thread(target=self._loop.run_forever, name="mmsent-metrics", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("metrics_listening", port=self.port)
        return self

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        else:
            self._loop.run_until_complete(self._stop())
        self._loop.close()

    async def _stop(self) -> None:
        self._server.close()
        for writer in list(self._idle):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._admit(writer)
        try:
            async with asyncio.timeout(self._request_timeout_s):
                connection, request = await _read_request(reader)
                self._idle.pop(writer, None)
                writer.write(self._respond(connection, request))
                writer.close()  # after the answer is flushed
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, h11.ProtocolError):
            pass  # a client that is slow, gone or not speaking HTTP: nothing to answer
        finally:
            self._idle.pop(writer, None)
            writer.transport.abort()  # a no-op once closed; otherwise drops what is left unsent

    def _admit(self, writer: asyncio.StreamWriter) -> None:
        """Count a new connection as idle, dropping the oldest idle one when the server is full."""
        if len(self._idle) >= self._max_connections:
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.transport.abort()
        self._idle[writer] = None

    def _respond(self, connection: h11.Connection, request: h11.Request) -> bytes:
        status, body, content_type = self._answer(request)
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close")]
        return b"".join((
            connection.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase))
            or b"",
            connection.send(h11.Data(data=body)) or b"",
            connection.send(h11.EndOfMessage()) or b"",
        ))

    def _answer(self, request: h11.Request) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        if request.method != b"GET":
            return 405, b"method not allowed\n", text
        path = request.target.split(b"?", 1)[0]
        if path == b"/metrics":
            return 200, generate_latest(self._registry), CONTENT_TYPE_LATEST
        if path == b"/healthz":
            live = self.is_live()
            return (200, b"ok\n", text) if live else (503, b"model stage stalled\n", text)
        if path == b"/readyz":
            ready = self.is_ready()
            return (200, b"ready\n", text) if ready else (503, b"not ready\n", text)
        return 404, b"not found\n", text


async def _read_request(reader: asyncio.StreamReader) -> tuple[h11.Connection, h11.Request]:
    """The request head, parsed by h11 (a head over `_MAX_REQUEST_HEAD` bytes is a protocol error)."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_HEAD)
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return connection, event
        if event is not h11.NEED_DATA:
            raise ConnectionResetError("the client closed before its request")
        connection.receive_data(await reader.read(_READ_CHUNK))
