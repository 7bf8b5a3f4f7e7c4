"""The same saturation workload through the engine alone and through `tandem serve` + gRPC
(issue 19's last row): one GPU, Llama-3-8B shape, dummy bf16 weights.

1. Engine alone: `bench.engine_saturation` (its own process, so its GPU memory is freed after):
   `--num-requests` random prompts of `--input-len` tokens, `--output-len` new tokens each
   (ignore_eos), all submitted at once, 256 running, 8,192 tokens a step; output tokens/s.
2. The service: `tandem serve --mode colocated --workers 1` (the same engine limits, local Ray,
   gRPC on loopback), driven by `tandem bench --workload random` with the same lengths,
   `--concurrency` requests in flight and every request sent at once (rate inf); a first pass
   of a quarter of the requests warms the service up (compiles what the engine's warm-up
   compiled in 1), the second is the one reported.

    python -m bench.serve_vs_engine [--num-requests 512] [--concurrency 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.disagg_experiment import tandem_serve


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--skip-engine", action="store_true", help="only the service")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--out", default="bench/results/serve_vs_engine")
    return parser.parse_args()


def engine_alone(args: argparse.Namespace, out: Path) -> float:
    path = out / "engine.json"
    subprocess.run(
        [sys.executable, "-m", "bench.engine_saturation", "--baseline-batch", "0",
         "--repeats", "1", "--num-requests", str(args.num_requests),
         "--input-len", str(args.input_len), "--output-len", str(args.output_len),
         "--max-num-seqs", str(args.max_num_seqs),
         "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--out", str(path)],
        check=True,
    )  # fmt: skip
    runs = json.loads(path.read_text())["results"]["tandem"]
    return float(max(run["output_tok_s"] for run in runs))


def service(args: argparse.Namespace, out: Path) -> float:
    serve = ["--model", args.model, "--device", "cuda", "--mode", "colocated", "--workers", "1",
             "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens)]  # fmt: skip
    with tandem_serve(serve, out / "serve.log", args.start_timeout) as port:
        result = out / "service.json"
        for label, prompts in (("warm-up", max(8, args.num_requests // 4)),
                               ("measured", args.num_requests)):  # fmt: skip
            subprocess.run(
                [sys.executable, "-m", "bench.serving.cli", "--target", f"127.0.0.1:{port}",
                 "--workload", "random", "--input-len", str(args.input_len),
                 "--output-len", str(args.output_len), "--num-prompts", str(prompts),
                 "--request-rate", "inf", "--concurrency", str(args.concurrency),
                 "--num-warmup", "0", "--seed", str(len(label)), "--output", str(result),
                 "--label", label, "--no-plot"],
                check=True,
            )  # fmt: skip
        from bench.serving.report import load_runs

        return float(load_runs(result)[1][-1].summary.output_throughput)


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    alone = None if args.skip_engine else engine_alone(args, out)
    served = service(args, out)
    print(f"\n{args.num_requests} x {args.input_len} in / {args.output_len} out, "
          f"concurrency {args.concurrency}: output tok/s")  # fmt: skip
    print("| engine alone | tandem serve + gRPC | service / engine |\n|---|---|---|")
    ratio = f"{served / alone:.2f}" if alone else "-"
    print(f"| {alone or 0:,.0f} | {served:,.0f} | {ratio} |")
    (out / "summary.json").write_text(json.dumps({"engine_tok_s": alone, "service_tok_s": served,
                                                  "args": vars(args)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
