"""The gated MLP's activation: silu(gate) * up over the fused gate_up projection output.

    gate_up = [gate | up]                 [num_tokens, 2 * intermediate]
    out     = silu(gate) * up             [num_tokens, intermediate]

Computed in fp32 and rounded once to the input's dtype. (The eager bf16 path in
`engine.llama.MLP`, `F.silu(gate) * up`, rounds twice: after the silu and after the product;
the results differ by at most about one bf16 ulp.)

`silu_and_mul_fp8` quantizes out per token for the FP8 down projection in the same launch
(one program per token: two passes over the row, its amax, then the e4m3 values, or, where
the row's width rounded up to a power of two is at most ONE_PASS_MAX_COLUMNS, the row held in
registers and read once): bitwise
`quantize_per_token_fused(silu_and_mul(gate_up))`, out rounded to gate_up's dtype first and
never stored. `silu_and_mul_fp8_ref` is its torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.fp8_round import round_to_e4m3
from engine.kernels.launch import check_amax_out
from engine.quantization import FP8_DTYPE, quantize_per_token

# Columns of out one program writes: big enough for wide vector loads, small enough that a
# decode batch of one token still spreads over a dozen programs (intermediate 14336 -> 14).
_BLOCK = 1024
# silu_and_mul_fp8 can hold a whole row in registers (one read of gate_up, up to 16 warps) where
# its width, rounded up to a power of two, is at most ONE_PASS_MAX_COLUMNS; wider rows take two
# passes over the row (its amax, then the values), reading gate_up twice. Off (0) until an H100
# run has timed it (written 2026-12-07, no device time left to run it; bench `+onepass` sets
# ONE_PASS_COLUMNS); bitwise the same values either way (tests/unit/kernels).
ONE_PASS_COLUMNS = 16384
ONE_PASS_MAX_COLUMNS = 0


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [num_tokens, 2 * intermediate]
    out_ptr,  # [num_tokens, intermediate]
    gate_up_row_stride,
    out_row_stride,
    intermediate,
    amax_ptr,  # [num_tokens, cdiv(intermediate, BLOCK)] fp32, contiguous; with AMAX only
    BLOCK: tl.constexpr,
    AMAX: tl.constexpr,  # also write each program's max |out| (of the values as stored)
):
    # Grid (num_tokens, cdiv(intermediate, BLOCK)): program (t, b) writes out[t, b*BLOCK:...],
    # reading gate at the same columns of gate_up and up `intermediate` columns further on.
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate_ptrs = gate_up_ptr + token * gate_up_row_stride + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + intermediate, mask=mask, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))  # torch's formula; -inf gate gives -0, not NaN
    out = (silu * up).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * out_row_stride + cols, out, mask=mask)
    if AMAX:  # masked lanes hold silu(0) * 0 = 0
        amax = tl.max(tl.abs(out.to(tl.float32)), axis=0)
        tl.store(amax_ptr + token * tl.num_programs(1) + block, amax)


@triton.jit
def _silu_mul_stored(row, cols, mask, intermediate):
    # silu(gate) * up at `cols` of one gate_up row, rounded to its dtype (what silu_and_mul
    # stores), as fp32; masked lanes give silu(0) * 0 = 0.
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    return (gate / (1.0 + tl.exp(-gate)) * up).to(row.dtype.element_ty).to(tl.float32)


@triton.jit
def _silu_and_mul_fp8_kernel(
    gate_up_ptr,  # [num_tokens, 2 * intermediate]
    out_ptr,  # [num_tokens, intermediate] e4m3, contiguous
    scale_ptr,  # [num_tokens] fp32
    gate_up_row_stride,
    intermediate,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,  # BLOCK >= intermediate: the row read once, held in registers
):
    # One program per token: pass 1 finds the amax of silu(gate) * up rounded to gate_up's
    # dtype (what silu_and_mul stores), pass 2 recomputes the same values and quantizes them
    # as engine.kernels.fp8_quant does. ONE_PASS keeps the values of pass 1 instead.
    token = tl.program_id(0).to(tl.int64)
    row = gate_up_ptr + token * gate_up_row_stride
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < intermediate
        y = _silu_mul_stored(row, cols, mask, intermediate)
        scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
        tl.store(scale_ptr + token, scale)
        q = round_to_e4m3(tl.clamp(y / scale, -448.0, 448.0))
        tl.store(out_ptr + token * intermediate + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
        return
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, intermediate, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < intermediate
        y = _silu_mul_stored(row, cols, mask, intermediate)
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(scale_ptr + token, scale)
    for start in range(0, intermediate, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < intermediate
        y = _silu_mul_stored(row, cols, mask, intermediate)
        q = round_to_e4m3(tl.clamp(y / scale, -448.0, 448.0))
        tl.store(out_ptr + token * intermediate + cols, q.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate] fp32/bf16/fp16
    out: torch.Tensor | None = None,  # [num_tokens, intermediate] gate_up's dtype
    amax_out: torch.Tensor | None = None,  # [num_tokens, amax_parts(intermediate)] fp32
) -> torch.Tensor:  # [num_tokens, intermediate] gate_up's dtype
    """Returns silu(gate) * up, written into `out` when given (it must not overlap gate_up).
    Rows may be strided; the column dim of both tensors must have stride 1. With `amax_out`,
    also writes there the max |value| of each block of columns of each row as stored (every
    slot, each call): a row's max over them is the amax `quantize_per_token` finds in it
    (what engine.quantization.Fp8Pending carries). Raises ValueError on a bad device, dtype,
    shape or stride.
    """
    _check_gate_up(gate_up)
    num_tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, intermediate, dtype=gate_up.dtype, device=gate_up.device)
    elif (
        out.device != gate_up.device
        or out.dtype != gate_up.dtype
        or tuple(out.shape) != (num_tokens, intermediate)
        or (intermediate > 1 and out.stride(1) != 1)
    ):
        raise ValueError(
            f"out must be [{num_tokens}, {intermediate}] {gate_up.dtype} on {gate_up.device} "
            f"with stride 1 along columns, got {tuple(out.shape)} {out.dtype} on {out.device} "
            f"strides {out.stride()}"
        )
    if amax_out is not None:
        check_amax_out(amax_out, num_tokens, amax_parts(intermediate), gate_up.device)
    if num_tokens == 0 or intermediate == 0:
        return out
    grid = (num_tokens, triton.cdiv(intermediate, _BLOCK))
    _silu_and_mul_kernel[grid](
        gate_up, out, gate_up.stride(0), out.stride(0), intermediate,
        out if amax_out is None else amax_out,  # a placeholder pointer without AMAX
        BLOCK=_BLOCK, AMAX=amax_out is not None, num_warps=4,
    )  # fmt: skip
    return out


def amax_parts(intermediate: int) -> int:
    """Partial amaxes `silu_and_mul` writes per row with amax_out: one per program."""
    return triton.cdiv(intermediate, _BLOCK)


def silu_and_mul_ref(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate]
) -> torch.Tensor:  # [num_tokens, intermediate]
    """Plain torch reference, in fp32 and rounded once to the input's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


