"""The SiLU-and-mul epilogue of the single-row gate_up GEMVs (engine.kernels.silu_mul_epilogue)
gives bitwise what the GEMV followed by `silu_and_mul` gives, for the bf16/fp32 GEMV and the FP8
GEMV, and its amax parts (FP8) max to the output's amax, the value an FP8 down projection
quantizes with. What does not fit is refused with a ValueError naming it. On CPU under
TRITON_INTERPRET=1, small shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.fp8_gemv import fp8_gemv
from engine.kernels.gemv import GemvConfig, gemv
from engine.kernels.silu_and_mul import silu_and_mul
from engine.kernels.silu_mul_epilogue import AMAX_PARTS, silu_mul_epilogue_ref
from engine.quantization import quantize_per_token, quantize_weight
from tests.unit.kernels.test_rotary_write_kv import DEVICE

pytestmark = pytest.mark.slow

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# bf16 on CPU too: there the rounding of gate_up before the SiLU is not a no-op
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
HIDDEN, INTERMEDIATE = 48, 40  # gate_up: 80 rows


def operands(
    seed: int = 0, rows: int = 1, dtype: torch.dtype = DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, HIDDEN, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(2 * INTERMEDIATE, HIDDEN, generator=gen) / HIDDEN**0.5).to(DEVICE, dtype)
    return x, w


def fp8_operands(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (*quantize_per_token(x), *quantize_weight(w))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_epilogue_matches_gemv_then_silu_and_mul_bitwise(dtype: torch.dtype) -> None:
    x, w = operands(dtype=dtype)
    got = gemv(x, w, silu_mul=True)
    want = silu_and_mul(gemv(x, w))
    assert got.shape == (1, INTERMEDIATE)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_amax", [False, True])
def test_fp8_gemv_epilogue_matches_and_its_amax_parts_max_to_the_outputs(
    with_amax: bool, dtype: torch.dtype
) -> None:
    x, w = operands(seed=1, dtype=dtype)
    amax = torch.zeros(1, AMAX_PARTS, device=DEVICE) if with_amax else None

    got = fp8_gemv(*fp8_operands(x, w), out_dtype=dtype, silu_mul=True, silu_amax=amax)

    want = silu_and_mul(fp8_gemv(*fp8_operands(x, w), out_dtype=dtype))
    assert torch.equal(got, want)
    if amax is not None:
        assert amax.max() == want.float().abs().max(), "the row's amax, exactly"
        assert int((amax > 0).sum()) > 1, "spread over several slots"


def test_agrees_with_the_torch_reference() -> None:
    x, w = operands(seed=2)
    amax = torch.zeros(1, AMAX_PARTS, device=DEVICE)
    got = fp8_gemv(*fp8_operands(x, w), out_dtype=DTYPE, silu_mul=True, silu_amax=amax)
    want_amax = torch.zeros(1, AMAX_PARTS, device=DEVICE)
    want = silu_mul_epilogue_ref(fp8_gemv(*fp8_operands(x, w), out_dtype=DTYPE), want_amax)
    tol = dict(atol=1e-5, rtol=1e-5) if DEVICE == "cpu" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(amax.max(), want_amax.max(), **tol)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("two_rows", "one row"),
        ("odd_block", "BLOCK_N"),
        ("bad_amax", "amax must be"),
        ("amax_without_epilogue", "needs silu_mul"),
    ],
)
def test_refuses_what_the_epilogue_cannot_do(case: str, message: str) -> None:
    x, w = operands(rows=2 if case == "two_rows" else 1)
    with pytest.raises(ValueError, match=message):
        if case == "odd_block":
            gemv(x, w, GemvConfig(block_n=6, block_k=16, num_warps=1, num_stages=1), silu_mul=True)
        elif case == "bad_amax":
            fp8_gemv(*fp8_operands(x, w), silu_mul=True, silu_amax=torch.zeros(1, 3))
        elif case == "amax_without_epilogue":
            fp8_gemv(*fp8_operands(x, w), silu_amax=torch.zeros(1, AMAX_PARTS, device=DEVICE))
        else:
            gemv(x, w, silu_mul=True)
