"""Predictions for a GPU count: every configuration (colocated, each prefill:decode split with
every prefill on the prefill pool, and each split with `--disagg auto`) simulated at each
request rate of a workload, judged by the benchmark's own metrics (bench.serving.metrics), and
the configuration with the highest predicted goodput. Pure but for `write_plot`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.serving.arrival import ArrivalConfig, arrival_offsets_s
from bench.serving.metrics import Summary, summarize
from bench.serving.slo import Slo
from bench.serving.workload import Workload
from planner.profile import Profile
from planner.simulator import Layout, SimRequest, Simulation
from router.disagg import DisaggPolicy

VOCAB_SIZE = 32_000  # token ids are drawn from it; their values do not change step times


def layouts(num_gpus: int, auto: DisaggPolicy | None = None) -> list[Layout]:
    """colocated on all GPUs; per split x:y (x + y = num_gpus), `--disagg always` and auto."""
    if type(num_gpus) is not int or num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus!r} must be an int >= 1")
    auto = replace(auto or DisaggPolicy(), mode="auto")
    found = [Layout("colocated", 0, num_gpus)]
    for num_prefill in range(1, num_gpus):
        split = f"{num_prefill}P{num_gpus - num_prefill}D"
        found.append(Layout(split, num_prefill, num_gpus - num_prefill, DisaggPolicy("always")))
        found.append(Layout(f"{split}-auto", num_prefill, num_gpus - num_prefill, auto))
    return found


def requests_of(
    workload: Workload, num_prompts: int, rate: float, seed: int, burstiness: float = 1.0
) -> list[SimRequest]:
    """The requests `tandem bench` would send (same sessions, same arrival times for the same
    seed); single-request sessions of token ids only (multi-turn needs the answers)."""
    sessions = workload.sessions(num_prompts, VOCAB_SIZE, seed)
    offsets = arrival_offsets_s(len(sessions), ArrivalConfig(rate, burstiness), seed)
    requests = []
    for index, (session, offset_s) in enumerate(zip(sessions, offsets, strict=True)):
        if session.follow_ups or not session.prompt.token_ids:
            raise ValueError(
                f"workload {workload.name!r}: the planner simulates single requests of token "
                "ids (random, shared-prefix, mixed), not conversations"
            )
        requests.append(
            SimRequest(index, session.label, offset_s, session.prompt.token_ids, session.max_tokens)
        )
    return requests


@dataclass(frozen=True, slots=True)
class Prediction:
    layout: str
    rate: float
    summary: Summary


def predict(
    profile: Profile,
    layout: Layout,
    requests: Sequence[SimRequest],
    slo: Slo,
    target_itl_s: float | None = None,
    seed: int = 0,
) -> Summary:
    """The benchmark's summary of `requests` served in `layout`, as simulated (`seed`: the
    simulation's draws of step-time spread and overheads)."""
    records = Simulation(profile, layout, target_itl_s, seed=seed).run(requests)
    ends = [r.end_s for r in records]
    duration_s = max(max(ends) - min(r.start_s for r in records), 1e-9)
    return summarize(records, duration_s, slo)


def plan(
    profile: Profile,
    candidates: Sequence[Layout],
    workload: Workload,
    rates: Sequence[float],
    slo: Slo,
    num_prompts: int,
    seed: int = 0,
    target_itl_s: float | None = None,
) -> list[Prediction]:
    predictions = []
    for rate in rates:
        requests = requests_of(workload, num_prompts, rate, seed)
        for layout in candidates:
            summary = predict(profile, layout, requests, slo, target_itl_s, seed)
            predictions.append(Prediction(layout.name, rate, summary))
    return predictions


def recommend(predictions: Sequence[Prediction]) -> Prediction:
    """The prediction with the highest goodput (ties: the lower rate, then the order given)."""
    if not predictions:
        raise ValueError("no predictions to recommend from")
    return max(predictions, key=lambda p: (p.summary.goodput or 0.0, -p.rate))


def best_ratio(predictions: Sequence[Prediction]) -> tuple[int, int] | None:
    """The prefill:decode split of the best disaggregated prediction, None if there is none."""
    split = [p for p in predictions if p.layout != "colocated"]
    if not split:
        return None
    name = recommend(split).layout.split("-")[0]  # "1P3D" or "1P3D-auto"
    num_prefill, num_decode = name.rstrip("D").split("P")
    return int(num_prefill), int(num_decode)


def _ms(stats: Any) -> str:
    return "-" if stats is None else f"{stats.p99_ms:,.0f}"


def table(predictions: Sequence[Prediction]) -> str:
    rows = ["| configuration | rate (req/s) | goodput (req/s) | SLO attainment | TTFT p99 ms "
            "| ITL p99 ms | TPOT p99 ms |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in predictions:
        s = p.summary
        attainment = "-" if s.slo_attainment is None else f"{100 * s.slo_attainment:.0f}%"
        rows.append(
            f"| {p.layout} | {p.rate:g} | {s.goodput or 0.0:.2f} | {attainment} | "
            f"{_ms(s.ttft)} | {_ms(s.itl)} | {_ms(s.tpot)} |"
        )
    return "\n".join(rows)


def to_json(predictions: Sequence[Prediction]) -> list[dict[str, Any]]:
    def p99(stats: Any) -> float | None:
        return None if stats is None else stats.p99_ms

    def p50(stats: Any) -> float | None:
        return None if stats is None else stats.p50_ms

    return [
        {"configuration": p.layout, "rate": p.rate, "goodput": p.summary.goodput,
         "slo_attainment": p.summary.slo_attainment, "num_failed": p.summary.num_failed,
         "ttft_p50_ms": p50(p.summary.ttft), "ttft_p99_ms": p99(p.summary.ttft),
         "itl_p99_ms": p99(p.summary.itl), "tpot_p99_ms": p99(p.summary.tpot)}
        for p in predictions
    ]  # fmt: skip


def write_plot(predictions: Sequence[Prediction], path: str | Path) -> Path | None:
    """Goodput and TTFT p99 against the rate, one line per configuration (PNG). None, with
    nothing written, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(p.layout for p in predictions):
        mine = [p for p in predictions if p.layout == name]
        rates = [p.rate for p in mine]
        axes[0].plot(rates, [p.summary.goodput or 0.0 for p in mine], marker="o", label=name)
        ttft = [p.summary.ttft.p99_ms if p.summary.ttft else math.nan for p in mine]
        axes[1].plot(rates, ttft, marker="o", label=name)
    axes[0].set(xlabel="request rate (req/s)", ylabel="predicted goodput (req/s)")
    axes[1].set(xlabel="request rate (req/s)", ylabel="predicted TTFT p99 (ms)", yscale="log")
    axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
