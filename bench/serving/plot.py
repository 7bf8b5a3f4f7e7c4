"""PNG plots of benchmark results: latency CDFs (TTFT, TPOT, ITL; one line per run) and, for a
sweep, SLO attainment, goodput and p99 latencies against the request rate (one line per result,
so two files compare on one figure). matplotlib is imported here, lazily, with the Agg backend;
nothing else in the package needs it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.serving.metrics import itls_s, tpot_s, ttft_s
from bench.serving.report import RunReport


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, values_ms: Sequence[float], label: str) -> None:
    if not values_ms:
        return
    xs = sorted(values_ms)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label)


def plot_latency_cdfs(runs: Sequence[RunReport], path: str | Path, title: str = "") -> Path:
    """TTFT, TPOT and ITL CDFs of each run's completed requests, in ms."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        ok = [r for r in run.records if r.is_ok]
        label = f"rate {run.rate_text}"
        _cdf(axes[0], [1000 * v for r in ok if (v := ttft_s(r)) is not None], label)
        _cdf(axes[1], [1000 * v for r in ok if (v := tpot_s(r)) is not None], label)
        _cdf(axes[2], [1000 * v for r in ok for v in itls_s(r)], label)
    for ax, name in zip(axes, ("TTFT", "TPOT", "ITL"), strict=True):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.suptitle(title or "latency CDFs")
    return _save(fig, plt, path)


def plot_sweep(
    series: Mapping[str, Sequence[RunReport]], path: str | Path, slo_text: str = ""
) -> Path:
    """Against the request rate, one line per name: SLO attainment (if an SLO was given),
    goodput (else request throughput), p99 TTFT and p99 ITL. Runs without a rate (all at once)
    are left out."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, runs in series.items():
        rated = sorted((r for r in runs if r.request_rate is not None), key=_rate)
        rates = [_rate(r) for r in rated]
        summaries = [r.summary for r in rated]
        if any(s.slo_attainment is not None for s in summaries):
            attainment = [100 * (s.slo_attainment or 0.0) for s in summaries]
            axes[0].plot(rates, attainment, marker="o", label=name)
            goodput = [s.goodput or 0.0 for s in summaries]
            axes[1].plot(rates, goodput, marker="o", label=f"{name} goodput")
        throughput = [s.request_throughput for s in summaries]
        axes[1].plot(rates, throughput, marker=".", linestyle="--", label=f"{name} throughput")
        axes[2].plot(rates, [_p99(s.ttft) for s in summaries], marker="o", label=f"{name} TTFT")
        axes[2].plot(rates, [_p99(s.itl) for s in summaries], marker="s", label=f"{name} ITL")
    axes[0].set_ylabel("SLO attainment (%)")
    axes[0].set_ylim(0, 102)
    axes[1].set_ylabel("requests / s")
    axes[2].set_ylabel("p99 latency (ms)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.suptitle(f"sweep; SLO {slo_text}" if slo_text else "sweep")
    return _save(fig, plt, path)


def _rate(run: RunReport) -> float:
    assert run.request_rate is not None, "a run without a rate in a sweep plot"
    return run.request_rate


def _p99(stats: Any) -> float:
    return float("nan") if stats is None else float(stats.p99_ms)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
