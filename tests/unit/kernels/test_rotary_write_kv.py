"""The fused rotary + KV write (`kv_write.rotary_write_kv`) gives bitwise what its two launches
give: `rotary.apply_rotary_` then `kv_write.write_kv`.

q, k and v are strided views of one padded fused qkv buffer, as in `engine.llama.Attention`;
the tables come from `engine.llama.RotaryEmbedding`. Compared byte for byte, no tolerance: the
whole qkv buffer (q and k rotated in place, v and the padding untouched) and the cache (values
and, per token, scales). Caches: the k dtype itself, e4m3 with a scale per row (packed), e4m3
with given per-head scales. On CPU under TRITON_INTERPRET=1 (fp32 and bf16), small shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.attention import TorchAttention
from engine.kernels.kv_write import rotary_write_kv, rotary_write_kv_ref, write_kv
from engine.kernels.rotary import apply_rotary_
from engine.kv_quant import calibrated_scales, layer_fp8_views, packed_row_bytes, split_fp8_cache
from engine.triton_attention import TritonAttention
from tests.unit.kernels.test_rotary import rope_tables

pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
TOLERANCES = {
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
EXACT = dict(atol=0.0, rtol=0.0)
MAX_POSITIONS = 512  # positions drawn below; rope_tables' hold 2,048
PAD = 5  # extra columns per qkv row, so no row stride is a neat multiple of anything
CACHES = ["model_dtype", "fp8_per_row", "fp8_per_head"]
HEAD_SHAPES = [  # (num_heads, num_kv_heads, head_dim)
    (6, 2, 64),  # GQA, 3 q heads per kv head
    (3, 3, 32),  # MHA, kv heads not a power of two
    (4, 1, 40),  # MQA, head_dim / 2 not a power of two: masked lanes
]


def fused_qkv(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim + PAD]
    gen = torch.Generator().manual_seed(num_tokens * 1000 + num_heads * 10 + head_dim)
    width = (num_heads + 2 * num_kv_heads) * head_dim + PAD
    # a few rows of larger keys, so that FP8 scales differ from row to row
    gain = torch.rand(num_tokens, 1, generator=gen) * 4 + 0.1
    return (torch.randn(num_tokens, width, generator=gen) * gain).to(DEVICE, dtype)


def split(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [num_tokens, num_heads, head_dim], k and v [num_tokens, num_kv_heads, head_dim]:
    views of qkv, as engine.llama.Attention takes them."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(-1, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(-1, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size : q_size + 2 * kv_size].view(-1, num_kv_heads, head_dim)
    return q, k, v


def kv_cache_layer(
    kind: str,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(one layer's cache [2, blocks, block_size, kv_heads, row], kv_scales or None), filled
    with a sentinel so that every byte written shows."""
    shape = (2, num_blocks, block_size, num_kv_heads)
    if kind == "model_dtype":
        return torch.full((*shape, head_dim), 7.0, dtype=dtype, device=DEVICE), None
    if kind == "fp8_per_row":
        row = packed_row_bytes(head_dim)
        return torch.full((*shape, row), 0x11, dtype=torch.uint8, device=DEVICE), None
    gen = torch.Generator().manual_seed(head_dim)
    amax = torch.rand(2, num_kv_heads, generator=gen) * 8 + 1  # K and V, per head
    kv_scales = calibrated_scales(amax).to(DEVICE)
    return torch.full((*shape, head_dim), 0x11, dtype=torch.int8, device=DEVICE), kv_scales


