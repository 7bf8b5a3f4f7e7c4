"""Dynamic per-token FP8 (e4m3) quantization of activations in one launch (torch takes eight
kernels, which at decode batch sizes cost more than the GEMM they feed):

    x [M, K] -> x_fp8 [M, K] e4m3,  scale [M, 1] fp32 = max(amax_k |x[m, k]|, 1e-12) / 448

`quantize_per_token_ref` is the torch reference; the kernel rounds like it (fp8_round), so the
two agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.fp8_round import round_to_e4m3
from engine.kernels.launch import check_devices, on_device
from engine.quantization import FP8_DTYPE, quantize_per_token

_BLOCK_K = 1024


@triton.jit
def _quant_kernel(
    x_ptr,  # [M, K]
    out_ptr,  # [M, K] e4m3, contiguous
    scale_ptr,  # [M] fp32
    K,
    stride_x_row,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):  # pass 1: the row's amax
        offs = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(scale_ptr + row, scale)
    for start in range(0, K, BLOCK_K):  # pass 2: scale, round, store
        offs = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = round_to_e4m3(tl.clamp(x / scale, -448.0, 448.0))
        tl.store(out_ptr + row * K + offs, q.to(out_ptr.dtype.element_ty), mask=offs < K)


def quantize_per_token_fused(
    x: torch.Tensor,  # [M, K]
) -> tuple[torch.Tensor, torch.Tensor]:  # ([M, K] e4m3, [M, 1] fp32)
    """One launch; the same values as `quantize_per_token_ref` (up to rounding mode). Raises
    ValueError for a non-2-d input, a non-unit column stride or an unsupported dtype."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K] with unit column stride, got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    check_devices(x)
    num_rows, k = x.shape
    out = torch.empty(num_rows, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return out, scale
    with on_device(x.device):
        _quant_kernel[(num_rows,)](
            x, out, scale, k, x.stride(0), BLOCK_K=min(_BLOCK_K, triton.next_power_of_2(k)),
            num_warps=4,
        )  # fmt: skip
    return out, scale


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference (what the CPU path runs)."""
    return quantize_per_token(x)
