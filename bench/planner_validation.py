"""Validation of the capacity planner (issue 21, item 5): its predictions against measurements.

`--cpu` (this machine): profile the engine here (`tandem profile`), serve 2 colocated workers
(`tandem serve`, as bench.disagg_experiment starts it), measure the mixed workload at each rate
with `tandem bench`, predict the same requests (same seed) with `tandem plan`, and print
predicted vs measured goodput and p99 TTFT. Target: within 20%.

`--h100` (one H100; the 2x H100 numbers are those recorded in docs/benchmarks.md, run B):
profile the Llama-3-8B shape (dummy weights; the engine limits of run B: 64 sequences, 2,048
tokens a step), predict run B's sweep for colocated (2 workers) and 1P1D (`--disagg always`),
and print them against the recorded goodput and p99 TTFT. Target: within 15%.

Both profiles are version 2: every point's repeats, mixed prefill+decode steps, and the time
outside engine steps measured through a real one-worker `tandem serve` (`--service-requests`);
`--profile P` predicts from an existing profile instead (version 1 files too). The predictions
are repeated with each term left out (`tandem plan --without`): validation.md's second table.

    python -m bench.planner_validation --cpu --out DIR
    python -m bench.planner_validation --h100 --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# docs/benchmarks.md, "The disaggregation experiment", run B (bc9c60a, 2x H100, 512 requests
# per rate): strict SLO goodput and p99 TTFT (ms) per rate
RUN_B = {
    "colocated": {32: (27.3, 135), 40: (33.2, 213), 48: (36.5, 151), 56: (35.9, 221)},
    "1P1D": {32: (27.2, 161), 40: (33.0, 326), 48: (28.7, 427), 56: (11.8, 1330)},
}
# bench.kvtransfer_nccl's full protocol on 2x H100, docs/benchmarks.md: ~128 MiB per
# prefill-heavy request in ~4 ms (~33 GB/s); the H100 profile uses it for its transfer times
H100_TRANSFER_GBPS = 33.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cpu", action="store_true")
    where.add_argument("--h100", action="store_true")
    parser.add_argument("--out", default="bench/results/planner")
    parser.add_argument("--profile", default=None, help="reuse this profile instead of one new")
    parser.add_argument("--transfer-gbps", type=float, default=None,
                        help="with --profile: its transfer times at this bandwidth instead "
                        "(profiles whose --transfer-gbps was ignored: version 1)")  # fmt: skip
    parser.add_argument("--measured", default=None,
                        help="cpu: reuse a tandem bench result (DIR/colocated.json)")  # fmt: skip
    parser.add_argument("--rates", default=None, help="default: 0.2,0.4,0.8 (cpu), run B's")
    parser.add_argument("--num-prompts", type=int, default=None, help="default 32 / 512")
    parser.add_argument("--prefill-heavy-lens", default=None, help="default 128:8 / 1024:16")
    parser.add_argument("--decode-heavy-lens", default=None, help="default 16:32 / 64:256")
    parser.add_argument("--slo", default=None, help="default ttft=4s,tpot=1s / run B's strict")
    return parser.parse_args()


def tandem(*argv: str) -> None:
    command = [sys.executable, "-m", "cluster.cli", *argv]
    print("$ tandem " + " ".join(argv), flush=True)
    subprocess.run(command, check=True)


def defaults(args: argparse.Namespace) -> None:
    cpu = args.cpu
    args.rates = args.rates or ("0.2,0.4,0.8" if cpu else "32,40,48,56")
    args.num_prompts = args.num_prompts or (32 if cpu else 512)
    args.prefill_heavy_lens = args.prefill_heavy_lens or ("128:8" if cpu else "1024:16")
    args.decode_heavy_lens = args.decode_heavy_lens or ("16:32" if cpu else "64:256")
    args.slo = args.slo or ("ttft=4s,tpot=1s" if cpu else "ttft=500ms,tpot=30ms")


def profile(args: argparse.Namespace, out: Path) -> str:
    if args.profile and args.transfer_gbps:  # the file's JSON as is but for its transfers
        data = json.loads(Path(args.profile).read_text())
        sizes = data["transfer"]["bytes"]
        data["transfer"]["seconds"] = [size / (args.transfer_gbps * 1e9) for size in sizes]
        path = out / "profile.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"{args.profile} with transfers at {args.transfer_gbps:g} GB/s: {path}")
        return str(path)
    if args.profile:
        return str(args.profile)
    path = str(out / "profile.json")
    try:
        measure(args, path)
    except subprocess.CalledProcessError:
        if not Path(path).exists():
            raise
        print(
            f"tandem profile failed after writing {path} (the service overhead: see "
            f"{path}.serve.log); predicting from it, with the engine loop's overhead"
        )
    return path


def measure(args: argparse.Namespace, path: str) -> None:
    if args.cpu:
        tandem("profile", "--device", "cpu", "--prefill-tokens", "16,64,128,256",
               "--prefill-context", "0,128", "--decode-batch", "1,4,16",
               "--decode-context", "32,160", "--repeats", "5", "--mixed-tokens", "16,128",
               "--mixed-batch", "0,4,16", "--mixed-context", "160", "--loop-batch", "4",
               "--service-requests", "16", "--service-batch", "4", "--out", path)  # fmt: skip
    else:
        tandem("profile", "--model", "dummy:llama-3-8b", "--device", "cuda",
               "--max-num-seqs", "64", "--max-num-batched-tokens", "2048",
               "--prefill-tokens", "64,256,512,1024,2048", "--prefill-context", "0,512,1024",
               "--decode-batch", "1,8,16,32,64", "--decode-context", "128,512,1024",
               "--transfer-bytes", "1048576,16777216,134217728",
               "--transfer-gbps", str(H100_TRANSFER_GBPS), "--repeats", "5",
               "--decode-steps", "16", "--mixed-tokens", "64,512,1024,1984",
               "--mixed-batch", "0,8,32,64", "--mixed-context", "512", "--loop-requests", "16",
               "--loop-batch", "32", "--service-requests", "16", "--service-batch", "32",
               "--out", path)  # fmt: skip


TERMS = ("spread", "mixed", "overhead")  # what a version 2 profile adds (tandem plan --without)


def predict(
    args: argparse.Namespace, profile_path: str, out: Path, without: str = ""
) -> dict[str, Any]:
    name = f"plan-without-{without}" if without else "plan"
    path = out / f"{name}.json"
    tandem("plan", "--profile", profile_path, "--gpus", "2", "--workload", "mixed",
           "--prefill-heavy-fraction", "0.7", "--prefill-heavy-lens", args.prefill_heavy_lens,
           "--decode-heavy-lens", args.decode_heavy_lens, "--rates", args.rates,
           "--num-prompts", str(args.num_prompts), "--slo", args.slo,
           "--configurations", "colocated" if args.cpu else "colocated,1P1D",
           "--without", without, "--out", str(path),
           "--plot", str(out / f"{name}.png"))  # fmt: skip
    return json.loads(path.read_text())


def by_term(plans: dict[str, dict[str, Any]]) -> str:
    """Goodput / TTFT p99 / TPOT p99 predicted with every term and without each one."""
    rows = ["| configuration | rate (req/s) | " + " | ".join(
        "all terms" if not t else f"without {t}" for t in plans) + " |",
        "|---|---|" + "---|" * len(plans)]  # fmt: skip
    for index, first in enumerate(plans[""]["predictions"]):
        cells = []
        for plan in plans.values():
            p = plan["predictions"][index]
            cells.append(f"{p['goodput']:.2f} / {p['ttft_p99_ms']:,.0f} / {p['tpot_p99_ms']:.1f}")
        rows.append(f"| {first['configuration']} | {first['rate']:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def measure_cpu(args: argparse.Namespace, out: Path) -> dict[float, tuple[float, ...]]:
    """rate -> (goodput, p99 TTFT ms, p50 TTFT ms) of 2 colocated workers, measured by
    bench.disagg_experiment's orchestration (or read from --measured)."""
    from bench.disagg_experiment import run_configuration
    from bench.serving.report import load_runs

    if args.measured:
        return _summaries(load_runs(args.measured)[1])
    experiment = argparse.Namespace(
        model="default", rates=args.rates, num_prompts=args.num_prompts,
        prefill_heavy_fraction=0.7, prefill_heavy_lens=args.prefill_heavy_lens,
        decode_heavy_lens=args.decode_heavy_lens, slo=args.slo, num_warmup=2,
        start_timeout=900.0, cpu_dry_run=True,
    )  # fmt: skip
    if run_configuration(experiment, "colocated", out):
        raise RuntimeError("tandem bench failed: see the logs in " + str(out))
    return _summaries(load_runs(out / "colocated.json")[1])


