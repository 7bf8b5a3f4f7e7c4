"""FP8 (e4m3) skinny products for decode steps, W8A8 like Fp8Linear's `torch._scaled_mm` path:

    out[m, n] = x_scale[m] * w_scale[n] * sum_k x_fp8[m, k] * w_fp8[n, k]     (fp32 sums)

x comes already quantized per token (engine.kernels.fp8_quant, the same kernel and the same
bits the `_scaled_mm` path feeds cuBLAS), so the two paths differ only in the order of the fp32
sums and where the scales are applied: outputs agree to bf16 rounding, not bit for bit. Why not
read bf16 x and skip its quantization: the products would change with the path (W8A16 at one
row, W8A8 at many), so a sequence's tokens would depend on the batch it runs in by more than
summation order; with x quantized the same way both paths compute the same exact products.

Each program streams BLOCK_N weight rows of e4m3 in BLOCK_K chunks (1 byte a weight: half a
bf16 GEMV's bytes), multiplies on CUDA cores in fp32 (products of two e4m3 values are exact in
fp32) and applies both scales once at the end. M == 1 reduces a [BLOCK_N, BLOCK_K] tile; 2 <= M
<= MAX_ROWS broadcasts [BLOCK_M, BLOCK_N, BLOCK_K] (no tl.dot: fp8 dots need 16-row tiles
and the interpreter has none). Why a kernel of our own: `torch._scaled_mm` at M = 1 reads the
small projections at 1.0-1.2 TB/s on an H100 (issue 20). Launches with programmatic dependent
launch when engine.kernels.gemv.USE_PDL is on. `fp8_gemv_ref` is the torch reference;
H100 measurements: docs/benchmarks.md (bench.kernels_gemv --fp8).

`fp8_gemv_quantizing` takes x not yet quantized, with its per-row amax in parts (written by
the kernel that made x: SiLU-and-mul, decode attention; engine.quantization.Fp8Pending), and
quantizes each x tile it loads in registers exactly as engine.kernels.fp8_quant would have
stored it: bitwise `fp8_gemv(*quantize_per_token_fused(x), ...)` (the same e4m3 products,
summed over the same tiles in the same order), one launch instead of two.
`fp8_gemv_quantizing_ref` is its torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

import engine.kernels.gemv as gemv_module
from engine.kernels import silu_mul_epilogue
from engine.kernels.fp8_round import round_to_e4m3
from engine.kernels.launch import check_devices, interpreting, on_device
from engine.kernels.rotary_kv_epilogue import RotaryKvWrite, paired_rows, rotary_kv_epilogue
from engine.quantization import FP8_DTYPE, FP8_MAX, MIN_AMAX

MAX_ROWS = 8  # rows of x the kernel takes
# fp8_gemv_quantizing on a GPU rounds x to e4m3 with the hardware conversion (round to nearest
# even, subnormals kept: the values fp8_round.round_to_e4m3 gives, in a fraction of the
# instructions); False rounds with round_to_e4m3 as the quantization kernel does. The
# interpreter always takes round_to_e4m3 (its conversion rounds ties away, see fp8_round).
HW_ROUND = True


@dataclass(frozen=True, slots=True)
class Fp8GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (M, N, K) -> tiles, set from a sweep on the card (bench.kernels_gemv --fp8 --sweep writes
# them, bench.fp8_gpu --fp8-gemv-tiles reads them); shapes not here take default_config's.
TUNED: dict[tuple[int, int, int], Fp8GemvConfig] = {}


def default_config(m: int, n: int, k: int) -> Fp8GemvConfig:
    """Tiles by shape. M == 1: 2 rows x 2,048 columns, 4 warps, the best or within 0.1 us of
    it on each Llama-3-8B projection in an H100 sweep (bench.kernels_gemv --fp8 --sweep,
    docs/benchmarks.md); fewer columns as rows grow so the [BLOCK_M, BLOCK_N, BLOCK_K]
    product stays in registers (M > 1 not yet timed)."""
    tuned = TUNED.get((m, n, k))
    if tuned is not None:
        return tuned
    if m == 1:
        return Fp8GemvConfig(block_n=2, block_k=2048, num_warps=4, num_stages=3)
    return Fp8GemvConfig(block_n=4, block_k=512 if m <= 4 else 256, num_warps=4, num_stages=3)


@triton.jit
def _e4m3_values(x, scale, SOFT_ROUND: tl.constexpr):
    """fp32 x / scale, clamped to +-448 and rounded to the nearest e4m3 value (ties to even,
    subnormals kept), in fp32: the values engine.kernels.fp8_quant stores, bit for bit."""
    y = tl.clamp(x / scale, -448.0, 448.0)
    if SOFT_ROUND:
        return round_to_e4m3(y)
    return y.to(tl.float8e4nv).to(tl.float32)  # sm_89+: cvt.rn.satfinite, round to nearest even


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,  # [M, K] e4m3; with QUANT bf16/fp16/fp32, not yet quantized
    x_scale_ptr,  # [M] fp32 (stride x_scale_stride); with QUANT [M, P] fp32 partial amaxes
    w_ptr,  # [N, K] e4m3
    w_scale_ptr,  # [N] fp32, contiguous
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_xs,
    stride_wn,
    stride_om,
    P,  # with QUANT: partial amaxes per row of x (x_scale_ptr's columns, contiguous)
    BLOCK_M: tl.constexpr,  # 1: one row; else a power of two >= M
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0
    PDL: tl.constexpr,  # launched with programmatic dependent launch: wait before reading x
    QUANT: tl.constexpr,  # quantize x per row here, from its partial amaxes (fp8_gemv_quantizing)
    P_PAD: tl.constexpr,  # with QUANT: P rounded up to a power of two
    SOFT_ROUND: tl.constexpr,  # with QUANT: round with fp8_round, not the conversion (see HW_ROUND)
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
    n_mask = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    w_scale = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rm = tl.arange(0, BLOCK_M)
    m_mask = rm < M
    if PDL:  # x and its scales are the previous kernel's output; w is not
        gdc_wait()
    if QUANT:  # each row's scale from its partial amaxes, as engine.kernels.fp8_quant's
        rp = tl.arange(0, P_PAD)
        if BLOCK_M == 1:
            parts = tl.load(x_scale_ptr + rp, mask=rp < P, other=0.0)
            x_scale = tl.maximum(tl.max(parts, axis=0), 1e-12) / 448.0
        else:
            parts = tl.load(
                x_scale_ptr + rm[:, None] * stride_xs + rp[None, :],
                mask=m_mask[:, None] & (rp < P)[None, :],
                other=0.0,
            )
            x_scale = tl.maximum(tl.max(parts, axis=1), 1e-12) / 448.0  # [BLOCK_M]
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        if EVEN_K and EVEN_N:
            w = tl.load(w_rows + rk[None, :])
        elif EVEN_K:
            w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None], other=0.0)
        else:
            w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        wf = w.to(tl.float32)
        if BLOCK_M == 1:
            if EVEN_K:  # noqa: SIM108 (constexpr branches)
                x = tl.load(x_ptr + rk)
            else:
                x = tl.load(x_ptr + rk, mask=k_mask, other=0.0)
            xf = x.to(tl.float32)
            if QUANT:  # what _quant_kernel stores, exactly: the same e4m3 values in fp32
                xf = _e4m3_values(xf, x_scale, SOFT_ROUND)
            acc += tl.sum(wf * xf[None, :], axis=1)
        else:
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + rk[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            xf = x.to(tl.float32)
            if QUANT:
                xf = _e4m3_values(xf, x_scale[:, None], SOFT_ROUND)
            acc += tl.sum(xf[:, None, :] * wf[None, :, :], axis=2)
    if BLOCK_M == 1:
        if not QUANT:
            x_scale = tl.load(x_scale_ptr)
        out = acc * x_scale * w_scale
        if ROTARY_KV:
            rotary_kv_epilogue(
                out, pid, out_ptr, positions_ptr, cos_ptr, sin_ptr, stride_table,
                slot_mapping_ptr, num_slots, k_cache_ptr, v_cache_ptr, stride_kc_block,
                stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
                k_scale_ptr, v_scale_ptr, stride_ks_head, stride_vs_head, NUM_HEADS,
                NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, KV_FP8,
            )  # fmt: skip
        elif SILU_MUL:
            silu_mul_epilogue.silu_mul_epilogue(
                out, pid, out_ptr, silu_amax_ptr, BLOCK_N, SILU_AMAX, AMAX_PARTS
            )
        else:
            tl.store(out_ptr + rn, out.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        if not QUANT:
            x_scale = tl.load(x_scale_ptr + rm * stride_xs, mask=m_mask, other=0.0)
        out = acc * x_scale[:, None] * w_scale[None, :]
        out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _check(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> None:
    _check_shapes(x, w, w_scale)
    m = x.shape[0]
    if x.dtype != FP8_DTYPE:
        raise ValueError(f"x and w must be {FP8_DTYPE}, got {x.dtype} and {w.dtype}")
    if x_scale.dtype != torch.float32 or x_scale.numel() != m:
        raise ValueError(f"x_scale must be {m} fp32 values, got {tuple(x_scale.shape)} "
                         f"{x_scale.dtype}")  # fmt: skip


def _check_shapes(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> None:
    """What fp8_gemv and fp8_gemv_quantizing both need of x's shape, w and w_scale."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x and w must be 2-d, got {tuple(x.shape)} and {tuple(w.shape)}")
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns, w {tuple(w.shape)} needs {k}")
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows, got {m}")
    if w.dtype != FP8_DTYPE:
        raise ValueError(f"x and w must be {FP8_DTYPE}, got {x.dtype} and {w.dtype}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"columns must be contiguous, got strides {x.stride()}, {w.stride()}")
    if w_scale.dtype != torch.float32 or w_scale.shape != (n,) or w_scale.stride(0) != 1:
        raise ValueError(f"w_scale must be [{n}] contiguous fp32, got {tuple(w_scale.shape)} "
                         f"{w_scale.dtype}")  # fmt: skip


def fp8_gemv(
    x: torch.Tensor,  # [M, K] e4m3, quantized per token
    x_scale: torch.Tensor,  # [M, 1] (or [M]) fp32
    w: torch.Tensor,  # [N, K] e4m3
    w_scale: torch.Tensor,  # [N] fp32
    out_dtype: torch.dtype = torch.bfloat16,
    config: Fp8GemvConfig | None = None,
    rotary_kv: RotaryKvWrite | None = None,
    silu_mul: bool = False,
    silu_amax: torch.Tensor | None = None,  # with silu_mul: [1, AMAX_PARTS] fp32, zero at entry
) -> torch.Tensor:  # [M, N] out_dtype ([1, N / 2] with silu_mul)
    """x_scale * (x @ w.T) * w_scale for 1 <= M <= MAX_ROWS rows, fp32 sums. Rows of x may be
    strided; its columns and w's must be contiguous. With `rotary_kv` (one row of a QKV
    projection), the output comes rotated and its k and v are written into the KV cache:
    bitwise `fp8_gemv` then kv_write.rotary_write_kv (engine.kernels.rotary_kv_epilogue).
    With `silu_mul` (one row of a gate_up projection), the output is silu(gate) * up, bitwise
    `fp8_gemv` then silu_and_mul, and `silu_amax` (if given) takes its amax in parts
    (engine.kernels.silu_mul_epilogue). Raises ValueError on a bad device, dtype, shape or
    stride."""
    check_devices(x, x_scale, w, w_scale)
    _check(x, x_scale, w, w_scale)
    scale_stride = x_scale.stride(0) if x_scale.dim() else 0
    return _launch(
        x, x_scale, scale_stride, 1, w, w_scale, out_dtype, config, quant=False,
        rotary_kv=rotary_kv, silu_mul=silu_mul, silu_amax=silu_amax,
    )  # fmt: skip


def fp8_gemv_quantizing(
    x: torch.Tensor,  # [M, K] bf16/fp16/fp32, not quantized
    x_amax: torch.Tensor,  # [M, P] fp32: partial amaxes, each row's max over them its amax
    w: torch.Tensor,  # [N, K] e4m3
    w_scale: torch.Tensor,  # [N] fp32
    out_dtype: torch.dtype = torch.bfloat16,
    config: Fp8GemvConfig | None = None,
) -> torch.Tensor:  # [M, N] out_dtype
    """`fp8_gemv(*quantize_per_token_fused(x), w, w_scale)` bit for bit, in one launch: each
    program takes each row's scale from `x_amax` (max |x[m]| split into parts by the kernel
    that made x: engine.quantization.Fp8Pending) and quantizes the x tiles it loads in
    registers, exactly as engine.kernels.fp8_quant stores them, over the same tiles and sums.
    Only as exact as x_amax: its row maxima must be x's. Raises ValueError on a bad device,
    dtype, shape or stride."""
    check_devices(x, x_amax, w, w_scale)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32 (not yet quantized), got {x.dtype}")
    if x.dim() != 2 or x_amax.dim() != 2 or x_amax.shape[0] != x.shape[0] or x_amax.shape[1] < 1:
        raise ValueError(f"x_amax must be [M, P] with x's M rows, got {tuple(x_amax.shape)} "
                         f"for x {tuple(x.shape)}")  # fmt: skip
    if x_amax.dtype != torch.float32 or x_amax.stride(1) != 1:
        raise ValueError(f"x_amax must be fp32 with contiguous columns, got {x_amax.dtype} "
                         f"strides {x_amax.stride()}")  # fmt: skip
    _check_shapes(x, w, w_scale)
    parts = x_amax.shape[1]
    return _launch(x, x_amax, x_amax.stride(0), parts, w, w_scale, out_dtype, config, quant=True)


def _launch(
    x: torch.Tensor,
    scales: torch.Tensor,  # x's scales [M] (fp8_gemv), or its partial amaxes [M, P] (QUANT)
    scales_stride: int,  # between rows of `scales`
    parts: int,  # P with quant, else 1
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    config: Fp8GemvConfig | None,
    quant: bool,
    rotary_kv: RotaryKvWrite | None = None,
    silu_mul: bool = False,
    silu_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel launch both launchers share, once their inputs are checked."""
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bf16, fp16 or fp32, got {out_dtype}")
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    cfg = config or default_config(m, n, k)
    out_cols, epilogue = gemv_module.epilogue_launch(
        x, n, cfg.block_n, out_dtype, rotary_kv, silu_mul, silu_amax
    )
    block_m = 1 if m == 1 else triton.next_power_of_2(m)
    out = torch.empty(m, out_cols, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n),)
    pdl = gemv_module._pdl_supported(x.device)
    launch = {"launch_pdl": True} if pdl else {}
    with on_device(x.device):
        _fp8_gemv_kernel[grid](
            x, scales, w, w_scale, out, m, n, k, x.stride(0), scales_stride, w.stride(0),
            out.stride(0), parts, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            EVEN_N=n % cfg.block_n == 0, EVEN_K=k % cfg.block_k == 0, PDL=pdl, QUANT=quant,
            P_PAD=triton.next_power_of_2(parts) if quant else 1,
            SOFT_ROUND=quant and (interpreting() or not HW_ROUND),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch, **epilogue,
        )  # fmt: skip
    return out


def fp8_gemv_ref(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Plain torch reference: exact fp8 values in fp32, fp32 product, both scales, one rounding
    to out_dtype (what Fp8Linear's CPU path computes)."""
    _check(x, x_scale, w, w_scale)
    product = x.float() @ w.float().t()
    return (product * x_scale.reshape(-1, 1).float() * w_scale.float()).to(out_dtype)


def fp8_gemv_quantizing_ref(
    x: torch.Tensor,
    x_amax: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch reference of `fp8_gemv_quantizing`: x quantized per token with the scales its
    partial amaxes give (those of `quantize_per_token` when they are x's), then
    `fp8_gemv_ref`."""
    _check_shapes(x, w, w_scale)
    scale = x_amax.float().amax(dim=1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    xq = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return fp8_gemv_ref(xq, scale, w, w_scale, out_dtype)
