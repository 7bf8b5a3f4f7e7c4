"""Per-token FP8 quantization fused into RMSNorm (with and without the residual add) and into
SiLU-and-mul gives bitwise the e4m3 bytes and fp32 scales of the unfused path (the kernel, then
engine.kernels.fp8_quant); ragged widths, one token and several. The torch references agree to
one e4m3 step: the unfused kernels themselves match their references only to a bf16 ulp."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels import silu_and_mul as silu_and_mul_module
from engine.kernels.fp8_quant import quantize_per_token_fused
from engine.kernels.rms_norm import rms_norm, rms_norm_fp8, rms_norm_fp8_ref
from engine.kernels.silu_and_mul import silu_and_mul, silu_and_mul_fp8, silu_and_mul_fp8_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_same_bits(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    (got_q, got_s), (want_q, want_s) = got[:2], want[:2]
    assert got_q.dtype == want_q.dtype == torch.float8_e4m3fn
    assert got_s.dtype == want_s.dtype == torch.float32 and got_s.shape == want_s.shape
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(got_s.view(torch.int32), want_s.view(torch.int32))


def assert_close_to_reference(
    got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]
) -> None:
    """Within one e4m3 step (1/8 relative, or a subnormal step) of the reference."""
    (got_q, got_s), (want_q, want_s) = got[:2], want[:2]
    torch.testing.assert_close(got_s, want_s, rtol=1e-2, atol=0)
    step = want_s * 2.0**-9  # the subnormal step, absolute
    torch.testing.assert_close(
        got_q.float() * got_s, want_q.float() * want_s, rtol=0.13, atol=float(step.max()) * 1.01
    )


def rows(num_tokens: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-3, 1, num_tokens)[:, None]  # tiny rows reach e4m3 subnormals
    return (torch.randn(num_tokens, width, generator=gen) * spread).to(DEVICE, dtype)


@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 48), (3, 100), (5, 37)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_is_rms_norm_then_quantize(
    num_tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool
) -> None:
    x = rows(num_tokens, hidden, dtype, seed=hidden)
    weight = rows(1, hidden, dtype, seed=1).reshape(-1) + 1
    residual = rows(num_tokens, hidden, dtype, seed=2) if with_residual else None
    res_fused = None if residual is None else residual.clone()
    res_unfused = None if residual is None else residual.clone()

    q, scale, h = rms_norm_fp8(x, weight, 1e-5, res_fused)
    out, h_unfused = rms_norm(x, weight, 1e-5, res_unfused)
    assert_same_bits((q, scale), quantize_per_token_fused(out))
    assert torch.equal(h, h_unfused)  # the residual stream is written the same way
    if with_residual:
        assert h is res_fused
    want = rms_norm_fp8_ref(x, weight, 1e-5, residual)
    assert_close_to_reference((q, scale), want)


def test_rms_norm_fp8_zero_row_and_empty_batch() -> None:
    x = torch.zeros(2, 24, device=DEVICE, dtype=torch.bfloat16)
    x[1] = 1.0
    weight = torch.ones(24, device=DEVICE, dtype=torch.bfloat16)
    q, scale, _ = rms_norm_fp8(x, weight, 1e-5)
    assert_same_bits((q, scale), quantize_per_token_fused(rms_norm(x, weight, 1e-5)[0]))
    assert scale[0].item() == pytest.approx(1e-12 / 448)
    q, scale, _ = rms_norm_fp8(x[:0], weight, 1e-5)
    assert q.shape == (0, 24) and scale.shape == (0, 1)


@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_passes"])
@pytest.mark.parametrize(("num_tokens", "intermediate"), [(1, 40), (2, 1500), (4, 33)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul_fp8_is_silu_and_mul_then_quantize(
    monkeypatch: pytest.MonkeyPatch,
    num_tokens: int,
    intermediate: int,
    dtype: torch.dtype,
    one_pass: bool,
) -> None:
    # Two passes: 1500 > the kernel's 1024-column block, the loop runs over a partial block.
    # One pass: the whole row in one block (2048 columns for 1500, masked).
    columns = silu_and_mul_module.ONE_PASS_COLUMNS if one_pass else 0
    monkeypatch.setattr(silu_and_mul_module, "ONE_PASS_MAX_COLUMNS", columns)
    gate_up = rows(num_tokens, 2 * intermediate, dtype, seed=intermediate) * 4
    got = silu_and_mul_fp8(gate_up)
    assert_same_bits(got, quantize_per_token_fused(silu_and_mul(gate_up)))
    assert_close_to_reference(got, silu_and_mul_fp8_ref(gate_up))


def test_silu_and_mul_fp8_strided_rows_and_bad_input() -> None:
    gate_up = rows(3, 80, torch.bfloat16, seed=5)[:, :64]  # row stride 80
    assert_same_bits(silu_and_mul_fp8(gate_up), quantize_per_token_fused(silu_and_mul(gate_up)))
    q, scale = silu_and_mul_fp8(gate_up[:0])
    assert q.shape == (0, 32) and scale.shape == (0, 1)
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul_fp8(torch.zeros(2, 7, device=DEVICE))
