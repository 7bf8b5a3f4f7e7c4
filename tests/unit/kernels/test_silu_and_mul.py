"""The silu_and_mul kernel matches `silu_and_mul_ref` (and the MLP's eager activation).

On CPU it runs under TRITON_INTERPRET=1 in fp32 (atol = rtol = 1e-5: exp implementations
differ in the last bits). On CUDA it runs in bf16 and fp16 against the same-dtype reference,
which also computes in fp32 and rounds once; the GPU's approximate exp may flip that rounding
by one ulp, hence bf16 atol = rtol = 1.6e-2 and fp16 2e-3.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engine.kernels.silu_and_mul import amax_parts, silu_and_mul, silu_and_mul_ref

pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def random_gate_up(
    num_tokens: int, intermediate: int, dtype: torch.dtype, extra_columns: int = 0
) -> torch.Tensor:
    """[num_tokens, 2 * intermediate + extra_columns] with values spread over [-12, 12]."""
    gen = torch.Generator().manual_seed(num_tokens * 7919 + intermediate)
    t = 4 * torch.randn(num_tokens, 2 * intermediate + extra_columns, generator=gen)
    return t.clamp(-12, 12).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [100, 1100, 1536])
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
def test_matches_reference(num_tokens: int, intermediate: int, dtype: torch.dtype) -> None:
    gate_up = random_gate_up(num_tokens, intermediate, dtype)
    gate_up_before = gate_up.clone()

    out = silu_and_mul(gate_up)

    assert out.shape == (num_tokens, intermediate) and out.dtype == dtype
    torch.testing.assert_close(out, silu_and_mul_ref(gate_up), **TOLERANCES[dtype])
    assert torch.equal(gate_up, gate_up_before), "gate_up must not be modified"


@pytest.mark.parametrize("dtype", DTYPES)
def test_close_to_llama_mlp_activation(dtype: torch.dtype) -> None:
    gate_up = random_gate_up(5, 576, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    # The eager MLP rounds after the silu as well; allow one more ulp of the narrow dtype.
    tolerance = {k: 2 * v for k, v in TOLERANCES[dtype].items()}

    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up, **tolerance)


def test_strided_rows_and_out_buffer() -> None:
    dtype = DTYPES[0]
    intermediate = 300
    gate_up = random_gate_up(4, intermediate, dtype, extra_columns=13)[:, : 2 * intermediate]
    out_wide = torch.zeros(4, intermediate + 7, device=DEVICE, dtype=dtype)
    out_view = out_wide[:, 7:]

    out = silu_and_mul(gate_up, out=out_view)

    assert out is out_view
    torch.testing.assert_close(out, silu_and_mul_ref(gate_up), **TOLERANCES[dtype])
    assert torch.count_nonzero(out_wide[:, :7]) == 0, "wrote outside out"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy
def test_extreme_values() -> None:
    dtype = DTYPES[0]
    big = torch.finfo(dtype).max
    gate = torch.tensor([[-big, -100.0, -20.0, -0.0, 0.0, 20.0, 100.0, big]], dtype=dtype)
    up = torch.full_like(gate, 0.5)
    gate_up = torch.cat([gate, up], dim=1).to(DEVICE)

    out = silu_and_mul(gate_up)

    assert torch.isfinite(out).all(), f"silu must not overflow to NaN/inf: {out}"
    torch.testing.assert_close(out, silu_and_mul_ref(gate_up), **TOLERANCES[dtype])


def test_zero_tokens() -> None:
    out = silu_and_mul(random_gate_up(0, 64, DTYPES[0]))
    assert out.shape == (0, 64)


@pytest.mark.parametrize("dtype", sorted({DTYPES[0], torch.bfloat16}, key=str))
@pytest.mark.parametrize(("num_tokens", "intermediate"), [(1, 100), (3, 1100), (2, 2500)])
def test_amax_out_is_each_blocks_max_of_what_is_stored(
    num_tokens: int, intermediate: int, dtype: torch.dtype
) -> None:
    """One partial amax per 1,024 columns (the last block ragged), of the values as stored:
    a row's max over them is the amax the per-token quantization finds (Fp8Pending)."""
    gate_up = random_gate_up(num_tokens, intermediate, dtype)
    parts = amax_parts(intermediate)
    assert parts == -(-intermediate // 1024)
    amax = torch.full((num_tokens, parts), float("nan"), device=DEVICE)  # every slot written
    plain = silu_and_mul(gate_up)
    out = silu_and_mul(gate_up, amax_out=amax)
    assert torch.equal(out, plain)  # the values do not change
    want = torch.stack([block.float().abs().amax(dim=1) for block in out.split(1024, dim=1)], dim=1)
    assert torch.equal(amax, want)
    assert torch.equal(amax.amax(dim=1), out.float().abs().amax(dim=1))


@pytest.mark.parametrize("case", ["shape", "dtype", "strided"])
def test_rejects_a_bad_amax_out(case: str) -> None:
    gate_up = random_gate_up(3, 1100, DTYPES[0])
    amax = torch.empty(3, 2, device=DEVICE)
    if case == "shape":
        amax = torch.empty(3, 1, device=DEVICE)
    elif case == "dtype":
        amax = amax.double()
    elif case == "strided":
        amax = torch.empty(3, 4, device=DEVICE)[:, ::2]
    with pytest.raises(ValueError, match="amax_out must be"):
        silu_and_mul(gate_up, amax_out=amax)


@pytest.mark.parametrize("case", ["odd_width", "3d", "column_stride", "out_shape", "out_dtype"])
def test_rejects_bad_inputs(case: str) -> None:
    gate_up = random_gate_up(3, 64, DTYPES[0])
    out: torch.Tensor | None = None
    if case == "odd_width":
        gate_up = gate_up[:, :127]
    elif case == "3d":
        gate_up = gate_up.view(3, 2, 64)
    elif case == "column_stride":
        gate_up = torch.cat([gate_up, gate_up], dim=1)[:, ::2]
    elif case == "out_shape":
        out = torch.empty(3, 65, device=DEVICE, dtype=gate_up.dtype)
    elif case == "out_dtype":
        out = torch.empty(3, 64, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError):
        silu_and_mul(gate_up, out=out)