def silu_and_mul_fp8(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate] fp32/bf16/fp16
) -> tuple[torch.Tensor, torch.Tensor]:  # ([num_tokens, intermediate] e4m3, [num_tokens, 1] fp32)
    """silu(gate) * up quantized per token, bitwise as `quantize_per_token_fused` would quantize
    `silu_and_mul(gate_up)`, in one launch. Raises ValueError like `silu_and_mul`."""
    _check_gate_up(gate_up)
    num_tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, intermediate, dtype=FP8_DTYPE, device=gate_up.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=gate_up.device)
    if num_tokens == 0 or intermediate == 0:
        return out, scale
    width = triton.next_power_of_2(intermediate)
    one_pass = width <= ONE_PASS_MAX_COLUMNS
    block = width if one_pass else min(_BLOCK, width)
    _silu_and_mul_fp8_kernel[(num_tokens,)](
        gate_up, out, scale, gate_up.stride(0), intermediate, BLOCK=block, ONE_PASS=one_pass,
        num_warps=min(max(width // 1024, 4), 16) if one_pass else 4,
    )  # fmt: skip
    return out, scale


def silu_and_mul_fp8_ref(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: `silu_and_mul_ref` then `quantize_per_token`."""
    return quantize_per_token(silu_and_mul_ref(gate_up))


def _check_gate_up(gate_up: torch.Tensor) -> None:
    if not gate_up.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(
            f"gate_up must be on a CUDA device (or TRITON_INTERPRET=1), got {gate_up.device}"
        )
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 != 0:
        raise ValueError(
            f"gate_up must be [num_tokens, 2 * intermediate], got {tuple(gate_up.shape)}"
        )
    if gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"gate_up must be fp32, bf16 or fp16, got {gate_up.dtype}")
    if gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must have stride 1 along columns, got {gate_up.stride()}")
