"""OpenTelemetry tracing: one trace per request, across the router and the workers.

The context crosses Ray calls explicitly (`inject()`'s W3C headers as an argument, `extract`ed by
the worker); worker spans are made after the fact from the engine's timings, never inside its
step loop (the span tree: docs/operations.md, "Traces"). Off unless an OTLP endpoint is
configured; then a bounded batch queue and a short export timeout make a dead or slow collector
cost dropped spans, never request latency. Torch-free.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

TRACER_NAME = "tandem"
_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider: Any = None  # this process's TracerProvider, once set up


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """`otlp_endpoint` (host:port of an OTLP/gRPC collector) None: no tracing."""

    otlp_endpoint: str | None = None
    service_name: str = "tandem"
    sample_ratio: float = 1.0  # of traces started here; a client's sampled flag is followed
    export_timeout_s: float = 2.0
    max_queue_size: int = 4096  # spans waiting for export; more are dropped

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio={self.sample_ratio!r} must be in [0, 1]")
        if not self.export_timeout_s > 0:
            raise ValueError(f"export_timeout_s={self.export_timeout_s!r} must be > 0")
        if self.otlp_endpoint is not None:
            host, _, port = self.otlp_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"otlp_endpoint={self.otlp_endpoint!r} must be host:port (e.g. "
                    "otel-collector:4317)"
                )


def setup_tracing(config: TracingConfig | None, process: str) -> bool:
    """Export this process's spans as `config` says (once per process; later calls with an
    endpoint are ignored). `process` names it in the resource (router, prefill-0, ...).
    Returns whether tracing is on."""
    global _provider
    if config is None or config.otlp_endpoint is None:
        return _provider is not None
    with _lock:
        if _provider is not None:
            return True
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        resource = Resource.create({"service.name": config.service_name, "tandem.process": process})
        provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio))
        )
        exporter = OTLPSpanExporter(
            endpoint=config.otlp_endpoint, insecure=True, timeout=config.export_timeout_s
        )
        provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=config.max_queue_size,
                export_timeout_millis=int(config.export_timeout_s * 1000),
                schedule_delay_millis=200,
            )
        )
        trace.set_tracer_provider(provider)
        _provider = provider
    logger.info("tracing %s to %s", process, config.otlp_endpoint)
    return True


def shutdown_tracing() -> None:
    """Flush what is queued (bounded by the export timeout) and stop exporting."""
    global _provider
    with _lock:
        provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(ctx: Any = None) -> dict[str, str]:
    """The W3C trace-context headers of the current (or given) context, to pass along."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Any:
    """The context carried by `carrier` (headers or gRPC metadata), or an empty one."""
    return _PROPAGATOR.extract(dict(carrier or {}))


def start_span(name: str, carrier: Mapping[str, str] | None = None, **attributes: Any) -> Any:
    """A span starting now, child of the context in `carrier` (none: a new trace). The
    caller ends it. Not made current: safe to hold across the yields of an async generator."""
    return tracer().start_span(name, context=extract(carrier), attributes=attributes)


def child_carrier(span: Any) -> dict[str, str]:
    """The headers that make a span the parent of spans in another process."""
    return inject(trace.set_span_in_context(span))


def record_span(name: str, start_s: float, end_s: float, parent: Any, **attributes: Any) -> None:
    """A finished span of known times (wall-clock seconds, e.g. a queue wait the engine
    measured) as a child of `parent`: a span, or a carrier of headers."""
    ctx = extract(parent) if isinstance(parent, Mapping) else trace.set_span_in_context(parent)
    span = tracer().start_span(name, context=ctx, start_time=_ns(start_s), attributes=attributes)
    span.end(end_time=_ns(max(end_s, start_s)))


def end_span(span: Any, error: BaseException | None = None, **attributes: Any) -> None:
    """Close a span, with its final attributes and, for a failure, the error."""
    span.set_attributes(attributes)
    if error is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}"))
    span.end()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