def _summaries(runs: list[Any]) -> dict[float, tuple[float, ...]]:
    found = {}
    for run in runs:
        ttft = run.summary.ttft
        found[float(run.request_rate or 0)] = (
            run.summary.goodput or 0.0,
            ttft.p99_ms if ttft else 0.0,
            ttft.p50_ms if ttft else 0.0,
        )
    return found


def error(predicted: float, measured: float) -> str:
    return "-" if not measured else f"{100 * (predicted - measured) / measured:+.0f}%"


def compare(plan: dict[str, Any], measured: dict[str, dict[float, tuple[float, ...]]]) -> str:
    """Measured (goodput, TTFT p99[, TTFT p50]) against the plan's, per configuration and rate."""
    rows = ["| configuration | rate (req/s) | goodput measured | predicted | error | TTFT p99 "
            "ms measured | predicted | error | TTFT p50 ms measured | predicted | error |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in plan["predictions"]:
        got = measured.get(p["configuration"], {}).get(float(p["rate"]))
        if got is None:
            continue
        goodput, ttft, *median = got
        row = (
            f"| {p['configuration']} | {p['rate']:g} | {goodput:.2f} | {p['goodput']:.2f} | "
            f"{error(p['goodput'], goodput)} | {ttft:,.0f} | {p['ttft_p99_ms']:,.0f} | "
            f"{error(p['ttft_p99_ms'], ttft)} |"
        )
        if median:
            predicted = p["ttft_p50_ms"]
            row += f" {median[0]:,.0f} | {predicted:,.0f} | {error(predicted, median[0])} |"
        else:
            row += " - | - | - |"
        rows.append(row)
    return "\n".join(rows)


def main() -> int:
    args = parse_args()
    defaults(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile_path = profile(args, out)
    if args.cpu:
        measured = {"colocated": measure_cpu(args, out)}
    else:
        measured = {name: {float(r): v for r, v in rates.items()} for name, rates in RUN_B.items()}
    plan = predict(args, profile_path, out)
    source = "measured here" if args.cpu else "recorded, docs/benchmarks.md run B"
    print(f"\npredicted (tandem plan) vs {source}; SLO {args.slo}\n")
    table = compare(plan, measured)
    print(table)
    plans = {"": plan, **{term: predict(args, profile_path, out, term) for term in TERMS}}
    terms = by_term(plans)
    print("\ngoodput req/s / TTFT p99 ms / TPOT p99 ms, with each term left out\n\n" + terms)
    (out / "validation.md").write_text(table + "\n\n" + terms + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
