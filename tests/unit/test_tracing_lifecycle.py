"""The process's tracing across set-ups: OpenTelemetry takes one tracer provider per process,
ever, so telemetry.tracing keeps one and changes what it feeds. Each case runs in a fresh
Python process (the provider is process-global) against real OTLP/gRPC collectors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


PRELUDE = """
import json
from tests.otlp_collector import Collector
from telemetry.tracing import (
    TracingConfig, add_span_processor, end_span, remove_span_processor, setup_tracing,
    shutdown_tracing, start_span,
)

def names(collector):
    return sorted(s["name"] for s in collector.spans)
"""


def test_a_second_setup_after_shutdown_exports_to_its_own_collector() -> None:
    """A service started, shut down and started again in one process (tests, benches): the
    second one's spans reach its collector (they went to the first, shut-down provider)."""
    result = _run(
        PRELUDE
        + """
first, second = Collector(), Collector()
assert setup_tracing(TracingConfig(otlp_endpoint=f"127.0.0.1:{first.port}"), "router")
end_span(start_span("first-run"))
shutdown_tracing()
end_span(start_span("between-runs"))
assert setup_tracing(TracingConfig(otlp_endpoint=f"127.0.0.1:{second.port}"), "router")
end_span(start_span("second-run"))
shutdown_tracing()
print(json.dumps({"first": names(first), "second": names(second),
                  "processes": sorted({s["process"] for s in second.spans})}))
"""
    )
    assert result["first"] == ["first-run"]
    assert result["second"] == ["second-run"]
    assert result["processes"] == ["router"]


def test_extra_processors_see_spans_with_and_without_export() -> None:
    """A bench's in-memory exporter sees every span, beside the OTLP export and without it;
    removed, it sees no more. No listener at all: spans are not recorded."""
    result = _run(
        PRELUDE
        + """
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

idle = start_span("before-anything")
recording_before = idle.is_recording()
end_span(idle)
memory = InMemorySpanExporter()
processor = SimpleSpanProcessor(memory)
assert add_span_processor(processor)
end_span(start_span("memory-only"))
collector = Collector()
assert setup_tracing(TracingConfig(otlp_endpoint=f"127.0.0.1:{collector.port}"), "router")
end_span(start_span("both"))
shutdown_tracing()
end_span(start_span("memory-after-shutdown"))
remove_span_processor(processor)
idle = start_span("nobody-listens")
recording_after = idle.is_recording()
end_span(idle)
print(json.dumps({"memory": sorted(s.name for s in memory.get_finished_spans()),
                  "collector": names(collector),
                  "recording": [recording_before, recording_after]}))
"""
    )
    assert result["memory"] == ["both", "memory-after-shutdown", "memory-only"]
    assert result["collector"] == ["both"]
    assert result["recording"] == [False, False]


def test_a_foreign_provider_is_named_in_a_warning_and_left_alone() -> None:
    result = _run(
        PRELUDE
        + """
import logging
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

logging.basicConfig(level=logging.WARNING)
theirs = TracerProvider()
trace.set_tracer_provider(theirs)
collector = Collector()
on = setup_tracing(TracingConfig(otlp_endpoint=f"127.0.0.1:{collector.port}"), "router")
print(json.dumps({"on": on, "kept": trace.get_tracer_provider() is theirs}))
"""
    )
    assert result == {**result, "on": False, "kept": True}
    assert "another tracer provider (TracerProvider) owns this process's spans" in str(
        result["stderr"]
    )
