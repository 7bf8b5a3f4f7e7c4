"""`tandem bench` (gRPC) and GuideLLM (a third-party load generator, over the OpenAI-compatible
HTTP edge) on the same workload against the same `tandem serve`, alternating A B A B on one
warm server, so the two reports can be set side by side (docs/benchmarks.md, issue 23).

The workload: fixed-length prompts and outputs (`--input-len`, `--output-len`; every request
ignores EOS), a fixed number of requests at a fixed concurrency. `tandem bench` sends random
token ids; GuideLLM sends synthetic text of the same token count (by the model's own tokenizer,
written from the GGUF with transformers; a test dependency). Both measure at the client.

    python -m bench.openai_http_compare --input-len 128 --output-len 32 --concurrency 2 \\
        --num-prompts 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "cluster.cli"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds, alternating")
    parser.add_argument(
        "--serve-args", default="--mode colocated --workers 1 --device cpu",
        help="the rest of the `tandem serve` command line",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="keep the reports in this folder")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gguf_tokenizer(folder: Path) -> Path:
    """The default model's tokenizer as a Hugging Face tokenizer folder (for GuideLLM)."""
    from transformers import AutoTokenizer

    from engine.loader import default_model_path

    path = Path(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(folder)
    return folder


def serve(serve_args: str) -> tuple[subprocess.Popen[str], int, int]:
    grpc_port, http_port = free_port(), free_port()
    server = subprocess.Popen(
        [*CLI, "serve", "--port", str(grpc_port), "--http-port", str(http_port),
         *serve_args.split()],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    assert server.stdout is not None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            raise SystemExit("tandem serve exited before serving")
        if "OpenAI-compatible HTTP on" in line:
            return server, grpc_port, http_port
    raise SystemExit("tandem serve did not start within 600 s")


def tandem_bench(
    args: argparse.Namespace, grpc_port: int, out: Path, warmup: int, seed: int
) -> Any:
    subprocess.run(
        [*CLI, "bench", "--target", f"127.0.0.1:{grpc_port}", "--workload", "random",
         "--seed", str(seed),
         "--input-len", str(args.input_len), "--output-len", str(args.output_len),
         "--concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts),
         "--num-warmup", str(warmup), "--output", str(out), "--no-plot"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    return {
        "completed": summary["num_completed"],
        "failed": summary["num_failed"],
        "req/s": summary["request_throughput"],
        "out tok/s": summary["output_throughput"],
        "TTFT mean ms": summary["ttft"]["mean_ms"],
        "TTFT p50 ms": summary["ttft"]["p50_ms"],
        "TPOT mean ms": summary["tpot"]["mean_ms"],
        "ITL mean ms": summary["itl"]["mean_ms"],
        "e2e mean s": summary["e2e"]["mean_ms"] / 1000,
    }


def guidellm(
    args: argparse.Namespace, http_port: int, tokenizer: Path, out: Path, seed: int
) -> Any:
    binary = shutil.which("guidellm", path=str(Path(sys.executable).parent)) or "guidellm"
    subprocess.run(
        [binary, "run",
         "--backend", f"kind=openai_http,target=http://127.0.0.1:{http_port},"
                      "request_format=/v1/completions,http2=false",
         "--tokenizer", f"kind=hf_auto,model={tokenizer}",
         "--data", f"kind=synthetic_text,prompt_tokens={args.input_len},"
                   f"output_tokens={args.output_len}",
         "--profile", f"kind=concurrent,streams={args.concurrency}",
         "--constraint", f"kind=max_requests,count={args.num_prompts}",
         "--seed", f"kind=static,value={seed}",
         "--output", f"kind=json,path={out}", "--disable-console"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out.parent,
    )  # fmt: skip
    (benchmark,) = json.loads(out.read_text())["benchmarks"]
    m = benchmark["metrics"]

    def mean(name: str) -> float:
        return float(m[name]["successful"]["mean"])

    totals = m["request_totals"]
    duration_s = benchmark["duration"]
    outputs = m["output_token_count"]["successful"]["total_sum"]
    return {
        "completed": totals["successful"],
        "failed": totals["errored"] + totals["incomplete"],
        "req/s": totals["successful"] / duration_s,
        "out tok/s": outputs / duration_s,
        "TTFT mean ms": mean("time_to_first_token_ms"),
        "TTFT p50 ms": float(m["time_to_first_token_ms"]["successful"]["median"]),
        "TPOT mean ms": mean("time_per_output_token_ms"),
        "ITL mean ms": mean("inter_token_latency_ms"),
        "e2e mean s": mean("request_latency"),
    }


def main() -> None:
    args = parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="openai-http-compare-"))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = gguf_tokenizer(folder / "tokenizer")
    server, grpc_port, http_port = serve(args.serve_args)
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        # every run its own seed: no run's prompts are in the prefix cache from an earlier one
        tandem_bench(args, grpc_port, folder / "warmup.json", warmup=2, seed=100)  # not kept
        for n in range(args.rounds):
            gr = tandem_bench(args, grpc_port, folder / f"tandem-{n}.json", warmup=0, seed=n + 1)
            rows.append((f"tandem bench (gRPC) #{n + 1}", gr))
            http = guidellm(args, http_port, tokenizer, folder / f"guidellm-{n}.json", 1000 + n)
            rows.append((f"GuideLLM (HTTP) #{n + 1}", http))
            print(f"round {n + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(120)
    print(
        f"input {args.input_len} tokens, output {args.output_len}, concurrency "
        f"{args.concurrency}, {args.num_prompts} requests per run; reports in {folder}\n"
    )
    names = list(rows[0][1])
    print("| run | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, row in rows:
        cells = [f"{row[n]:.2f}" if isinstance(row[n], float) else str(row[n]) for n in names]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
