"""Skinny matrix products for decode steps: out [M, N] = x [M, K] @ w [N, K].T with M <= 16,
accumulated in fp32. Each program streams BLOCK_N weight rows in BLOCK_K chunks, so many small
programs keep HBM saturated where cuBLAS's large-M tiles do not; M == 1 reduces on CUDA cores,
2 <= M <= 16 pads to 16 rows for tl.dot. USE_PDL launches with programmatic dependent launch on
Hopper (off by default). `gemv_ref` is the torch reference; H100 measurements:
docs/benchmarks.md (bench.kernels_gemv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from engine.kernels import silu_mul_epilogue
from engine.kernels.launch import check_devices, on_device
from engine.kernels.rotary_kv_epilogue import (
    RotaryKvWrite,
    launch_args,
    paired_rows,
    rotary_kv_epilogue,
)

MAX_ROWS = 16  # rows of x the kernel takes; more go to cuBLAS


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(m: int, n: int, k: int) -> GemvConfig:
    """Tile choice by shape, from an H100 sweep (`bench.kernels_gemv`, issue 19)."""
    if m == 1:  # narrow row blocks: thousands of programs, each streaming whole rows
        return GemvConfig(block_n=4, block_k=512 if n * k <= 4096 * 4096 else 1024,
                          num_warps=4, num_stages=3)  # fmt: skip
    return GemvConfig(block_n=32, block_k=512, num_warps=4, num_stages=3)


# Programmatic dependent launch (see the module docstring). Off until an H100 run has timed
# it in the engine (issue 19: tested for correctness in a CUDA graph only).
USE_PDL = False


def _pdl_supported(device: torch.device) -> bool:
    return USE_PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,  # 1: CUDA-core path; 16: tl.dot path
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait before reading x
    # ROTARY_KV: one row of a QKV projection, rotated and written into the KV cache by the
    # epilogue (engine.kernels.rotary_kv_epilogue: RotaryKvWrite.kernel_args); rows in pairs
    positions_ptr=None,
    cos_ptr=None,
    sin_ptr=None,
    stride_table=0,
    slot_mapping_ptr=None,
    num_slots=0,
    k_cache_ptr=None,
    v_cache_ptr=None,
    stride_kc_block=0,
    stride_kc_slot=0,
    stride_kc_head=0,
    stride_vc_block=0,
    stride_vc_slot=0,
    stride_vc_head=0,
    k_scale_ptr=None,
    v_scale_ptr=None,
    stride_ks_head=0,
    stride_vs_head=0,
    NUM_HEADS: tl.constexpr = 0,
    NUM_KV_HEADS: tl.constexpr = 0,
    HEAD_DIM: tl.constexpr = 0,
    BLOCK_SIZE: tl.constexpr = 0,
    KV_FP8: tl.constexpr = False,
    ROTARY_KV: tl.constexpr = False,
    # SILU_MUL: one row of a gate_up projection, the epilogue stores silu(gate) * up, [1, N / 2]
    # (engine.kernels.silu_mul_epilogue), with SILU_AMAX its amax folded into silu_amax_ptr
    silu_amax_ptr=None,
    SILU_MUL: tl.constexpr = False,
    SILU_AMAX: tl.constexpr = False,
    AMAX_PARTS: tl.constexpr = 1,
):
    pid = tl.program_id(0)
    if ROTARY_KV:
        rn = paired_rows(pid, BLOCK_N, HEAD_DIM)
    elif SILU_MUL:
        rn = silu_mul_epilogue.paired_rows(pid, N, BLOCK_N)
    else:
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + rm[:, None] * stride_xm
    n_mask = rn < N
    m_mask = rm < M
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PDL:  # x is the previous kernel's output; w is not: nothing read before this
        gdc_wait()
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x_mask = m_mask[:, None]
            if EVEN_N:
                w = tl.load(w_rows + rk[None, :])
            else:
                w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k_mask = rk < K
            x_mask = m_mask[:, None] & k_mask[None, :]
            w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_rows + rk[None, :], mask=x_mask, other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)
        else:
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
    if ROTARY_KV:
        rotary_kv_epilogue(
            acc, pid, out_ptr, positions_ptr, cos_ptr, sin_ptr, stride_table, slot_mapping_ptr,
            num_slots, k_cache_ptr, v_cache_ptr, stride_kc_block, stride_kc_slot, stride_kc_head,
            stride_vc_block, stride_vc_slot, stride_vc_head, k_scale_ptr, v_scale_ptr,
            stride_ks_head, stride_vs_head, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
            BLOCK_N, KV_FP8,
        )  # fmt: skip
    elif SILU_MUL:
        silu_mul_epilogue.silu_mul_epilogue(
            acc, pid, out_ptr, silu_amax_ptr, BLOCK_N, SILU_AMAX, AMAX_PARTS
        )
    elif BLOCK_M == 1:
        tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemv(
    x: torch.Tensor,  # [M, K]
    w: torch.Tensor,  # [N, K]
    config: GemvConfig | None = None,
    rotary_kv: RotaryKvWrite | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:  # [M, N] x's dtype ([1, N / 2] with silu_mul)
    """x @ w.T for 1 <= M <= 16 rows. Rows of x may be strided; its columns and w's must be
    contiguous. With `rotary_kv` (one row of a QKV projection), the output comes rotated and
    its k and v are written into the KV cache: bitwise `gemv` then kv_write.rotary_write_kv
    (engine.kernels.rotary_kv_epilogue). With `silu_mul` (one row of a gate_up projection),
    the output is silu(gate) * up: bitwise `gemv` then silu_and_mul
    (engine.kernels.silu_mul_epilogue). Raises ValueError on a bad device, dtype, shape or
    stride."""
    check_devices(x, w)
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x and w must be 2-d, got {tuple(x.shape)} and {tuple(w.shape)}")
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns, w {tuple(w.shape)} needs {k}")
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows, got {m}")
    if x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x and w must share a float dtype, got {x.dtype} and {w.dtype}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"columns must be contiguous, got strides {x.stride()}, {w.stride()}")
    cfg = config or default_config(m, n, k)
    block_m = 1 if m == 1 else MAX_ROWS
    block_n = cfg.block_n if block_m == 1 else max(cfg.block_n, 16)
    out_cols, epilogue = epilogue_launch(x, n, block_n, x.dtype, rotary_kv, silu_mul)
    out = torch.empty(m, out_cols, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n),)
    pdl = _pdl_supported(x.device)
    launch = {"launch_pdl": True} if pdl else {}
    with on_device(x.device):
        _gemv_kernel[grid](
            x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k,
            EVEN_N=n % block_n == 0, EVEN_K=k % cfg.block_k == 0, PDL=pdl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch, **epilogue,
        )  # fmt: skip
    return out


def epilogue_launch(
    x: torch.Tensor,  # [M, K]
    n: int,  # the projection's rows
    block_n: int,
    out_dtype: torch.dtype,
    rotary_kv: RotaryKvWrite | None,
    silu_mul: bool,
    silu_amax: torch.Tensor | None = None,
) -> tuple[int, dict]:
    """(output columns, kernel keyword arguments) of the epilogue asked of a GEMV (this one or
    engine.kernels.fp8_gemv's), once checked: none, the rotary + KV write, or SiLU-and-mul.
    ValueError naming what does not fit."""
    if rotary_kv is not None and silu_mul:
        raise ValueError("rotary_kv and silu_mul are epilogues of different projections")
    if silu_amax is not None and not silu_mul:
        raise ValueError("silu_amax is the SiLU-and-mul epilogue's: it needs silu_mul")
    if rotary_kv is not None:
        rotary_kv.check(x, n, block_n, out_dtype)
        return n, launch_args(rotary_kv)
    if silu_mul:
        silu_mul_epilogue.check(x, n, block_n, silu_amax)
        return n // 2, silu_mul_epilogue.launch_args(silu_amax)
    return n, {}


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain torch reference: fp32 product, rounded once to x's dtype."""
    return (x.float() @ w.float().t()).to(x.dtype)
