"""FP8 KV cache kernels: the KV write quantizes like `kv_quant`, and the decode and prefill
attention kernels reading an e4m3 cache match their torch references, for both layouts of
`engine.kv_quant`.

The packed cache (per-token scales; uint8 rows: e4m3 values, then an fp32 scale) is handed to
the kernels as its e4m3 and scale views, as the Triton backend does; the per-head cache (int8
storage of e4m3 values) as its e4m3 view and its [2, kv_heads] scales broadcast over blocks and
slots (strides 0), which the KV write reads instead of computing and storing a scale per row. On CPU
the kernels run under TRITON_INTERPRET=1 with small, odd shapes. Kernel vs reference (both
reading the same quantized cache) must agree to the float tolerances of the bf16/fp32 kernels;
against attention over the unquantized values, FP8 costs at most a few percent.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.attention import AttentionMetadata, PrefillChunk, decode_mask, paged_attention_ref
from engine.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from engine.kernels.kv_write import given_scales, write_kv, write_kv_ref
from engine.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from engine.kv_quant import (
    calibrated_scales,
    dequantize_rows,
    layer_fp8_views,
    pack_blocks,
    packed_row_bytes,
    quantize_with_scales,
    split_fp8_cache,
    write_kv_fp8_ref,
)
from engine.triton_attention import TritonAttention

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


# ---- per-head scales (kv_cache_scales="per_head"): int8 storage of e4m3 values only, and one
# fp32 scale per (K|V, kv head) that the kernels read through broadcast views (strides 0)


def per_head_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 cache [2, blocks, block_size, kv_heads, head_dim], its scales [2, kv_heads] fp32,
    the fp32 values it was quantized from). Heads of different magnitudes, scales as
    calibration makes them (powers of two, 2-4x headroom over each head's amax)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    head_gain = torch.rand(2, 1, 1, num_kv_heads, 1, generator=gen) * 2 + 0.1
    values = torch.randn(shape, generator=gen) * head_gain
    kv_scales = calibrated_scales(values.abs().amax(dim=(1, 2, 4)))  # [2, kv_heads]
    cache = torch.stack([quantize_with_scales(values[i], kv_scales[i]) for i in range(2)])
    return cache.view(torch.int8).to(DEVICE), kv_scales.to(DEVICE), values.to(DEVICE)


@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(3, 64), (2, 20)])
def test_kv_write_with_per_head_scales_matches_the_reference_bitwise(
    num_kv_heads: int, head_dim: int
) -> None:
    """The kernel reads each head's scale (never writes it), quantizes like `write_kv_ref`
    and the engine's torch write byte for byte, skips padding tokens and leaves every other
    slot alone; a value beyond 448 * scale saturates to +-448."""
    num_blocks, block_size, num_tokens = 5, 4, 11
    gen = torch.Generator().manual_seed(5)
    k = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 2).to(DEVICE, Q_DTYPE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE, Q_DTYPE)
    # powers of two, as calibration makes them: K's heads hold |k| <= 28, 56, 28; V's 14, 28, 14
    kv_scales = torch.tensor([[2.0**-4, 2.0**-3, 2.0**-4], [2.0**-5, 2.0**-4, 2.0**-5]])
    kv_scales = kv_scales[:, :num_kv_heads].contiguous().to(DEVICE)
    k[0, 0, :3] = torch.tensor([1e4, -1e4, 448 * 2.0**-4 * 1.5])  # beyond head 0's range
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # a padding token: skipped
    slots = slots.to(DEVICE)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    sentinel = 0x11  # in every byte before the write
    got = torch.full(shape, sentinel, dtype=torch.int8, device=DEVICE)
    want, engine_ref = got.clone(), got.clone()
    before = kv_scales.clone()
    values, scales = layer_fp8_views(got, kv_scales)
    assert given_scales(scales[0], scales[1])
    assert not given_scales(*split_fp8_cache(packed_cache(2, 4, 2, 16)[0])[1])
    write_kv(k, v, values[0], values[1], slots, scales[0], scales[1])
    ref_values, ref_scales = layer_fp8_views(want, kv_scales)
    write_kv_ref(k, v, ref_values[0], ref_values[1], slots, ref_scales[0], ref_scales[1])
    assert torch.equal(got, want)
    assert torch.equal(kv_scales, before)  # read, never written
    keep = slots >= 0
    write_kv_fp8_ref(engine_ref, k[keep], v[keep], slots[keep], kv_scales)
    assert torch.equal(got, engine_ref)
    # exactly the kept tokens' slots were written (some byte of theirs changed)
    written = (got != sentinel).any(dim=4).any(dim=3).any(dim=0).reshape(-1)  # [flat slots]
    assert written.nonzero().flatten().tolist() == sorted(slots[keep].tolist())
    # saturation at +-448, and the in-range values within e4m3 precision (3 mantissa bits)
    first = values[0].reshape(-1, num_kv_heads, head_dim)[slots[0]].float()  # token 0's K
    assert first[0, :3].tolist() == [448.0, -448.0, 448.0]
    dequantized = first[:, 3:] * kv_scales[0][:, None]
    exact = k[0, :, 3:].float()
    assert ((dequantized - exact).abs() <= exact.abs() * 2**-4 + kv_scales[0].max() * 2**-9).all()


def attention_batch(
    decode_lens: list[int], prefills: list[tuple[int, int]], block_size: int, num_blocks: int
) -> AttentionMetadata:
    """Metadata for decode rows (context lengths) then prefill chunks ((query_len,
    context_len)), every sequence in its own random blocks, as both backends read it."""
    gen = torch.Generator().manual_seed(6)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    lens = decode_lens + [c for _, c in prefills]
    tables = [[ids.pop() for _ in range(-(-n // block_size))] for n in lens]

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max((len(r) for r in rows), default=0)
        flat = [i for r in rows for i in r + [0] * (width - len(r))]
        return torch.tensor(flat, dtype=torch.int32).view(len(rows), width)

    decode_tables = padded(tables[: len(decode_lens)])
    decode_context = torch.tensor(decode_lens, dtype=torch.int32)
    starts, chunks = [0], []
    for (query_len, context_len), table in zip(prefills, tables[len(decode_lens) :], strict=True):
        query_start = len(decode_lens) + starts[-1]
        block_ids = torch.tensor(table, dtype=torch.int32, device=DEVICE)
        chunks.append(PrefillChunk(query_start, query_len, context_len, block_ids))
        starts.append(starts[-1] + query_len)
    packed = {}  # for the Triton backend's one launch over every chunk (model_runner's)
    if prefills:
        packed = dict(
            prefill_block_tables=padded(tables[len(decode_lens) :]).to(DEVICE),
            prefill_query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
            prefill_context_lens=torch.tensor(
                [c for _, c in prefills], dtype=torch.int32, device=DEVICE
            ),
            max_prefill_query_len=max(q for q, _ in prefills),
        )
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device=DEVICE),
        num_decode_tokens=len(decode_lens),
        decode_block_tables=decode_tables.to(DEVICE),
        decode_context_lens=decode_context.to(DEVICE),
        prefills=tuple(chunks),
        decode_mask=decode_mask(decode_context, decode_tables.shape[1] * block_size).to(DEVICE),
        **packed,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("decode_lens", "prefills", "num_heads", "num_kv_heads", "head_dim", "block_size"),
    [
        ([1, 37, 130], [(7, 7), (5, 23), (1, 9)], 6, 2, 64, 16),  # fresh, cached prefix, one
        ([200, 5], [(13, 13)], 4, 1, 32, 8),
        ([], [(9, 9), (3, 17)], 4, 2, 32, 4),  # prefills only
        ([3, 17], [], 4, 2, 32, 4),  # decodes only
    ],
)
def test_attention_kernels_read_a_per_head_cache_like_the_torch_backend(
    decode_lens: list[int],
    prefills: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
) -> None:
    """The Triton backend hands the decode and prefill kernels a per-head cache's e4m3 values
    and its scales broadcast over blocks and slots (kv_quant.layer_fp8_views); they agree with
    the engine's torch reference reading the same cache and scales, and FP8 costs at most a
    few percent against attention over the unquantized values."""
    lens = decode_lens + [c for _, c in prefills]
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    cache, kv_scales, exact = per_head_cache(num_blocks, block_size, num_kv_heads, head_dim, 7)
    assert kv_scales.unique().numel() > 1  # a scale read for the wrong head or K|V shows
    meta = attention_batch(decode_lens, prefills, block_size, num_blocks)
    num_tokens = len(decode_lens) + sum(q for q, _ in prefills)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(DEVICE, Q_DTYPE)
    scale = head_dim**-0.5
    got = TritonAttention().forward(q, cache, meta, scale, kv_scales=kv_scales)
    want = paged_attention_ref(q.float(), cache, meta, scale, kv_scales)
    torch.testing.assert_close(got.float(), want, **TOL)
    unquantized = paged_attention_ref(q.float(), exact, meta, scale)
    assert (want - unquantized).norm() / unquantized.norm() < 0.05
    with pytest.raises(ValueError, match="needs kv_scales"):  # never read as unscaled
        TritonAttention().forward(q, cache, meta, scale)


def test_triton_backend_writes_amaxes_for_decode_only_steps() -> None:
    """amax_out (Fp8Pending's amaxes for o_proj): one per head of each row, max |out| as
    returned, 0 for a padding row, the output unchanged; refused where the step has
    prefills."""
    block_size, num_blocks = 8, 12
    cache, kv_scales, _ = per_head_cache(num_blocks, block_size, 2, 32, 9)
    meta = attention_batch([3, 0, 40], [], block_size, num_blocks)
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(3, 6, 32, generator=gen).to(DEVICE, Q_DTYPE)
    amax = torch.full((3, 6), float("nan"), device=DEVICE)
    got = TritonAttention().forward(q, cache, meta, 32**-0.5, kv_scales=kv_scales, amax_out=amax)
    assert torch.equal(
        got, TritonAttention().forward(q, cache, meta, 32**-0.5, kv_scales=kv_scales)
    )
    assert torch.equal(amax, got.float().abs().amax(dim=2))
    assert torch.equal(amax[1], torch.zeros(6, device=DEVICE))
    mixed = attention_batch([3], [(2, 9)], block_size, num_blocks)
    with pytest.raises(ValueError, match="decode-only"):
        TritonAttention().forward(q, cache, mixed, 32**-0.5, kv_scales=kv_scales, amax_out=amax)


def test_layer_fp8_views_refuse_a_scheme_mismatch() -> None:
    """A per-head cache is read only with its [2, kv_heads] scales; a packed cache carries its
    own and refuses others; neither copies."""
    cache, kv_scales, _ = per_head_cache(3, 4, 2, 16)
    values, scales = layer_fp8_views(cache, kv_scales)
    assert values.dtype == torch.float8_e4m3fn and values.data_ptr() == cache.data_ptr()
    assert scales.shape == (2, 3, 4, 2) and scales.stride() == (kv_scales.stride(0), 0, 0, 1)
    assert scales.data_ptr() == kv_scales.data_ptr()  # a view: the model's scales, as they are
    for wrong in (None, kv_scales[:, :1], kv_scales[0], kv_scales.repeat(1, 2)):
        with pytest.raises(ValueError, match=r"a per-head FP8 cache needs kv_scales \[2, 2\]"):
            layer_fp8_views(cache, wrong)
    packed, _ = packed_cache(3, 4, 2, 16)
    with pytest.raises(ValueError, match="carries its own scales"):
        layer_fp8_views(packed, kv_scales)
    with pytest.raises(ValueError, match="not an FP8 cache"):
        layer_fp8_views(torch.zeros(2, 3, 4, 2, 16, device=DEVICE), kv_scales)
