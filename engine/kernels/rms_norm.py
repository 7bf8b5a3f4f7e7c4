"""RMSNorm with the residual add fused in: one read of x (and residual), one write of each out.

    h = x + residual;  out = weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)   (fp32 stats)

The rounding order is Hugging Face's; `residual` (when given) holds h afterwards, in place, so
CUDA-graph buffers stay the ones replayed. Rows are the leading dim, the hidden dim contiguous.
`rms_norm_ref` is the torch reference.

`rms_norm_fp8` is the same kernel ending in the per-token FP8 quantization of `out` that
W8A8 projections need (engine.kernels.fp8_quant) instead of the store of `out`: the e4m3
values and scales are bitwise those of `quantize_per_token_fused(rms_norm(...)[0])` (out is
rounded to x's dtype first, the same amax, scale formula and rounding), one launch fewer.
`rms_norm_fp8_ref` is its torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.fp8_round import round_to_e4m3
from engine.quantization import FP8_DTYPE, quantize_per_token

# Above this many bytes per row one program holding the whole row in registers spills; the
# Llama family stays far below it (hidden 16384 bf16 = 32 KiB).
_MAX_ROW_BYTES = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden_size]
    residual_ptr,  # [num_tokens, hidden_size], read then overwritten with h (HAS_RESIDUAL)
    weight_ptr,  # [hidden_size]
    out_ptr,  # [num_tokens, hidden_size]: x's dtype, or e4m3 (QUANT)
    scale_ptr,  # [num_tokens] fp32 per-token scales (QUANT)
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,  # store out quantized per token (e4m3 + scale), as fp8_quant would
    BLOCK: tl.constexpr,  # next power of two >= hidden_size: the whole row in one block
):
    # One program per row (token); int64 so row * stride cannot overflow on long batches.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size  # lanes past hidden_size load 0 and add nothing to the sum

    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    # Loaded first: after the residual store below the compiler may not move it up (the
    # pointers could alias), and at one row its latency would follow the reduction's.
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + row * residual_row_stride + cols
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        # The add is rounded to x's dtype, as `x + residual` in torch would be.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(r_ptrs, x, mask=mask)

    h = x.to(tl.float32)
    mean_square = tl.sum(h * h, axis=0) / hidden_size
    normed = h * tl.rsqrt(mean_square + eps)
    # Round to x's dtype before the weight (Hugging Face order), then multiply in fp32: a
    # product of two bf16/fp16 values is exact in fp32, so the one rounding at the store
    # gives the same result as torch's product in the narrow dtype.
    normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    if QUANT:
        # What fp8_quant's kernel computes from the stored out: the product rounded to x's
        # dtype, the row's amax (lanes past hidden_size are 0), the same scale and rounding.
        y = (normed * w).to(x_ptr.dtype.element_ty).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
        tl.store(scale_ptr + row, scale)
        q = round_to_e4m3(tl.clamp(y / scale, -448.0, 448.0))
        tl.store(out_ptr + row * out_row_stride + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + row * out_row_stride + cols, normed * w, mask=mask)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden_size] fp32/bf16/fp16
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden_size], x's dtype; overwritten
    *,
    out: torch.Tensor | None = None,  # [num_tokens, hidden_size], x's dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, residual_out), like `engine.llama.RMSNorm.forward(x, residual)`.

    With a residual, residual_out IS `residual`, overwritten with x + residual; without one,
    residual_out is `x` itself. `out` (allocated if not given) is written in x's dtype and may
    be `x` (each row is read whole before it is written). Positions are rows: the hidden dim
    of every tensor must have stride 1; row strides are free. Raises ValueError on a bad
    device, dtype, shape or stride.
    """
    _check_inputs(x, weight, residual)
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_row_major("out", out)
        _check_like("out", out, x, shape=x.shape)
    _launch(x, weight, eps, residual, out, None)
    return out, x if residual is None else residual


def rms_norm_fp8(
    x: torch.Tensor,  # [num_tokens, hidden_size] fp32/bf16/fp16
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden_size], x's dtype; overwritten
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out_fp8 [num_tokens, hidden_size] e4m3, scale [num_tokens, 1] fp32,
    residual_out): `rms_norm`'s out quantized per token, bitwise as `quantize_per_token_fused`
    would, without out ever being stored. residual_out as in `rms_norm`. Raises ValueError
    like `rms_norm`."""
    num_tokens, hidden_size = _check_inputs(x, weight, residual)
    out = torch.empty(num_tokens, hidden_size, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)
    _launch(x, weight, eps, residual, out, scale)
    return out, scale, x if residual is None else residual


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    scale: torch.Tensor | None,  # given: out is e4m3, quantized per token (QUANT)
) -> None:
    """One program per row of `_rms_norm_kernel` (checked inputs); ValueError for a row too
    wide for one program."""
    num_tokens, hidden_size = x.shape
    block = triton.next_power_of_2(hidden_size)
    if block * x.element_size() > _MAX_ROW_BYTES:
        raise ValueError(f"hidden_size {hidden_size} too large for one program per row")
    if num_tokens == 0:
        return
    _rms_norm_kernel[(num_tokens,)](
        x,
        residual if residual is not None else x,  # unused when HAS_RESIDUAL is False
        weight,
        out,
        scale if scale is not None else out,  # no scales when QUANT is False
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        hidden_size,
        eps,
        HAS_RESIDUAL=residual is not None,
        QUANT=scale is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),  # 4096 -> 8 warps, 1024 -> 4
    )


def rms_norm_fp8_ref(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden_size]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference: `rms_norm_ref` then `quantize_per_token`; inputs are not modified."""
    out, h = rms_norm_ref(x, weight, eps, residual)
    q, scale = quantize_per_token(out)
    return q, scale, h


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden_size]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch reference: (out, x + residual); inputs are not modified."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype), h


def _check_inputs(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
) -> tuple[int, int]:
    """(num_tokens, hidden_size) of valid inputs; ValueError naming the first bad one."""
    _check_device(x)
    _check_row_major("x", x)
    num_tokens, hidden_size = x.shape
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be fp32, bf16 or fp16, got {x.dtype}")
    _check_like("weight", weight, x, shape=(hidden_size,), same_dtype=False)
    if weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous, got stride {weight.stride()}")
    if residual is not None:
        _check_row_major("residual", residual)
        _check_like("residual", residual, x, shape=x.shape)
        if x.numel() > 0 and residual.data_ptr() == x.data_ptr():
            raise ValueError("residual must not alias x")
    return num_tokens, hidden_size


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(f"x must be on a CUDA device (or TRITON_INTERPRET=1), got {x.device}")


def _check_row_major(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be [num_tokens, hidden_size], got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous hidden dim, got stride {t.stride()}")


def _check_like(
    name: str,
    t: torch.Tensor,
    x: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    same_dtype: bool = True,
) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if same_dtype and t.dtype != x.dtype:
        raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
