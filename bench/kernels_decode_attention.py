"""Paged decode attention on one GPU: the Triton kernel (auto and one split) against
`paged_decode_attention_ref`, Llama-3-8B-like heads, per batch size and context length, as GPU
time from CUDA-graph replays over inputs larger than L2, plus the eager time; bandwidth as a
share of `--peak-bandwidth`. Outputs are checked against the reference first. CUDA only.
`--kv-dtype fp8` reads an FP8 cache in the engine's packed layout (engine.kv_quant: each
block's e4m3 values, then its fp32 scales); `fp8-dense` the same values and scales as two
separate contiguous tensors, to tell layout costs from dequantization costs.
Method: docs/benchmarks.md.

    python -m bench.kernels_decode_attention [--batch-sizes 1,16,64] [--contexts 640,4096]
        [--kv-dtype bf16|fp8|fp8-dense]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import triton.testing

from bench.common import machine_info, markdown_table, write_json
from engine.kernels.decode_attention import (
    DecodeAttentionWorkspace,
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from engine.kv_quant import pack_blocks, packed_row_bytes, split_fp8_cache

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--contexts", default="640,4096")
    parser.add_argument("--rep-ms", type=int, default=100, help="time per measurement")
    parser.add_argument("--peak-bandwidth", type=float, default=3.0e12, help="bytes/s")
    parser.add_argument("--kv-dtype", default="bf16", choices=("bf16", "fp8", "fp8-dense"))
    parser.add_argument("--out", default="bench/results/kernels_decode_attention.json")
    return parser.parse_args()


def make_inputs(batch: int, context: int, seed: int, kv_dtype: str = "bf16") -> dict[str, Any]:
    """q, K/V cache views of one layer tensor (and for FP8 their scales), shuffled block
    tables, context lengths."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    layer = torch.randn(
        2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", generator=gen
    ).to(DTYPE)  # [2, num_blocks, block_size, kv_heads, head_dim]
    block_ids = torch.randperm(num_blocks, device="cuda", generator=gen)
    cache: dict[str, Any] = {"k_cache": layer[0], "v_cache": layer[1]}
    if kv_dtype != "bf16":
        values, scales = split_fp8_cache(pack_blocks(layer))
        if kv_dtype == "fp8-dense":
            values, scales = values.contiguous(), scales.contiguous()
        cache = {"k_cache": values[0], "v_cache": values[1], "k_scale": scales[0],
                 "v_scale": scales[1]}  # fmt: skip
    return {
        "q": torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", generator=gen).to(DTYPE),
        **cache,
        "block_tables": block_ids.view(batch, blocks_per_seq).to(torch.int32),
        "context_lens": torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        "scale": HEAD_DIM**-0.5,
    }


def graph_time_us(fn: Callable[[], object], calls_per_fn: int, rep_ms: int) -> float:
    ms = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    return 1e3 * ms / calls_per_fn


def measure(batch: int, context: int, args: argparse.Namespace) -> dict[str, Any]:
    row_bytes = HEAD_DIM * DTYPE.itemsize if args.kv_dtype == "bf16" else packed_row_bytes(HEAD_DIM)
    kv_bytes = batch * context * NUM_KV_HEADS * row_bytes * 2
    l2_bytes = torch.cuda.get_device_properties().L2_cache_size
    num_sets = min(64, max(1, -(-4 * l2_bytes // kv_bytes)))
    sets = [make_inputs(batch, context, seed=i, kv_dtype=args.kv_dtype) for i in range(num_sets)]
    max_blocks = sets[0]["block_tables"].shape[1]
    device = torch.device("cuda")
    auto_splits = choose_num_splits(batch, NUM_KV_HEADS, max_blocks, BLOCK_SIZE, device)
    workspace = DecodeAttentionWorkspace.allocate(batch, NUM_HEADS, auto_splits, HEAD_DIM, device)
    out = torch.empty_like(sets[0]["q"])

    def triton_auto(inputs: dict[str, Any]) -> torch.Tensor:
        return paged_decode_attention(
            **inputs, out=out, num_splits=auto_splits, workspace=workspace
        )

    def triton_1split(inputs: dict[str, Any]) -> torch.Tensor:
        return paged_decode_attention(**inputs, out=out, num_splits=1)

    systems = {
        "triton_auto": triton_auto,
        "triton_1split": triton_1split,
        "torch_ref": lambda inputs: paged_decode_attention_ref(**inputs),
    }
    expected = systems["torch_ref"](sets[-1]).float()
    for name in ("triton_auto", "triton_1split"):
        result = systems[name](sets[-1]).float()
        torch.testing.assert_close(result, expected, atol=2e-2, rtol=2e-2, msg=name)

    row: dict[str, Any] = {
        "batch": batch, "context": context, "num_splits": auto_splits, "input_sets": num_sets
    }  # fmt: skip
    for name, call in systems.items():
        us = graph_time_us(lambda call=call: [call(s) for s in sets], num_sets, args.rep_ms)
        row[name] = {"us": us, "gb_per_s": kv_bytes / us / 1e3}
    eager_ms = triton.testing.do_bench(lambda: triton_auto(sets[0]), return_mode="median")
    row["triton_auto_eager"] = {"us": 1e3 * eager_ms, "gb_per_s": kv_bytes / eager_ms / 1e6}
    return row


SYSTEMS = ("triton_auto", "triton_1split", "torch_ref", "triton_auto_eager")


def table_row(row: dict[str, Any], peak: float) -> list[str]:
    cells = [str(row["batch"]), str(row["context"]), str(row["num_splits"])]
    for name in SYSTEMS:
        r = row[name]
        share = r["gb_per_s"] * 1e9 / peak
        cells.append(f"{r['us']:.1f} us, {r['gb_per_s']:.0f} GB/s ({share:.0%})")
    cells.append(f"{row['torch_ref']['us'] / row['triton_auto']['us']:.1f}x")
    return cells


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = []
    for batch in map(int, args.batch_sizes.split(",")):
        for context in map(int, args.contexts.split(",")):
            rows.append(measure(batch, context, args))
            torch.cuda.empty_cache()  # the reference's gathers of one size stay out of the next
    headers = ["batch", "context", "splits", "triton (auto splits)", "triton (1 split)",
               "torch reference", "triton auto, eager", "speedup vs ref"]  # fmt: skip
    peak_tb_per_s = args.peak_bandwidth / 1e12
    print(
        f"{torch.cuda.get_device_name()}: 32 heads / 8 kv heads, head_dim 128, "
        f"KV {args.kv_dtype}, block 16; "
        f"GB/s = K+V bytes read / time, % of {peak_tb_per_s:.1f} TB/s"
    )
    print(markdown_table(headers, [table_row(r, args.peak_bandwidth) for r in rows]))
    info = machine_info(("torch", "triton"))
    path = write_json(args.out, {"machine": info, "args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
