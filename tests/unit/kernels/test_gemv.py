"""The skinny-product kernel (decode projections) against its torch reference.

On a GPU in bf16. Under TRITON_INTERPRET=1 (CPU) the M == 1 path runs in bf16 too, but the
tl.dot path (M > 1) in fp32: Triton 3.6's interpreter multiplies bf16 dot operands wrongly
(values near 1e10 for a product of unit-scale inputs).
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels.gemv import MAX_ROWS, GemvConfig, gemv, gemv_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(m: int) -> torch.dtype:
    return torch.bfloat16 if DEVICE == "cuda" or m == 1 else torch.float32


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 96)])  # 40 rows, 96 cols: ragged tiles
def test_gemv_matches_reference(m: int, n: int, k: int) -> None:
    generator = torch.Generator().manual_seed(1000 * m + n + k)
    dtype = dtype_for(m)
    x = torch.randn(m, k, generator=generator).to(dtype)
    w = (torch.randn(n, k, generator=generator) / k**0.5).to(dtype)
    x, w = x.to(DEVICE), w.to(DEVICE)
    config = GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=2)
    out = gemv(x, w, config=config)
    ref = gemv_ref(x, w)
    assert out.shape == (m, n) and out.dtype == dtype
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("m", [1, 2])
def test_gemv_default_tiles_on_ragged_shapes(m: int) -> None:
    """The engine's tiles (block_k 512/1024) over a K and N they do not divide."""
    generator = torch.Generator().manual_seed(11 + m)
    x = torch.randn(m, 1100, generator=generator).to(dtype_for(m)).to(DEVICE)
    w = (torch.randn(37, 1100, generator=generator) / 33).to(dtype_for(m)).to(DEVICE)
    assert rel_err(gemv(x, w), gemv_ref(x, w)) < 1e-2


def test_gemv_takes_strided_rows() -> None:
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(4, 128, generator=generator).to(dtype_for(4)).to(DEVICE)
    x = base[:, 32:96]  # row stride 128, columns contiguous
    w = (torch.randn(32, 64, generator=generator) / 8).to(dtype_for(4)).to(DEVICE)
    config = GemvConfig(block_n=16, block_k=32, num_warps=4, num_stages=2)
    assert rel_err(gemv(x, w, config=config), gemv_ref(x, w)) < 1e-2


@pytest.mark.parametrize(
    "x_shape,w_shape,message",
    [
        ((MAX_ROWS + 1, 64), (32, 64), "rows"),
        ((0, 64), (32, 64), "rows"),
        ((2, 63), (32, 64), "columns"),
    ],
)
def test_gemv_rejects_bad_shapes(
    x_shape: tuple[int, int], w_shape: tuple[int, int], message: str
) -> None:
    x = torch.ones(x_shape, dtype=torch.bfloat16, device=DEVICE)
    w = torch.ones(w_shape, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        gemv(x, w)


def test_gemv_rejects_mixed_dtypes() -> None:
    x = torch.ones(1, 64, dtype=torch.float16, device=DEVICE)
    w = torch.ones(32, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        gemv(x, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PDL needs a GPU")
def test_gemv_with_dependent_launch_in_a_cuda_graph() -> None:
    """With PDL the kernel may start before the kernel that writes x has finished: it must
    still read that kernel's output (x scaled in place just before, inside one graph)."""
    import engine.kernels.gemv as gemv_module

    generator = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(1, 4096, generator=generator, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, generator=generator, device="cuda", dtype=torch.bfloat16) / 64
    default = gemv_module.USE_PDL
    gemv_module.USE_PDL = True
    try:
        x.mul_(3)  # warm-up outside the capture (compiles the kernel)
        gemv(x, w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.mul_(-2)
            out = gemv(x, w)
        for _ in range(3):
            expected_x = x * -2
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(x, expected_x)
            assert rel_err(out, gemv_ref(x, w)) < 1e-2
    finally:
        gemv_module.USE_PDL = default
