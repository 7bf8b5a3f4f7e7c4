"""Tracing configuration and the trace context that crosses Ray calls (W3C headers). Spans
across real processes and a real collector: tests/integration/test_service_observability.py."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from telemetry.tracing import TracingConfig, child_carrier, extract, inject

TRACE_ID, SPAN_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7


def test_the_context_survives_a_carrier() -> None:
    span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, False, TraceFlags(1)))
    carrier = inject(trace.set_span_in_context(span))
    assert carrier == {"traceparent": f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"}
    assert child_carrier(span) == carrier
    received = trace.get_current_span(extract(carrier)).get_span_context()
    assert (received.trace_id, received.span_id, received.is_remote) == (TRACE_ID, SPAN_ID, True)


def test_no_or_bad_headers_start_a_new_trace() -> None:
    for carrier in (None, {}, {"traceparent": "garbage"}):
        assert not trace.get_current_span(extract(carrier)).get_span_context().is_valid


def test_bad_configuration_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="otlp_endpoint='collector' must be host:port"):
        TracingConfig(otlp_endpoint="collector")
    with pytest.raises(ValueError, match="sample_ratio=2"):
        TracingConfig(sample_ratio=2)
    assert TracingConfig(otlp_endpoint="otel-collector:4317").otlp_endpoint
