"""FP8 KV cache kernels: the KV write quantizes like `kv_quant`, and the decode and prefill
attention kernels reading a packed e4m3 cache match their torch references.

The cache is the packed layout of `engine.kv_quant` (uint8 rows: e4m3 values, then an fp32
scale), handed to the kernels as its e4m3 and scale views, as the Triton backend does. On CPU
the kernels run under TRITON_INTERPRET=1 with small, odd shapes. Kernel vs reference (both
reading the same quantized cache) must agree to the float tolerances of the bf16/fp32 kernels;
against attention over the unquantized values, FP8 costs at most a few percent.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from engine.kernels.kv_write import write_kv, write_kv_ref
from engine.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from engine.kv_quant import (
    dequantize_rows,
    pack_blocks,
    packed_row_bytes,
    split_fp8_cache,
    write_kv_fp8_ref,
)

pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Q_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = dict(atol=2e-2, rtol=2e-2) if DEVICE == "cuda" else dict(atol=1e-4, rtol=1e-4)


def packed_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 cache [2, blocks, block_size, kv_heads, head_dim + 4], the fp32 values it
    was quantized from). Rows of very different magnitudes, as real keys have."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    values = torch.randn(shape, generator=gen) * (
        torch.rand((*shape[:-1], 1), generator=gen) * 2 + 0.1
    )
    return pack_blocks(values).to(DEVICE), values.to(DEVICE)


def views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    values, scales = split_fp8_cache(cache)
    return values[0], values[1], scales[0], scales[1]


def assert_same_bytes(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same scales and same e4m3 values (the kernel rounds to nearest even, as torch does)."""
    assert torch.equal(split_fp8_cache(got)[1], split_fp8_cache(want)[1])
    assert torch.equal(dequantize_rows(got), dequantize_rows(want))


@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(3, 64), (2, 20)])
def test_kv_write_quantizes_like_the_reference(num_kv_heads: int, head_dim: int) -> None:
    num_blocks, block_size, num_tokens = 5, 4, 11
    gen = torch.Generator().manual_seed(1)
    k = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 5).to(DEVICE, Q_DTYPE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE, Q_DTYPE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # a padding token: skipped
    slots = slots.to(DEVICE)
    row = packed_row_bytes(head_dim)
    got = torch.zeros(
        2, num_blocks, block_size, num_kv_heads, row, dtype=torch.uint8, device=DEVICE
    )
    want = got.clone()
    write_kv(k, v, *views(got)[:2], slots, *views(got)[2:])
    write_kv_ref(k, v, *views(want)[:2], slots, *views(want)[2:])
    assert_same_bytes(got, want)
    # and like the engine's torch backend, which packs whole rows
    keep = slots >= 0
    engine_ref = torch.zeros_like(got)
    write_kv_fp8_ref(engine_ref, k[keep], v[keep], slots[keep])
    assert_same_bytes(got, engine_ref)
    # the dequantized rows are the inputs within e4m3 precision (3 mantissa bits)
    flat = dequantize_rows(got)[0].reshape(-1, num_kv_heads, head_dim)[slots[keep]]
    assert ((flat - k[keep].float()).abs() <= k[keep].float().abs() * 2**-4 + 0.02).all()


@pytest.mark.parametrize(
    ("context_lens", "num_heads", "num_kv_heads", "head_dim", "block_size"),
    [([1, 37, 130], 6, 2, 64, 16), ([200, 5], 4, 1, 32, 8)],
)
def test_decode_attention_reads_fp8(
    context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    gen = torch.Generator().manual_seed(2)
    blocks = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks) + 2
    cache, exact = packed_cache(num_blocks, block_size, num_kv_heads, head_dim)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(context_lens), max(blocks), dtype=torch.int32)
    for s, n in enumerate(blocks):
        tables[s, :n] = torch.tensor([ids.pop() for _ in range(n)])
    tables, lens = tables.to(DEVICE), torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(DEVICE, Q_DTYPE)
    scale = head_dim**-0.5
    k, v, ks, vs = views(cache)
    got = paged_decode_attention(q, k, v, tables, lens, scale, k_scale=ks, v_scale=vs)
    want = paged_decode_attention_ref(q.float(), k, v, tables, lens, scale, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got.float(), want, **TOL)
    unquantized = paged_decode_attention_ref(q.float(), exact[0], exact[1], tables, lens, scale)
    assert (want - unquantized).norm() / unquantized.norm() < 0.05


@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_attention_reads_fp8(block_size: int) -> None:
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    chunks = [(7, 7), (5, 23), (1, 9)]  # (query_len, context_len): fresh, cached prefix, one
    gen = torch.Generator().manual_seed(3)
    blocks = [-(-c // block_size) for _, c in chunks]
    num_blocks = sum(blocks) + 1
    cache, exact = packed_cache(num_blocks, block_size, num_kv_heads, head_dim, seed=4)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(chunks), max(blocks), dtype=torch.int32)
    for s, n in enumerate(blocks):
        tables[s, :n] = torch.tensor([ids.pop() for _ in range(n)])
    starts = torch.tensor([0, 7, 12, 13], dtype=torch.int32)
    lens = torch.tensor([c for _, c in chunks], dtype=torch.int32)
    tables, starts, lens = tables.to(DEVICE), starts.to(DEVICE), lens.to(DEVICE)
    q = torch.randn(13, num_heads, head_dim, generator=gen).to(DEVICE, Q_DTYPE)
    scale = head_dim**-0.5
    k, v, ks, vs = views(cache)
    args = (tables, starts, lens, scale, 7)
    got = paged_prefill_attention(q, k, v, *args, k_scale=ks, v_scale=vs)
    want = paged_prefill_attention_ref(q.float(), k, v, *args, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got.float(), want, **TOL)
    unquantized = paged_prefill_attention_ref(q.float(), exact[0], exact[1], *args)
    assert (want - unquantized).norm() / unquantized.norm() < 0.05


def test_scales_are_required_with_an_fp8_cache_and_refused_without() -> None:
    cache, _ = packed_cache(3, 4, 2, 16)
    k, v, ks, vs = views(cache)
    q = torch.randn(1, 2, 16, device=DEVICE, dtype=Q_DTYPE)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="k_scale and v_scale are required"):
        paged_decode_attention(q, k, v, tables, lens, 0.25)
    dense = torch.zeros(3, 4, 2, 16, device=DEVICE, dtype=Q_DTYPE)
    with pytest.raises(ValueError, match="k_scale and v_scale are required"):
        paged_decode_attention(q, dense, dense, tables, lens, 0.25, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="v_scale must be fp32"):
        paged_decode_attention(q, k, v, tables, lens, 0.25, k_scale=ks, v_scale=vs[:2])


def test_kernels_refuse_e4m3_rows_that_are_not_4_byte_aligned() -> None:
    """The kernels load e4m3 rows at least 4 bytes at a time: a cache whose rows are not
    4-byte aligned is refused by name, not read wrongly."""
    num_blocks, block_size, num_kv_heads, head_dim = 2, 4, 1, 8
    shape = (num_blocks, block_size, num_kv_heads, head_dim + 2)
    storage = torch.zeros(shape, dtype=torch.uint8, device=DEVICE)
    cache = storage[..., :head_dim].view(torch.float8_e4m3fn)  # rows 10 bytes apart
    scales = torch.ones(num_blocks, block_size, num_kv_heads, device=DEVICE)
    k = torch.randn(3, num_kv_heads, head_dim).to(DEVICE, Q_DTYPE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="4-byte aligned rows"):
        write_kv(k, k, cache, cache, slots, scales, scales)
