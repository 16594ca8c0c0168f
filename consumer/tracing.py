"""Tracing with OpenTelemetry, the optional `tracing` extra: off unless the standard `OTEL_TRACES_EXPORTER` names
an exporter (`console`, or `otlp` with opentelemetry-exporter-otlp installed); every call is a no-op when off.
The extra is not in the service image, so OpenTelemetry is imported inside the calls that run only when tracing is
on (`_provider` for the SDK, the others once a tracer exists): importing this module never needs it.

    mmsent.batch   one per micro-batch, linked to the trace of each of its posts (their `traceparent` headers)
      ├─ mmsent.fetch     images: caches and downloads (the I/O loop)
      ├─ mmsent.embed     the image encoder (the model thread)
      ├─ mmsent.score     the scorer (the model thread)
      └─ mmsent.produce   events and dead letters to the broker (the poll loop)
    mmsent.post    one per post that came with a `traceparent`: a child of the post's own span, so the event's
                   `traceparent` header continues the post's trace instead of copying it
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import structlog

from schemas import headers as wire

log = structlog.get_logger("consumer")


class Tracing:
    """The service's spans. `Tracing()` is off; `Tracing(provider)` traces through an OpenTelemetry provider."""

    def __init__(self, provider: Any = None) -> None:
        self._provider = provider
        self._tracer = None if provider is None else provider.get_tracer("mmsent")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def close(self) -> None:
        """Export what is buffered (at shutdown)."""
        if self._provider is not None:
            self._provider.shutdown()

    @classmethod
    def from_environment(cls) -> Tracing:
        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
        if exporter_name in ("", "none"):
            return cls()
        try:
            return cls(_provider(exporter_name))
        except ImportError as exc:
            log.error("tracing_unavailable", exporter=exporter_name, error=str(exc),
                      hint="pip install 'mmsent[tracing]' (and opentelemetry-exporter-otlp for otlp)")
            return cls()

    def end_batch(self, batch_span: Any) -> None:
        if batch_span is not None:
            batch_span.end()

    def start_batch(self, items: list[Any]) -> Any:
        """The batch's span, linked to each post's trace; None when tracing is off."""
        if self._tracer is None:
            return None
        from opentelemetry import trace  # the optional extra: tracing is on, so it is installed

        links = [trace.Link(context) for context in (_span_context(item.headers) for item in items) if context]
        return self._tracer.start_span("mmsent.batch", links=links, attributes={"mmsent.batch.size": len(items)})

    @contextlib.contextmanager
    def stage(self, batch_span: Any, name: str) -> Iterator[None]:
        """A span for one stage of the batch, on whichever thread runs it."""
        if self._tracer is None or batch_span is None:
            yield
            return
        from opentelemetry import trace  # the optional extra: tracing is on, so it is installed

        with self._tracer.start_as_current_span(f"mmsent.{name}", context=trace.set_span_in_context(batch_span)):
            yield

    def continue_post(self, headers: wire.Headers) -> wire.Headers:
        """The carried headers, with the post's `traceparent` (and `tracestate`) replaced by mmsent's span in the
        same trace. Unchanged when tracing is off or the post came without one."""
        if self._tracer is None or _span_context(headers) is None:
            return headers
        from opentelemetry import trace  # the optional extra: tracing is on, so it is installed
        from opentelemetry.propagate import extract, inject

        span = self._tracer.start_span("mmsent.post", context=extract(_text(headers)))
        span.end()
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(span))
        kept = [(name, value) for name, value in headers if name.lower() not in carrier]
        return kept + [(name, value.encode()) for name, value in carrier.items()]


def _text(headers: wire.Headers | None) -> dict[str, str]:
    """Kafka headers as the text carrier the W3C propagator reads (names in lower case, the first of a name)."""
    carrier: dict[str, str] = {}
    for name, value in headers or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if text is not None:
            carrier.setdefault(name.lower(), text)
    return carrier


def _span_context(headers: wire.Headers | None) -> Any:
    """The post's span context from its `traceparent`, or None (absent or malformed)."""
    if not any(name.lower() == wire.TRACEPARENT for name, _value in headers or ()):
        return None
    from opentelemetry import trace  # the optional extra: only called with tracing on
    from opentelemetry.propagate import extract

    context = trace.get_current_span(extract(_text(headers))).get_span_context()
    return context if context.is_valid else None


def _provider(exporter_name: str) -> Any:
    """Raises ImportError without the optional `tracing` extra (`Tracing.from_environment` then stays off)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter_name == "console":
        exporter: Any = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # installed on its own

        exporter = OTLPSpanExporter()  # its endpoint and headers from the standard OTEL_EXPORTER_OTLP_* settings
    else:
        raise ImportError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: mmsent knows console and otlp")
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                        "mmsent")}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
