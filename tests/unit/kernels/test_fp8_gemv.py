"""The FP8 (e4m3, W8A8) skinny-product kernel against its torch reference and against the
fp32 product of the dequantized operands; on a GPU also against Fp8Linear's `torch._scaled_mm`
path, which it replaces for single rows. Its quantizing mode (x not yet quantized, with partial
amaxes) bitwise against the quantization kernel then the GEMV. Small shapes
(TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.fp8_gemv import (
    MAX_ROWS,
    Fp8GemvConfig,
    default_config,
    fp8_gemv,
    fp8_gemv_quantizing,
    fp8_gemv_quantizing_ref,
    fp8_gemv_ref,
)
from engine.kernels.fp8_quant import quantize_per_token_fused
from engine.quantization import FP8_DTYPE, quantize_per_token, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def operands(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m)[:, None]
    w = torch.randn(n, k, generator=gen) / k**0.5 * torch.logspace(-1, 1, n)[:, None]
    xq, xs = quantize_per_token(x)
    wq, ws = quantize_weight(w)
    return tuple(t.to(DEVICE) for t in (xq, xs, wq, ws))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


SMALL = Fp8GemvConfig(block_n=4, block_k=32, num_warps=4, num_stages=2)


@pytest.mark.parametrize("m", [1, 3, MAX_ROWS])
@pytest.mark.parametrize(("n", "k"), [(16, 64), (10, 80)])  # 10 rows, 80 cols: ragged tiles
def test_matches_the_reference(m: int, n: int, k: int) -> None:
    xq, xs, wq, ws = operands(m, n, k, seed=100 * m + n + k)
    out = fp8_gemv(xq, xs, wq, ws, out_dtype=torch.float32, config=SMALL)
    ref = fp8_gemv_ref(xq, xs, wq, ws, out_dtype=torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # the products are exact in fp32; only the order of the sums differs
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and the reference is the product of the dequantized operands, scales applied per row of
    # x and per row of w (a scale swapped or dropped would be far off: they span 100x)
    dequantized = (xq.float() * xs) @ (wq.float() * ws[:, None]).t()
    torch.testing.assert_close(ref, dequantized, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [1, 2])
def test_default_tiles_on_a_ragged_shape_in_bf16(m: int) -> None:
    """The engine's tiles (block_k 2,048 / 512) over a K and N they do not divide; bf16 out."""
    xq, xs, wq, ws = operands(m, 37, 2100, seed=7 + m)
    assert 2100 % default_config(m, 37, 2100).block_k != 0
    out = fp8_gemv(xq, xs, wq, ws)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, fp8_gemv_ref(xq, xs, wq, ws, out_dtype=torch.float32)) < 4e-3


def test_a_strided_row_of_x() -> None:
    xq, xs, wq, ws = operands(2, 16, 64, seed=3)
    wide = torch.zeros(2, 96, dtype=FP8_DTYPE, device=DEVICE)
    wide[:, :64] = xq
    view = wide[:, :64]  # row stride 96
    out = fp8_gemv(view, xs, wq, ws, out_dtype=torch.float32, config=SMALL)
    torch.testing.assert_close(out, fp8_gemv_ref(xq, xs, wq, ws, torch.float32), atol=1e-5,
                               rtol=1e-5)  # fmt: skip


def test_bad_inputs_are_refused_with_the_problem_named() -> None:
    xq, xs, wq, ws = operands(1, 16, 64, seed=5)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemv(xq.float(), xs, wq, ws)
    with pytest.raises(ValueError, match="columns"):
        fp8_gemv(xq[:, :32], xs, wq, ws)
    with pytest.raises(ValueError, match="rows"):
        many = torch.zeros(MAX_ROWS + 1, 64, dtype=FP8_DTYPE, device=DEVICE)
        fp8_gemv(many, torch.ones(MAX_ROWS + 1, 1, device=DEVICE), wq, ws)
    with pytest.raises(ValueError, match="w_scale"):
        fp8_gemv(xq, xs, wq, ws[:8])
    with pytest.raises(ValueError, match="x_scale"):
        fp8_gemv(xq, xs.double(), wq, ws)
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemv(xq, xs, wq, ws, out_dtype=torch.int32)


def partial_amaxes(x: torch.Tensor, parts: int) -> torch.Tensor:
    """[M, parts] fp32: max |x| over `parts` column blocks of each row (the last ones may be
    empty: 0), as a producing kernel writes them."""
    blocks = torch.zeros(x.shape[0], parts, dtype=torch.float32, device=x.device)
    for i, chunk in enumerate(x.float().abs().tensor_split(parts, dim=1)):
        if chunk.shape[1]:
            blocks[:, i] = chunk.amax(dim=1)
    return blocks


def unquantized(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]
    x[0, :3] = torch.tensor([1e-9, -3e-6, 0.0])  # e4m3 subnormals and zeros after scaling
    return x.to(DEVICE, dtype)


