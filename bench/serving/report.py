"""Results as JSON and as markdown tables: one file per `tandem bench` invocation holding the
configuration, the server's model, the machine and every run (a rate of a sweep) with its
summary and its requests' timestamps; `compare_table` sets two such files side by side.
Reads and writes files only where its callers say; draws nothing (that is `plot`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import markdown_table
from bench.serving.metrics import (
    LatencyStats,
    RequestRecord,
    Summary,
    summarize,
    summarize_by_label,
)
from bench.serving.slo import Slo

RESULT_VERSION = 1


@dataclass(frozen=True, slots=True)
class RunReport:
    """One run of a sweep: its load, its numbers, and its requests."""

    request_rate: float | None  # requests (sessions) per second; None: all at once
    burstiness: float
    max_concurrency: int | None
    summary: Summary
    by_label: Mapping[str, Summary]  # only when the workload has several labels
    records: tuple[RequestRecord, ...]  # times relative to the run's start

    @property
    def rate_text(self) -> str:
        return "inf" if self.request_rate is None else f"{self.request_rate:g}"


def relative_records(
    records: Sequence[RequestRecord], started_s: float
) -> tuple[RequestRecord, ...]:
    """The records with every time measured from `started_s`."""
    return tuple(
        RequestRecord(
            index=r.index,
            label=r.label,
            start_s=r.start_s - started_s,
            chunk_times_s=tuple(t - started_s for t in r.chunk_times_s),
            end_s=r.end_s - started_s,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            cached_tokens=r.cached_tokens,
            error=r.error,
        )
        for r in records
    )


def result_json(header: Mapping[str, Any], runs: Sequence[RunReport]) -> dict[str, Any]:
    """The file's content: `header` (command, config, server, machine) and the runs."""
    return {"version": RESULT_VERSION, **header, "runs": [asdict(run) for run in runs]}


def load_runs(path: str | Path) -> tuple[dict[str, Any], list[RunReport]]:
    """A result file's header and runs; ValueError if it is not one."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("version") != RESULT_VERSION or "runs" not in data:
        raise ValueError(f"{path} is not a `tandem bench` result (version {RESULT_VERSION})")
    header = {k: v for k, v in data.items() if k != "runs"}
    return header, [run_from_dict(run) for run in data["runs"]]


def with_slo(runs: Sequence[RunReport], slo: Slo) -> list[RunReport]:
    """The runs with their summaries recomputed from their requests under `slo`."""
    return [
        replace(
            run,
            summary=summarize(run.records, run.summary.duration_s, slo),
            by_label=summarize_by_label(run.records, run.summary.duration_s, slo)
            if run.by_label
            else {},
        )
        for run in runs
    ]


def run_from_dict(data: Mapping[str, Any]) -> RunReport:
    return RunReport(
        request_rate=data["request_rate"],
        burstiness=data["burstiness"],
        max_concurrency=data["max_concurrency"],
        summary=summary_from_dict(data["summary"]),
        by_label={k: summary_from_dict(v) for k, v in data["by_label"].items()},
        records=tuple(
            RequestRecord(**{**r, "chunk_times_s": tuple(r["chunk_times_s"])})
            for r in data["records"]
        ),
    )


def summary_from_dict(data: Mapping[str, Any]) -> Summary:
    fields: dict[str, Any] = dict(data)
    for name in ("ttft", "tpot", "itl", "e2e"):
        fields[name] = LatencyStats(**data[name]) if data[name] else None
    return Summary(**fields)


def _ms(stats: LatencyStats | None, field: str) -> str:
    return "-" if stats is None else f"{getattr(stats, field):.1f}"


def _optional(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{scale * value:.{digits}f}"


def _latency_cell(name: str, field: str) -> Callable[[Summary], str]:
    return lambda summary: _ms(getattr(summary, name), field)


def _latency_rows() -> list[tuple[str, Callable[[Summary], str]]]:
    return [
        (f"{name.upper()} {field.removesuffix('_ms')} (ms)", _latency_cell(name, field))
        for name in ("ttft", "tpot", "itl", "e2e")
        for field in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")
    ]


ROWS: list[tuple[str, Callable[[Summary], str]]] = [
    ("requests completed", lambda s: str(s.num_completed)),
    ("requests failed", lambda s: str(s.num_failed)),
    ("errors", lambda s: ", ".join(f"{k} {v}" for k, v in s.errors.items()) or "-"),
    ("duration (s)", lambda s: f"{s.duration_s:.2f}"),
    ("input tokens", lambda s: str(s.total_input_tokens)),
    ("cached input tokens", lambda s: str(s.total_cached_tokens)),
    ("output tokens", lambda s: str(s.total_output_tokens)),
    ("request throughput (req/s)", lambda s: f"{s.request_throughput:.2f}"),
    ("output throughput (tok/s)", lambda s: f"{s.output_throughput:.1f}"),
    ("total throughput (tok/s)", lambda s: f"{s.total_token_throughput:.1f}"),
    ("goodput (req/s)", lambda s: _optional(s.goodput)),
    ("SLO attainment (%)", lambda s: _optional(s.slo_attainment, 100.0, 1)),
    *_latency_rows(),
]


def summary_table(columns: Sequence[tuple[str, Summary]]) -> str:
    """A markdown table: one row per metric, one column per (header, summary)."""
    headers = ["metric", *(header for header, _ in columns)]
    rows = [[label, *(cell(summary) for _, summary in columns)] for label, cell in ROWS]
    return markdown_table(headers, rows)


def sweep_table(runs: Sequence[RunReport]) -> str:
    return summary_table([(f"rate {run.rate_text}", run.summary) for run in runs])


def paired_runs(
    runs_a: Sequence[RunReport], runs_b: Sequence[RunReport]
) -> list[tuple[RunReport, RunReport]]:
    """The runs of two results at the same request rates, in a's order; if they share no
    rate, the runs in order, as many as both have."""
    rates_b = {run.rate_text: run for run in runs_b}
    same_rate = [(run, rates_b[run.rate_text]) for run in runs_a if run.rate_text in rates_b]
    return same_rate or list(zip(runs_a, runs_b, strict=False))


def compare_table(
    name_a: str, runs_a: Sequence[RunReport], name_b: str, runs_b: Sequence[RunReport]
) -> str:
    """Two results side by side (paired_runs), with a ratio column b/a per pair."""
    pairs = paired_runs(runs_a, runs_b)
    if not pairs:
        raise ValueError(
            f"nothing to compare: {name_a} has {len(runs_a)} runs, {name_b} {len(runs_b)}"
        )
    headers = ["metric"]
    for run_a, run_b in pairs:
        headers += [f"{name_a} @ {run_a.rate_text}", f"{name_b} @ {run_b.rate_text}", "b/a"]
    rows = []
    for label, cell in ROWS:
        row = [label]
        for run_a, run_b in pairs:
            a, b = cell(run_a.summary), cell(run_b.summary)
            row += [a, b, _ratio(a, b)]
        rows.append(row)
    return markdown_table(headers, rows)


def _ratio(a: str, b: str) -> str:
    try:
        value_a, value_b = float(a), float(b)
    except ValueError:
        return "-"
    if value_a == 0 or not math.isfinite(value_a):
        return "-"
    return f"{value_b / value_a:.2f}x"
