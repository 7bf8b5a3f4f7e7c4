"""The attention backend for CUDA: Triton kernels for KV writes, decode and prefill attention,
every launch free of host synchronization (CUDA-graph safe).

Dense fresh prefill: prefill chunks that start their sequence (DENSE_MIN_QUERY_LEN queries or
more) attend with torch's fused causal SDPA over the step's own q, k, v (in the model dtype, also
with an FP8 cache), one call a chunk; the paged kernel skips them and attends for the step's
other chunks (those that continue a sequence, and short ones). On by default for FP8 caches,
where the paged kernel's in-register conversion of e4m3 keys and values makes it the slower one
(TTFT of 2,048 tokens on an H100: 33.6 against 36.8 ms with per-head scales, 39.7 per token),
off for bf16 (no clear gain measured); DENSE_FRESH_PREFILL True or False forces it. An FP8 cache
is passed to the kernels as its e4m3 and scale views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention import (
    AttentionBackend,
    AttentionMetadata,
    PrefillChunk,
    causal_self_attention,
)
from engine.kernels import decode_attention
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.kv_write import rotary_write_kv, write_kv
from engine.kernels.launch import given_scales
from engine.kernels.prefill_attention import paged_prefill_attention
from engine.kv_quant import layer_values_and_scales

# Fresh prefill chunks through torch's fused attention (see above): None, for FP8 caches only;
# True, always; False, never.
DENSE_FRESH_PREFILL: bool | None = None
# Shorter fresh chunks stay in the paged kernel's one launch: one SDPA call a chunk and layer
# costs host time that a short chunk's attention does not repay.
DENSE_MIN_QUERY_LEN = 128
# Dense chunks are padded to a multiple of this many tokens: on an H100, torch's SDPA runs
# cuDNN's attention, which builds a plan for every new sequence length (42-58 ms on first use,
# 0.1 ms after; FlashAttention-2, which builds none, took 5.27 ms for a 2,048-token layer stack
# against cuDNN's 2.65), so a server seeing every prompt length would pay that build again and
# again; buckets bound the lengths to max_model_len / 256 shapes.
DENSE_LENGTH_BUCKET = 256
# A step whose dense chunks hold most of its prefill rows makes one variable-length
# FlashAttention-2 call over all of them as they lie ([tokens, heads, head_dim], native GQA,
# the chunks' offsets are prefill_query_start_loc) instead of one padded SDPA call a dense
# chunk: no transposes, no padding, no per-length plan. CUDA only. Off: on an H100 it won for
# steps of several chunks in isolation but not in the engine (TTFT 50.6 against 48.0 ms,
# saturation 1% lower; docs/benchmarks.md).
DENSE_VARLEN = False
# Rotary embedding and KV write in one launch a layer (kv_write.rotary_write_kv); False: the
# rotary kernel, then the KV write (the same bits; the baseline of A/B benchmarks).
FUSED_ROTARY_KV_WRITE = True


class TritonAttention(AttentionBackend):
    writes_amax = True  # decode-only steps: the decode kernels write the amaxes

    def __init__(self) -> None:
        # decode attention's FUSED_REDUCE tickets, zero between calls: allocated (zeroed) once
        # outside CUDA-graph capture (the graphs' eager warm-up at their largest batch comes
        # first), so no layer's call zeroes its own
        self._counters: torch.Tensor | None = None
        # every counters tensor ever handed out: a captured graph keeps using the one it saw,
        # so a larger one replaces it without freeing it
        self._all_counters: list[torch.Tensor] = []

    def _decode_counters(self, rows: int, num_kv_heads: int, device: torch.device) -> torch.Tensor:
        have = self._counters
        if have is None or have.shape[0] < rows or have.shape[1] < num_kv_heads:
            have = torch.zeros(rows, num_kv_heads, dtype=torch.int32, device=device)
            self._counters = have
            self._all_counters.append(have)
        return have

    def write_kv(
        self,
        kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = padding
        kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32: a per-head FP8 cache
    ) -> None:
        cache, scales = _values_and_scales(kv_cache_layer, kv_scales)
        write_kv(k, v, cache[0], cache[1], slot_mapping, *scales)

    def rotate_and_write_kv(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
        v: torch.Tensor,
        positions: torch.Tensor,  # [num_tokens] int64
        cos2: torch.Tensor,  # [max_positions, head_dim] fp32
        sin2: torch.Tensor,
        kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = padding
        kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32: a per-head FP8 cache
    ) -> None:
        """One launch (kv_write.rotary_write_kv), bitwise what the two of the default give
        (those with FUSED_ROTARY_KV_WRITE off)."""
        if not FUSED_ROTARY_KV_WRITE:
            super().rotate_and_write_kv(
                q, k, v, positions, cos2, sin2, kv_cache_layer, slot_mapping, kv_scales
            )
            return
        cache, scales = _values_and_scales(kv_cache_layer, kv_scales)
        rotary_write_kv(q, k, v, positions, cos2, sin2, cache[0], cache[1], slot_mapping, *scales)

    def epilogue_kv_views(
        self,
        kv_cache_layer: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """The cache views rotate_and_write_kv writes, for a float cache or an e4m3 one with
        per-head scales; None with a scale per token (its write needs each head's amax)."""
        cache, (k_scale, v_scale) = _values_and_scales(kv_cache_layer, kv_scales)
        if k_scale is not None and not given_scales(k_scale, v_scale):
            return None
        return cache[0], cache[1], k_scale, v_scale

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        kv_cache_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim], this step's
        v: torch.Tensor | None = None,
        kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32: a per-head FP8 cache
        amax_out: torch.Tensor | None = None,  # [num_tokens, num_heads] fp32, decode-only steps
    ) -> torch.Tensor:
        if amax_out is not None and (meta.num_decode_tokens != q.shape[0] or meta.prefills):
            raise ValueError("amax_out is written for decode-only steps only")
        # q is a strided view of the fused QKV projection: the kernels take its strides, so
        # no copy (a 2,048-token prefill of the 8B shape copied 16 MiB per layer).
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        cache, scales = _values_and_scales(kv_cache_layer, kv_scales)
        k_cache, v_cache = cache[0], cache[1]
        k_scale, v_scale = scales
        num_decode = meta.num_decode_tokens
        if num_decode:
            paged_decode_attention(
                q[:num_decode],
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_context_lens,
                scale,
                out=out[:num_decode],
                k_scale=k_scale,
                v_scale=v_scale,
                amax_out=amax_out,
                counters=self._decode_counters(num_decode, k_cache.shape[2], q.device)
                if decode_attention.FUSED_REDUCE
                else None,
            )
        dense: list[PrefillChunk] = []
        if k is not None and v is not None:
            dense = dense_chunks(meta, k_scale is not None)
            if _varlen_fits(dense, meta, q):
                # every prefill row attends over its own chunk; those of chunks that are not
                # dense are written again by the paged kernel below
                assert meta.prefill_query_start_loc is not None
                rows = slice(num_decode, None)
                out[rows] = _dense_varlen(
                    q[rows], k[rows], v[rows], meta.prefill_query_start_loc,
                    meta.max_prefill_query_len, scale,
                )  # fmt: skip
            else:
                for chunk in dense:
                    rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
                    out[rows] = _dense_causal(q[rows], k[rows], v[rows], scale)
        if len(dense) < len(meta.prefills):
            assert meta.prefill_block_tables is not None
            assert meta.prefill_query_start_loc is not None
            assert meta.prefill_context_lens is not None
            paged_prefill_attention(
                q[num_decode:],
                k_cache,
                v_cache,
                meta.prefill_block_tables,
                meta.prefill_query_start_loc,
                meta.prefill_context_lens,
                scale,
                meta.max_prefill_query_len,
                out=out[num_decode:],
                k_scale=k_scale,
                v_scale=v_scale,
                skip_fresh_from=DENSE_MIN_QUERY_LEN if dense else None,
            )
        return out


