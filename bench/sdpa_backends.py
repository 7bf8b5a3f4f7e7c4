"""torch's fused SDPA on this GPU, as engine.triton_attention's dense fresh prefill calls it (one
sequence, GQA, causal, bf16): which kernel runs, what a first call at a new sequence length costs
against the next one (cuDNN builds a plan per shape), and each backend's time for a layer stack;
then a step's chunks (one of 2,048 tokens, eight of 1,024) attended chunk by chunk through SDPA
against one variable-length call for all of them (FlashAttention-2's and cuDNN's, through
torch's private ops, on the [tokens, heads, head_dim] rows the engine holds: no transposes).
Why dense chunks are padded to engine.triton_attention.DENSE_LENGTH_BUCKET: docs/benchmarks.md.

    python -m bench.sdpa_backends [--heads 32] [--kv-heads 8] [--head-dim 128] [--layers 32]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from engine.attention import causal_self_attention


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


def chunk_rows(args: argparse.Namespace, lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """q [T, heads, d], k and v [T, kv_heads, d] of chunks laid end to end, as the engine holds
    a step's rows, and the chunks' start offsets [len + 1] int32."""
    total = sum(lengths)

    def make(heads: int) -> torch.Tensor:
        return torch.randn(total, heads, args.head_dim, device="cuda", dtype=torch.bfloat16)

    starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    return make(args.heads), make(args.kv_heads), make(args.kv_heads), starts


def per_chunk(q, k, v, starts, lengths, scale):  # type: ignore[no-untyped-def]
    """One SDPA call a chunk over transposed views, as the engine's dense prefill (which also
    pads each chunk to DENSE_LENGTH_BUCKET tokens; here the first call at a length builds
    cuDNN's plan, outside the timed calls)."""
    out = torch.empty_like(q)
    begin = 0
    for n in lengths:
        rows = slice(begin, begin + n)
        out[rows] = causal_self_attention(q[rows], k[rows], v[rows], scale)
        begin += n
    return out


def flash_varlen(q, k, v, starts, lengths, scale):  # type: ignore[no-untyped-def]
    n = max(lengths)
    return torch.ops.aten._flash_attention_forward(
        q, k, v, starts, starts, n, n, 0.0, True, False, scale=scale
    )[0]


def cudnn_varlen(q, k, v, starts, lengths, scale):  # type: ignore[no-untyped-def]
    n = max(lengths)
    return torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, starts, starts, n, n, False, 0.0, True, False, scale=scale
    )[0]


def step_ms(args: argparse.Namespace, lengths: list[int], fn) -> tuple[float | None, float]:  # type: ignore[no-untyped-def]
    """(ms for args.layers calls, max |difference| from per_chunk's output), or None where the
    op refuses these inputs."""
    q, k, v, starts = chunk_rows(args, lengths)
    scale = args.head_dim**-0.5
    try:
        out = fn(q, k, v, starts, lengths, scale)
        torch.cuda.synchronize()
    except (RuntimeError, TypeError) as e:
        print(f"  {fn.__name__} {lengths[:2]}...: refused: {str(e)[:160]}")
        return None, float("nan")
    error = (out.float() - per_chunk(q, k, v, starts, lengths, scale).float()).abs().max().item()
    for _ in range(2):
        fn(q, k, v, starts, lengths, scale)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.layers):
        fn(q, k, v, starts, lengths, scale)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), error


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
    for lengths in ([2048], [1024] * 8, [1024, 512, 300, 130]):
        for fn in (per_chunk, flash_varlen, cudnn_varlen):
            ms, error = step_ms(args, lengths, fn)
            shown = "refused" if ms is None else f"{ms:.2f} ms, max |diff| {error:.2e}"
            print(f"chunks {lengths}, {args.layers} layers, {fn.__name__}: {shown}")


if __name__ == "__main__":
    main()
