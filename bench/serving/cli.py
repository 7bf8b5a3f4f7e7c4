"""`tandem bench`: measure a running service under load, or compare two results.

    tandem bench --target HOST:PORT [--workload random|shared-prefix|multi-turn|mixed]
                 [--request-rate R | --rates 1,2,4,8] [--concurrency C] [--slo ...] ...
    tandem bench compare a.json b.json [--plot both.png]

Importing this module is cheap (argparse only), so `tandem --help` stays instant. Exit codes:
0 done (failed requests are counted, not fatal), 2 bad arguments or an unreachable server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

WORKLOADS = ("random", "shared-prefix", "multi-turn", "mixed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tandem bench` and its `compare` subcommand; sets `handler`."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="the service, HOST:PORT")
    add_connection_arguments(parser)
    parser.add_argument("--workload", default="random", choices=WORKLOADS)
    parser.add_argument(
        "--num-prompts", type=int, default=100, help="requests per run (multi-turn: conversations)"
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate", type=float, default=float("inf"), help="per second; inf: all at once"
    )
    load.add_argument("--rates", type=parse_rates, default=None, help="a sweep: 1,2,4,8 (req/s)")
    load.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier"
    )
    load.add_argument("--concurrency", type=int, default=None, help="at most this many in flight")
    load.add_argument("--num-warmup", type=int, default=2, help="sessions first, not counted")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    load.add_argument("--temperature", type=float, default=0.0)
    add_workload_shape_arguments(parser)
    results = parser.add_argument_group("results")
    results.add_argument("--slo", type=_slo, default=None, help="e.g. ttft=500ms,tpot=30ms")
    results.add_argument("--output", default=None, help="JSON file (default: a dated name)")
    results.add_argument("--label", default=None, help="this result's name in tables and plots")
    results.add_argument("--no-plot", action="store_true", help="write no PNG files")
    parser.set_defaults(handler=run)
    commands = parser.add_subparsers(dest="bench_command", required=False)
    compare = commands.add_parser("compare", help="two result files side by side")
    compare.add_argument("results", nargs=2, help="two JSON files written by tandem bench")
    compare.add_argument("--plot", default=None, help="also draw both sweeps in this PNG")
    compare.add_argument(
        "--slo",
        type=_slo,
        default=None,
        help="judge both under this SLO instead of their own (recomputed from their requests)",
    )


def add_workload_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shape a workload's requests, with the workloads' own defaults: one set
    for `tandem bench` and `tandem plan`, so a plan and a measurement of the same flags see
    the same requests (bench.serving.workload.workload_from_args builds it)."""
    lengths = parser.add_argument_group("workload shape (tokens)")
    lengths.add_argument("--input-len", type=int, default=1024, help="random")
    lengths.add_argument("--output-len", type=int, default=128, help="all but mixed")
    lengths.add_argument("--range-ratio", type=float, default=0.0, help="random: +-ratio")
    lengths.add_argument("--num-groups", type=int, default=4, help="shared-prefix")
    lengths.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix")
    lengths.add_argument("--suffix-len", type=int, default=32, help="shared-prefix")
    lengths.add_argument("--num-turns", type=int, default=3, help="multi-turn")
    lengths.add_argument("--question-len", type=int, default=32, help="multi-turn (words/ids)")
    lengths.add_argument("--multi-turn-format", default="chat", choices=("chat", "token-ids"))
    lengths.add_argument("--prefill-heavy-fraction", type=float, default=0.5, help="mixed")
    lengths.add_argument("--prefill-heavy-lens", type=parse_lens, default=(1024, 16), help="IN:OUT")
    lengths.add_argument("--decode-heavy-lens", type=parse_lens, default=(64, 256), help="IN:OUT")


def add_tls_arguments(group: Any) -> None:
    """The client's TLS flags (read by bench.serving.connection.client_tls_of) on an argument
    group or parser."""
    group.add_argument(
        "--tls", action="store_true", help="connect over TLS, trusting the system's CA roots"
    )
    group.add_argument(
        "--tls-ca", default=None, help="PEM roots the server's certificate must chain to (TLS)"
    )
    group.add_argument(
        "--tls-client-cert", default=None, help="this client's PEM certificate (mutual TLS)"
    )
    group.add_argument("--tls-client-key", default=None, help="its PEM private key")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """How a client reaches a service that wants TLS or an API key (`tandem client`, `bench`)."""
    group = parser.add_argument_group("connection (TLS, API key)")
    add_tls_arguments(group)
    group.add_argument(
        "--api-key",
        default=None,
        help="sent as 'authorization: Bearer <key>'; default $TANDEM_API_KEY (preferred: a "
        "flag shows in the process list)",
    )


def _slo(text: str) -> Any:
    from bench.serving.slo import parse_slo

    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_rates(text: str) -> list[float]:
    """A --rates value: positive request rates, comma-separated (argparse type)."""
    try:
        rates = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of rates like 1,2,4,8") from None
    if not rates or any(not rate > 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive rates like 1,2,4,8")
    return rates


def parse_lens(text: str) -> tuple[int, int]:
    """An IN:OUT pair of token lengths (argparse type)."""
    try:
        num_input, num_output = (int(item) for item in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not INPUT:OUTPUT, e.g. 1024:16") from None
    return num_input, num_output


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "compare":
        return run_compare(args)
    from bench.serving.benchmark import run_benchmark

    return run_benchmark(args)


def run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.serving.report import compare_table, load_runs, with_slo

    (path_a, path_b) = args.results
    (header_a, runs_a), (header_b, runs_b) = load_runs(path_a), load_runs(path_b)
    if args.slo is not None:  # e.g. a relaxed pair next to the one the runs were taken with
        runs_a, runs_b = with_slo(runs_a, args.slo), with_slo(runs_b, args.slo)
    name_a = header_a.get("label") or Path(path_a).stem
    name_b = header_b.get("label") or Path(path_b).stem
    for name, header in ((name_a, header_a), (name_b, header_b)):
        print(f"- {name}: {header.get('workload_summary', '')} ({header.get('git_revision')})")
    print()
    print(compare_table(name_a, runs_a, name_b, runs_b))
    if args.plot:
        from bench.serving.plot import plot_sweep

        print(f"\nplot: {plot_sweep({name_a: runs_a, name_b: runs_b}, args.plot)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.serving.cli ...`: the same as `tandem bench ...`."""
    parser = argparse.ArgumentParser(prog="tandem bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ValueError as e:
        print(f"tandem bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
