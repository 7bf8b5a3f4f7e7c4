"""The disaggregation experiment: the same GPUs, model, workload and SLOs served colocated (2
workers) and disaggregated (1 prefill + 1 decode worker, KV over NCCL), each by `tandem serve`
in a subprocess, measured with `tandem bench`'s rate sweep and compared with `tandem bench
compare`. `--cpu-dry-run` checks the orchestration on CPU. Workload defaults and the compare
commands: docs/benchmarks.md.

    python -m bench.disagg_experiment --model dummy:llama-3-8b --rates 1,2,4,8 --out DIR
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ONE_TO_ONE = ["--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "1"]
CONFIGURATIONS = {
    "colocated": ["--mode", "colocated", "--workers", "2"],
    # every prefill on the prefill pool: the fixed 1:1 split this experiment measures
    "disaggregated": [*ONE_TO_ONE, "--disagg", "always"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--rates", default="1,2,4,8")
    parser.add_argument("--num-prompts", type=int, default=64, help="per rate")
    parser.add_argument("--prefill-heavy-fraction", type=float, default=0.7)
    parser.add_argument("--prefill-heavy-lens", default="1024:16")
    parser.add_argument("--decode-heavy-lens", default="64:256")
    parser.add_argument("--slo", default="ttft=500ms,tpot=30ms")
    parser.add_argument(
        "--num-warmup",
        type=int,
        default=16,
        help="requests before each sweep: enough to compile every kernel shape (a smoke run with "
        "2 showed the first rate's TTFT p99 inflated by first-use compilation)",
    )
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS))
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds")
    parser.add_argument("--out", default="bench/results/disagg")
    parser.add_argument("--cpu-dry-run", action="store_true")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(port: int, server: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until the service's overall health is SERVING; raises if the server exits first."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"tandem serve exited with {server.returncode}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(1.0)
    raise TimeoutError(f"the service was not SERVING within {timeout_s:.0f} s")


@contextmanager
def tandem_serve(
    serve_args: list[str], log_path: Path, start_timeout_s: float, name: str = "service"
) -> Iterator[int]:
    """`tandem serve SERVE_ARGS` in a process of its own (and a local Ray cluster of its own),
    its output in `log_path`; yields its gRPC port once it is SERVING, then stops it cleanly
    (SIGINT: streams end, workers drain; killed after 60 s)."""
    port = free_port()
    serve = [sys.executable, "-m", "cluster.cli", "-v", "serve", *serve_args,
             "--port", str(port)]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}
    print(f"[{name}] starting: {' '.join(serve[2:])}", flush=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_serving(port, server, start_timeout_s)
            print(f"[{name}] serving after {time.monotonic() - started:.0f} s", flush=True)
            yield port
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()


def run_configuration(args: argparse.Namespace, name: str, out: Path) -> int:
    device = "cpu" if args.cpu_dry_run else "cuda"
    serve = ["--model", args.model, "--device", device, *CONFIGURATIONS[name]]
    with tandem_serve(serve, out / f"{name}-serve.log", args.start_timeout, name) as port:
        bench = [sys.executable, "-m", "bench.serving.cli", "--target", f"127.0.0.1:{port}",
                 "--workload", "mixed", "--rates", args.rates,
                 "--num-prompts", str(args.num_prompts),
                 "--prefill-heavy-fraction", str(args.prefill_heavy_fraction),
                 "--prefill-heavy-lens", args.prefill_heavy_lens,
                 "--decode-heavy-lens", args.decode_heavy_lens, "--slo", args.slo,
                 "--num-warmup", str(args.num_warmup),
                 "--output", str(out / f"{name}.json"), "--label", name, "--no-plot"]  # fmt: skip
        return subprocess.run(bench, check=False).returncode


def main() -> int:
    args = parse_args()
    if args.cpu_dry_run:
        args.model = "default" if args.model == "dummy:llama-3-8b" else args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.configurations.split(","):
        failed |= run_configuration(args, name, out)
    names = args.configurations.split(",")
    if len(names) == 2 and not failed:
        files = [str(out / f"{name}.json") for name in names]
        subprocess.run([sys.executable, "-m", "bench.serving.cli", "compare", *files], check=False)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