def cache_views(
    layer: torch.Tensor, kv_scales: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(k_cache, v_cache, k_scale, v_scale) as the Triton backend hands them to the kernels."""
    if layer.dtype == torch.uint8:
        values, scales = split_fp8_cache(layer)
        return values[0], values[1], scales[0], scales[1]
    if layer.dtype == torch.int8:
        values, scales = layer_fp8_views(layer, kv_scales)
        return values[0], values[1], scales[0], scales[1]
    return layer[0], layer[1], None, None


def written_slots(
    after: torch.Tensor, before: torch.Tensor, kv_scales: torch.Tensor | None
) -> list[int]:
    """Flat slots whose K or V values changed in some byte (the scale bytes of a packed cache
    lie elsewhere in its block, so values only)."""
    after_kv, before_kv = cache_views(after, kv_scales)[:2], cache_views(before, kv_scales)[:2]
    changed = [
        (a.view(torch.uint8) != b.view(torch.uint8)).flatten(2).any(dim=2).reshape(-1)
        if a.element_size() == 1
        else (a != b).flatten(2).any(dim=2).reshape(-1)
        for a, b in zip(after_kv, before_kv, strict=True)
    ]
    return (changed[0] | changed[1]).nonzero().flatten().tolist()


def positions_and_slots(
    num_tokens: int, num_slots: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[1::4] = -1  # padding tokens: rotated, never written
    return positions.to(DEVICE), slots.to(DEVICE)


def run_both(
    qkv: torch.Tensor,
    layer: torch.Tensor,
    kv_scales: torch.Tensor | None,
    positions: torch.Tensor,
    slots: torch.Tensor,
    shape: tuple[int, int, int],
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((qkv, layer) after the fused launch, (qkv, layer) after the two launches), from
    copies of the inputs."""
    cos2, sin2 = rope_tables(shape[2])
    fused_qkv_, fused_layer = qkv.clone(), layer.clone()
    q, k, v = split(fused_qkv_, *shape)
    rotary_write_kv(
        q, k, v, positions, cos2, sin2, *cache_views(fused_layer, kv_scales)[:2], slots,
        *cache_views(fused_layer, kv_scales)[2:],
    )  # fmt: skip
    two_qkv, two_layer = qkv.clone(), layer.clone()
    q, k, v = split(two_qkv, *shape)
    apply_rotary_(q, k, positions, cos2, sin2)
    k_cache, v_cache, k_scale, v_scale = cache_views(two_layer, kv_scales)
    write_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    return (fused_qkv_, fused_layer), (two_qkv, two_layer)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_rotary_then_write_kv_bitwise(
    shape: tuple[int, int, int], dtype: torch.dtype, cache: str
) -> None:
    num_heads, num_kv_heads, head_dim = shape
    num_tokens, num_blocks, block_size = 7, 3, 4
    qkv = fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    layer, kv_scales = kv_cache_layer(cache, num_blocks, block_size, num_kv_heads, head_dim, dtype)
    positions, slots = positions_and_slots(num_tokens, num_blocks * block_size)

    (got_qkv, got_layer), (want_qkv, want_layer) = run_both(
        qkv, layer, kv_scales, positions, slots, shape
    )

    assert torch.equal(got_qkv, want_qkv), "q, k rotated in place; v and padding untouched"
    assert not torch.equal(got_qkv, qkv), "the rotation did something"
    assert torch.equal(got_layer, want_layer), "cache values and scales byte for byte"
    keep = slots >= 0
    assert written_slots(got_layer, layer, kv_scales) == sorted(slots[keep].tolist())


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_torch_reference(dtype: torch.dtype) -> None:
    """Against rotary_write_kv_ref: the kernel and torch both compute x * c + y * s in fp32 and
    round once to the model dtype: equal in fp32 on CPU (the interpreter's FMA is a product and
    a sum). The rounding may differ by one ulp: on CUDA the kernel's FMA rounds once where torch
    rounds the product x * c too, and the interpreter's bf16 conversion does not round as
    torch's does (tolerances of test_rotary)."""
    shape = _, num_kv_heads, head_dim = 6, 2, 64
    tol = TOLERANCES[dtype] if DEVICE == "cuda" or dtype != torch.float32 else EXACT
    qkv = fused_qkv(9, *shape, dtype)
    layer, _ = kv_cache_layer("model_dtype", 4, 4, num_kv_heads, head_dim, dtype)
    positions, slots = positions_and_slots(9, 16, seed=1)
    cos2, sin2 = rope_tables(head_dim)
    got_qkv, got_layer = qkv.clone(), layer.clone()
    want_qkv, want_layer = qkv.clone(), layer.clone()

    rotary_write_kv(*split(got_qkv, *shape), positions, cos2, sin2, *got_layer, slots)
    rotary_write_kv_ref(*split(want_qkv, *shape), positions, cos2, sin2, *want_layer, slots)

    torch.testing.assert_close(got_qkv, want_qkv, **tol)
    torch.testing.assert_close(got_layer, want_layer, **tol)


@pytest.mark.parametrize("cache", ["model_dtype", "fp8_per_head"])
def test_triton_backend_matches_the_default_two_launches(cache: str) -> None:
    """TritonAttention.rotate_and_write_kv (fused) against AttentionBackend's default, which
    TorchAttention keeps (rotary kernel, then the torch write), each through its own cache
    views. No padding slots: the torch write takes none."""
    shape = _, num_kv_heads, head_dim = 6, 2, 32
    dtype = DTYPES[-1]
    qkv = fused_qkv(5, *shape, dtype)
    layer, kv_scales = kv_cache_layer(cache, 3, 4, num_kv_heads, head_dim, dtype)
    positions, _ = positions_and_slots(5, 12, seed=2)
    slots = torch.tensor([9, 0, 4, 11, 2], device=DEVICE)
    cos2, sin2 = rope_tables(head_dim)
    got_qkv, got_layer = qkv.clone(), layer.clone()
    want_qkv, want_layer = qkv.clone(), layer.clone()

    TritonAttention().rotate_and_write_kv(
        *split(got_qkv, *shape), positions, cos2, sin2, got_layer, slots, kv_scales
    )
    TorchAttention().rotate_and_write_kv(
        *split(want_qkv, *shape), positions, cos2, sin2, want_layer, slots, kv_scales
    )

    assert torch.equal(got_qkv, want_qkv)
    assert torch.equal(got_layer, want_layer)
    assert written_slots(got_layer, layer, kv_scales) == sorted(slots.tolist())


def test_zero_tokens() -> None:
    shape = 4, 2, 32
    qkv = fused_qkv(0, *shape, DTYPES[0])
    layer, _ = kv_cache_layer("model_dtype", 2, 4, 2, 32, DTYPES[0])
    before = layer.clone()
    cos2, sin2 = rope_tables(32)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    rotary_write_kv(*split(qkv, *shape), empty, cos2, sin2, *layer, empty)
    assert torch.equal(layer, before)


BAD_CASES = [
    "q_dtype",  # q and k dtypes differ (rotary's check)
    "positions_len",
    "table_width",
    "q_head_dim",
    "slots_shape",  # write_kv's checks
    "cache_heads",
    "block_size",
    "fp8_without_scales",  # launch.check_kv_scales
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_rejects_bad_inputs(case: str) -> None:
    shape = 4, 2, 32
    qkv = fused_qkv(3, *shape, DTYPES[0])
    q, k, v = split(qkv, *shape)
    layer, _ = kv_cache_layer("model_dtype", 2, 4, 2, 32, DTYPES[0])
    cos2, sin2 = rope_tables(32)
    positions, slots = positions_and_slots(3, 8)
    k_cache, v_cache = layer[0], layer[1]
    if case == "q_dtype":
        q = q.to(torch.float64)
    elif case == "positions_len":
        positions = positions[:2]
    elif case == "table_width":
        cos2, sin2 = rope_tables(64)
    elif case == "q_head_dim":
        q = q[..., :16]
    elif case == "slots_shape":
        slots = slots[:2]
    elif case == "cache_heads":
        k_cache, v_cache = k_cache[:, :, :1], v_cache[:, :, :1]
    elif case == "block_size":
        k_cache, v_cache = k_cache[:, :3], v_cache[:, :3]
    elif case == "fp8_without_scales":
        fp8, _ = kv_cache_layer("fp8_per_row", 2, 4, 2, 32, DTYPES[0])
        k_cache, v_cache = cache_views(fp8, None)[:2]
    before = qkv.clone()
    with pytest.raises(ValueError):
        rotary_write_kv(q, k, v, positions, cos2, sin2, k_cache, v_cache, slots)
    assert torch.equal(qkv, before), "nothing rotated before the check failed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("shape", [(32, 8, 128), (4, 1, 128)], ids=["llama3_8b", "one_kv_head"])
def test_llama_shapes_on_gpu(cache: str, shape: tuple[int, int, int]) -> None:
    """Llama-3-8B's heads, and one KV head a rank (Llama-3-8B at TP=8, MQA: a k element and
    its rotary partner in different warps, the layout a review found racing before the
    kernel's barrier), a CUDA-graph-padded batch of decodes and a prefill chunk: the compiled
    kernel against the two compiled launches, byte for byte."""
    num_kv_heads = shape[1]
    qkv = fused_qkv(300, *shape, torch.bfloat16)
    layer, kv_scales = kv_cache_layer(cache, 64, 16, num_kv_heads, 128, torch.bfloat16)
    positions, slots = positions_and_slots(300, 64 * 16, seed=3)

    (got_qkv, got_layer), (want_qkv, want_layer) = run_both(
        qkv, layer, kv_scales, positions, slots, shape
    )

    assert torch.equal(got_qkv, want_qkv)
    assert torch.equal(got_layer, want_layer)
