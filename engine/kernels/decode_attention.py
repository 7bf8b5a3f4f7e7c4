"""Paged decode attention: one new query token per sequence against its cached context, the Triton
backend's hot kernel for decode steps. Reads K/V through the block table (no gather copy),
shares each K/V tile among a GQA group's query heads, and splits long contexts across programs
(flash-decoding) whose partial outputs a reduce kernel merges by log-sum-exp (or, with
`FUSED_REDUCE`, the last split program of each group). Never syncs with the host (CUDA-graph
safe); does not write the cache or handle prefill. `paged_decode_attention_ref` is the torch
reference. Grid, tiles and workspace layout: docs/engine.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.attention import decode_mask
from engine.kernels.launch import (
    check_amax_out,
    check_devices,
    check_kv_scales,
    given_scales,
    on_device,
    only_4_byte_aligned,
)
from engine.kv_quant import KV_FP8_DTYPE

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634  # 1 / ln(2): scores are kept in base 2 so the kernel uses exp2
_LN2 = tl.constexpr(0.6931471805599453)  # turns the kernel's base-2 lse back into natural log
_TILE_TOKENS = 128  # K/V tokens per tile of the split kernel (head_dim <= 128)
_MIN_SPLIT_TOKENS = 128  # one tile: a shorter split would leave the later splits empty
_MAX_SPLITS = 32
_PROGRAMS_PER_SM = 2  # target this many programs per multiprocessor when choosing splits
_CPU_NUM_SMS = 4  # stand-in for the interpreter, so tests exercise several splits

# With several splits, the last split program of each (sequence, kv head) to finish merges the
# group's splits (a ticket counter in the workspace decides which) instead of a second launch,
# the reduce kernel. Off: slower on an H100 (batch-1 FP8 decode 247 against 273 tok/s with the
# reduce launch; docs/benchmarks.md, issue 20); bench `+fusedreduce` A/Bs it.
FUSED_REDUCE = False


@dataclass(frozen=True, slots=True)
class DecodeAttentionWorkspace:
    """Scratch for the split partial results. Allocate once (for the largest batch and split
    count a CUDA graph will see) and pass to every call; larger first dims are fine."""

    partial_out: torch.Tensor  # [max_seqs, num_heads, max_splits, head_dim] fp32
    partial_lse: torch.Tensor  # [max_seqs, num_heads, max_splits] fp32
    # [max_seqs, >=num_kv_heads] int32, FUSED_REDUCE's tickets: zero between calls (each call
    # leaves them zero again), so allocated zeroed once
    counters: torch.Tensor

    @classmethod
    def allocate(
        cls,
        max_seqs: int,
        num_heads: int,
        max_splits: int,
        head_dim: int,
        device: torch.device | str,
        num_kv_heads: int | None = None,  # counters per row: num_heads if None (enough for any
        # grouping); 0 for none (FUSED_REDUCE off)
    ) -> DecodeAttentionWorkspace:
        counter_cols = num_heads if num_kv_heads is None else num_kv_heads
        return cls(
            partial_out=torch.empty(
                max_seqs, num_heads, max_splits, head_dim, dtype=torch.float32, device=device
            ),
            partial_lse=torch.empty(
                max_seqs, num_heads, max_splits, dtype=torch.float32, device=device
            ),
            counters=torch.zeros(max_seqs, counter_cols, dtype=torch.int32, device=device),
        )


# Ints and pointers that change from batch to batch are not specialized on (Triton would
# compile a variant per value class: == 1, divisible by 16, 16-byte aligned): a new compile
# stalls a serving engine for a second or more, and eager mixed prefill/decode batches see
# every batch width and split count. Only the model's shapes are compile-time constants.
@triton.jit(
    do_not_specialize=["num_splits", "stride_bt_seq", "stride_po_seq", "stride_po_head",
                       "stride_po_split", "stride_pl_seq", "stride_pl_head", "stride_cnt_seq"],
    do_not_specialize_on_alignment=["block_tables_ptr", "context_lens_ptr"],
)  # fmt: skip
def _decode_split_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32 or int64
    context_lens_ptr,  # [num_seqs] int32 or int64
    out_ptr,  # [num_seqs, num_heads, head_dim]; written only with SINGLE_SPLIT
    partial_out_ptr,  # [>=num_seqs, num_heads, >=num_splits, head_dim] fp32
    partial_lse_ptr,  # [>=num_seqs, num_heads, >=num_splits] fp32
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    stride_q_seq,
    stride_q_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_bt_seq,
    stride_bt_block,
    stride_o_seq,
    stride_o_head,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    k_scale_ptr,  # [num_blocks, block_size, num_kv_heads] fp32 with KV_FP8 (else unused)
    v_scale_ptr,
    stride_ks_block,
    stride_ks_slot,
    stride_ks_head,
    stride_vs_block,
    stride_vs_slot,
    stride_vs_head,
    amax_ptr,  # [num_seqs, num_heads] fp32, contiguous; with AMAX only
    counters_ptr,  # [>=num_seqs, >=num_kv_heads] int32, zero at entry; with FUSED only
    stride_cnt_seq,
    HEAD_DIM: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # query heads per kv head
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    SINGLE_SPLIT: tl.constexpr,  # num_splits == 1: write out directly
    GROUP_PAD: tl.constexpr,  # GROUP_SIZE rounded up to a power of two >= 16 (tl.dot's M)
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two >= 16
    TILE_N: tl.constexpr,  # tokens per K/V tile, a power of two >= 16
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 caches, so tl.dot does not round to tf32
    KV_FP8: tl.constexpr,  # e4m3 cache: K/V converted to q's dtype, scales folded in
    ROW_SCALES: tl.constexpr,  # with KV_FP8: a scale per key; else one per head
    ROWS_4B: tl.constexpr,  # e4m3 rows only 4-byte aligned (launch.only_4_byte_aligned)
    AMAX: tl.constexpr,  # also write each head's max |out| as stored (SINGLE_SPLIT or FUSED)
    FUSED: tl.constexpr,  # several splits: the group's last program merges them (FUSED_REDUCE)
    SPLITS_PAD: tl.constexpr,  # with FUSED: num_splits rounded up to a power of two (else 1)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    offs_g = tl.arange(0, GROUP_PAD)  # row g of this program = query head kv_head*GROUP_SIZE+g
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, TILE_N)
    mask_g = offs_g < GROUP_SIZE
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP_SIZE + offs_g  # [GROUP_PAD] query head ids

    q_ptrs = q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [GROUP_PAD, BLOCK_D]

    # This split's share of the context: ceil(context_len / num_splits) rounded up to whole
    # tiles, so splits start on tile boundaries. Trailing splits of a short context are empty.
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), TILE_N) * TILE_N
    split_start = split * split_len
    split_end = tl.minimum(split_start + split_len, context_len)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)  # running max, base-2 units
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)  # running sum of p @ V

    if ROWS_4B:  # e4m3 rows 4- but not 16-byte aligned (checked by the launcher): said
        # so, Triton moves 4 values at a time instead of one byte
        stride_k_block, stride_v_block = (stride_k_block // 4) * 4, (stride_v_block // 4) * 4
        stride_k_slot, stride_v_slot = (stride_k_slot // 4) * 4, (stride_v_slot // 4) * 4
        stride_k_head, stride_v_head = (stride_k_head // 4) * 4, (stride_v_head // 4) * 4
    k_head_ptr = k_cache_ptr + kv_head * stride_k_head
    v_head_ptr = v_cache_ptr + kv_head * stride_v_head
    if KV_FP8 and not ROW_SCALES:  # the head's key scale multiplies every score
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head * stride_ks_head)
    bt_row_ptr = block_tables_ptr + seq * stride_bt_seq
    for tile_start in range(split_start, split_end, TILE_N):
        # Token positions of this tile and where each one lives in the cache. The first token
        # is always < split_end, so every tile has at least one valid column and m_i turns
        # finite on the first tile.
        positions = tile_start + offs_n  # [TILE_N]
        mask_n = positions < split_end
        block_ids = tl.load(
            bt_row_ptr + (positions // BLOCK_SIZE) * stride_bt_block, mask=mask_n, other=0
        ).to(tl.int64)
        slots = positions % BLOCK_SIZE
        kv_mask = mask_n[:, None] & mask_d[None, :]

        # K^T tile [BLOCK_D, TILE_N]: column n is the key of token positions[n].
        k_ptrs = (
            k_head_ptr
            + block_ids[None, :] * stride_k_block
            + slots[None, :] * stride_k_slot
            + offs_d[:, None]
        )
        k = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)  # exact: e4m3 values fit bf16, fp16 and fp32
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, TILE_N]
        if ROW_SCALES:  # key n's scale multiplies score column n
            k_s = tl.load(
                k_scale_ptr + kv_head * stride_ks_head + block_ids * stride_ks_block
                + slots * stride_ks_slot, mask=mask_n, other=0.0,
            )  # fmt: skip
            scores = scores * k_s[None, :]
        scores = tl.where(mask_n[None, :], scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales the old sums; exp2(-inf) = 0 on the first tile
        p = tl.exp2(scores - m_new[:, None])  # [GROUP_PAD, TILE_N], 0 in masked columns
        l_i = l_i * alpha + tl.sum(p, axis=1)

        # V tile [TILE_N, BLOCK_D]: row n is the value of token positions[n].
        v_ptrs = (
            v_head_ptr
            + block_ids[:, None] * stride_v_block
            + slots[:, None] * stride_v_slot
            + offs_d[None, :]
        )
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        p_v = p
        if KV_FP8:
            v = v.to(q.dtype)
        if ROW_SCALES:  # value n's scale multiplies probability column n (not the sum l_i)
            v_s = tl.load(
                v_scale_ptr + kv_head * stride_vs_head + block_ids * stride_vs_block
                + slots * stride_vs_slot, mask=mask_n, other=0.0,
            )  # fmt: skip
            p_v = p * v_s[None, :]
        acc = acc * alpha[:, None] + tl.dot(p_v.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (or a padding row, context_len 0) has l_i = 0 and acc = 0: its output is
    # 0 and its lse -inf, so the merge gives it weight 0.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)  # no 0 / 0, no log2(0)
    out = acc / l_safe[:, None]
    if KV_FP8 and not ROW_SCALES:  # the head's value scale multiplies the whole output
        out = out * tl.load(v_scale_ptr + kv_head * stride_vs_head)
    out_mask = mask_g[:, None] & mask_d[None, :]
    if SINGLE_SPLIT:
        o_ptrs = out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + offs_d[None, :]
        stored = out.to(out_ptr.dtype.element_ty)
        tl.store(o_ptrs, stored, mask=out_mask)
        if AMAX:  # row stride num_heads = GROUP_SIZE * the grid's kv heads
            head_amax = tl.max(tl.where(out_mask, tl.abs(stored.to(tl.float32)), 0.0), axis=1)
            row_amax = amax_ptr + seq * (GROUP_SIZE * tl.num_programs(1))
            tl.store(row_amax + heads, head_amax, mask=mask_g)
    else:
        lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
        po_ptrs = (
            partial_out_ptr
            + seq * stride_po_seq
            + heads[:, None] * stride_po_head
            + split * stride_po_split
            + offs_d[None, :]
        )
        tl.store(po_ptrs, out, mask=out_mask)
        pl_ptrs = partial_lse_ptr + seq * stride_pl_seq + heads * stride_pl_head + split
        tl.store(pl_ptrs, lse, mask=mask_g)
        if FUSED:  # every program takes a ticket, padding rows and empty splits too
            tl.debug_barrier()  # every thread's partial stores precede the (one-thread) ticket
            counter = counters_ptr + seq * stride_cnt_seq + kv_head
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:  # the others' partials are all written: merge
                tl.store(counter, 0)  # all num_splits tickets are drawn: zero for the next call
                for g in tl.static_range(GROUP_SIZE):
                    _merge_splits(
                        out_ptr, partial_out_ptr, partial_lse_ptr, amax_ptr,
                        seq, kv_head * GROUP_SIZE + g, GROUP_SIZE * tl.num_programs(1), num_splits,
                        stride_o_seq, stride_o_head, stride_po_seq, stride_po_head,
                        stride_po_split, stride_pl_seq, stride_pl_head,
                        HEAD_DIM, SPLITS_PAD, BLOCK_D, AMAX,
                        ".cg",  # through L2: no stale L1 line of another program's partials
                    )  # fmt: skip


@triton.jit(
    do_not_specialize=["num_splits", "stride_po_seq", "stride_po_head", "stride_po_split",
                       "stride_pl_seq", "stride_pl_head"],
)  # fmt: skip
def _decode_reduce_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    partial_out_ptr,  # [>=num_seqs, num_heads, >=num_splits, head_dim] fp32
    partial_lse_ptr,  # [>=num_seqs, num_heads, >=num_splits] fp32
    num_splits,
    stride_o_seq,
    stride_o_head,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    amax_ptr,  # [num_seqs, num_heads] fp32, contiguous; with AMAX only
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # num_splits rounded up to a power of two
    BLOCK_D: tl.constexpr,
    AMAX: tl.constexpr,  # also write the head's max |out| as stored
):
    _merge_splits(
        out_ptr, partial_out_ptr, partial_lse_ptr, amax_ptr,
        tl.program_id(0), tl.program_id(1), tl.num_programs(1), num_splits,
        stride_o_seq, stride_o_head, stride_po_seq, stride_po_head, stride_po_split,
        stride_pl_seq, stride_pl_head,
        HEAD_DIM, SPLITS_PAD, BLOCK_D, AMAX, "",
    )  # fmt: skip


@triton.jit
def _merge_splits(
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    amax_ptr,
    seq,
    head,
    num_heads,  # amax_ptr's row stride
    num_splits,
    stride_o_seq,
    stride_o_head,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    AMAX: tl.constexpr,
    CACHE: tl.constexpr,  # the partials' load cache modifier: "" or ".cg" (L2 only)
):
    """out[seq, head] (and amax[seq, head] with AMAX) from the head's split partials, merged
    by log-sum-exp: the reduce kernel's program, or one head of FUSED's last split program."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(
        partial_lse_ptr + seq * stride_pl_seq + head * stride_pl_head + offs_s,
        mask=mask_s,
        other=float("-inf"),
        cache_modifier=CACHE,
    )  # [SPLITS_PAD]
    has_keys = lse > float("-inf")
    # All splits empty (a padding row): lse_max = -inf; use 0 so no -inf - -inf = NaN appears.
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)
    weights = tl.where(has_keys, tl.exp(lse - lse_max), 0.0)  # [SPLITS_PAD]
    total = tl.sum(weights, axis=0)

    po_ptrs = (
        partial_out_ptr
        + seq * stride_po_seq
        + head * stride_po_head
        + offs_s[:, None] * stride_po_split
        + offs_d[None, :]
    )
    partial = tl.load(
        po_ptrs, mask=has_keys[:, None] & mask_d[None, :], other=0.0, cache_modifier=CACHE
    )
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    o_ptrs = out_ptr + seq * stride_o_seq + head * stride_o_head + offs_d
    stored = out.to(out_ptr.dtype.element_ty)
    tl.store(o_ptrs, stored, mask=mask_d)
    if AMAX:
        head_amax = tl.max(tl.where(mask_d, tl.abs(stored.to(tl.float32)), 0.0), axis=0)
        tl.store(amax_ptr + seq * num_heads + head, head_amax)


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int, device: torch.device
) -> int:
    """How many splits of the context to use, from shapes alone (no host sync).

    Enough (sequence, kv head, split) programs to give every multiprocessor about
    `_PROGRAMS_PER_SM` of them, but no split shorter than `_MIN_SPLIT_TOKENS` of the longest
    possible context (max_blocks * block_size), and at most `_MAX_SPLITS`."""
    base_programs = max(1, num_seqs * num_kv_heads)
    wanted = -(-_PROGRAMS_PER_SM * _num_sms(device) // base_programs)
    useful = -(-max_blocks * block_size // _MIN_SPLIT_TOKENS)
    return max(1, min(wanted, useful, _MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32 or int64
    context_lens: torch.Tensor,  # [num_seqs] int32 or int64; 0 marks a padding row
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim], q's dtype
    num_splits: int | None = None,
    workspace: DecodeAttentionWorkspace | None = None,
    k_scale: torch.Tensor | None = None,  # e4m3 caches: [num_blocks, block_size, num_kv_heads]
    v_scale: torch.Tensor | None = None,  # fp32 (the packed cache's scale views, kv_quant)
    amax_out: torch.Tensor | None = None,  # [num_seqs, num_heads] fp32, contiguous
    # FUSED_REDUCE without a workspace: the tickets, [>=num_seqs, >=num_kv_heads] int32, zero
    # at entry (left zero): a caller's own, kept across calls
    counters: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim], q's dtype
    """Attention of each sequence's one query token over its first context_len cached tokens.
    With an e4m3 cache (k_scale and v_scale given) K and V are dequantized in registers.
    With `amax_out`, also writes there each head's max |out| over head_dim, of the values as
    stored (every slot, each call; 0 for padding rows): a row's max over them is the amax
    `quantize_per_token` finds in out[seq] (engine.quantization.Fp8Pending).

    Returns `out` (allocated if None). Rows with context_len 0 come out as zeros. `num_splits`
    defaults to `choose_num_splits(...)`; with more than one split the partial results go to
    `workspace` (allocated here when None: pass one when capturing a CUDA graph; with
    `FUSED_REDUCE` its zeroed counters then cost a memset a call). Raises
    ValueError for inputs of the wrong device, dtype, shape or layout. Never syncs the host."""
    is_fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    num_seqs, num_heads, head_dim = _check_inputs(
        q, k_cache, v_cache, block_tables, context_lens, is_fp8
    )
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    max_blocks = block_tables.shape[1]
    ks = k_scale if k_scale is not None else k_cache  # a placeholder pointer without FP8
    vs = v_scale if v_scale is not None else v_cache
    ks_strides = k_scale.stride() if k_scale is not None else (0, 0, 0)
    vs_strides = v_scale.stride() if v_scale is not None else (0, 0, 0)
    if out is None:
        out = torch.empty_like(q)
    _check_out(out, q)
    if amax_out is not None:
        check_amax_out(amax_out, num_seqs, num_heads, q.device)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_blocks, block_size, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_seqs == 0:
        return out
    fused = FUSED_REDUCE and num_splits > 1
    if num_splits == 1:
        partial_out = partial_lse = out  # not touched: the split kernel writes out directly
        counters = context_lens  # a placeholder pointer: not touched either
    else:
        if workspace is None:
            own_counters = fused and counters is None
            workspace = DecodeAttentionWorkspace.allocate(
                num_seqs, num_heads, num_splits, head_dim, q.device,
                num_kv_heads if own_counters else 0,
            )  # fmt: skip
        _check_workspace(workspace, num_seqs, num_heads, num_splits, head_dim, q.device)
        partial_out, partial_lse = workspace.partial_out, workspace.partial_lse
        if counters is None or not fused:
            counters = workspace.counters
        if fused:
            _check_counters(counters, num_seqs, num_kv_heads, q.device)

    group_size = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile_n, num_warps, num_stages = _split_kernel_config(block_d, block_size)
    with on_device(q.device):
        _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
            q, k_cache, v_cache, block_tables, context_lens, out, partial_out, partial_lse,
            scale * _LOG2E, num_splits,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), block_tables.stride(1),
            out.stride(0), out.stride(1),
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
            partial_lse.stride(0), partial_lse.stride(1),
            ks, vs, *ks_strides, *vs_strides,
            out if amax_out is None else amax_out,  # a placeholder pointer without AMAX
            counters, counters.stride(0),
            HEAD_DIM=head_dim,
            GROUP_SIZE=group_size,
            BLOCK_SIZE=block_size,
            SINGLE_SPLIT=num_splits == 1,
            GROUP_PAD=max(16, triton.next_power_of_2(group_size)),
            BLOCK_D=block_d,
            TILE_N=tile_n,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            KV_FP8=is_fp8,
            ROW_SCALES=is_fp8 and not given_scales(k_scale, v_scale),
            ROWS_4B=is_fp8 and only_4_byte_aligned(k_cache, v_cache),
            AMAX=amax_out is not None and (num_splits == 1 or fused),
            FUSED=fused,
            # a constant of the fused kernel only: the default one compiles once for any count
            SPLITS_PAD=triton.next_power_of_2(num_splits) if fused else 1,
            num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip
        if num_splits > 1 and not fused:
            _decode_reduce_kernel[(num_seqs, num_heads)](
                out, partial_out, partial_lse, num_splits,
                out.stride(0), out.stride(1),
                partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
                partial_lse.stride(0), partial_lse.stride(1),
                out if amax_out is None else amax_out,
                HEAD_DIM=head_dim,
                SPLITS_PAD=triton.next_power_of_2(num_splits),
                BLOCK_D=block_d,
                AMAX=amax_out is not None,
                num_warps=4 if block_d >= 128 else 2,
            )  # fmt: skip
    return out


def _split_kernel_config(block_d: int, block_size: int) -> tuple[int, int, int]:
    """(TILE_N, num_warps, num_stages) of the split kernel. TILE_N is a power of two >= 16
    (tl.dot's K for p @ V) and >= block_size. Tuned on an H100 for head_dim 128, bf16
    (bench/kernels_decode_attention.py): 128-token tiles beat 32 and 64 at every batch size,
    most at one split (86 vs 134 us for one 4096-token sequence); 8 warps or 3 stages did not
    help. Two stages of 128 x 128 bf16 K and V tiles take 128 KiB of shared memory."""
    tile_n = max(16, block_size, _TILE_TOKENS if block_d <= 128 else _TILE_TOKENS // 2)
    return tile_n, 4, 2


def paged_decode_attention_ref(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    context_lens: torch.Tensor,  # [num_seqs]; 0 marks a padding row
    scale: float,
    k_scale: torch.Tensor | None = None,  # e4m3 caches: [num_blocks, block_size, num_kv_heads]
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim], q's dtype
    """The same function in plain torch: gather the context, masked SDPA, zeros for padding
    rows. Computes in the inputs' dtype (upcast them for a high-precision reference); an e4m3
    cache is dequantized to q's dtype first."""
    if k_scale is not None and v_scale is not None:
        k_cache = (k_cache.float() * k_scale[..., None]).to(q.dtype)
        v_cache = (v_cache.float() * v_scale[..., None]).to(q.dtype)
    num_seqs, max_blocks = block_tables.shape
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    ids = block_tables.long()
    # [num_seqs, kv_heads, max_blocks * block_size, head_dim]
    k = k_cache[ids].reshape(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache[ids].reshape(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    mask = decode_mask(context_lens, max_blocks * block_size)  # [num_seqs, 1, 1, num_keys]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    ).squeeze(2)  # [num_seqs, num_heads, head_dim]; NaN in rows with no keys
    is_padding = (context_lens == 0)[:, None, None]
    return torch.where(is_padding, torch.zeros_like(out), out).to(q.dtype)


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    is_fp8: bool = False,
) -> tuple[int, int, int]:
    if q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, num_heads, head_dim], got shape {tuple(q.shape)}")
    num_seqs, num_heads, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and cache ({cache_head_dim}) differ")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    cache_dtype = q.dtype if not is_fp8 else KV_FP8_DTYPE
    if q.dtype not in _SUPPORTED_DTYPES or {k_cache.dtype, v_cache.dtype} != {cache_dtype}:
        raise ValueError(
            f"q, k_cache, v_cache must share one dtype of {_SUPPORTED_DTYPES}, got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim, strides {t.stride()}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be [num_seqs={num_seqs}, max_blocks], "
            f"got {tuple(block_tables.shape)}"
        )
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be [{num_seqs}], got {tuple(context_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    check_devices(q, k_cache, v_cache, block_tables, context_lens)
    return num_seqs, num_heads, head_dim


def _check_out(out: torch.Tensor, q: torch.Tensor) -> None:
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
            f"({tuple(out.shape)}, {out.dtype}, {out.device})"
        )
    if out.stride(-1) != 1:
        raise ValueError(f"out must be contiguous along head_dim, strides {out.stride()}")


def _check_workspace(
    workspace: DecodeAttentionWorkspace,
    num_seqs: int,
    num_heads: int,
    num_splits: int,
    head_dim: int,
    device: torch.device,
) -> None:
    po, pl = workspace.partial_out, workspace.partial_lse
    fits = (
        po.dim() == 4
        and pl.dim() == 3
        and po.shape[0] >= num_seqs
        and pl.shape[0] >= num_seqs
        and po.shape[1] == pl.shape[1] == num_heads
        and po.shape[2] >= num_splits
        and pl.shape[2] >= num_splits
        and po.shape[3] == head_dim
    )
    if not fits:
        raise ValueError(
            f"workspace ({tuple(po.shape)}, {tuple(pl.shape)}) does not fit "
            f"num_seqs={num_seqs}, num_heads={num_heads}, num_splits={num_splits}, "
            f"head_dim={head_dim}"
        )
    if po.dtype != torch.float32 or pl.dtype != torch.float32:
        raise ValueError(f"workspace must be float32, got {po.dtype}, {pl.dtype}")
    if po.stride(-1) != 1 or pl.stride(-1) != 1:
        raise ValueError("workspace tensors must be contiguous in their last dim")
    if po.device != device or pl.device != device:
        raise ValueError(f"workspace is on {po.device}/{pl.device}, inputs on {device}")


def _check_counters(
    counters: torch.Tensor, num_seqs: int, num_kv_heads: int, device: torch.device
) -> None:
    fits = counters.dim() == 2 and counters.shape[0] >= num_seqs
    if not fits or counters.shape[1] < num_kv_heads or counters.stride(1) != 1:
        raise ValueError(
            f"workspace counters {tuple(counters.shape)} (strides {counters.stride()}) do not "
            f"fit num_seqs={num_seqs}, num_kv_heads={num_kv_heads} with unit column stride"
        )
    if counters.dtype != torch.int32 or counters.device != device:
        raise ValueError(f"workspace counters must be int32 on {device}, got {counters.dtype} "
                         f"on {counters.device}")  # fmt: skip


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


__all__ = [
    "DecodeAttentionWorkspace",
    "choose_num_splits",
    "paged_decode_attention",
    "paged_decode_attention_ref",
]
