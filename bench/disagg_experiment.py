"""The disaggregation experiment: the same GPUs, model, workload and SLOs served colocated (one
worker per GPU) and disaggregated (prefill and decode pools, KV over NCCL), each by `tandem
serve` in a subprocess, measured with `tandem bench`'s rate sweep and compared with `tandem
bench compare` (each configuration against the first). `--cpu-dry-run` checks the
orchestration on CPU. Workload defaults and the compare commands: docs/benchmarks.md.

Configurations (`--configurations`, in order): `colocated`; `disaggregated` (the `--split`,
every prefill on the prefill pool) and `auto` (the same split, `--disagg auto`: per-request
placement); `planner`: what `tandem plan` recommends for `--gpus` on this workload, rates and
SLO from `--planner-profile` (its predictions in OUT/plan.json, beside the measurements);
`planner-split`: its best disaggregated layout (colocated left out); or a planner layout by
name (`1P3D`, `1P3D-auto`). A configuration that comes out as one already run is not run again
(its JSON is a copy). `--workload long-prompt`: 4k-8k-token prompts,
~256 tokens out (random lengths, 6,000 +-30% in, 256 +-30% out: every request fits 8,192).

    python -m bench.disagg_experiment --model dummy:llama-3-8b --rates 1,2,4,8 --out DIR
    python -m bench.disagg_experiment --gpus 2 --configurations colocated,planner,auto \
        --workload long-prompt --rates 0.5,1,2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# and planner layout names (1P3D, 1P3D-auto)
CONFIGURATIONS = ("colocated", "disaggregated", "auto", "planner", "planner-split")
PLANNER_PROFILE = "bench/data/h100_planner_profile_v2.json"  # Llama-3-8B shape, one H100
LAYOUT = re.compile(r"(\d+)P(\d+)D(-auto)?")  # planner.plan.layouts' names
# --workload long-prompt: tandem bench's random workload (lengths uniform in +-RANGE)
LONG_PROMPT_INPUT, LONG_PROMPT_OUTPUT, LONG_PROMPT_RANGE = 6000, 256, 0.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs (workers) of every configuration")
    parser.add_argument(
        "--split", default=None, help="P:D of `disaggregated` and `auto` (default: half and half)"
    )
    parser.add_argument("--workload", default="mixed", choices=("mixed", "long-prompt"))
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
    parser.add_argument(
        "--configurations",
        default="colocated,disaggregated",
        help=f"comma list of {', '.join(CONFIGURATIONS)} or planner layouts (1P3D, 1P3D-auto)",
    )
    parser.add_argument("--planner-profile", default=PLANNER_PROFILE, help="for `planner`")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds")
    parser.add_argument("--out", default="bench/results/disagg")
    parser.add_argument("--cpu-dry-run", action="store_true")
    return parser.parse_args(argv)


def workload_args(args: argparse.Namespace) -> list[str]:
    """The flags of `tandem bench` (and `tandem plan`: the same requests) for the workload."""
    if args.workload == "long-prompt":
        return ["--workload", "random", "--input-len", str(LONG_PROMPT_INPUT),
                "--output-len", str(LONG_PROMPT_OUTPUT),
                "--range-ratio", str(LONG_PROMPT_RANGE)]  # fmt: skip
    return ["--workload", "mixed", "--prefill-heavy-fraction", str(args.prefill_heavy_fraction),
            "--prefill-heavy-lens", args.prefill_heavy_lens,
            "--decode-heavy-lens", args.decode_heavy_lens]  # fmt: skip


def default_split(args: argparse.Namespace) -> str:
    """The --split as a layout name: 1P1D for 2 GPUs, 2P2D for 4."""
    if args.split is None:
        return f"{args.gpus // 2}P{args.gpus - args.gpus // 2}D"
    num_prefill, _, num_decode = args.split.partition(":")
    return f"{num_prefill}P{num_decode}D"


def serve_args(args: argparse.Namespace, name: str) -> list[str]:
    """`tandem serve`'s pool flags for a configuration (`planner` resolved first: resolve).
    Raises ValueError naming a configuration that is unknown or not `--gpus` workers."""
    if name == "colocated":
        return ["--mode", "colocated", "--workers", str(args.gpus)]
    layout = {"disaggregated": default_split(args), "auto": default_split(args) + "-auto"}
    match = LAYOUT.fullmatch(layout.get(name, name))
    if match is None:
        raise ValueError(
            f"--configurations: unknown {name!r} ({layout.get(name, name)}); known: "
            f"{', '.join(CONFIGURATIONS)} or a planner layout (1P1D, 1P1D-auto)"
        )
    num_prefill, num_decode = int(match[1]), int(match[2])
    if num_prefill < 1 or num_decode < 1 or num_prefill + num_decode != args.gpus:
        raise ValueError(f"configuration {name!r}: {num_prefill}P{num_decode}D is not "
                         f"--gpus={args.gpus} workers")  # fmt: skip
    return ["--mode", "disaggregated", "--prefill-workers", str(num_prefill),
            "--decode-workers", str(num_decode),
            "--disagg", "auto" if match[3] else "always"]  # fmt: skip


def run_plan(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """`tandem plan` for this experiment (same GPUs, workload, rates, SLO, number of
    requests): its JSON (recommended, predictions), also in OUT/plan.json; log OUT/plan.log."""
    command = [sys.executable, "-m", "cluster.cli", "plan", "--profile", args.planner_profile,
               "--gpus", str(args.gpus), *workload_args(args), "--rates", args.rates,
               "--num-prompts", str(args.num_prompts), "--slo", args.slo,
               "--out", str(out / "plan.json"), "--no-plot"]  # fmt: skip
    with open(out / "plan.log", "wb") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    plan: dict[str, Any] = json.loads((out / "plan.json").read_text())
    print(f"[planner] recommends {plan['recommended']} for {args.gpus} GPUs", flush=True)
    return plan


def planned_layout(plan: dict[str, Any], split_only: bool) -> str:
    """The plan's recommended layout, or (`split_only`) its best disaggregated one: the
    highest predicted goodput, ties to the lower rate (as planner.plan.recommend)."""
    if not split_only:
        return str(plan["recommended"])
    split = [p for p in plan["predictions"] if p["configuration"] != "colocated"]
    return str(max(split, key=lambda p: (p["goodput"] or 0.0, -p["rate"]))["configuration"])


def resolve(args: argparse.Namespace, names: list[str], out: Path) -> dict[str, list[str]]:
    """Each configuration's `tandem serve` flags, the planner's layouts looked up (one plan)."""
    plan: dict[str, Any] | None = None
    resolved = {}
    for name in names:
        layout = name
        if name in ("planner", "planner-split"):
            plan = plan or run_plan(args, out)
            layout = planned_layout(plan, split_only=name == "planner-split")
        resolved[name] = serve_args(args, layout)
    return resolved


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
    (SIGINT: streams end, workers drain; killed after 60 s, or 10 s when this process is
    being stopped)."""
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
            stopped = sys.exc_info()[0] is SystemExit  # SIGTERM (main): no time to drain
            try:
                server.wait(10 if stopped else 60)
            except subprocess.TimeoutExpired:
                server.kill()


