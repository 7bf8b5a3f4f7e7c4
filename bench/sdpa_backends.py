"""torch's fused SDPA on this GPU, as engine.triton_attention's dense fresh prefill calls it (one
sequence, GQA, causal, bf16): which kernel runs, what a first call at a new sequence length costs
against the next one (cuDNN builds a plan per shape), and each backend's time for a layer stack.
Why dense chunks are padded to engine.triton_attention.DENSE_LENGTH_BUCKET: docs/benchmarks.md.

    python -m bench.sdpa_backends [--heads 32] [--kv-heads 8] [--head-dim 128] [--layers 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile


def qkv(args: argparse.Namespace, length: int) -> tuple[torch.Tensor, ...]:
    def make(heads: int) -> torch.Tensor:
        return torch.randn(1, heads, length, args.head_dim, device="cuda", dtype=torch.bfloat16)

    return make(args.heads), make(args.kv_heads), make(args.kv_heads)


def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def first_and_again_ms(args: argparse.Namespace, length: int) -> tuple[float, float]:
    q, k, v = qkv(args, length)
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        call(q, k, v)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - started))
    return times[0], times[1]


def stack_ms(args: argparse.Namespace, length: int, backend: SDPBackend) -> float | None:
    q, k, v = qkv(args, length)
    try:
        with sdpa_kernel([backend]):
            for _ in range(3):
                call(q, k, v)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.layers):
                call(q, k, v)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    except RuntimeError:  # no kernel of this backend for these inputs
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    call(*qkv(args, 512))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(*qkv(args, 1000))
    kernels = sorted({e.name[:70] for e in prof.events() if e.device_type.name == "CUDA"})
    print("kernels at the default backend:", kernels)
    for length in (1001, 1357, 1790, 2047):
        first, again = first_and_again_ms(args, length)
        print(f"length {length}: first call {first:.2f} ms, again {again:.2f} ms")
    for length in (1024, 2048):
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            ms = stack_ms(args, length, backend)
            shown = "unavailable" if ms is None else f"{ms:.2f} ms"
            print(f"length {length}, {args.layers} calls, {backend.name}: {shown}")


if __name__ == "__main__":
    main()