def quantize_then_gemv(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    xq, xs = quantize_per_token_fused(x)
    return fp8_gemv(xq, xs, *args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize(("n", "k", "parts"), [(16, 64, 1), (10, 80, 3), (37, 2100, 14)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_mode_is_bitwise_quantize_then_gemv(
    m: int, n: int, k: int, parts: int, dtype: torch.dtype
) -> None:
    """x not yet quantized, with its amax in parts: bitwise the quantization kernel followed
    by the GEMV, over SMALL tiles and the engine's (ragged K and N both)."""
    x = unquantized(m, k, dtype, seed=m + n + k)
    _, _, wq, ws = operands(1, n, k, seed=n + k)
    amax = partial_amaxes(x, parts)
    for config in (SMALL, None):
        got = fp8_gemv_quantizing(x, amax, wq, ws, out_dtype=dtype, config=config)
        want = quantize_then_gemv(x, wq, ws, out_dtype=dtype, config=config)
        assert got.dtype == dtype and got.shape == (m, n)
        assert torch.equal(got, want)
    ref = fp8_gemv_quantizing_ref(x, amax, wq, ws, out_dtype=torch.float32)
    torch.testing.assert_close(got.float(), ref, atol=1e-2, rtol=1e-2)  # dtype rounding


def test_quantizing_mode_takes_the_scale_from_the_amaxes() -> None:
    """The scale is the amaxes' max / 448, whatever x holds: amaxes three times x's own give
    the reference's output for those amaxes, not x's (a power of two would give the same
    e4m3 products, rescaled)."""
    x = unquantized(2, 64, torch.float32, seed=9)
    _, _, wq, ws = operands(1, 16, 64, seed=10)
    amax = 3 * partial_amaxes(x, 2)
    got = fp8_gemv_quantizing(x, amax, wq, ws, out_dtype=torch.float32, config=SMALL)
    ref = fp8_gemv_quantizing_ref(x, amax, wq, ws, out_dtype=torch.float32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    own = quantize_then_gemv(x, wq, ws, out_dtype=torch.float32, config=SMALL)
    assert not torch.equal(got, own)


def test_quantizing_mode_refuses_bad_inputs_with_the_problem_named() -> None:
    x = unquantized(2, 64, torch.float32, seed=11)
    _, _, wq, ws = operands(1, 16, 64, seed=12)
    amax = partial_amaxes(x, 2)
    with pytest.raises(ValueError, match="x_amax must be \\[M, P\\]"):
        fp8_gemv_quantizing(x, amax[:1], wq, ws)
    with pytest.raises(ValueError, match="x_amax must be \\[M, P\\]"):
        fp8_gemv_quantizing(x, amax[:, 0], wq, ws)
    with pytest.raises(ValueError, match="x_amax must be fp32"):
        fp8_gemv_quantizing(x, amax.double(), wq, ws)
    with pytest.raises(ValueError, match="not yet quantized"):
        fp8_gemv_quantizing(x.to(FP8_DTYPE), amax, wq, ws)
    with pytest.raises(ValueError, match="columns"):
        fp8_gemv_quantizing(x[:, :32], amax, wq, ws)
    with pytest.raises(ValueError, match="rows"):
        many = torch.zeros(MAX_ROWS + 1, 64, device=DEVICE)
        fp8_gemv_quantizing(many, torch.ones(MAX_ROWS + 1, 1, device=DEVICE), wq, ws)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 2, MAX_ROWS])
def test_quantizing_mode_is_bitwise_at_llama_3_8b_shapes_on_a_gpu(m: int, n: int, k: int) -> None:
    """The engine's shapes and tiles, compiled: bitwise quantize_per_token_fused + fp8_gemv,
    with the amaxes in the parts the engine's producers write (SiLU-and-mul: 14 of 1,024
    columns; decode attention: one per head of 128)."""
    torch.manual_seed(n + k + m)
    x = (torch.randn(m, k, device="cuda") * 3).to(torch.bfloat16)
    # row 0 with amax 448 (scale 1): ties between e4m3 neighbours, normal and subnormal, and
    # values that round up into the next binade; round to nearest even must match
    ties = [448.0, 1.0625, 1.1875, -1.0625, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-10, 15.5, 0.0]
    x[0, : len(ties)] = torch.tensor(ties, device="cuda", dtype=torch.bfloat16)
    x[0, len(ties) :].clamp_(-400, 400)
    wq, ws = quantize_weight(torch.randn(n, k, device="cuda") / k**0.5)
    amax = partial_amaxes(x, -(-k // 1024) if k == 14336 else k // 128)
    got = fp8_gemv_quantizing(x, amax, wq, ws)
    assert torch.equal(got, quantize_then_gemv(x, wq, ws))


@pytest.mark.skipif(DEVICE != "cuda", reason="torch._scaled_mm needs CUDA")
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336), (512, 256)])
def test_close_to_the_scaled_mm_path_on_a_gpu(n: int, k: int) -> None:
    """What the engine swaps: Fp8Linear with use_gemv against the same layer without it, for
    one bf16 row; same quantized x, so they differ by summation order and bf16 rounding."""
    from engine.quantization import Fp8Linear

    torch.manual_seed(0)
    layer = Fp8Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    wq, ws = quantize_weight(torch.randn(n, k, device="cuda") / k**0.5)
    with torch.no_grad():
        layer.weight.copy_(wq)
        layer.weight_scale.copy_(ws)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    scaled_mm = layer(x).float()
    layer.use_gemv = True
    gemv = layer(x).float()
    assert rel_err(gemv, scaled_mm) < 4e-3  # bf16 rounding of each output: ~2e-3 at most
    xq, xs = quantize_per_token(x)
    exact = (xq.float() @ wq.float().t()) * xs * ws
    assert rel_err(gemv, exact) < 4e-3
