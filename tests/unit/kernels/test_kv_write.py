"""The KV write kernel matches `write_kv_ref` and the torch backend's `engine.attention.write_kv`.

A write is a copy (plus a cast to the cache's dtype, rounded to nearest even by both), so the
caches must be bitwise equal: no tolerance. On CPU the kernel runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.attention import write_kv as write_kv_torch_backend
from engine.kernels.kv_write import write_kv, write_kv_ref

pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype of the new k/v, dtype of the cache); the interpreter also handles fp32 -> fp16.
DTYPE_PAIRS = (
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
    ]
    if DEVICE == "cuda"
    else [(torch.float32, torch.float32), (torch.float32, torch.float16)]
)


def random_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    gen = torch.Generator().manual_seed(num_blocks * 31 + head_dim)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def random_tokens(
    num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:  # k, v: [num_tokens, num_kv_heads, head_dim]
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    return k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def distinct_slots(num_tokens: int, num_slots: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_slots, generator=gen)[:num_tokens].to(DEVICE)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS)
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(1, 64), (3, 128), (8, 64), (2, 80)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_matches_reference(
    block_size: int, num_kv_heads: int, head_dim: int, dtypes: tuple[torch.dtype, torch.dtype]
) -> None:
    new_dtype, cache_dtype = dtypes
    layer = random_cache(5, block_size, num_kv_heads, head_dim, cache_dtype)
    expected = layer.clone()
    k, v = random_tokens(7, num_kv_heads, head_dim, new_dtype)
    slots = distinct_slots(7, 5 * block_size)

    write_kv(k, v, layer[0], layer[1], slots)
    write_kv_ref(k, v, expected[0], expected[1], slots)

    assert torch.equal(layer, expected)
    flat = layer.view(2, -1, num_kv_heads, head_dim)
    assert torch.equal(flat[0, slots], k.to(cache_dtype)), "keys must land at their slots"


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_padding_slots_are_skipped(slot_dtype: torch.dtype) -> None:
    layer = random_cache(4, 16, 2, 64, torch.float32)
    before = layer.clone()
    k, v = random_tokens(6, 2, 64, torch.float32, seed=1)
    slots = torch.tensor([-1, 17, -1, 0, 63, -5], dtype=slot_dtype, device=DEVICE)

    write_kv(k, v, layer[0], layer[1], slots)

    write_kv_ref(k, v, before[0], before[1], slots)
    assert torch.equal(layer, before)


def test_out_of_range_slot_is_skipped() -> None:
    layer = random_cache(2, 8, 1, 64, torch.float32)
    before = layer.clone()
    k, v = random_tokens(2, 1, 64, torch.float32, seed=2)
    slots = torch.tensor([16, 3], device=DEVICE)  # 16 == num_slots: a caller bug

    write_kv(k, v, layer[0], layer[1], slots)

    before[0, 0, 3], before[1, 0, 3] = k[1], v[1]
    assert torch.equal(layer, before), "only the in-range token may be written"


def test_agrees_with_torch_backend_write_kv() -> None:
    layer = random_cache(6, 16, 4, 64, torch.float32)
    expected = layer.clone()
    k, v = random_tokens(9, 4, 64, torch.float32, seed=3)
    slots = distinct_slots(9, 6 * 16, seed=3)

    write_kv(k, v, layer[0], layer[1], slots)
    write_kv_torch_backend(expected, k, v, slots)

    assert torch.equal(layer, expected)


def test_strided_inputs() -> None:
    # k and v as slices of one fused projection output [num_tokens, 2 * num_kv_heads, head_dim].
    layer = random_cache(3, 8, 2, 64, torch.float32)
    expected = layer.clone()
    kv, _ = random_tokens(5, 4, 64, torch.float32, seed=4)
    k, v = kv[:, :2], kv[:, 2:]
    slots = distinct_slots(5, 24, seed=4)

    write_kv(k, v, layer[0], layer[1], slots)
    write_kv_ref(k, v, expected[0], expected[1], slots)

    assert torch.equal(layer, expected)


def test_zero_tokens() -> None:
    layer = random_cache(2, 8, 1, 64, torch.float32)
    before = layer.clone()
    k, v = random_tokens(0, 1, 64, torch.float32)
    write_kv(k, v, layer[0], layer[1], torch.empty(0, dtype=torch.long, device=DEVICE))
    assert torch.equal(layer, before)


@pytest.mark.parametrize("case", ["k_rank", "heads", "slots_shape", "slots_dtype", "block_size"])
def test_rejects_bad_inputs(case: str) -> None:
    layer = random_cache(2, 8, 2, 64, torch.float32)
    k, v = random_tokens(3, 2, 64, torch.float32)
    slots = torch.arange(3, device=DEVICE)
    k_cache, v_cache = layer[0], layer[1]
    if case == "k_rank":
        k = k[0]
    elif case == "heads":
        k, v = k[:, :1], v[:, :1]
    elif case == "slots_shape":
        slots = slots[:2]
    elif case == "slots_dtype":
        slots = slots.float()
    elif case == "block_size":
        k_cache, v_cache = k_cache[:, :6], v_cache[:, :6]
    with pytest.raises(ValueError):
        write_kv(k, v, k_cache, v_cache, slots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_llama_shapes_on_gpu() -> None:
    layer = random_cache(512, 16, 8, 128, torch.bfloat16)
    expected = layer.clone()
    k, v = random_tokens(300, 8, 128, torch.bfloat16, seed=5)
    slots = distinct_slots(300, 512 * 16, seed=5)
    slots[::7] = -1  # CUDA-graph padding

    write_kv(k, v, layer[0], layer[1], slots)
    write_kv_ref(k, v, expected[0], expected[1], slots)

    assert torch.equal(layer, expected)
