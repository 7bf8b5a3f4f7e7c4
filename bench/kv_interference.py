"""How much a KV transfer's device work slows a prefill running beside it on the same GPU.

cuda:0 runs a 2,048-token prefill of the dummy Llama-3-8B model while a second thread ships
the prompt's KV in 2-layer chunks (16 MiB each) as the layers complete, as an overlapped
KVSender does; each variant does only part of that work, to tell the costs apart:

    none          the prefill alone
    gather        gather each chunk's blocks into staging (kvtransfer.coalesce), no send
    send          NCCL send of each chunk, pre-gathered, no header; the receiver (cuda:1, a
                  second process) posted every receive ahead
    header+send   a 48-byte header message before each chunk, as PairChannel sends them
    gather+send   gather, then send (no header)
    copy_engine   a copy of each pre-gathered chunk into cuda:1's memory by the copy engine
                  (Tensor.copy_ across devices on a side stream: DMA, no SMs), no NCCL

The prefill is timed on its own stream by CUDA events (not the transfer's work); variants are
interleaved within each repeat; median of --repeats, with the spread (25th-75th percentile).

    python -m bench.kv_interference [--repeats 10] [--trace-dir DIR] [--out f.json]

With --trace-dir, the last repeat of each variant is profiled (torch.profiler, CUDA kernels
with their streams): where the transfer's kernels fall against the prefill's GEMMs. That
repeat is still timed; leave the option off for the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import machine_info, markdown_table, write_json
from bench.kvtransfer_bare import process_group

VARIANTS = ("none", "gather", "send", "header+send", "gather+send", "copy_engine")
NCCL_VARIANTS = ("send", "header+send", "gather+send")
TOKENS, LAYERS_PER_CHUNK, BLOCK = 2048, 2, 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--nccl-max-ctas", type=int, default=16, help="0: NCCL's default")
    parser.add_argument("--out", default="bench/results/kv_interference.json")
    parser.add_argument(
        "--trace-dir",
        default=None,
        help="write the CUDA kernels (torch.profiler) of the last repeat of each variant here",
    )
    return parser.parse_args()


def chunk_shape(num_blocks: int) -> tuple[int, ...]:
    """A 2-layer chunk of the 8B shape's KV: [layers, K/V, blocks, block, kv heads, dim]."""
    return (LAYERS_PER_CHUNK, 2, num_blocks, BLOCK, 8, 128)


def receiver(args: argparse.Namespace, port: int, num_chunks: int, num_blocks: int) -> None:
    torch.cuda.set_device(1)
    pg = process_group(port, 1, args.nccl_max_ctas)
    buffers = [
        torch.empty(chunk_shape(num_blocks), dtype=torch.bfloat16, device="cuda:1")
        for _ in range(num_chunks)
    ]
    header = torch.empty(6, dtype=torch.int64, device="cuda:1")
    for _, variant in schedule(args):
        if variant not in NCCL_VARIANTS:
            continue
        works = []
        for buffer in buffers:  # every receive posted ahead
            if variant == "header+send":
                works.append(pg.recv([header], 0, 0))
            works.append(pg.recv([buffer], 0, 0))
        for work in works:
            work.wait()
        torch.cuda.synchronize()
    pg.abort()


def schedule(args: argparse.Namespace) -> list[tuple[int, str]]:
    return [(rep, variant) for rep in range(args.repeats + 1) for variant in VARIANTS]


