"""`Application`: every collaborator of the consumer wired in one place, and the poll loop.

    records ──consume()──▶ decode ──▶ MicroBatcher ──▶ ImageStage (I/O loop) ──▶ ModelStage (model thread)
        ▲                                                                          (+ ShadowStage)  │
        └─ commit low watermark ◀── OffsetTracker ◀── delivery acks ◀── Sink ◀── OutputBuilder ◀─────┘

    ModelReloader (its own thread) ──▶ a warmed ServingModel ──▶ swapped in between batches (each batch keeps its)
    an event acknowledged ──▶ PredictionMonitor (what the model says, drift) ──▶ FeedbackJoiner (its own thread)

The poll loop (this thread) owns the Kafka consumer, the offset tracker, the batcher and the producer's
callbacks: nothing in it is shared with the stage threads except the batches it hands over and gets back.
It never blocks for long, so it keeps polling (heartbeats, rebalances, `max.poll.interval.ms`) while the stages
work, and pauses the partitions when too much is in flight.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.batcher import Batch, MicroBatcher, ServingModel, WorkItem
from consumer.cache import ImageCache
from consumer.decoding import decode_side
from consumer.drift import PredictionMonitor
from consumer.errors import (
    EXIT_CONFIGURATION,
    EXIT_FAILURE,
    Action,
    ConfigurationError,
    Decision,
    DeliveryFailed,
    ErrorPolicy,
    FatalError,
    is_rebalance_error,
)
from consumer.feedback import FeedbackJoiner
from consumer.fetch import ImageFetcher, image_decoder
from consumer.fitting import OutputFitter, SizeLimits, internal_error, is_refusal
from consumer.kafkaconfig import client_config, consumer_config, producer_config
from consumer.lag import RetentionWatch, TimeLag, UnreadProbe
from consumer.language import LanguageDetector
from consumer.metrics import HealthServer, Metrics
from consumer.offsets import OffsetTracker, TopicPartitionKey
from consumer.outputs import Output, OutputBuilder
from consumer.pausing import PausingManager
from consumer.preflight import preflight
from consumer.protocols import CacheLike, FetcherLike, ScorerLike
from consumer.reload import ModelReloader
from consumer.replay import ReplayWindow
from consumer.rollout import load_vetted, refusal_reason
from consumer.settings import ProcessingGuarantee, Settings
from consumer.shadow import ShadowStage
from consumer.sink import Sink
from consumer.stages import ImageStage, LoopThread, ModelStage, Pipeline
from consumer.tracing import Tracing
from mmsent import ModelRefused
from schemas.decode import BadRecord, decode_post
from schemas.models import ModelInfo

log = structlog.get_logger("consumer")

COMMIT_INTERVAL_S = 0.5
REVOKE_FLUSH_S = 10.0
LEAVE_TIMEOUT_S = 10.0
MAX_CONSUME = 500
# Under a backlog (full batches), batches on the model at once. With one, the machine idled 9-10% at full load, evenly
# through the run; most likely (not measured apart) a batch's scorer slices finishing unevenly, and the model thread's
# own work between the CNN and the text calls, leave the workers waiting. A second full batch on the model gives them
# its slices meanwhile: idle 4-5% (results still leave in submission order); smaller batches keep to one at a time.
# BENCHMARKS.md "Third round" has the runs.
MODEL_CONCURRENCY = 2
# Posts per batch for a scorer that does not say what suits its device (`serving_batch_size`): the CPU's.
DEVICELESS_BATCH_SIZE = 32
# A refused output is replaced by a smaller dead letter, again while the broker refuses it (consumer/fitting.py:
# its size limit halves each time, and from the BARE_AFTER-th the letter keeps nothing of the record); then the
# delivery error policy decides.
MAX_REPLACEMENTS = 8
# How long a thread may hold the GIL while another asks for it (CPython's default: 5 ms). A scoring slice that comes
# back from ONNX Runtime waits for the GIL while the I/O loop or the poll loop runs Python. At 1 ms the two scoring
# threads slept 8.7% of an int8 backlog instead of 10.5% (means over 8 runs each of `scripts/profile_consumer.py
# --posts 1920 --env MMSENT_CPU_PRECISION=int8`, alternated, AMD EPYC VNNI VM, 2026-12-07: median 195.4 against 180.7
# posts/s, inside this VM's run-to-run spread; fp32 no change seen). BENCHMARKS.md "The GIL's switch interval".
GIL_SWITCH_INTERVAL_S = 0.001


class Application:
    """The consumer service. `run()` blocks until `stop()` (or a fatal error) and returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        *,
        scorer: ScorerLike | None = None,
        fetcher_factory: Callable[[Settings], FetcherLike] | None = None,
        cache_factory: Callable[[Settings], CacheLike | None] | None = None,
        image_decoder: Callable[[bytes], Any] | None = None,
        error_policy: ErrorPolicy | None = None,
        metrics: Metrics | None = None,
        serve_http: bool = True,
        window: ReplayWindow | None = None,
        tracing: Tracing | None = None,
        producer_factory: Callable[..., Producer] = Producer,
        owns_process: bool = False,
    ) -> None:
        """`window`: replay a time window (`mmsent replay`) and stop at its end, instead of consuming for good.
        `producer_factory`: makes the Kafka producer from its configuration (a test wraps the real one to inject
        faults). `owns_process` (`mmsent consume`, `mmsent replay`): the process is this application's, so its
        start-up objects are frozen out of the cyclic garbage collector once wired (`freeze_start_up_objects`) and
        the GIL changes hands sooner (`GIL_SWITCH_INTERVAL_S`)."""
        self.settings = settings
        self.eos = settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE
        self.metrics = metrics or Metrics.get()
        self.policy = error_policy or ErrorPolicy()
        self._scorer = scorer
        self._fetcher_factory = fetcher_factory
        self._cache_factory = cache_factory
        self._image_decoder = image_decoder
        self._serve_http = serve_http
        self._window = window
        self._producer_factory = producer_factory
        self._owns_process = owns_process
        self.tracing = tracing or Tracing.from_environment()
        self._stop = threading.Event()
        self._fatal: BaseException | None = None
        # At least once: a producer that hit a fatal error (e.g. its idempotence state was lost with a broker
        # restart) is replaced and everything not yet acknowledged is read again, instead of exiting.
        self._producer_failed: KafkaError | None = None
        self.ready = False
        self.health: HealthServer | None = None
        self.retention = RetentionWatch(self.metrics)
        self.time_lag: TimeLag | None = None  # set in _start(), with its probe's consumer

        self.tracker = OffsetTracker()
        # its size is the device's default until the model is loaded (_start), unless set
        self.batcher = MicroBatcher(settings.max_batch_size or DEVICELESS_BATCH_SIZE, settings.max_wait_ms / 1000)
        self.max_in_flight = 0  # set in _start(), with the model's device known
        self.outputs = OutputBuilder(settings, self.tracing)
        self.languages = LanguageDetector()  # on this thread, once per batch cut (why: consumer/language.py)
        # every output goes through it: never raising, always within the topics' limits (learned in _start)
        self.fitter = OutputFitter(self.outputs, SizeLimits())
        self._last_commit = 0.0
        self._commit_in_flight = False  # an asynchronous commit awaits its result
        self._model: ServingModel | None = None  # what new batches are scored with
        self._reloader: ModelReloader[ServingModel] | None = None
        self._shadow: ShadowStage | None = None
        self._assigned: set[TopicPartitionKey] = set()
        # what the models say and their drift (consumer/drift.py); verdicts joined to events (consumer/feedback.py)
        self.predictions = PredictionMonitor(self.metrics, settings.drift_window)
        self.feedback: FeedbackJoiner | None = None
        # set in _start(): Kafka clients, I/O loop, stages
        self.consumer: Consumer | None = None
        self.sink: Sink | None = None
        self.pausing: PausingManager | None = None
        self.pipeline: Pipeline | None = None
        self._io: LoopThread | None = None
        self._fetcher: FetcherLike | None = None
        self._cache: CacheLike | None = None
        self.started = threading.Event()

    # -- wiring ---------------------------------------------------------------------------------------------

    def _start(self) -> bool:
        """Wire everything; False when stopped while waiting for the broker. Raises `ConfigurationError` for what
        is fatal for every record (consumer/preflight.py), before the model loads."""
        s = self.settings
        if self._serve_http and self.health is None:
            self.health = HealthServer(
                s.metrics_host, s.metrics_port, lambda: self.ready,
                is_live=lambda: self.pipeline is None or self.pipeline.progress.live(s.liveness_stall_s)).start()
        limits = preflight(s, self._stop)
        if limits is None:
            return False
        self.fitter.limits = limits
        primary = self._scorer or _first_model(s)
        self.batcher.max_size, self.max_in_flight = s.batch_limits(
            getattr(primary, "serving_batch_size", DEVICELESS_BATCH_SIZE))
        self._shadow = self._shadow_stage(primary, s.shadow_model)
        # A scorer that decodes on its device (CUDA) gets the bytes, their header checked; others decoded images, no
        # larger than the serving models' preprocessing needs (a model reloaded later keeps this decoder).
        side = decode_side(primary, *([self._shadow.scorer] if self._shadow is not None else []))
        decoder = self._image_decoder or image_decoder(s, keep_bytes=getattr(primary, "wants_image_bytes", False),
                                                       min_side=side)
        self._io = LoopThread()
        # the safe fetcher decodes with the same decoder as the cached bytes
        fetcher_factory = self._fetcher_factory or partial(ImageFetcher, decode=decoder)
        self._fetcher = self._io.call(_construct(fetcher_factory, s), timeout=30)
        self._cache = self._io.call(_construct(self._cache_factory or _default_cache, s), timeout=30)
        reads = self._shadow is None or self._shadow.same_image_encoder
        image_stage = ImageStage(self._fetcher, self._cache, decoder, self.metrics, read_embeddings=reads,
                                 tracing=self.tracing)
        self.pipeline = Pipeline(self._io, image_stage, model_concurrency=MODEL_CONCURRENCY)
        if self._shadow is not None:
            self.pipeline.on_model_threads(partial(_warm_up, self._shadow.scorer, strict=False))
        self._model = self._serving(primary, strict=False)  # /readyz: not before this (and partitions)
        self._reloader = ModelReloader(self._reloaded_model, self._reload_refused, watched=_model_dir(s),
                                       interval_s=s.model_watch_s, on_failed=self._watch_failed).start()

        self.sink = self._new_sink()
        if self.eos:
            # Before joining the group: fences a dead predecessor with our transactional id and aborts its
            # open transaction, so the offsets we are about to read are the committed ones.
            self.sink.init_transactions()
        self.time_lag = TimeLag(self.metrics, UnreadProbe(client_config(s), s.input_topic))
        self.consumer = Consumer(consumer_config(
            s, error_cb=self._on_client_error, stats_cb=self._on_stats, on_commit=self._on_commit))
        self.pausing = PausingManager(self.consumer, self.max_in_flight)
        self.consumer.subscribe(
            [s.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        if s.feedback_topic:
            self.feedback = FeedbackJoiner(s, self.metrics).start()
        log.info(
            "consumer_started",
            group=s.group_id,
            input_topic=s.input_topic,
            output_topic=s.output_topic,
            guarantee=s.processing_guarantee.value,
            model=self._model.info.model_dump(),
            max_batch_size=self.batcher.max_size,
            max_wait_ms=s.max_wait_ms,
            max_in_flight=self.max_in_flight,
        )
        if self._owns_process:
            freeze_start_up_objects()
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
            log.info("gil_switch_interval_set", seconds=sys.getswitchinterval())
        self.started.set()
        return True

    # -- the loop ----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop (thread- and signal-safe); `run()` then drains, commits and returns."""
        self._stop.set()

    @property
    def model_info(self) -> ModelInfo | None:
        """The model that scores new batches (name, version, ...), once loaded."""
        return None if self._model is None else self._model.info

    def request_reload(self) -> None:
        """Load the model again beside the serving one and swap it in between batches (SIGHUP). Signal-safe."""
        if self._reloader is not None:
            self._reloader.request()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """Exit codes: 0 stopped (SIGTERM/SIGINT, or a replay's end); 1 (`EXIT_FAILURE`) a fatal error, the records
        past the last commit are read again by the next start; 2 (`EXIT_CONFIGURATION`) refused at start-up for what
        is fatal for every record (an output or dead-letter topic missing, credentials refused): fix the settings."""
        try:
            started = self._start()
        except ConfigurationError as exc:
            log.error("consumer_start_failed", error=str(exc), exit_code=EXIT_CONFIGURATION)
            self._close_quietly()
            return EXIT_CONFIGURATION
        except Exception:
            log.exception("consumer_start_failed")
            self._close_quietly()
            return EXIT_FAILURE
        if not started:
            self._close_quietly()
            return 0
        try:
            while not self._stop.is_set() and self._fatal is None:
                self._tick()
        except FatalError as exc:
            self._fatal = exc
        except Exception as exc:
            log.exception("consumer_loop_failed")
            self._fatal = exc
        return self._shutdown()

    def _tick(self) -> None:
        assert self.consumer is not None and self.pausing is not None and self.sink is not None
        assert self.pipeline is not None
        self._swap_reloaded_model()
        in_flight = self.tracker.in_flight
        self.pausing.update(in_flight)
        room = self.pausing.room(in_flight)
        messages = self.consumer.consume(max(1, min(room, MAX_CONSUME)), self._poll_timeout())
        for message in messages:
            self._accept(message)
        ready = self.batcher.ready(limit=self.pipeline.room(full=True), partial_limit=self.pipeline.room(full=False))
        for batch in ready:
            self._submit(batch)
        self._drain_completed()
        try:
            self.sink.poll(0)
        except KafkaException as exc:
            self._on_producer_error(exc.args[0])
        if self._producer_failed is not None:
            self._replace_producer()
        self._maybe_commit()
        self.metrics.in_flight.set(self.tracker.in_flight)
        self.metrics.paused_partitions.set(self.pausing.paused_partitions)
        if self._fatal is not None:
            raise self._fatal if isinstance(self._fatal, FatalError) else FatalError(str(self._fatal))
        self._stop_at_window_end()

    def _stop_at_window_end(self) -> None:
        """A replay stops once every partition of its window is committed to the window's end."""
        if self._window is not None and self._window.finished(self.tracker.committed_offsets(self._window.topic)):
            log.info("replay_window_done")
            self.stop()

    def _poll_timeout(self) -> float:
        assert self.pipeline is not None
        if self.pipeline.pending:
            return 0.005
        due = self.batcher.time_to_deadline()
        return 0.1 if due is None else min(0.1, due)

    def _accept(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            if error.fatal():
                raise FatalError(f"consumer: {error}")
            log.warning("consume_error", error=str(error))
            return
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        if self._window is not None and self._window.past_end(partition, offset):
            return  # a replay reads no further than its window
        state = self.tracker.state((topic, partition))
        ts_type, ts = message.timestamp()
        skipped_from = self.tracker.register(state, offset, ts if ts_type != 0 and ts > 0 else None)
        if skipped_from is not None and self.consumer is not None:
            self.retention.after_gap(self.consumer, state, skipped_from, offset)
        self.metrics.records_consumed.inc()
        item = WorkItem(
            state=state,
            topic=topic,
            partition=partition,
            offset=offset,
            key=message.key(),
            value=message.value(),
            received_at=time.monotonic(),
            timestamp_ms=ts if ts_type != 0 and ts > 0 else None,
            headers=_headers_of(message),
        )
        item.error = self._window.decision(item.timestamp_ms) if self._window is not None else None
        if item.error is None:
            item.error = self._decode(item)
        self.batcher.add(item)

    def _decode(self, item: WorkItem) -> Decision | None:
        """Set the item's post, or say what becomes of a record that is not one."""
        try:
            item.post = decode_post(item.value, max_text_chars=self.settings.max_text_chars)
            return None
        except BadRecord as bad:
            decision = self.policy.on_bad_record(bad, item)
            if decision.action is Action.FATAL:
                raise FatalError(f"bad record at {item.topic}[{item.partition}]@{item.offset}: {bad}") from None
            log.warning("bad_record", code=bad.code, reason=bad.message[:300], action=decision.action,
                        **item.log_fields())
            return decision
        except Exception as exc:  # decode_post raises only BadRecord: a bug in it must not stop the group
            return internal_error(exc, item, "decoding")

    def _submit(self, batch: Batch) -> None:
        assert self.pipeline is not None and self._model is not None
        self.metrics.batch_size.observe(len(batch))
        wait = batch.cut_at - batch.oldest_at
        batch.timings["wait"] = wait
        self.metrics.stage_latency.labels("wait").observe(wait)
        self.languages.tag(batch.items)
        batch.trace = self.tracing.start_batch(batch.items)
        self.pipeline.submit(batch, self._model)

    def _drain_completed(self) -> None:
        assert self.pipeline is not None
        done: list[WorkItem] = []
        for batch, exc in self.pipeline.completed():
            if exc is not None:
                if isinstance(exc, FatalError):
                    raise exc
                raise FatalError(f"batch {batch.batch_id} failed in a stage: {exc!r}") from exc
            live = [item for item in batch.items if self.tracker.is_current(item.state)]
            for item in live:
                item.scored_by = batch.model
                item.alert = self.outputs.alert(item)
            self._observe_batch(batch, live)
            with self.tracing.stage(batch.trace, "produce"):
                if self.eos:
                    done.extend(live)  # produced in the transaction below, with the other completed batches'
                else:
                    for item in live:
                        self._emit(item)
            self.tracing.end_batch(batch.trace)
        if done:
            self._transact(done)

    def _observe_batch(self, batch: Batch, live: Sequence[WorkItem]) -> None:
        latency = time.monotonic() - batch.cut_at
        self.metrics.batch_latency.observe(latency)
        for stage in ("fetch", "model"):
            if stage in batch.timings:
                self.metrics.stage_latency.labels(stage).observe(batch.timings[stage])
        labels: dict[str, int] = {}
        for item in live:
            key = item.error.code if item.error else (item.result.label if item.result is not None else "none")
            labels[key] = labels.get(key, 0) + 1
        log.info(
            "batch_done",
            batch_id=batch.batch_id,
            size=len(batch),
            dropped=len(batch) - len(live),
            outcomes=labels,
            wait_ms=round(batch.timings.get("wait", 0) * 1000, 1),
            fetch_ms=round(batch.timings.get("fetch", 0) * 1000, 1),
            model_ms=round(batch.timings.get("model", 0) * 1000, 1),
            in_flight=self.tracker.in_flight,
        )

    # -- outputs -----------------------------------------------------------------------------------------------

    def _emit(self, item: WorkItem) -> None:
        """At least once: produce, and mark the record done when every output of it is acknowledged."""
        assert self.sink is not None
        outputs = self.fitter.outputs(item)
        if not outputs:
            if self.tracker.done(item.state, item.offset):
                self._count_done(item)
            return
        pending = _Pending(len(outputs))
        for output in outputs:
            self._produce(item, pending, output)

    def _produce(self, item: WorkItem, pending: _Pending, output: Output) -> None:
        """At least once: one output; what the client refuses at once takes the broker's refusal's road."""
        assert self.sink is not None
        if self._producer_failed is not None:
            return  # the producer is being replaced, and this record will be read again
        try:
            self.sink.produce(output, partial(self._on_delivery, item, pending, output))
        except (KafkaException, TypeError, ValueError) as exc:
            error = _client_refusal(exc)
            if self._replaceable(error):
                # The producer turned fatal before its error callback ran: replace it, as that callback would.
                self._producer_failed = error
            else:
                self._on_delivery(item, pending, output, error, None)

    def _on_delivery(self, item: WorkItem, pending: _Pending, output: Output, error: KafkaError | None,
                     _msg: Message | None) -> None:
        if error is not None and output.best_effort:
            log.warning("shadow_event_refused", error=str(error), **item.log_fields())
            self.metrics.shadow_failures.inc()
        elif error is not None and is_refusal(error) and pending.replaced_besides(output):
            log.warning("output_refused", error=str(error), output_topic=output.topic, **item.log_fields())
        elif error is not None and is_refusal(error) and pending.replacements < MAX_REPLACEMENTS:
            # The broker takes no such record (too large, invalid): the record becomes a smaller dead letter.
            log.warning("output_refused", error=str(error), output_topic=output.topic, **item.log_fields())
            self.fitter.refused(item, output, error)
            pending.replacement = self.fitter.outputs(item)[0]
            pending.replacements += 1
            self._produce(item, pending, pending.replacement)
            return
        elif error is not None:
            if self._producer_failed is not None:
                return  # the producer failed and is being replaced: this record will be read again
            decision = self.policy.on_delivery_error(error, item)
            log.error("delivery_failed", error=str(error), action=decision.action, **item.log_fields())
            if decision.action is Action.FATAL:
                if self._replaceable(error):
                    self._producer_failed = error
                else:
                    self._fatal = DeliveryFailed(f"output of {item.topic}[{item.partition}]@{item.offset}: {error}")
                return
        pending.remaining -= 1
        if pending.remaining == 0 and self.tracker.done(item.state, item.offset):
            self._count_done(item)

    def _count_done(self, item: WorkItem) -> None:
        m = self.metrics
        self.fitter.refusals.forget(item)
        if self._window is not None:
            self._window.advance(1)
        if item.error is not None:
            if item.error.action is Action.SKIP:
                m.skipped.labels(item.error.code).inc()
            else:
                m.dead_letters.labels(item.error.code).inc()
            return
        assert item.result is not None and item.scored_by is not None  # no error: it was scored
        model = item.scored_by.label
        m.events_produced.labels(item.result.label, model).inc()
        self.predictions.observe(model, getattr(item.scored_by.scorer, "reference", None), item.result)
        if self.feedback is not None and item.post is not None:
            self.feedback.remember(item.post.post_id, model, item.result.label)
        m.image_status.labels(item.image_status.value).inc()
        if item.alert is not None:
            m.alerts.inc()
        m.posts_by_language.labels(item.language or "unknown").inc()
        if item.timestamp_ms is not None:
            m.end_to_end_latency.observe(max(0.0, time.time() - item.timestamp_ms / 1000))

    def _transact(self, items: list[WorkItem]) -> None:
        """Exactly once: the outputs of these records and the offsets they free, in one transaction."""
        assert self.sink is not None and self.consumer is not None
        try:
            # Built (and fitted) before anything is produced: one record that cannot be built, or whose output would
            # not fit, is its own dead letter instead of an aborted transaction read again for ever.
            outputs = [(item, output) for item in items for output in self.fitter.outputs(item)]
            self.sink.begin()
            for item, output in outputs:
                self._produce_in_transaction(item, output)
            for item in items:
                self.tracker.done(item.state, item.offset)
            offsets = self.tracker.committable()
            if offsets:
                self.sink.send_offsets(offsets, self.consumer.consumer_group_metadata())
            self.sink.commit()
        except KafkaException as exc:
            error = exc.args[0]
            self.metrics.commits.labels("aborted").inc()
            if error.fatal():
                raise FatalError(f"transaction: {error}") from exc
            log.warning("transaction_aborted", error=str(error), records=len(items))
            try:
                self.sink.abort()
            except KafkaException as abort_exc:
                raise FatalError(f"abort_transaction: {abort_exc}") from abort_exc
            self._rewind()
            return
        self.tracker.mark_committed(offsets)
        self.metrics.commits.labels("transaction").inc()
        for item in items:
            self._count_done(item)

    def _produce_in_transaction(self, item: WorkItem, output: Output) -> None:
        """What the client refuses at once aborts the transaction, remembered as the broker's refusal would be."""
        assert self.sink is not None
        try:
            self.sink.produce(output, partial(self._on_transactional_delivery, item, output))
        except (KafkaException, TypeError, ValueError) as exc:
            error = _client_refusal(exc)
            self._on_transactional_delivery(item, output, error, None)
            raise KafkaException(error) from exc

    def _on_transactional_delivery(self, item: WorkItem, output: Output, error: KafkaError | None,
                                   _msg: Message | None) -> None:
        """Exactly once: an output the broker refuses fails the transaction's commit; remembered, the record's next
        build (after the abort and the rewind) is the smaller dead letter."""
        if error is not None and is_refusal(error):
            log.warning("output_refused", error=str(error), output_topic=output.topic, **item.log_fields())
            self.fitter.refused(item, output, error)

    def _new_sink(self) -> Sink:
        return Sink(producer_config(self.settings, error_cb=self._on_producer_error),
                    producer_factory=self._producer_factory)

    def _on_producer_error(self, error: KafkaError) -> None:
        if self._replaceable(error):
            self._producer_failed = error
        else:
            self._on_client_error(error)

    def _replaceable(self, error: KafkaError) -> bool:
        """At least once, a producer in a fatal state is replaced. What `produce` raises for one has the code
        _FATAL without the fatal flag."""
        return not self.eos and (error.fatal() or error.code() == KafkaError._FATAL)

    def _replace_producer(self) -> None:
        """At least once: a fresh idempotent producer, and every unacknowledged record read again.

        Nothing is lost (offsets past the last acknowledged output were never committed); records whose output
        did reach the broker before the failure may be repeated, as at-least-once allows.
        """
        assert self.sink is not None
        log.error("producer_failed_replacing", error=str(self._producer_failed))
        self.sink.abandon()
        self.sink = self._new_sink()
        self._producer_failed = None
        self.metrics.producer_replacements.inc()
        self._rewind()

    def _rewind(self) -> None:
        """After an aborted transaction: drop everything in flight and read again from the committed offsets."""
        assert self.consumer is not None
        positions = self.tracker.rewind()
        self.batcher.drop()
        for (topic, partition), offset in positions.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                raise FatalError(f"could not rewind {topic}[{partition}] to {offset}: {exc}") from exc
        log.info("rewound", positions={f"{t}[{p}]": o for (t, p), o in positions.items()})

    # -- commits (at least once) --------------------------------------------------------------------------------

    def _maybe_commit(self, force: bool = False, keys: Sequence[TopicPartitionKey] | None = None) -> None:
        """In the loop, every COMMIT_INTERVAL_S and asynchronously (the result comes to `_on_commit`): a commit can
        wait seconds on the coordinator while the group rebalances (5 s on Tansu), and with a blocking call every
        partition would stop with it. Forced (before partitions go, at shutdown), it waits for the result."""
        if self.eos or self.consumer is None or (not force and self._commit_in_flight):
            return
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        offsets = self.tracker.committable(keys)
        if not offsets:
            return
        self._last_commit = now
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            if force:
                self._commit_settled(self.consumer.commit(offsets=partitions, asynchronous=False) or [], offsets)
            else:
                self.consumer.commit(offsets=partitions, asynchronous=True)
                self._commit_in_flight = True
        except KafkaException as exc:
            self._commit_failed(exc.args[0], offsets)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """An asynchronous commit's result (called from inside consume(), on this thread)."""
        self._commit_in_flight = False
        offsets = {(tp.topic, tp.partition): tp.offset for tp in partitions}
        if error is not None:
            self._commit_failed(error, offsets)
        else:
            self._commit_settled(partitions, offsets)

    def _commit_settled(self, results: list[TopicPartition], offsets: dict[TopicPartitionKey, int]) -> None:
        failed = {(tp.topic, tp.partition) for tp in results if tp.error is not None}
        if failed:
            first = next(tp.error for tp in results if tp.error is not None)
            self._commit_failed(first, {k: v for k, v in offsets.items() if k in failed})
        ok = {k: v for k, v in offsets.items() if k not in failed}
        self.tracker.mark_committed(ok)
        if ok:
            self.metrics.commits.labels("ok").inc()
            log.debug("committed", offsets={f"{t}[{p}]": o for (t, p), o in ok.items()})

    def _commit_failed(self, error: KafkaError, offsets: dict[TopicPartitionKey, int]) -> None:
        self.tracker.mark_dirty(offsets)
        self.metrics.commits.labels("rejected").inc()
        log.warning(
            "commit_rejected",
            error=str(error),
            rebalance=is_rebalance_error(error),
            offsets={f"{t}[{p}]": o for (t, p), o in offsets.items()},
        )

    # -- rebalances ----------------------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """`partitions` are the ones added: all of them under an eager strategy, the moved ones under cooperative."""
        states = {}
        for tp in partitions:
            states[(tp.topic, tp.partition)] = self.tracker.assign((tp.topic, tp.partition))
            self._assigned.add((tp.topic, tp.partition))
        if self._window is None and states:  # a replay starts where its window does, not at the committed offset
            self.retention.at_assignment(consumer, states)
        if self._window is not None:
            partitions = self._window.start_offsets(partitions)
        # now, not after this callback: the pause state below applies to them
        if self.settings.kafka_assignment_strategy == "cooperative-sticky":
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self.pausing is not None:
            self.pausing.on_assign(partitions)
        self.metrics.rebalances.labels("assigned").inc()
        self._set_ready()
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in partitions),
                 assignment=self._assignment())

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        if not self.eos and self.sink is not None:
            # Batches already scored are produced; everything produced is waited for (acknowledgements) and
            # committed before the partitions go: the new owner repeats as little as possible.
            if self.pipeline is not None:
                self._drain_completed()
            self.sink.flush(REVOKE_FLUSH_S)
            self._maybe_commit(force=True, keys=keys)
        self._forget(partitions, keys)
        self.metrics.rebalances.labels("revoked").inc()
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in partitions),
                 assignment=self._assignment())

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget(partitions, [(tp.topic, tp.partition) for tp in partitions])
        self.metrics.rebalances.labels("lost").inc()
        log.warning("partitions_lost", partitions=sorted(tp.partition for tp in partitions),
                    assignment=self._assignment())

    def _forget(self, partitions: list[TopicPartition], keys: list[TopicPartitionKey]) -> None:
        for key in keys:
            self.tracker.revoke(key)
            self._assigned.discard(key)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(key[1]))
            if self.time_lag is not None:
                self.time_lag.forget(key[1])
        dropped = self.batcher.drop(set(keys))
        if self.pausing is not None:
            self.pausing.forget(partitions)
        if dropped:
            log.info("waiting_records_dropped", count=dropped)
        self._set_ready()

    def _assignment(self) -> list[int]:
        """This member's partitions after the change being logged."""
        return sorted(partition for _topic, partition in self._assigned)

    def _set_ready(self) -> None:
        self.ready = bool(self._assigned) and self._model is not None and not self._stop.is_set()
        self.metrics.ready.set(1 if self.ready else 0)

    # -- model rollout (consumer/reload.py) ------------------------------------------------------------------

    def _serving(self, scorer: ScorerLike, *, strict: bool) -> ServingModel:
        """A scorer, warmed, with its own model stage and alert threshold. `strict`: a warm-up that fails refuses
        the model.

        Warmed here first (with MMSENT_COMPILE, the compilation: here it holds up no batch), then on each model
        thread, as CUDA graphs are recorded per thread; there it waits behind the batches already queued."""
        threshold = _alert_threshold(scorer, self.settings)
        _warm_up(scorer, strict=strict)
        assert self.pipeline is not None
        self.pipeline.on_model_threads(partial(_warm_up, scorer, strict=strict))
        stage = ModelStage(scorer, self._cache, self._io, self.policy, self.metrics, shadow=self._shadow,
                           tracing=self.tracing)
        return ServingModel(scorer, _model_info(scorer), stage, threshold)

    def _shadow_stage(self, primary: ScorerLike, shadow_model: str | None) -> ShadowStage | None:
        """The shadow model, loaded and warmed; one that fails to is left out, and the primary serves alone."""
        if shadow_model is None:
            return None
        try:
            shadow = _load_scorer(self.settings, shadow_model)
            _warm_up(shadow, strict=True)
        except Exception as exc:  # whatever a model directory can make a loader raise
            log.error("shadow_model_refused", model=shadow_model, error=repr(exc)[:500])
            self.metrics.shadow_failures.inc()
            return None
        same = shadow.image_encoder_id == primary.image_encoder_id
        log.info("shadow_model_ready", model=_model_info(shadow).model_dump(), same_image_encoder=same)
        return ShadowStage(shadow, _model_info(shadow), same, self.metrics)

    def _reloaded_model(self) -> ServingModel:
        """On the reloader's thread: load and warm the model that `MMSENT_MODEL` names now."""
        return self._serving(_load_scorer(self.settings, self.settings.model), strict=True)

    def _reload_refused(self, exc: BaseException) -> None:
        log.error("model_reload_refused", reason=refusal_reason(exc), error=repr(exc)[:500],
                  serving=None if self._model is None else self._model.label)
        self.metrics.model_reloads.labels("refused").inc()

    def _watch_failed(self, _exc: BaseException) -> None:
        self.metrics.model_reloads.labels("watch_failed").inc()  # logged by the reloader, which goes on watching

    def _swap_reloaded_model(self) -> None:
        """Between batches: new batches go to the new model; batches already submitted keep theirs."""
        new = self._reloader.take() if self._reloader is not None else None
        if new is None:
            return
        old, self._model = self._model, new
        self.metrics.model_reloads.labels("loaded").inc()
        log.info("model_reloaded", model=new.label, previous=None if old is None else old.label)

    # -- client callbacks (called from inside consume()/poll(), on this thread) ---------------------------------

    def _on_client_error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("kafka_fatal_error", error=str(error))
            self._fatal = FatalError(f"kafka: {error}")
        elif error.code() == KafkaError._AUTHENTICATION:
            # The broker refused this client's credentials or SASL mechanism: every record would meet the same.
            log.error("kafka_authentication_failed", error=str(error),
                      hint="check MMSENT_KAFKA_SECURITY_PROTOCOL and MMSENT_KAFKA_SASL_*")
            self._fatal = FatalError(f"kafka: authentication refused: {error}")
        elif error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            log.warning("kafka_error", error=str(error))
        else:
            log.warning("kafka_error", error=str(error), code=error.code())

    def _on_stats(self, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
            partitions = stats.get("topics", {}).get(self.settings.input_topic, {}).get("partitions", {})
        except (ValueError, AttributeError):
            return
        ends: dict[int, int] = {}
        for name, values in partitions.items():
            partition = int(name)
            if partition < 0 or (self.settings.input_topic, partition) not in self._assigned:
                continue
            lag = values.get("consumer_lag", -1)  # end of the partition minus the committed offset
            if lag is not None and lag >= 0:
                self.metrics.consumer_lag.labels(str(partition)).set(lag)
            end = values.get("ls_offset", -1)  # the last stable offset: the end a read_committed consumer reads to
            if isinstance(end, int) and end >= 0:
                ends[partition] = end
        if self.time_lag is not None:
            self.time_lag.update({p: self.tracker.state((t, p)) for t, p in self._assigned}, ends)

    # -- shutdown --------------------------------------------------------------------------------------------

    def _shutdown(self) -> int:
        fatal = self._fatal
        started = time.monotonic()
        deadline = started + self.settings.shutdown_grace_s
        self.ready = False
        self.metrics.ready.set(0)
        log.info("consumer_stopping", reason="fatal" if fatal else "signal", in_flight=self.tracker.in_flight)
        try:
            if self.pausing is not None:
                self.pausing.pause_for_good()
            if fatal is None and self.pipeline is not None:
                for batch in self.batcher.flush():
                    self._submit(batch)
                while self.pipeline.pending and time.monotonic() < deadline and self._fatal is None:
                    self.pipeline.wait_head(min(0.05, max(0.0, deadline - time.monotonic())))
                    self._drain_completed()
                    if self.sink is not None:
                        self.sink.poll(0)
            if self.sink is not None and not self.eos:
                left = self.sink.flush(max(0.5, deadline - time.monotonic()))
                if left:
                    log.warning("shutdown_unacknowledged", count=left)
                self._maybe_commit(force=True)
        except FatalError as exc:
            fatal = fatal or exc
            log.error("shutdown_failed", error=str(exc))
        except Exception as exc:
            fatal = fatal or exc
            log.exception("shutdown_failed")
        abandoned = self.tracker.in_flight
        self._close_quietly()
        if fatal is not None:
            log.error("consumer_stopped", error=str(fatal), abandoned=abandoned)
            return 1
        log.info("consumer_stopped", abandoned=abandoned, shutdown_s=round(time.monotonic() - started, 3))
        return 0

    def _close_quietly(self) -> None:
        if self.feedback is not None:
            self.feedback.close()
            self.feedback = None
        if self._reloader is not None:
            self._reloader.close()
        if self.pipeline is not None:
            self.pipeline.close()
        if self.consumer is not None:
            try:
                _leave_group(self.consumer)
            except (KafkaException, RuntimeError) as exc:
                log.warning("consumer_close_failed", error=str(exc))
            self.consumer = None
        if self.sink is not None:
            self.sink.close(timeout=2.0)
            self.sink = None
        if self._io is not None:
            for resource in (self._fetcher, self._cache):
                closer = getattr(resource, "aclose", None)
                if closer is not None:
                    try:
                        self._io.call(closer(), timeout=5)
                    except Exception as exc:
                        log.warning("close_failed", resource=type(resource).__name__, error=repr(exc))
            self._io.close()
            self._io = None
        if self.health is not None:
            self.health.close()
            self.health = None
        if self.time_lag is not None:
            self.time_lag.close()
        self.tracing.close()


class _Pending:
    """At least once: a record's outputs not yet acknowledged, and the dead letter that replaced a refused one."""

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.replacement: Output | None = None
        self.replacements = 0  # a few in a row at most: a bare dead letter still refused is a delivery failure

    def replaced_besides(self, refused: Output) -> bool:
        """A dead letter already stands for the record beside this refused output: it is only counted off."""
        return self.replacement is not None and refused is not self.replacement


def _client_refusal(exc: Exception) -> KafkaError:
    """What `produce` raised, as a Kafka error: a header or key the client cannot take is an invalid argument."""
    if isinstance(exc, KafkaException):
        return exc.args[0]
    return KafkaError(KafkaError._INVALID_ARG, repr(exc)[:300])


def _leave_group(consumer: Consumer) -> None:
    """Unsubscribe and serve the revocation until nothing is assigned, then close (which leaves the group at once:
    its partitions go to the others now). Closed in the middle of a cooperative rebalance, a consumer that receives
    an incremental assignment can hang in close() (librdkafka issue 4527; seen on Tansu as a member that never
    exited after SIGTERM). Records read meanwhile are dropped uncommitted: the next owner reads them."""
    consumer.unsubscribe()
    deadline = time.monotonic() + LEAVE_TIMEOUT_S
    while consumer.assignment() and time.monotonic() < deadline:
        consumer.consume(1, 0.1)
    consumer.close()


def _headers_of(message: Message) -> list[tuple[str, str | bytes | None]] | None:
    headers = message.headers()  # a consumed record's are a list of (name, value) in order, or None
    return headers if isinstance(headers, list) else None


async def _construct(factory: Callable[[Settings], Any], settings: Settings) -> Any:
    """Build an async collaborator on the I/O loop (its connection pools bind to that loop)."""
    return factory(settings)


def _default_cache(settings: Settings) -> CacheLike | None:
    if not settings.redis_url:
        return None
    return ImageCache.from_settings(settings)


def _first_model(settings: Settings) -> ScorerLike:
    """The model to start with. One that fails its checks (consumer/rollout.py) is refused as a missing topic is:
    it would fail every record."""
    try:
        return _load_scorer(settings, settings.model)
    except ModelRefused as exc:
        raise ConfigurationError(str(exc)) from exc


def _load_scorer(settings: Settings, model: str | None) -> ScorerLike:
    """The model, refused (`mmsent.ModelRefused`) before it can serve when a check fails (consumer/rollout.py)."""
    started = time.monotonic()
    scorer = load_vetted(settings, model)
    log.info("model_loaded", model=dict(scorer.info), device=str(scorer.device), cpu_runtime=scorer.cpu_runtime,
             cpu_precision=scorer.cpu_precision, precision_note=scorer.precision_note,
             compile=scorer.compile, seconds=round(time.monotonic() - started, 2))
    return scorer


def _alert_threshold(scorer: ScorerLike, settings: Settings) -> float:
    """The probability of the alert label at which a post alerts: MMSENT_ALERT_MIN_PROBABILITY, or, with
    MMSENT_ALERT_MIN_PRECISION, the threshold the model's calibration gives for that precision. A model without one
    is refused (at start the consumer does not start; a reload keeps the serving model)."""
    if settings.alert_min_precision is None:
        return settings.alert_min_probability
    calibrated = getattr(scorer, "alert_threshold", None)
    threshold = calibrated(settings.alert_label, settings.alert_min_precision) if calibrated else None
    if threshold is None:
        raise ValueError(f"MMSENT_ALERT_MIN_PRECISION={settings.alert_min_precision}: the model has no calibrated "
                         f"threshold for {settings.alert_label!r} at that precision (run `mmsent calibrate`)")
    log.info("alert_threshold", label=settings.alert_label, min_precision=settings.alert_min_precision,
             threshold=round(threshold, 4))
    return float(threshold)


def _model_info(scorer: ScorerLike) -> ModelInfo:
    return ModelInfo(**{str(k): str(v) for k, v in dict(scorer.info).items()})


def _warm_up(scorer: ScorerLike, *, strict: bool) -> None:
    """On this thread, before the first batch: `Scorer.warm_up` (every shape the model will see, compiled first
    with MMSENT_COMPILE), or for a scorer without one a tiny call, so that real posts pay no lazy initialisation.
    `strict` (a reload): a failure raises, and the model is refused; at start, the first batch will say what is
    wrong."""
    started = time.monotonic()
    warm = getattr(scorer, "warm_up", None)
    try:
        calls = warm() if warm is not None else scorer.score([{"text": "warm up", "image": None}])
    except Exception as exc:
        if strict:
            raise
        log.warning("model_warm_up_failed", error=repr(exc))
        return
    log.info("model_warmed_up", thread=threading.current_thread().name, calls=calls if warm is not None else 1,
             seconds=round(time.monotonic() - started, 3))


def _model_dir(settings: Settings) -> Path | None:
    """The directory to watch for a new model: `MMSENT_MODEL` when it names one (not a preset, not the default)."""
    return Path(settings.model) if settings.model and Path(settings.model).is_dir() else None


# -- the process -------------------------------------------------------------------------------------------------


def freeze_start_up_objects() -> None:
    """Collect once, then move every object alive into the garbage collector's permanent generation.

    By the end of start-up the process holds the libraries and the model (torch, transformers, ONNX Runtime...),
    objects that live as long as it does (~416,000 for the default model). Each full pass of the cyclic collector
    scanned them all, 240-316 ms with the GIL held, and passes land while serving: a half-load post caught behind
    one waited ~600 ms (BENCHMARKS.md, 2026-12-07). Frozen, they are never scanned again (a pass while serving then
    took 1.4-2.1 ms); the stream's own objects still are. A frozen
    object is still freed when its last reference goes (a model swapped out by a reload); only a reference cycle
    among frozen objects is never reclaimed."""
    started = time.monotonic()
    gc.collect()
    gc.freeze()
    log.info("start_up_objects_frozen", objects=gc.get_freeze_count(), seconds=round(time.monotonic() - started, 3))


def install_signal_handlers(app: Application) -> None:
    """First SIGTERM/SIGINT: stop polling, drain within the grace period, commit, exit 0. Second: exit now.
    SIGHUP: reload the model (consumer/reload.py)."""
    received: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("signal_received", signal=signal.Signals(signum).name, grace_s=app.settings.shutdown_grace_s)
        app.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: app.request_reload())


def run_consumer(settings: Settings, window: ReplayWindow | None = None) -> int:
    """`mmsent consume`: run until SIGTERM/SIGINT (`mmsent replay`: or the window's end); returns the exit code."""
    app = Application(settings, window=window, owns_process=True)
    install_signal_handlers(app)
    return app.run()
