"""Speed of the paged prefill attention kernel against PyTorch's SDPA on contiguous tensors
(a yardstick: SDPA cannot read a paged cache), Llama-3-8B heads, prompts of 512-8192 tokens and a
chunk after a prefix; TFLOP/s of the causal work from CUDA-graph replays, plus the eager time.
`--sweep` also times a list of tile shapes. CUDA only. Method: docs/benchmarks.md.

    python -m bench.kernels_prefill_attention [--block-size 16] [--sweep]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import machine_info, markdown_table, write_json

DEFAULT_OUT = Path("bench/results/kernels_prefill_attention.json")
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
CASES = ((0, 512), (0, 2048), (0, 8192), (2048, 2048))  # (cached prefix, chunk length)
SWEEP = (  # (block_m, block_n, num_warps, num_stages)
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
    (256, 64, 8, 2),
)


@dataclass(frozen=True, slots=True)
class Result:
    prefix_len: int
    query_len: int
    tiles: str  # "default" or "block_m/block_n/warps/stages"
    kernel_ms: float  # graph replay
    kernel_tflops: float
    kernel_eager_ms: float
    sdpa_ms: float | None
    sdpa_tflops: float | None
    max_abs_diff: float | None


def causal_flops(prefix_len: int, query_len: int) -> float:
    """Two matmuls of 2 * head_dim flops per (query, visible key) pair, for every head."""
    visible_pairs = query_len * prefix_len + query_len * (query_len + 1) // 2
    return 4.0 * NUM_HEADS * HEAD_DIM * visible_pairs


def make_case(prefix_len: int, query_len: int, block_size: int) -> dict[str, torch.Tensor]:
    """Paged inputs for one sequence, plus the same K/V contiguous for SDPA."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    context_len = prefix_len + query_len
    num_blocks = -(-context_len // block_size)
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    block_ids = torch.randperm(num_blocks, generator=gen, device="cuda")
    q = torch.randn(
        query_len, NUM_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16
    )
    group = NUM_HEADS // NUM_KV_HEADS

    def dense(cache: torch.Tensor) -> torch.Tensor:  # [1, NUM_HEADS, context_len, HEAD_DIM]
        seq = cache[block_ids].flatten(0, 1)[:context_len]
        return seq.repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).contiguous()

    return {
        "q": q,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": block_ids.to(torch.int32)[None, :],
        "query_start_loc": torch.tensor([0, query_len], dtype=torch.int32, device="cuda"),
        "context_lens": torch.tensor([context_len], dtype=torch.int32, device="cuda"),
        "q_dense": q.transpose(0, 1).unsqueeze(0).contiguous(),
        "k_dense": dense(k_cache),
        "v_dense": dense(v_cache),
    }


def run_case(prefix_len: int, query_len: int, block_size: int, sweep: bool) -> list[Result]:
    import triton.testing

    from engine.kernels.prefill_attention import PrefillTiles, paged_prefill_attention

    case = make_case(prefix_len, query_len, block_size)
    scale = HEAD_DIM**-0.5
    out = torch.empty_like(case["q"])
    paged_args = [case[k] for k in ("q", "k_cache", "v_cache", "block_tables")]
    paged_args += [case["query_start_loc"], case["context_lens"], scale, query_len, out]

    if prefix_len:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(query_len, prefix_len + query_len)
        sdpa_kwargs = {"attn_mask": mask}
    else:
        sdpa_kwargs = {"is_causal": True}

    def sdpa() -> torch.Tensor:
        qd, kd, vd = case["q_dense"], case["k_dense"], case["v_dense"]
        return F.scaled_dot_product_attention(qd, kd, vd, scale=scale, **sdpa_kwargs)

    reference = sdpa()[0].transpose(0, 1)  # [query_len, NUM_HEADS, HEAD_DIM]; also a warm-up
    sdpa_ms = triton.testing.do_bench_cudagraph(sdpa, return_mode="median")
    flops = causal_flops(prefix_len, query_len)
    tile_options: list[PrefillTiles | None] = [None]
    if sweep:
        tile_options += [PrefillTiles(m, n, w, s) for m, n, w, s in SWEEP]
    results = []
    for tiles in tile_options:

        def kernel(t: PrefillTiles | None = tiles) -> torch.Tensor:
            return paged_prefill_attention(*paged_args, tiles=t)

        kernel()  # compile outside the graph capture
        ms = triton.testing.do_bench_cudagraph(kernel, return_mode="median")
        eager_ms = triton.testing.do_bench(kernel, return_mode="median")
        diff = (out.float() - reference.float()).abs().max().item()
        name = "default" if tiles is None else "/".join(str(v) for v in asdict(tiles).values())
        is_default = tiles is None
        results.append(
            Result(
                prefix_len, query_len, name, ms, flops / ms / 1e9, eager_ms,
                sdpa_ms if is_default else None,
                flops / sdpa_ms / 1e9 if is_default else None,
                diff,
            )
        )  # fmt: skip
    return results


def table(results: Sequence[Result]) -> str:
    rows = [
        [
            str(r.prefix_len), str(r.query_len), r.tiles, f"{r.kernel_ms:.3f}",
            f"{r.kernel_tflops:.0f}", f"{r.kernel_eager_ms:.3f}",
            "" if r.sdpa_ms is None else f"{r.sdpa_ms:.3f}",
            "" if r.sdpa_tflops is None else f"{r.sdpa_tflops:.0f}",
            "" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}",
        ]
        for r in results
    ]  # fmt: skip
    headers = ["prefix", "chunk", "tiles", "kernel ms", "TFLOP/s", "eager ms"]
    headers += ["sdpa ms", "TFLOP/s", "max|d|"]
    return markdown_table(headers, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size, tokens")
    p.add_argument("--sweep", action="store_true", help="also time a list of tile shapes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.kernels_prefill_attention needs a CUDA device")
    results = []
    for prefix_len, query_len in CASES:
        results += run_case(prefix_len, query_len, args.block_size, args.sweep)
    print(f"{torch.cuda.get_device_name()}, block size {args.block_size}, bf16, "
          f"{NUM_HEADS} heads, {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}")  # fmt: skip
    print(table(results))
    data = {
        "machine": machine_info(packages=("torch", "triton")),
        "settings": {"block_size": args.block_size, "sweep": args.sweep},
        "results": [asdict(r) for r in results],
    }
    print(f"wrote {write_json(args.out, data)}")


if __name__ == "__main__":
    main()
