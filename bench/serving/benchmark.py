"""One `tandem bench` invocation: ask the server what it serves, build the workload, warm up,
run each request rate (one run, or a sweep), then write the JSON result, print the tables and
draw the plots. Each run has a cache salt of its own, so a sweep's runs send the same prompts
without finding each other's (or the warm-up's) prefixes in the server's cache."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import sys
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import git_revision, machine_info, write_json
from bench.serving.arrival import ArrivalConfig, arrival_offsets_s
from bench.serving.metrics import summarize, summarize_by_label
from bench.serving.progress import Progress
from bench.serving.report import (
    RunReport,
    relative_records,
    result_json,
    summary_table,
    sweep_table,
)
from bench.serving.runner import RunResult, Send, run_sessions
from bench.serving.slo import Slo
from bench.serving.workload import (
    MixedWorkload,
    MultiTurnWorkload,
    RandomWorkload,
    Session,
    SharedPrefixWorkload,
    Workload,
    workload_from_args,
)

CONNECT_TIMEOUT_S = 30.0


class ServerUnreachable(Exception):
    """ListModels failed: nothing to measure."""


def check_fits(workload: Workload, max_model_len: int) -> None:
    needed = workload.max_total_tokens()
    if needed > max_model_len:
        raise ValueError(
            f"the {workload.name} workload needs up to {needed} tokens per request (prompt + "
            f"output) but the served model's max_model_len is {max_model_len}: shorten it"
        )


def run_benchmark(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    workload = workload_from_args(args)
    rates = list(args.rates or [args.request_rate])
    for rate in rates:
        ArrivalConfig(rate, args.burstiness)  # validates
    try:
        header, runs = asyncio.run(_benchmark(args, workload, rates))
    except ServerUnreachable as e:
        print(f"tandem bench: error: {e}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    output = Path(args.output or f"tandem-bench-{workload.name}-{stamp}.json")
    write_json(output, result_json(header, runs))
    model_id = header["server"]["model_id"]
    print(f"\n{header['label']}: {header['workload_summary']}; {model_id} at {args.target}\n")
    print(sweep_table(runs))
    for run in runs:
        if len(run.by_label) > 1:
            print(f"\nrate {run.rate_text} by request label:\n")
            print(summary_table(list(run.by_label.items())))
    print(f"\nresults: {output}")
    if not args.no_plot:
        for path in write_plots(output, runs, header["slo"] or ""):
            print(f"plot: {path}")
    return 0


def write_plots(output: Path, runs: Sequence[RunReport], slo_text: str) -> list[Path]:
    """`<stem>-cdf.png`, and `<stem>-sweep.png` for a sweep, next to the JSON file."""
    from bench.serving.plot import plot_latency_cdfs, plot_sweep

    paths = [plot_latency_cdfs(runs, output.with_name(f"{output.stem}-cdf.png"), output.stem)]
    if sum(run.request_rate is not None for run in runs) > 1:
        sweep = output.with_name(f"{output.stem}-sweep.png")
        paths.append(plot_sweep({output.stem: runs}, sweep, slo_text))
    return paths


async def _benchmark(
    args: argparse.Namespace, workload: Workload, rates: Sequence[float]
) -> tuple[dict[str, Any], list[RunReport]]:
    import grpc

    from bench.serving.client import make_sender, server_info
    from bench.serving.connection import connection_of, open_channel

    salt = uuid.uuid4().hex[:12]
    tls, metadata = connection_of(args)
    async with open_channel(args.target, tls, aio=True) as channel:
        try:
            info = await server_info(channel, args.target, CONNECT_TIMEOUT_S, metadata)
        except grpc.aio.AioRpcError as e:
            raise ServerUnreachable(
                f"no answer from a Tandem service at {args.target} ({e.code().name}: {e.details()})"
            ) from None
        check_fits(workload, info.max_model_len)

        def sender(name: str) -> Send:
            return make_sender(channel, f"{salt}-{name}", args.temperature, args.timeout, metadata)

        if args.num_warmup > 0:
            warmup = workload.sessions(args.num_warmup, info.vocab_size, args.seed + 1)
            result = await _run(warmup, [0.0] * len(warmup), sender("warmup"), args, "warm-up")
            if failed := [r for r in result.records if not r.is_ok]:
                print(f"tandem bench: {len(failed)} warm-up requests failed", file=sys.stderr)
        sessions = workload.sessions(args.num_prompts, info.vocab_size, args.seed)
        runs = []
        for index, rate in enumerate(rates):
            offsets = arrival_offsets_s(
                len(sessions), ArrivalConfig(rate, args.burstiness), args.seed
            )
            result = await _run(sessions, offsets, sender(f"run{index}"), args, f"rate {rate:g}")
            runs.append(_report(result, rate, args))
    header = {
        "label": args.label or (Path(args.output).stem if args.output else workload.name),
        "command": redacted_argv(sys.argv),
        "config": _config(args),
        "workload": {"name": workload.name, **asdict(workload)},
        "workload_summary": _describe(workload),
        "slo": args.slo.describe() if args.slo else None,
        "server": asdict(info),
        "cache_salt": salt,
        "git_revision": git_revision(),
        "machine": machine_info(packages=("grpcio", "protobuf", "matplotlib")),
    }
    return header, runs


async def _run(
    sessions: Sequence[Session],
    offsets_s: Sequence[float],
    send: Send,
    args: argparse.Namespace,
    label: str,
) -> RunResult:
    progress = Progress(sum(s.num_requests for s in sessions), label)
    try:
        return await run_sessions(sessions, offsets_s, send, args.concurrency, progress.update)
    finally:
        progress.close()


def _report(result: RunResult, rate: float, args: argparse.Namespace) -> RunReport:
    slo: Slo | None = args.slo
    duration_s = max(result.duration_s, 1e-9)
    summary = summarize(result.records, duration_s, slo)
    by_label = summarize_by_label(result.records, duration_s, slo)
    return RunReport(
        request_rate=None if math.isinf(rate) else rate,
        burstiness=args.burstiness,
        max_concurrency=args.concurrency,
        summary=summary,
        by_label=by_label if len(by_label) > 1 else {},
        records=relative_records(result.records, result.started_s),
    )


REDACTED = "<redacted>"


def redacted_argv(argv: Sequence[str]) -> list[str]:
    """The command line with the value of --api-key replaced (it goes into the results)."""
    redacted, hide_next = [], False
    for arg in argv:
        if hide_next:
            redacted.append(REDACTED)
        elif arg.startswith("--api-key="):
            redacted.append(f"--api-key={REDACTED}")
        else:
            redacted.append(arg)
        hide_next = arg == "--api-key"
    return redacted


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as JSON values (inf as "inf", the SLO as its text, an API key
    redacted)."""
    config: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key == "handler":
            continue
        if key == "api_key" and value is not None:
            value = REDACTED
        elif isinstance(value, Slo):
            value = value.describe()
        elif isinstance(value, float) and math.isinf(value):
            value = "inf"
        config[key] = value
    return config


def _describe(workload: Workload) -> str:
    if isinstance(workload, RandomWorkload):
        spread = f" (range ratio {workload.range_ratio:g})" if workload.range_ratio else ""
        return f"random {workload.input_len} in / {workload.output_len} out{spread}"
    if isinstance(workload, SharedPrefixWorkload):
        return (
            f"shared-prefix: {workload.num_groups} groups, {workload.prefix_len}-token prefix + "
            f"{workload.suffix_len}-token suffix in / {workload.output_len} out"
        )
    if isinstance(workload, MultiTurnWorkload):
        return (
            f"multi-turn ({workload.prompt_format}): {workload.num_turns} turns, "
            f"{workload.question_len}-token questions, {workload.output_len}-token answers"
        )
    assert isinstance(workload, MixedWorkload), f"no description of {workload.name}"
    (pi, po), (di, do) = workload.prefill_heavy_lens, workload.decode_heavy_lens
    return (
        f"mixed: {100 * workload.prefill_heavy_fraction:g}% prefill-heavy {pi} in / {po} out, "
        f"the rest decode-heavy {di} in / {do} out"
    )
