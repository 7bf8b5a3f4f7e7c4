"""SiLU-and-mul as the epilogue of a single-row gate_up GEMV.

At one decode row the gate_up GEMV (engine.kernels.gemv, or engine.kernels.fp8_gemv for FP8
weights) is followed by a launch of silu_and_mul. Here the GEMV computes silu(gate) * up itself:

- its programs take rows in (gate, up) pairs: program p computes pairs p * P .. p * P + P - 1
  (P = BLOCK_N / 2), pair i being rows (i, i + N / 2), so each program holds the gate and the
  up of every output it makes (`paired_rows`);
- its epilogue (`silu_mul_epilogue`) rounds both to the output dtype (the projection as the
  GEMV stores it), computes silu(gate) * up in fp32 as silu_and_mul does (the same formula)
  and stores it rounded, [1, N / 2]; with `amax` given, it also folds each program's max |out|
  (as stored) into `amax` (atomic max into one of AMAX_PARTS slots): the parts whose max is the
  row's amax, which an FP8 down projection's GEMV quantizes from (engine.quantization.Fp8Pending).

Bitwise the GEMV then silu_and_mul, one launch fewer a layer. One row only (the engine's GEMVs
run single rows), no bias. `silu_mul_epilogue_ref` is the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.silu_and_mul import silu_and_mul_ref

# Slots the programs' amaxes are folded into (program p into slot p % AMAX_PARTS): one slot
# would serialize thousands of atomics on one address; the reader maxes over the slots.
AMAX_PARTS = 64


def check(x: torch.Tensor, out_features: int, block_n: int, amax: torch.Tensor | None) -> None:
    """ValueError naming what does not fit a gate_up projection of x ([M, K]) with
    `out_features` rows, BLOCK_N rows a program, and the amax slots."""
    if x.shape[0] != 1:
        raise ValueError(f"the SiLU-and-mul epilogue takes one row, got {x.shape[0]}")
    half = out_features // 2
    if out_features % 2 or block_n % 2 or half % (block_n // 2):
        raise ValueError(
            f"gate_up must have an even number of rows ({out_features}) whose half ({half}) "
            f"BLOCK_N's pairs ({block_n} / 2) divide"
        )
    if amax is not None and (
        amax.shape != (1, AMAX_PARTS) or amax.dtype != torch.float32 or not amax.is_contiguous()
        or amax.device != x.device
    ):  # fmt: skip
        raise ValueError(
            f"amax must be [1, {AMAX_PARTS}] contiguous fp32 on {x.device}, zero at entry; got "
            f"{tuple(amax.shape)} {amax.dtype} on {amax.device}"
        )


def launch_args(amax: torch.Tensor | None) -> dict:
    """A GEMV kernel's epilogue keyword arguments."""
    args: dict = {"SILU_MUL": True, "SILU_AMAX": amax is not None, "AMAX_PARTS": AMAX_PARTS}
    if amax is not None:
        args["silu_amax_ptr"] = amax
    return args


@triton.jit
def paired_rows(pid, N, BLOCK_N: tl.constexpr):
    """[BLOCK_N] rows of program pid: element 2 * i + h is row pid * P + i of gate (h = 0) or
    of up (h = 1, N / 2 rows further)."""
    P: tl.constexpr = BLOCK_N // 2
    idx = tl.arange(0, BLOCK_N)
    return pid * P + idx // 2 + (idx % 2) * (N // 2)


@triton.jit
def silu_mul_epilogue(
    values,  # [BLOCK_N] fp32: this program's outputs in paired_rows order, not yet rounded
    pid,
    out_ptr,  # [1, N / 2]
    amax_ptr,  # [1, AMAX_PARTS] fp32, zero at entry; with AMAX only
    BLOCK_N: tl.constexpr,
    AMAX: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Round, silu(gate) * up as silu_and_mul computes it, store; fold in the amax."""
    P: tl.constexpr = BLOCK_N // 2
    out_ty = out_ptr.dtype.element_ty
    stored = values.to(out_ty).to(tl.float32)  # gate_up as the GEMV alone stores it
    gate, up = tl.split(tl.reshape(stored, [P, 2]))
    out = (gate / (1.0 + tl.exp(-gate)) * up).to(out_ty)  # silu_and_mul's formula
    tl.store(out_ptr + pid * P + tl.arange(0, P), out)
    if AMAX:
        amax = tl.max(tl.abs(out.to(tl.float32)), axis=0)
        tl.atomic_max(amax_ptr + pid % PARTS, amax, sem="relaxed")


def silu_mul_epilogue_ref(
    gate_up: torch.Tensor,  # [1, N] the projection's output
    amax: torch.Tensor | None = None,  # [1, AMAX_PARTS]: max'd with the output's amax
) -> torch.Tensor:  # [1, N / 2]
    """Torch reference: silu_and_mul_ref, and the output's amax folded into amax[0, 0]."""
    out = silu_and_mul_ref(gate_up)
    if amax is not None:
        amax[0, 0] = torch.maximum(amax[0, 0], out.float().abs().max())
    return out
