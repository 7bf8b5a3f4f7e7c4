"""Serving metrics from recorded timestamps, as pure functions: TTFT, TPOT, ITL, E2E and
goodput as docs/benchmarks.md ("Limits and definitions") defines them, which are those of
`vllm bench serve`. Percentiles interpolate linearly between order statistics (numpy's
default). Failed requests count in `num_failed` and `errors`, never in a latency or a
throughput. Nothing here does I/O.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.serving.slo import Slo

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One measured request. Times are seconds on the runner's monotonic clock."""

    index: int
    label: str  # the workload's class of request: "random", "prefill-heavy", "turn-2", ...
    start_s: float  # the request was sent
    chunk_times_s: tuple[float, ...]  # each streamed message that carried tokens arrived
    end_s: float  # the stream ended (its last message, or the error)
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    error: str | None = None  # the gRPC status code's name if the request failed

    @property
    def is_ok(self) -> bool:
        return self.error is None and bool(self.chunk_times_s)


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Mean and percentiles of one latency, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of_seconds(cls, values_s: Sequence[float]) -> LatencyStats | None:
        """None when there are no values."""
        if not values_s:
            return None
        ms = sorted(1000.0 * v for v in values_s)
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(len(ms), math.fsum(ms) / len(ms), p50, p90, p99)


@dataclass(frozen=True, slots=True)
class Summary:
    """One run's numbers. Throughputs are per second of `duration_s`."""

    num_requests: int
    num_completed: int
    num_failed: int
    errors: Mapping[str, int]  # gRPC status code name -> failed requests
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    total_cached_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float | None  # None without an SLO
    slo_attainment: float | None  # the fraction of all requests that met the SLO
    ttft: LatencyStats | None
    tpot: LatencyStats | None
    itl: LatencyStats | None
    e2e: LatencyStats | None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending values, linearly interpolated."""
    assert sorted_values, "percentile of no values"
    assert 0 <= q <= 100, f"percentile {q} outside 0..100"
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def ttft_s(record: RequestRecord) -> float | None:
    return record.chunk_times_s[0] - record.start_s if record.is_ok else None


def e2e_s(record: RequestRecord) -> float | None:
    return record.end_s - record.start_s if record.is_ok else None


def tpot_s(record: RequestRecord) -> float | None:
    """None for a failed request or one with a single output token (TPOT is undefined)."""
    ttft, e2e = ttft_s(record), e2e_s(record)
    if ttft is None or e2e is None or record.output_tokens < 2:
        return None
    return (e2e - ttft) / (record.output_tokens - 1)


def itls_s(record: RequestRecord) -> list[float]:
    times = record.chunk_times_s if record.is_ok else ()
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    """A completed request within every bound given; an undefined TPOT (one output token)
    meets any TPOT bound, as in `vllm bench serve`."""
    ttft, tpot, e2e = ttft_s(record), tpot_s(record), e2e_s(record)
    if ttft is None or e2e is None:
        return False
    checks = ((ttft, slo.ttft_s), (tpot if tpot is not None else 0.0, slo.tpot_s), (e2e, slo.e2e_s))
    return all(bound is None or value <= bound for value, bound in checks)


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Slo | None) -> Summary:
    """The run's numbers; `duration_s` is the measured span (first send to last end)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    ok = [r for r in records if r.is_ok]
    errors = Counter(r.error or "NO_OUTPUT" for r in records if not r.is_ok)
    num_good = sum(meets_slo(r, slo) for r in ok) if slo is not None else None
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.input_tokens for r in ok)
    return Summary(
        num_requests=len(records),
        num_completed=len(ok),
        num_failed=len(records) - len(ok),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        total_cached_tokens=sum(r.cached_tokens for r in ok),
        request_throughput=len(ok) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        goodput=None if num_good is None else num_good / duration_s,
        slo_attainment=None if num_good is None or not records else num_good / len(records),
        ttft=LatencyStats.of_seconds([v for r in ok if (v := ttft_s(r)) is not None]),
        tpot=LatencyStats.of_seconds([v for r in ok if (v := tpot_s(r)) is not None]),
        itl=LatencyStats.of_seconds([v for r in ok for v in itls_s(r)]),
        e2e=LatencyStats.of_seconds([v for r in ok if (v := e2e_s(r)) is not None]),
    )


def summarize_by_label(
    records: Sequence[RequestRecord], duration_s: float, slo: Slo | None
) -> dict[str, Summary]:
    """One Summary per request label, over the whole run's duration."""
    labels = sorted({r.label for r in records})
    return {
        label: summarize([r for r in records if r.label == label], duration_s, slo)
        for label in labels
    }
