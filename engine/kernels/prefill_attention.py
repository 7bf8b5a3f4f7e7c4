"""Flash attention for a batch of prefill chunks over the paged KV cache: each chunk's queries
attend causally to their sequence's cached prefix and to the chunk itself (whose K/V must
already be in the cache). Online softmax in fp32 over key tiles gathered through the block
table, so memory is O(tokens). One program per (query tile, kv head, sequence) serves the
whole GQA group; full tiles skip the mask, tiles past the diagonal are never loaded. Does not
write the cache or handle decodes. Grid, packing and tiles: docs/engine.md.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from engine.kernels.launch import check_kv_scales, given_scales, only_4_byte_aligned
from engine.kv_quant import KV_FP8_DTYPE

_LOG2_E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True, slots=True)
class PrefillTiles:
    """Tile shape and launch options of the kernel."""

    block_m: int  # rows per program: query positions x packed query heads
    block_n: int  # key positions per inner step
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or not _is_power_of_two(value):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


@triton.jit
def _attend_key_range(
    acc,  # [BLOCK_M, HEAD_DIM] fp32, unnormalized output
    l_i,  # [BLOCK_M] fp32, softmax denominator
    m_i,  # [BLOCK_M] fp32, running max of the base-2 scores
    q,  # [BLOCK_M, HEAD_DIM]
    q_pos,  # [BLOCK_M] int, absolute position of each row's query
    key_lo,  # first key position, a multiple of BLOCK_N
    key_hi,  # one past the last key position
    block_table_row,  # pointer to block_tables[s, 0]
    k_base,  # pointer to k_cache[0, 0, g, 0]
    v_base,  # pointer to v_cache[0, 0, g, 0]
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    qk_scale,
    ks_base,  # pointer to k_scale[0, 0, g] (KV_FP8 only)
    vs_base,  # pointer to v_scale[0, 0, g]
    stride_ksb,
    stride_kss,
    stride_vsb,
    stride_vss,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_DIAGONAL: tl.constexpr,  # True: mask keys past each row's own position
    KV_FP8: tl.constexpr,  # e4m3 cache: K/V converted to q's dtype
    ROW_SCALES: tl.constexpr,  # with KV_FP8: a scale per key, folded into its column
):
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    for key_start in range(key_lo, key_hi, BLOCK_N):
        key_pos = key_start + offs_n  # [BLOCK_N]
        key_mask = key_pos < key_hi  # all true in full tiles, which end at key_hi
        # Gather: key n is in cache block block_table_row[n // BLOCK_SIZE], slot n % BLOCK_SIZE.
        block_ids = tl.load(block_table_row + key_pos // BLOCK_SIZE, mask=key_mask, other=0)
        block_ids = block_ids.to(tl.int64)
        slots = key_pos % BLOCK_SIZE
        k_offs = (block_ids * stride_kb + slots * stride_ks)[:, None] + dims[None, :]
        v_offs = (block_ids * stride_vb + slots * stride_vs)[:, None] + dims[None, :]
        k = tl.load(k_base + k_offs, mask=key_mask[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
        v = tl.load(v_base + v_offs, mask=key_mask[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]

        if KV_FP8:
            k = k.to(q.dtype)  # exact: e4m3 values fit bf16, fp16 and fp32
            v = v.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # base-2 logits
        if ROW_SCALES:  # key n's scale multiplies score column n
            k_s = tl.load(ks_base + block_ids * stride_ksb + slots * stride_kss, mask=key_mask,
                          other=0.0)  # fmt: skip
            qk = qk * k_s[None, :]
        if IS_DIAGONAL:
            # Valid rows have q_pos < key_hi, so causality also hides keys past key_hi; padding
            # rows (not stored) still see key 0, so no row's max is -inf and nothing is NaN.
            qk = tl.where(key_pos[None, :] <= q_pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_v = p
        if ROW_SCALES:  # value n's scale multiplies probability column n (not the sum l_i)
            v_s = tl.load(vs_base + block_ids * stride_vsb + slots * stride_vss, mask=key_mask,
                          other=0.0)  # fmt: skip
            p_v = p * v_s[None, :]
        acc = tl.dot(p_v.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# The block table's width changes from batch to batch: not specialized on, nor are the
# batch's index tensors' alignments (slices of larger buffers), so one compile per model serves
# every batch (see decode_attention.py).
@triton.jit(
    do_not_specialize=["stride_bt", "skip_fresh_from"],
    do_not_specialize_on_alignment=["block_tables_ptr", "query_start_loc_ptr", "context_lens_ptr"],
)
def _prefill_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    block_tables_ptr,  # [num_seqs, max_blocks]
    query_start_loc_ptr,  # [num_seqs + 1]
    context_lens_ptr,  # [num_seqs]
    qk_scale,  # softmax scale * log2(e): exponentials are base 2
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    k_scale_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads] fp32 with KV_FP8 (else unused)
    v_scale_ptr,
    stride_ksb,
    stride_kss,
    stride_ksh,
    stride_vsb,
    stride_vss,
    stride_vsh,
    skip_fresh_from,  # chunks with no cached prefix and at least this many queries are skipped
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # next power of two >= GROUP
    BLOCK_Q: tl.constexpr,  # query positions per program
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size, in tokens
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (as torch), else unused
    KV_FP8: tl.constexpr,
    ROW_SCALES: tl.constexpr,  # with KV_FP8: a scale per key; else one per head (folded in)
    ROWS_4B: tl.constexpr,  # e4m3 rows only 4-byte aligned (launch.only_4_byte_aligned)
):
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # last tiles (most keys) first
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_q = q_tile * BLOCK_Q  # chunk-relative index of the tile's first query
    if first_q >= query_len:
        return
    prefix_len = tl.load(context_lens_ptr + seq) - query_len
    if (prefix_len == 0) & (query_len >= skip_fresh_from):  # attended elsewhere (dense)
        return

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)  # [BLOCK_M]
    q_idx = first_q + rows // GROUP_PAD  # chunk-relative query index of each row
    head = kv_head * GROUP + rows % GROUP_PAD
    row_mask = (q_idx < query_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_DIM)
    token = (q_start + q_idx).to(tl.int64)
    q_offs = (token * stride_qt + head * stride_qh)[:, None] + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_mask[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    q_pos = prefix_len + q_idx

    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if ROWS_4B:  # e4m3 rows 4- but not 16-byte aligned (checked by the launcher): said
        # so, Triton moves 4 values at a time instead of one byte
        stride_kb, stride_vb = (stride_kb // 4) * 4, (stride_vb // 4) * 4
        stride_ks, stride_vs = (stride_ks // 4) * 4, (stride_vs // 4) * 4
        stride_kh, stride_vh = (stride_kh // 4) * 4, (stride_vh // 4) * 4
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    ks_base = k_scale_ptr + kv_head * stride_ksh
    vs_base = v_scale_ptr + kv_head * stride_vsh
    if KV_FP8 and not ROW_SCALES:  # the head's key scale multiplies every score
        qk_scale = qk_scale * tl.load(ks_base)
    # Keys at positions <= prefix_len + first_q are visible to every row of the tile.
    full_end = (prefix_len + first_q + 1) // BLOCK_N * BLOCK_N
    # One past the position of the tile's last query: nothing beyond is visible to any row.
    key_end = prefix_len + tl.minimum(first_q + BLOCK_Q, query_len)
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, q_pos, 0, full_end, block_table_row, k_base, v_base,
        stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
        ks_base, vs_base, stride_ksb, stride_kss, stride_vsb, stride_vss,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, DOT_PRECISION, IS_DIAGONAL=False, KV_FP8=KV_FP8,
        ROW_SCALES=ROW_SCALES,
    )  # fmt: skip
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, q_pos, full_end, key_end, block_table_row, k_base, v_base,
        stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
        ks_base, vs_base, stride_ksb, stride_kss, stride_vsb, stride_vss,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, DOT_PRECISION, IS_DIAGONAL=True, KV_FP8=KV_FP8,
        ROW_SCALES=ROW_SCALES,
    )  # fmt: skip

    acc = acc / l_i[:, None]
    if KV_FP8 and not ROW_SCALES:  # the head's value scale multiplies the whole output
        acc = acc * tl.load(vs_base)
    out_offs = (token * stride_ot + head * stride_oh)[:, None] + dims[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32 or int64
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32 or int64, cumulative
    context_lens: torch.Tensor,  # [num_seqs] int32 or int64, cached prefix + chunk
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    *,
    tiles: PrefillTiles | None = None,
    k_scale: torch.Tensor | None = None,  # e4m3 caches: [num_blocks, block_size, num_kv_heads]
    v_scale: torch.Tensor | None = None,  # fp32 (the packed cache's scale views, kv_quant)
    skip_fresh_from: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q's dtype
    """Causal attention of each chunk's queries over its sequence's cache; returns `out`.
    With an e4m3 cache (k_scale and v_scale given) K and V are dequantized in registers.
    With skip_fresh_from, chunks that start their sequence (no cached prefix) and have at
    least that many queries are skipped, their rows of `out` left as they are (the caller
    attends over them otherwise).

    Only the rows of q named by query_start_loc are written: rows before query_start_loc[0]
    (say, a batch's decode tokens) are left as they are. max_query_len must be >= every chunk's
    length and 0 <= query_len <= context_len must hold (neither is checked: that would sync).
    Raises ValueError for inputs of the wrong device, dtype, shape or stride. Runs on the
    caller's CUDA stream; on CPU tensors only under TRITON_INTERPRET=1.
    """
    is_fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    out = _check_inputs(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out, is_fp8
    )
    num_seqs = context_lens.shape[0]
    if num_seqs == 0 or max_query_len <= 0:
        return out
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    tiles = tiles or default_tiles(head_dim, q.dtype, q.device)
    block_q = max(1, tiles.block_m // group_pad)
    grid = (triton.cdiv(max_query_len, block_q), num_kv_heads, num_seqs)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, context_lens,
        scale * _LOG2_E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        k_scale if k_scale is not None else k_cache,  # a placeholder pointer without FP8
        v_scale if v_scale is not None else v_cache,
        *(k_scale.stride() if k_scale is not None else (0, 0, 0)),
        *(v_scale.stride() if v_scale is not None else (0, 0, 0)),
        _NEVER if skip_fresh_from is None else skip_fresh_from,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=tiles.block_n,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_FP8=is_fp8,
        ROW_SCALES=is_fp8 and not given_scales(k_scale, v_scale),
        ROWS_4B=is_fp8 and only_4_byte_aligned(k_cache, v_cache),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


_NEVER = 2**31 - 1  # skip_fresh_from that skips no chunk


@functools.cache
def default_tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillTiles:
    """Tiles measured on an H100 for bf16 (bench/kernels_prefill_attention.py), shrunk until they
    fit the device's shared memory; small ones on CPU, where the interpreter runs numpy."""
    if device.type != "cuda":
        return PrefillTiles(block_m=32, block_n=16)
    if dtype == torch.float32:  # exact fp32 dots run on the FMA units: small tiles
        tiles = PrefillTiles(block_m=64, block_n=32, num_warps=4, num_stages=2)
    elif head_dim <= 64:
        tiles = PrefillTiles(block_m=128, block_n=128, num_warps=4, num_stages=3)
    elif head_dim <= 128:
        tiles = PrefillTiles(block_m=128, block_n=128, num_warps=8, num_stages=3)
    else:
        tiles = PrefillTiles(block_m=128, block_n=64, num_warps=8, num_stages=2)
    limit = _max_shared_memory_bytes(device.index or 0)
    element_bytes = torch.finfo(dtype).bits // 8
    while _shared_memory_bytes(tiles, head_dim, element_bytes) > limit:
        if tiles.num_stages > 2:
            tiles = replace(tiles, num_stages=tiles.num_stages - 1)
        elif tiles.block_n > 16:
            tiles = replace(tiles, block_n=tiles.block_n // 2)
        elif tiles.block_m > 16:
            tiles = replace(tiles, block_m=tiles.block_m // 2)
        else:
            break
    return tiles


def _shared_memory_bytes(tiles: PrefillTiles, head_dim: int, element_bytes: int) -> int:
    """Triton's buffers: the Q tile plus num_stages - 1 in-flight K and V tiles, and a margin
    for barriers and layout conversions (measured within 1 KiB of this on an H100)."""
    rows = tiles.block_m + 2 * (tiles.num_stages - 1) * tiles.block_n
    return rows * head_dim * element_bytes + 4096


@functools.cache
def _max_shared_memory_bytes(device_index: int) -> int:
    properties = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return int(properties["max_shared_mem"])


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    context_lens: torch.Tensor,  # [num_seqs]
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,  # e4m3 caches: [num_blocks, block_size, num_kv_heads]
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Plain torch reference: per sequence, gather its context (an e4m3 cache dequantized in
    fp32), mask, softmax in fp32."""
    del max_query_len  # the loop needs no grid size
    if k_scale is not None and v_scale is not None:
        k_cache = k_cache.float() * k_scale[..., None]
        v_cache = v_cache.float() * v_scale[..., None]
    out = torch.empty_like(q) if out is None else out
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for s, context_len in enumerate(lens):
        rows = slice(starts[s], starts[s + 1])
        query_len = starts[s + 1] - starts[s]
        if query_len == 0:
            continue
        block_ids = block_tables[s, : -(-context_len // block_size)].long()
        # [context_len, num_heads, head_dim] fp32, kv heads repeated for their query heads
        k = k_cache[block_ids].flatten(0, 1)[:context_len].float().repeat_interleave(group, 1)
        v = v_cache[block_ids].flatten(0, 1)[:context_len].float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), k) * scale
        q_pos = torch.arange(context_len - query_len, context_len, device=q.device)
        visible = torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[rows] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor | None,
    is_fp8: bool = False,
) -> torch.Tensor:
    """Validate the launcher's inputs; returns `out`, allocated if None."""
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables}
    tensors |= {"query_start_loc": query_start_loc, "context_lens": context_lens}
    if out is not None:
        tensors["out"] = out
    for name, tensor in tensors.items():
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device}, q on {q.device}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"tensors on {q.device} need TRITON_INTERPRET=1 (or a CUDA device)")
    cache_dtype = KV_FP8_DTYPE if is_fp8 else q.dtype
    if q.dtype not in _DTYPES or k_cache.dtype != cache_dtype or v_cache.dtype != cache_dtype:
        raise ValueError(
            f"q, k_cache, v_cache must share a dtype of {_DTYPES}, "
            f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    for name in ("block_tables", "query_start_loc", "context_lens"):
        if tensors[name].dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {tensors[name].dtype}")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "want q [tokens, heads, head_dim], k/v_cache [blocks, block_size, kv_heads, "
            f"head_dim]; got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if head_dim < 16 or not _is_power_of_two(head_dim) or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"head_dim must be a power of two >= 16 in q and cache, got {head_dim} and "
            f"{k_cache.shape[3]}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    num_seqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if (
        num_seqs < 0
        or query_start_loc.shape != (num_seqs + 1,)
        or block_tables.dim() != 2
        or block_tables.shape[0] != num_seqs
    ):
        raise ValueError(
            f"want context_lens [num_seqs], query_start_loc [num_seqs + 1], block_tables "
            f"[num_seqs, max_blocks]; got {tuple(context_lens.shape)}, "
            f"{tuple(query_start_loc.shape)}, {tuple(block_tables.shape)}"
        )
    if not (query_start_loc.is_contiguous() and context_lens.is_contiguous()):
        raise ValueError("query_start_loc and context_lens must be contiguous")
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables rows must be contiguous, strides {block_tables.stride()}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, want {q.dtype} {tuple(q.shape)}")
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} needs head_dim stride 1, has strides {tensor.stride()}")
    return out


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
