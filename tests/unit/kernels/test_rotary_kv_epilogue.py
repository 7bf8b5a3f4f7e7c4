"""The rotary + KV write epilogue of the single-row QKV GEMVs (engine.kernels.rotary_kv_epilogue)
gives bitwise what the GEMV followed by `kv_write.rotary_write_kv` gives: the projection's output
(q and k rotated, v as projected) and the cache, byte for byte, for the bf16/fp32 GEMV and the FP8
GEMV, float caches and e4m3 caches with per-head scales. A padding slot writes no cache; what
does not fit the epilogue is refused with a ValueError naming it. On CPU under
TRITON_INTERPRET=1, small shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.fp8_gemv import Fp8GemvConfig, fp8_gemv
from engine.kernels.gemv import GemvConfig, gemv, gemv_ref
from engine.kernels.kv_write import rotary_write_kv
from engine.kernels.rotary_kv_epilogue import RotaryKvWrite
from engine.quantization import quantize_per_token, quantize_weight
from tests.unit.kernels.test_rotary import rope_tables
from tests.unit.kernels.test_rotary_write_kv import (
    DEVICE,
    cache_views,
    kv_cache_layer,
    split,
    written_slots,
)

pytestmark = pytest.mark.slow

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# bf16 on CPU too: there the rounding of the projection before the rotation is not a no-op
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
# against the torch reference: the GEMV sums in another order than one fp32 product
REF_TOLERANCE = dict(atol=2e-2, rtol=2e-2) if DEVICE == "cuda" else dict(atol=1e-5, rtol=1e-5)
HEAD_SHAPES = [  # (num_heads, num_kv_heads, head_dim)
    (6, 2, 32),  # GQA
    (4, 1, 40),  # MQA, head_dim / 2 = 20: pairs of programs not a power of two
]
NUM_BLOCKS, BLOCK_SIZE = 3, 4
HIDDEN = 48


def operands(shape: tuple[int, int, int], dtype: torch.dtype, seed: int = 0):
    num_heads, num_kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    n = (num_heads + 2 * num_kv_heads) * head_dim
    x = torch.randn(1, HIDDEN, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, HIDDEN, generator=gen) / HIDDEN**0.5).to(DEVICE, dtype)
    return x, w


def target(
    shape: tuple[int, int, int],
    layer: torch.Tensor,
    kv_scales: torch.Tensor | None,
    position: int,
    slot: int,
) -> RotaryKvWrite:
    cos2, sin2 = rope_tables(shape[2])
    k_cache, v_cache, k_scale, v_scale = cache_views(layer, kv_scales)
    return RotaryKvWrite(
        *shape,
        positions=torch.tensor([position], device=DEVICE),
        cos2=cos2,
        sin2=sin2,
        k_cache=k_cache,
        v_cache=v_cache,
        slot_mapping=torch.tensor([slot], device=DEVICE),
        k_scale=k_scale,
        v_scale=v_scale,
    )


def two_launches(out: torch.Tensor, t: RotaryKvWrite) -> None:
    """What the engine ran before the epilogue: rotary_write_kv on views of the output."""
    q, k, v = split(out, t.num_heads, t.num_kv_heads, t.head_dim)
    rotary_write_kv(
        q, k, v, t.positions, t.cos2, t.sin2, t.k_cache, t.v_cache, t.slot_mapping, t.k_scale,
        t.v_scale,
    )  # fmt: skip


def project(kind: str, x: torch.Tensor, w: torch.Tensor, rotary_kv: RotaryKvWrite | None):
    if kind == "gemv":
        return gemv(x, w, rotary_kv=rotary_kv)
    xq, x_scale = quantize_per_token(x)
    wq, w_scale = quantize_weight(w)
    return fp8_gemv(xq, x_scale, wq, w_scale, out_dtype=x.dtype, rotary_kv=rotary_kv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["gemv", "fp8_gemv"])
@pytest.mark.parametrize("cache", ["model_dtype", "fp8_per_head"])
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_gemv_then_rotary_write_kv_bitwise(
    kind: str, cache: str, shape: tuple[int, int, int], dtype: torch.dtype
) -> None:
    x, w = operands(shape, dtype)
    layer, kv_scales = kv_cache_layer(cache, NUM_BLOCKS, BLOCK_SIZE, shape[1], shape[2], dtype)
    fused_layer, two_layer = layer.clone(), layer.clone()
    slot = 6

    got = project(kind, x, w, target(shape, fused_layer, kv_scales, 37, slot))
    want = project(kind, x, w, None)
    unrotated = want.clone()
    two_launches(want, target(shape, two_layer, kv_scales, 37, slot))

    assert torch.equal(got, want), "q and k rotated, v as projected, bit for bit"
    assert not torch.equal(got, unrotated), "the rotation did something"
    assert torch.equal(fused_layer, two_layer), "the cache byte for byte"
    assert written_slots(fused_layer, layer, kv_scales) == [slot]


def test_a_padding_slot_rotates_but_writes_no_cache() -> None:
    shape = (6, 2, 32)
    x, w = operands(shape, DTYPE, seed=1)
    layer, _ = kv_cache_layer("model_dtype", NUM_BLOCKS, BLOCK_SIZE, 2, 32, DTYPE)
    before = layer.clone()

    got = gemv(x, w, rotary_kv=target(shape, layer, None, 5, -1))

    want = gemv(x, w)
    two_launches(want, target(shape, before.clone(), None, 5, -1))
    assert torch.equal(got, want)
    assert torch.equal(layer, before), "slot -1 is padding: no cache write"


def test_agrees_with_the_torch_reference() -> None:
    """gemv_ref's product (one fp32 sum, rounded once) through RotaryKvWrite.apply_ref: the
    same up to the GEMV's order of fp32 sums."""
    shape = (6, 2, 32)
    x, w = operands(shape, DTYPE, seed=2)
    got_layer, _ = kv_cache_layer("model_dtype", NUM_BLOCKS, BLOCK_SIZE, 2, 32, DTYPE)
    want_layer = got_layer.clone()

    got = gemv(x, w, rotary_kv=target(shape, got_layer, None, 100, 3))
    want = gemv_ref(x, w)
    target(shape, want_layer, None, 100, 3).apply_ref(want)

    torch.testing.assert_close(got, want, **REF_TOLERANCE)
    torch.testing.assert_close(got_layer, want_layer, **REF_TOLERANCE)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("two_rows", "one row"),
        ("wrong_heads", "need"),
        ("per_token_scales", "per-head-scale caches only"),
        ("odd_block", "must be even"),
        ("bad_positions", "positions must be"),
    ],
)
def test_refuses_what_the_epilogue_cannot_do(case: str, message: str) -> None:
    shape = (6, 2, 32)
    x, w = operands(shape, DTYPE)
    cache = "fp8_per_row" if case == "per_token_scales" else "model_dtype"
    layer, kv_scales = kv_cache_layer(cache, NUM_BLOCKS, BLOCK_SIZE, 2, 32, DTYPE)
    t = target(shape, layer, kv_scales, 1, 0)
    config = None
    if case == "two_rows":
        x = x.expand(2, -1).contiguous()
    elif case == "wrong_heads":
        t = target((5, 2, 32), layer, kv_scales, 1, 0)
    elif case == "odd_block":
        config = GemvConfig(block_n=3, block_k=16, num_warps=1, num_stages=1)
    elif case == "bad_positions":
        t = RotaryKvWrite(**{**_fields(t), "positions": torch.zeros(2, device=DEVICE).long()})

    with pytest.raises(ValueError, match=message):
        gemv(x, w, config=config, rotary_kv=t)


def test_fp8_gemv_refuses_a_tile_that_splits_pairs() -> None:
    shape = (6, 2, 32)
    x, w = operands(shape, DTYPE)
    layer, _ = kv_cache_layer("model_dtype", NUM_BLOCKS, BLOCK_SIZE, 2, 32, DTYPE)
    xq, x_scale = quantize_per_token(x)
    wq, w_scale = quantize_weight(w)
    config = Fp8GemvConfig(block_n=64, block_k=16, num_warps=1, num_stages=1)  # 32 pairs > 16

    with pytest.raises(ValueError, match="divide"):
        fp8_gemv(xq, x_scale, wq, w_scale, x.dtype, config, target(shape, layer, None, 1, 0))


def _fields(t: RotaryKvWrite) -> dict:
    return {name: getattr(t, name) for name in RotaryKvWrite.__slots__}
