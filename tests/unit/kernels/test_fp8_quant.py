"""The fused per-token FP8 quantization kernel matches the torch reference bit for bit (scales
and e4m3 values), odd shapes and strided rows included."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.fp8_quant import quantize_per_token_fused, quantize_per_token_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("num_rows", "k"), [(1, 16), (3, 1000), (5, 2500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_reference(num_rows: int, k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(num_rows, k, generator=gen) * torch.logspace(-2, 2, num_rows)[:, None]
    x = x.to(DEVICE, dtype)
    got_q, got_s = quantize_per_token_fused(x)
    want_q, want_s = quantize_per_token_ref(x)
    torch.testing.assert_close(got_s, want_s, atol=0, rtol=0)
    assert torch.equal(got_q.float(), want_q.float())


def test_a_strided_view_and_empty_input() -> None:
    x = torch.randn(4, 64, device=DEVICE)[:, :48]  # row stride 64
    got_q, got_s = quantize_per_token_fused(x)
    want_q, want_s = quantize_per_token_ref(x)
    assert torch.equal(got_s, want_s) and torch.equal(got_q.float(), want_q.float())
    q, s = quantize_per_token_fused(torch.empty(0, 32, device=DEVICE))
    assert q.shape == (0, 32) and s.shape == (0, 1)
    with pytest.raises(ValueError, match="unit column stride"):
        quantize_per_token_fused(torch.randn(8, 4, device=DEVICE).t())