def main() -> None:
    args = parse_args()
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    from bench.engine_gpu import dummy_engine
    from contracts.sampling_params import SamplingParams
    from engine.scheduler import ScheduledSequence, SchedulerOutput
    from engine.sequence import Sequence
    from kvtransfer.coalesce import block_index, gather_blocks

    torch.cuda.set_device(0)
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
    engine = dummy_engine("llama-3-8b", 4.0, 4096, 4, 4096, cuda_graphs=False)
    runner = engine.runner
    cache = runner.kv_cache
    num_layers = cache.shape[0]
    num_chunks = num_layers // LAYERS_PER_CHUNK
    num_blocks = TOKENS // BLOCK
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    peer = mp.get_context("spawn").Process(
        target=receiver, args=(args, server.port, num_chunks, num_blocks)
    )
    peer.start()
    pg = process_group(server.port, 0, args.nccl_max_ctas)
    stream = torch.cuda.Stream()
    staged = [
        torch.randn(chunk_shape(num_blocks), device="cuda:0").to(torch.bfloat16)
        for _ in range(num_chunks)
    ]
    remote = [torch.empty_like(s, device="cuda:1") for s in staged]
    header = torch.zeros(6, dtype=torch.int64, device="cuda:0")
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep, variant in schedule(args):
        seq = Sequence(
            f"p{rep}{variant}", [1 + i % 100 for i in range(TOKENS)], SamplingParams(), b"r"
        )
        assert engine.block_manager.allocate_slots(seq, TOKENS)
        ids = block_index(cache, seq.block_ids)
        events = [torch.cuda.Event() for _ in range(num_layers)]
        issued = [threading.Event() for _ in range(num_layers)]

        def hook(layer: int, events: Any = events, issued: Any = issued) -> None:
            events[layer].record()
            issued[layer].set()

        def ship(
            variant: str = variant, events: Any = events, issued: Any = issued, ids: Any = ids
        ) -> None:
            torch.cuda.set_device(0)
            works = []
            for chunk in range(num_chunks):
                last = (chunk + 1) * LAYERS_PER_CHUNK - 1
                issued[last].wait()
                events[last].synchronize()
                with torch.cuda.stream(stream):
                    layers = slice(last + 1 - LAYERS_PER_CHUNK, last + 1)
                    if "gather" in variant:
                        gather_blocks(cache, ids, staged[chunk], layers=layers)
                    if variant == "header+send":
                        works.append(pg.send([header], 1, 0))
                    if "send" in variant:
                        works.append(pg.send([staged[chunk]], 1, 0))
                    if variant == "copy_engine":
                        remote[chunk].copy_(staged[chunk], non_blocking=True)
            for work in works:
                work.wait()
            stream.synchronize()

        batch = SchedulerOutput([ScheduledSequence(seq, TOKENS)], [])
        torch.cuda.synchronize()
        runner.model.layer_hook = hook if variant != "none" else None
        shipper = threading.Thread(target=ship) if variant != "none" else None
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        trace = args.trace_dir is not None and rep == args.repeats
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        if trace:
            profiler.__enter__()
        began.record()
        if shipper is not None:
            shipper.start()
        runner.execute(batch)
        ended.record()
        ended.synchronize()  # the prefill's stream only
        elapsed = began.elapsed_time(ended) / 1e3
        if shipper is not None:
            shipper.join()
        if trace:
            profiler.__exit__(None, None, None)
            write_trace(profiler, f"{args.trace_dir}/{variant}")
        runner.model.layer_hook = None
        torch.cuda.synchronize()
        engine.block_manager.free(seq)
        if rep > 0:
            times[variant].append(elapsed)
    peer.join(60)
    pg.abort()
    report(args, times)


def write_trace(profiler: Any, path: str) -> None:
    """Every CUDA kernel of a profiled repeat: [name, stream, start us, duration us]."""
    kernels = [
        (e.name, getattr(e, "device_resource_id", None), e.time_range.start,
         e.time_range.end - e.time_range.start)
        for e in profiler.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]  # fmt: skip
    with open(f"{path}.json", "w") as f:
        json.dump(kernels, f)


def report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    alone = statistics.median(times["none"])
    rows = []
    for variant in VARIANTS:
        median = statistics.median(times[variant])
        low, _, high = statistics.quantiles(times[variant], n=4)
        rows.append(
            [variant, f"{1e3 * median:.2f}", f"{1e3 * low:.2f}-{1e3 * high:.2f}",
             f"{1e3 * (median - alone):+.2f}"]
        )  # fmt: skip
    table = markdown_table(
        ["beside the prefill", "prefill (ms)", "25th-75th pct (ms)", "vs alone (ms)"], rows
    )
    device = torch.cuda.get_device_name(0)
    print(f"\n2,048-token prefill, dummy Llama-3-8B, {device}, median of {args.repeats}\n{table}")
    write_json(
        args.out,
        {"config": vars(args), "machine": machine_info(), "device": device, "times": times,
         "table": table},
    )  # fmt: skip


if __name__ == "__main__":
    main()