def dense_fresh_prefill(fp8_cache: bool) -> bool:
    """Whether steps of fresh prefill chunks attend densely (DENSE_FRESH_PREFILL, above)."""
    return fp8_cache if DENSE_FRESH_PREFILL is None else DENSE_FRESH_PREFILL


def dense_chunks(meta: AttentionMetadata, fp8_cache: bool) -> list[PrefillChunk]:
    """The step's prefill chunks that attend densely: with dense fresh prefill on, those that
    start their sequence (no cached prefix) with at least DENSE_MIN_QUERY_LEN queries; the
    paged kernel skips exactly these (its skip_fresh_from) and attends over the others."""
    if not meta.prefills or not dense_fresh_prefill(fp8_cache):
        return []
    return [
        c
        for c in meta.prefills
        if c.query_len == c.context_len and c.query_len >= DENSE_MIN_QUERY_LEN
    ]


def _dense_causal(
    q: torch.Tensor,  # [len, heads, head_dim]
    k: torch.Tensor,  # [len, kv_heads, head_dim]
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # [len, heads, head_dim]
    """Causal attention of a chunk over itself, its length padded at the end to a multiple of
    DENSE_LENGTH_BUCKET (padding keys come after every real query, so causality hides them;
    padding rows are dropped)."""
    length = q.shape[0]
    padded = -(-length // DENSE_LENGTH_BUCKET) * DENSE_LENGTH_BUCKET
    if padded != length:
        pad = (0, 0, 0, 0, 0, padded - length)  # [len, heads, head_dim]: len only, at the end
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    return causal_self_attention(q, k, v, scale)[:length]


def _varlen_fits(dense: list[PrefillChunk], meta: AttentionMetadata, q: torch.Tensor) -> bool:
    """Whether the step's dense chunks attend in one variable-length call (DENSE_VARLEN): that
    call also attends for the other chunks' rows (over their own rows only, then overwritten),
    so only where the dense chunks hold most of the prefill rows; and only where
    FlashAttention-2 takes the inputs (fp16/bf16, head_dim <= 256)."""
    flash = q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    if not (DENSE_VARLEN and dense and q.is_cuda and flash):
        return False
    dense_rows = sum(c.query_len for c in dense)
    return 2 * dense_rows >= sum(c.query_len for c in meta.prefills)


def _dense_varlen(
    q: torch.Tensor,  # [tokens, heads, head_dim], the chunks end to end
    k: torch.Tensor,  # [tokens, kv_heads, head_dim]
    v: torch.Tensor,
    starts: torch.Tensor,  # [chunks + 1] int32: each chunk's first row, then the total
    max_len: int,
    scale: float,
) -> torch.Tensor:  # [tokens, heads, head_dim]
    """Each chunk's causal attention over itself, all chunks in one FlashAttention-2 call."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, starts, starts, max_len, max_len, 0.0, True, False, scale=scale
    )[0]


def _values_and_scales(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, kv_heads, head_dim (+ 4)]
    kv_scales: torch.Tensor | None,  # [2, kv_heads] fp32 with a per-head FP8 cache
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The K/V values [2, ...] and, for an FP8 cache, the K and V scale views (a per-head
    cache's broadcast over blocks and slots: the kernels read them per key unchanged)."""
    values, scales = layer_values_and_scales(kv_cache_layer, kv_scales)
    return values, (None, None) if scales is None else (scales[0], scales[1])
