"""The KV copy path with nothing around it: gather -> NCCL -> scatter, no channel framing.

What bench.kvtransfer_nccl's raw columns would reach without PairChannel's per-message costs
(a header message, its host-side copy and the host polling completions): the bound to compare
them with. Two processes, cuda:0 gathers 128 scattered 16-token blocks of a Llama-3-8B-shaped
bf16 cache (256 MiB) and sends them over a bare 2-rank torch.distributed NCCL process group;
cuda:1 receives and scatters, in P parts (P = 1, 2, 4, 8, 16: gather and send of part i + 1
overlap part i on the link, the scatter of part i the receive of part i + 1), timed on the
receiver from a "go" message to its scatter being complete; median of reps 2-7. Once with
NCCL channels capped at 16 (TransportConfig's default) and once at NCCL's default.

    python -m bench.kvtransfer_bare [--trace-dir DIR]

--trace-dir writes each side's CUDA kernels (torch.profiler) of one repeat of P = 1 and 4.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CACHE_SHAPE = (32, 2, 1024, 16, 8, 128)  # layers, K/V, blocks, block, KV heads, head dim
NUM_BLOCKS, REPEATS, WARMUP = 128, 8, 2
PARTS = (1, 2, 4, 8, 16)


def process_group(port: int, rank: int, max_ctas: int) -> Any:
    """Rank `rank` (on cuda:rank) of a bare 2-rank NCCL group through the TCPStore at `port`,
    its communicator formed (max_ctas 0: NCCL's channel count)."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    options = dist.ProcessGroupNCCL.Options()
    if max_ctas:
        options.config.min_ctas, options.config.max_ctas = 1, max_ctas
    pg = dist.ProcessGroupNCCL(store, rank, 2, options)
    one = torch.ones(1, device=f"cuda:{rank}")  # forms the communicator
    (pg.send if rank == 0 else pg.recv)([one], 1 - rank, 0).wait()
    torch.cuda.synchronize()
    return pg


def role(rank: int, port: int, max_ctas: int, trace_dir: str | None, results: Any) -> None:
    from kvtransfer.coalesce import block_index, gather_blocks, scatter_blocks

    torch.cuda.set_device(rank)
    pg = process_group(port, rank, max_ctas)
    cache = torch.randn(CACHE_SHAPE, device=f"cuda:{rank}").to(torch.bfloat16)
    ids = torch.randperm(CACHE_SHAPE[2], generator=torch.Generator().manual_seed(1))
    index = block_index(cache, ids[:NUM_BLOCKS].tolist(), unique=rank == 1)
    staging = torch.empty((32, 2, NUM_BLOCKS, *CACHE_SHAPE[3:]), dtype=cache.dtype, device=rank)
    side = torch.cuda.Stream()
    go = torch.ones(1, device=f"cuda:{rank}")
    medians = {}
    for num_parts in PARTS:
        per_part = CACHE_SHAPE[0] // num_parts
        parts = [slice(i * per_part, (i + 1) * per_part) for i in range(num_parts)]
        times = []
        for rep in range(REPEATS):
            torch.cuda.synchronize()
            trace = trace_dir is not None and rep == REPEATS - 2 and num_parts in (1, 4)
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            if trace:
                profiler.__enter__()
            if rank == 0:
                pg.send([go], 1, 0).wait()
                works = []
                for part in parts:
                    gather_blocks(cache, index, staging[part], layers=part)
                    works.append(pg.send([staging[part]], 1, 0))
                for work in works:
                    work.wait()
                torch.cuda.synchronize()
            else:
                pg.recv([go], 0, 0).wait()
                torch.cuda.synchronize()
                start = time.perf_counter()
                current = torch.cuda.current_stream()
                for part in parts:
                    work = pg.recv([staging[part]], 0, 0)
                    side.wait_stream(current)
                    with torch.cuda.stream(side):
                        work.wait()  # the side stream waits for this part, not the host
                        scatter_blocks(cache, index, staging[part], layers=part)
                current.wait_stream(side)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            if trace:
                profiler.__exit__(None, None, None)
                write_trace(profiler, f"{trace_dir}/rank{rank}-parts{num_parts}-ctas{max_ctas}")
        if rank == 1:
            medians[num_parts] = statistics.median(times[WARMUP:])
    if rank == 1:
        results.put(medians)
    pg.abort()


def write_trace(profiler: Any, path: str) -> None:
    kernels = [
        (e.name, e.time_range.start, e.time_range.end - e.time_range.start)
        for e in profiler.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    with open(f"{path}.json", "w") as f:
        json.dump(kernels, f)


def run(max_ctas: int, trace_dir: str | None) -> dict[int, float]:
    ctx = mp.get_context("spawn")
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    results = ctx.Queue()
    peers = [
        ctx.Process(target=role, args=(rank, server.port, max_ctas, trace_dir, results))
        for rank in (0, 1)
    ]
    for peer in peers:
        peer.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            medians: dict[int, float] = results.get(timeout=2)
            break
        except queue.Empty:
            if any(peer.exitcode not in (None, 0) for peer in peers):
                break
    else:
        medians = {}
    for peer in peers:
        peer.join(30)
        if peer.is_alive():
            peer.kill()
    if not medians:
        raise SystemExit(f"max_ctas={max_ctas}: a peer failed or hung")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace-dir", default=None)
    args = parser.parse_args()
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
    nbytes = 32 * 2 * NUM_BLOCKS * 16 * 8 * 128 * 2
    print(f"{torch.cuda.get_device_name(0)} x2, 256 MiB, median of {REPEATS - WARMUP}")
    for max_ctas in (16, 0):
        medians = run(max_ctas, args.trace_dir)
        cells = [
            f"{n} parts {1e3 * t:.3f} ms ({nbytes / t / 1e9:.0f} GB/s)" for n, t in medians.items()
        ]
        print(f"nccl max_ctas={max_ctas or 'default'}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