def run_configuration(args: argparse.Namespace, name: str, pools: list[str], out: Path) -> int:
    device = "cpu" if args.cpu_dry_run else "cuda"
    serve = ["--model", args.model, "--device", device, *pools]
    with tandem_serve(serve, out / f"{name}-serve.log", args.start_timeout, name) as port:
        bench = [sys.executable, "-m", "bench.serving.cli", "--target", f"127.0.0.1:{port}",
                 *workload_args(args), "--rates", args.rates,
                 "--num-prompts", str(args.num_prompts), "--slo", args.slo,
                 "--num-warmup", str(args.num_warmup),
                 "--output", str(out / f"{name}.json"), "--label", name, "--no-plot"]  # fmt: skip
        return subprocess.run(bench, check=False).returncode


def main() -> int:
    # a time limit's SIGTERM (scripts/multi_gpu_run.sh): the running service still stops,
    # instead of outliving this process with its GPUs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args = parse_args()
    if args.cpu_dry_run:
        args.model = "default" if args.model == "dummy:llama-3-8b" else args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.configurations.split(",")
    try:
        configurations = resolve(args, names, out)
    except ValueError as e:
        raise SystemExit(f"bench.disagg_experiment: {e}") from e
    failed = 0
    ran: dict[str, list[str]] = {}  # configurations run so far: their pools
    for name, pools in configurations.items():
        same = next((n for n, p in ran.items() if p == pools), None)
        if same is not None:  # e.g. the planner recommends colocated
            print(f"[{name}] is {same} ({' '.join(pools)}): not run again", flush=True)
            if (out / f"{same}.json").exists():
                shutil.copyfile(out / f"{same}.json", out / f"{name}.json")
            continue
        failed |= run_configuration(args, name, pools, out)
        ran[name] = pools
    if not failed:
        for name in names[1:]:  # each against the first
            files = [str(out / f"{n}.json") for n in (names[0], name)]
            subprocess.run([sys.executable, "-m", "bench.serving.cli", "compare", *files],
                           check=False)  # fmt: skip
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
