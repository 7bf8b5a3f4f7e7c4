"""The fused RMSNorm kernel matches `rms_norm_ref` and `engine.llama.RMSNorm`.

On CPU it runs under TRITON_INTERPRET=1 in fp32 (atol = rtol = 1e-5: only the order of the sum
differs). On CUDA it runs in bf16 and fp16 against the same-dtype reference: the normalized row
is rounded to the narrow dtype before the weight multiplies it, so a different fp32 sum may
flip that rounding by one ulp, hence rtol = 2 ulp (bf16 1.6e-2, fp16 2e-3).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engine.kernels.rms_norm import rms_norm, rms_norm_ref
from engine.llama import RMSNorm

pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
EPS = 1e-5


def make_inputs(
    num_tokens: int, hidden_size: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, weight, residual) on DEVICE; weight near 1 like a trained norm, in x's dtype."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden_size, generator=gen)
    weight = 1 + 0.1 * torch.randn(hidden_size, generator=gen)
    residual = 2 * torch.randn(num_tokens, hidden_size, generator=gen)
    return tuple(t.to(DEVICE, dtype) for t in (x, weight, residual))  # type: ignore[return-value]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("hidden_size", [100, 576, 4096])
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
def test_matches_reference(
    num_tokens: int, hidden_size: int, has_residual: bool, dtype: torch.dtype
) -> None:
    x, weight, residual = make_inputs(num_tokens, hidden_size, dtype)
    x_before = x.clone()
    expected_out, expected_h = rms_norm_ref(x, weight, EPS, residual if has_residual else None)

    out, residual_out = rms_norm(x, weight, EPS, residual if has_residual else None)

    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected_out, **TOLERANCES[dtype])
    assert torch.equal(x, x_before), "x must not be modified"
    if has_residual:
        assert residual_out is residual, "the residual is updated in place"
        torch.testing.assert_close(residual_out, expected_h, atol=0, rtol=0)
    else:
        assert residual_out is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [100, 576])
def test_matches_llama_module(hidden_size: int, dtype: torch.dtype) -> None:
    x, weight, residual = make_inputs(5, hidden_size, dtype, seed=1)
    module = RMSNorm(hidden_size, EPS).to(DEVICE, dtype)
    module.weight.data.copy_(weight)
    expected_out, expected_h = module(x, residual.clone())  # the CUDA path updates it in place

    out, residual_out = rms_norm(x, weight, EPS, residual.clone())

    torch.testing.assert_close(out, expected_out, **TOLERANCES[dtype])
    torch.testing.assert_close(residual_out, expected_h, atol=0, rtol=0)


def test_strided_rows_and_out_buffer() -> None:
    dtype = DTYPES[0]
    num_tokens, hidden_size = 7, 100
    # Rows of x and residual are views into wider buffers; out is a view too.
    x_wide, _, residual_wide = make_inputs(num_tokens, hidden_size + 28, dtype, seed=2)
    x, residual = x_wide[:, 3 : 3 + hidden_size], residual_wide[:, :hidden_size]
    weight = make_inputs(1, hidden_size, dtype, seed=3)[1]
    out_wide = torch.zeros(num_tokens, 2 * hidden_size, device=DEVICE, dtype=dtype)
    out_view = out_wide[:, hidden_size:]
    residual_wide_before = residual_wide.clone()
    expected_out, expected_h = rms_norm_ref(x, weight, EPS, residual)

    out, residual_out = rms_norm(x, weight, EPS, residual, out=out_view)

    assert out is out_view
    torch.testing.assert_close(out, expected_out, **TOLERANCES[dtype])
    assert torch.count_nonzero(out_wide[:, :hidden_size]) == 0, "wrote outside out"
    torch.testing.assert_close(residual_out, expected_h, atol=0, rtol=0)
    rest = residual_wide[:, hidden_size:]
    assert torch.equal(rest, residual_wide_before[:, hidden_size:]), "wrote outside residual"


def test_out_may_alias_x() -> None:
    dtype = DTYPES[0]
    x, weight, _ = make_inputs(3, 576, dtype, seed=4)
    expected_out, _ = rms_norm_ref(x, weight, EPS)

    out, _ = rms_norm(x, weight, EPS, out=x)

    assert out is x
    torch.testing.assert_close(out, expected_out, **TOLERANCES[dtype])


def test_fp32_weight_with_narrow_input() -> None:
    dtype = DTYPES[0]
    x, _, _ = make_inputs(3, 100, dtype, seed=5)
    weight = 1 + 0.1 * torch.randn(100, device=DEVICE)

    out, _ = rms_norm(x, weight, EPS)

    assert out.dtype == dtype
    torch.testing.assert_close(out, rms_norm_ref(x, weight, EPS)[0], **TOLERANCES[dtype])


def test_zero_tokens() -> None:
    x, weight, residual = make_inputs(0, 64, DTYPES[0])
    out, residual_out = rms_norm(x, weight, EPS, residual)
    assert out.shape == (0, 64) and residual_out is residual


@pytest.mark.parametrize(
    "case",
    ["3d_x", "residual_dtype", "residual_shape", "weight_shape", "column_stride", "aliased"],
)
def test_rejects_bad_inputs(case: str) -> None:
    x, weight, residual = make_inputs(4, 64, DTYPES[0])
    kwargs: dict[str, object] = dict(x=x, weight=weight, eps=EPS, residual=residual)
    if case == "3d_x":
        kwargs["x"] = x.view(2, 2, 64)
    elif case == "residual_dtype":
        kwargs["residual"] = residual.to(torch.float64)
    elif case == "residual_shape":
        kwargs["residual"] = residual[:3]
    elif case == "weight_shape":
        kwargs["weight"] = weight[:63]
    elif case == "column_stride":
        kwargs["x"] = torch.cat([x, x], dim=1)[:, ::2]
    elif case == "aliased":
        kwargs["residual"] = x
    with pytest.raises(ValueError):
        rms_norm(**kwargs)  # type: ignore[arg-type]
