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
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

TRACER_NAME = "tandem"
_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider: Any = None  # this process's SDK TracerProvider, once anything wanted spans
_switchboard: Any = None  # its one span processor, forwarding to the current ones
_exporter: Any = None  # the OTLP export processor setup_tracing added, until shutdown_tracing


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


# OpenTelemetry lets a process set its tracer provider once, ever. So this module installs one
# provider for the process's life, the first time anything wants spans, and changes what it
# does instead of replacing it: its one span processor (`_Switchboard`) forwards to the
# processors of the moment (setup_tracing's exporter, a test's or a bench's own), and its
# sampler (`_Sampling`) samples at the configured ratio, or drops every span while no
# processor listens (no span is then recorded: the cost of tracing off). A service started,
# shut down and started again in one process (tests, benches) exports again.


def setup_tracing(config: TracingConfig | None, process: str) -> bool:
    """Export this process's spans as `config` says (one exporter at a time: later calls
    with an endpoint are ignored until shutdown_tracing). `process` names the process in the
    resource (router, prefill-0, ...) when this is the first call to install the provider.
    Returns whether tracing is on."""
    global _exporter
    if config is None or config.otlp_endpoint is None:
        return _exporter is not None
    with _lock:
        if _exporter is not None:
            return True
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if not _install_locked(config.service_name, process):
            return False
        exporter = OTLPSpanExporter(
            endpoint=config.otlp_endpoint, insecure=True, timeout=config.export_timeout_s
        )
        _exporter = BatchSpanProcessor(
            exporter,
            max_queue_size=config.max_queue_size,
            export_timeout_millis=int(config.export_timeout_s * 1000),
            schedule_delay_millis=200,
        )
        _provider.sampler.ratio = config.sample_ratio  # a _Sampling
        _switchboard.add(_exporter)
    logger.info("tracing %s to %s", process, config.otlp_endpoint)
    return True


def shutdown_tracing() -> None:
    """Flush what is queued (bounded by the export timeout) and stop exporting. Processors
    added with add_span_processor keep receiving spans."""
    global _exporter
    with _lock:
        exporter, _exporter = _exporter, None
        if exporter is not None:
            _switchboard.remove(exporter)
    if exporter is not None:
        exporter.shutdown()


def add_span_processor(processor: Any, process: str = "local") -> bool:
    """Also hand every span this process ends to `processor` (an SDK SpanProcessor: e.g. an
    in-memory exporter of a test or a bench), whether or not setup_tracing exports. Sampled
    at ratio 1 unless setup_tracing set another. False (and a warning) if another provider
    owns the process's spans. Undo with remove_span_processor."""
    with _lock:
        if not _install_locked("tandem", process):
            return False
        _switchboard.add(processor)
    return True


def remove_span_processor(processor: Any) -> None:
    """Stop handing spans to `processor` (not shut down: its owner does that)."""
    with _lock:
        if _switchboard is not None:
            _switchboard.remove(processor)


def _install_locked(service_name: str, process: str) -> bool:
    """Make this module's provider the process's, once (under _lock). False if a provider of
    someone else's was set first: spans go there, and this module cannot add to them."""
    global _provider, _switchboard
    if _provider is not None:
        return True
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        logger.warning(
            "another tracer provider (%s) owns this process's spans: tandem's tracing is off "
            "here (set none before tandem starts, or add processors with "
            "telemetry.tracing.add_span_processor)",
            type(current).__name__,
        )
        return False

    switchboard = _Switchboard()
    sampling = _Sampling(switchboard)
    resource = Resource.create({"service.name": service_name, "tandem.process": process})
    provider = TracerProvider(resource=resource, sampler=sampling)
    provider.add_span_processor(switchboard)
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:  # lost a race with someone else's
        logger.warning("another tracer provider was set first: tandem's tracing is off here")
        return False
    _provider, _switchboard = provider, switchboard
    return True


class _Switchboard(SpanProcessor):
    """The process provider's one processor: forwards to the processors of the moment."""

    def __init__(self) -> None:
        self.processors: tuple[Any, ...] = ()  # replaced whole: readers need no lock

    def add(self, processor: Any) -> None:
        self.processors += (processor,)

    def remove(self, processor: Any) -> None:
        self.processors = tuple(p for p in self.processors if p is not processor)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        for processor in self.processors:
            processor.on_start(span, parent_context=parent_context)

    def on_end(self, span: Any) -> None:
        for processor in self.processors:
            processor.on_end(span)

    def shutdown(self) -> None:
        for processor in self.processors:
            processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)


class _Sampling(Sampler):
    """ParentBased(TraceIdRatioBased(ratio)) while a processor listens; drop while none does."""

    def __init__(self, switchboard: _Switchboard) -> None:
        self.switchboard = switchboard
        self.ratio = 1.0
        self._rule: tuple[float, Sampler] = (1.0, ParentBased(TraceIdRatioBased(1.0)))

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: Any = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if not self.switchboard.processors:
            return SamplingResult(Decision.DROP)
        if self._rule[0] != self.ratio:
            self._rule = (self.ratio, ParentBased(TraceIdRatioBased(self.ratio)))
        return self._rule[1].should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"TandemSampling({self.ratio})"


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
