"""paged_prefill_attention against its torch reference, over odd chunk and prefix lengths.

On CPU the kernel runs under TRITON_INTERPRET=1 in fp32 with small shapes (tolerance 1e-4); on
a CUDA device in bf16 (tolerance 2e-2), with realistic shapes added. The cache is poisoned with
NaN everywhere no token lives, so a read past a sequence's context shows up as NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

pytest.importorskip("triton")  # conftest.py has set TRITON_INTERPRET=1 if there is no GPU

from engine.attention import AttentionMetadata, PrefillChunk, paged_attention_ref
from engine.kernels.prefill_attention import (
    PrefillTiles,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)

pytestmark = pytest.mark.slow

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
TOL = 2e-2 if HAS_CUDA else 1e-4
NUM_DECODE_ROWS = 3  # rows before the first chunk, which the kernel must leave alone


class Batch(NamedTuple):
    q: torch.Tensor  # [num_tokens, num_heads, head_dim], a slice of a fused qkv buffer
    kv_cache_layer: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks]
    query_start_loc: torch.Tensor  # [num_seqs + 1]
    context_lens: torch.Tensor  # [num_seqs]
    max_query_len: int
    scale: float

    def args(self) -> tuple:
        k_cache, v_cache = self.kv_cache_layer
        return (
            self.q, k_cache, v_cache, self.block_tables, self.query_start_loc,
            self.context_lens, self.scale, self.max_query_len,
        )  # fmt: skip


def make_batch(
    chunks: list[tuple[int, int]],  # (cached prefix length, chunk length) per sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    index_dtype: torch.dtype = torch.int32,
    seed: int = 0,
    dtype: torch.dtype = DTYPE,
) -> Batch:
    """Chunks after NUM_DECODE_ROWS leading rows; each sequence's blocks are shuffled ids."""
    gen = torch.Generator().manual_seed(seed)
    context_lens = [prefix + length for prefix, length in chunks]
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(chunks), max(blocks_per_seq) + 1, dtype=torch.long)
    # Two layers, so the cache is a view with a layer offset; all unused slots are NaN.
    kv_cache = torch.full((2, 2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    flat_slots = kv_cache[1].view(2, num_blocks * block_size, num_kv_heads, head_dim)
    for s, context_len in enumerate(context_lens):
        num_seq_blocks = blocks_per_seq[s]
        ids = torch.tensor([block_ids.pop() for _ in range(num_seq_blocks)])
        tables[s, :num_seq_blocks] = ids
        positions = torch.arange(context_len)
        slots = ids[positions // block_size] * block_size + positions % block_size
        kv = torch.randn(2, context_len, num_kv_heads, head_dim, generator=gen)
        flat_slots[:, slots] = kv
    query_lens = [length for _, length in chunks]
    starts = torch.tensor([0, *query_lens]).cumsum(0) + NUM_DECODE_ROWS
    num_tokens = int(starts[-1])
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    return Batch(
        q=qkv.to(DEVICE, dtype).as_strided(q.shape, q.stride()),  # still a view of qkv
        kv_cache_layer=kv_cache.to(DEVICE, dtype)[1],
        block_tables=tables.to(DEVICE, index_dtype),
        query_start_loc=starts.to(DEVICE, index_dtype),
        context_lens=torch.tensor(context_lens).to(DEVICE, index_dtype),
        max_query_len=max(query_lens),
        scale=head_dim**-0.5,
    )


def odd_chunks(block_size: int) -> list[tuple[int, int]]:
    """Chunk lengths 1, block_size +- 1, block_size, 37 over prefixes 0, 16 and 23; and a chunk
    whose first query sits 2 before a key-tile edge for key tiles of 16, 32 and 64 (prefix 62),
    where seeing one key too many in the unmasked tiles would show."""
    return [
        (0, 37), (16, 1), (23, block_size - 1), (0, block_size), (16, block_size + 1),
        (23, 37), (0, block_size + 1), (62, 5),
    ]  # fmt: skip


def check_against_ref(batch: Batch, tiles: PrefillTiles | None = None, tol: float = TOL) -> None:
    out = torch.full_like(batch.q, float("nan"))
    paged_prefill_attention(*batch.args(), out=out, tiles=tiles)
    ref = paged_prefill_attention_ref(*batch.args())
    assert out[:NUM_DECODE_ROWS].isnan().all(), "rows outside the chunks were written"
    torch.testing.assert_close(
        out[NUM_DECODE_ROWS:], ref[NUM_DECODE_ROWS:], atol=tol, rtol=tol, equal_nan=False
    )


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads"),
    [
        (2, 2),  # GQA ratio 1
        (6, 2),  # ratio 3: one padding row per group of four
        (8, 2),  # ratio 4
        (8, 1),  # ratio 8
    ],
)
def test_mixed_batch_matches_ref(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    batch = make_batch(odd_chunks(block_size), num_heads, num_kv_heads, head_dim, block_size)
    check_against_ref(batch)


@pytest.mark.parametrize(
    ("block_m", "block_n", "block_size", "index_dtype"),
    [
        (16, 16, 32, torch.int32),  # key tile inside one cache block
        (64, 32, 8, torch.int64),  # key tile over four cache blocks, int64 metadata
        (128, 64, 16, torch.int32),  # the H100 tiles
    ],
)
def test_tile_shapes(block_m: int, block_n: int, block_size: int, index_dtype: torch.dtype) -> None:
    batch = make_batch(
        odd_chunks(block_size), 4, 2, 64, block_size, index_dtype=index_dtype, seed=block_m
    )
    batch = batch._replace(max_query_len=batch.max_query_len + 40)  # a grid larger than needed
    check_against_ref(batch, PrefillTiles(block_m, block_n))


def test_ref_matches_engine_torch_backend() -> None:
    batch = make_batch(odd_chunks(16), 8, 2, 64, 16)
    starts, lens = batch.query_start_loc.tolist(), batch.context_lens.tolist()
    chunks = tuple(
        PrefillChunk(starts[s], starts[s + 1] - starts[s], n, batch.block_tables[s].long())
        for s, n in enumerate(lens)
    )
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decode_tokens=0,
        decode_block_tables=torch.empty(0, 0, dtype=torch.long),
        decode_context_lens=torch.empty(0, dtype=torch.long),
        prefills=chunks,
    )
    engine_out = paged_attention_ref(batch.q, batch.kv_cache_layer, meta, batch.scale)
    ref = paged_prefill_attention_ref(*batch.args())
    rows = slice(NUM_DECODE_ROWS, None)
    tol = 1e-2 if HAS_CUDA else 1e-5
    torch.testing.assert_close(ref[rows], engine_out[rows], atol=tol, rtol=tol)


# (cached prefix, chunk): fresh and long (skipped from 16), continuing, fresh but short
SPLIT_CHUNKS = [(0, 40), (17, 9), (0, 6)]


def test_skip_fresh_from_leaves_long_fresh_chunks_alone_and_the_rest_unchanged() -> None:
    batch = make_batch(SPLIT_CHUNKS, 4, 2, 32, 8)
    every = paged_prefill_attention(*batch.args())
    out = torch.full_like(every, 7.0)
    paged_prefill_attention(*batch.args(), out=out, skip_fresh_from=16)
    starts = batch.query_start_loc.tolist()
    skipped = slice(starts[0], starts[1])
    assert (out[skipped] == 7.0).all()  # the long fresh chunk is the caller's
    assert torch.equal(out[starts[1] :], every[starts[1] :])  # the others bit for bit


def _step_kv(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's own keys and values [num_tokens, kv_heads, head_dim]: each chunk's tokens as
    the cache holds them (what the layer wrote before attending)."""
    cache = batch.kv_cache_layer  # [2, blocks, block_size, kv_heads, head_dim]
    block_size = cache.shape[2]
    num_tokens = batch.q.shape[0]
    kv = torch.zeros(2, num_tokens, *cache.shape[3:], dtype=cache.dtype, device=cache.device)
    starts, lens = batch.query_start_loc.tolist(), batch.context_lens.tolist()
    for s, context_len in enumerate(lens):
        query_len = starts[s + 1] - starts[s]
        positions = torch.arange(context_len - query_len, context_len, device=cache.device)
        ids = batch.block_tables[s].long()[positions // block_size]
        kv[:, starts[s] : starts[s + 1]] = cache[:, ids, positions % block_size]
    return kv[0], kv[1]


def test_a_step_splits_long_fresh_chunks_to_dense_attention_and_the_rest_to_the_kernel() -> None:
    from engine import triton_attention
    from engine.triton_attention import TritonAttention, dense_chunks

    batch = make_batch(SPLIT_CHUNKS, 4, 2, 32, 8)
    starts, lens = batch.query_start_loc.tolist(), batch.context_lens.tolist()
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=DEVICE),
        num_decode_tokens=0,
        decode_block_tables=torch.empty(0, 0, dtype=torch.int32, device=DEVICE),
        decode_context_lens=torch.empty(0, dtype=torch.int32, device=DEVICE),
        prefills=tuple(
            PrefillChunk(starts[s], starts[s + 1] - starts[s], n, batch.block_tables[s])
            for s, n in enumerate(lens)
        ),
        prefill_block_tables=batch.block_tables,
        prefill_query_start_loc=batch.query_start_loc,
        prefill_context_lens=batch.context_lens,
        max_prefill_query_len=batch.max_query_len,
    )
    k, v = _step_kv(batch)
    before = (triton_attention.DENSE_FRESH_PREFILL, triton_attention.DENSE_MIN_QUERY_LEN)
    try:
        triton_attention.DENSE_FRESH_PREFILL, triton_attention.DENSE_MIN_QUERY_LEN = True, 16
        assert [c.query_len for c in dense_chunks(meta, fp8_cache=False)] == [40]
        split = TritonAttention().forward(batch.q, batch.kv_cache_layer, meta, batch.scale, k, v)
        triton_attention.DENSE_FRESH_PREFILL = False
        assert dense_chunks(meta, fp8_cache=True) == []
        paged = TritonAttention().forward(batch.q, batch.kv_cache_layer, meta, batch.scale, k, v)
    finally:
        triton_attention.DENSE_FRESH_PREFILL, triton_attention.DENSE_MIN_QUERY_LEN = before
    rows = slice(NUM_DECODE_ROWS, None)
    torch.testing.assert_close(split[rows], paged[rows], atol=TOL, rtol=TOL)
    assert torch.equal(split[starts[1] :], paged[starts[1] :])  # only the long fresh chunk moved


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="realistic shapes need a CUDA device")
@pytest.mark.parametrize(
    ("chunks", "head_dim", "dtype", "tol"),
    [
        ([(0, 2048)], 128, torch.bfloat16, 2e-2),  # one Llama-3-8B-sized prompt
        ([(0, 1000), (2048, 513), (77, 1), (4000, 300)], 128, torch.bfloat16, 2e-2),
        ([(0, 700), (300, 129)], 256, torch.bfloat16, 2e-2),
        ([(0, 700), (300, 129)], 64, torch.float16, 2e-3),
        ([(0, 700), (300, 129)], 128, torch.float32, 1e-4),  # exact fp32 dots, as torch's
    ],
)
def test_realistic_shapes(
    chunks: list[tuple[int, int]], head_dim: int, dtype: torch.dtype, tol: float
) -> None:
    check_against_ref(make_batch(chunks, 32, 8, head_dim, 16, dtype=dtype), tol=tol)


def test_rejects_bad_inputs() -> None:
    batch = make_batch([(0, 5)], 4, 2, 64, 16)
    q, k_cache, v_cache, *rest = batch.args()
    with pytest.raises(ValueError, match="head_dim"):
        paged_prefill_attention(q[..., :48], k_cache[..., :48], v_cache[..., :48], *rest)
    with pytest.raises(ValueError, match="dtype"):
        paged_prefill_attention(q.half(), k_cache, v_cache, *rest)
    with pytest.raises(ValueError, match="multiple"):
        paged_prefill_attention(q[:, :3], k_cache, v_cache, *rest)
    wide = torch.empty(*k_cache.shape[:-1], 2 * k_cache.shape[-1], device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="stride"):
        paged_prefill_attention(q, wide[..., ::2], v_cache, *rest)
    with pytest.raises(ValueError, match="int32 or int64"):
        paged_prefill_attention(q, k_cache, v_cache, rest[0].float(), *rest[1:])
