"""Attention over the paged KV cache: batch metadata, cache writes, and the torch backend, the
correctness reference every faster kernel is tested against and the CPU path:

    kv_cache[layer, 0 = K | 1 = V, block_id, slot_in_block, kv_head, head_dim]
    token p of a sequence with block table bt: block bt[p // block_size], slot p % block_size

A batch flattens every scheduled sequence's tokens, decodes (one token each) first. An FP8 cache
(engine.kv_quant) is dequantized as gathered; a per-head one comes with its layer's `kv_scales`
[2, num_kv_heads] (LlamaModel.kv_scales). More: docs/engine.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from engine.kv_quant import is_any_fp8_cache, layer_values_and_scales, write_kv_fp8_ref


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Host-side description of one prefill chunk (the torch backend loops over these)."""

    query_start: int  # first token of the chunk in the flattened batch
    query_len: int  # tokens computed this step
    context_len: int  # tokens in the cache after this step (cached prefix + chunk)
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] int32


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where each new token's K/V goes and what each query attends to, for one step.

    Decode rows come first ([0, num_decode_tokens)), prefill chunks after. Tensors live on the
    model's device; padding rows (CUDA-graph batches) have slot -1 and context length 0.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, flat cache slot of each new token
    num_decode_tokens: int  # the first num_decode_tokens tokens are single-token decodes
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32 (padded with 0)
    decode_context_lens: torch.Tensor  # [num_decodes] int32
    prefills: tuple[PrefillChunk, ...]
    prefill_block_tables: torch.Tensor | None = None  # [num_prefills, max_blocks] int32
    prefill_query_start_loc: torch.Tensor | None = None  # [num_prefills + 1] int32, from 0
    prefill_context_lens: torch.Tensor | None = None  # [num_prefills] int32
    max_prefill_query_len: int = 0
    # [num_decodes, 1, 1, max_blocks * block_size] bool, True where a key is in the context;
    # built once per step for the torch backend only.
    decode_mask: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class OutputRows:
    """The rows whose hidden states leave the model this step (those that sample a token).

    In a step with prefills, only these rows need the last layer beyond its K/V: there, their
    queries attend as single-token decodes (`meta`: one row each, over its whole context), and
    its output projection and MLP run on them alone. A 2,048-token prefill then runs the last
    layer's MLP on one row instead of 2,048.
    """

    rows: torch.Tensor  # [n] int64, indices into the flattened batch, in output order
    meta: AttentionMetadata  # n decode rows: context_len = each sequence's tokens after this step


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and attends over it. One instance per engine."""

    uses_decode_mask = False  # whether prepare_inputs must build AttentionMetadata.decode_mask
    # whether forward takes `amax_out` for decode-only steps (engine.quantization.Fp8Pending)
    writes_amax = False

    @abstractmethod
    def write_kv(
        self,
        kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [num_tokens] int64
        kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32: a per-head FP8 cache
    ) -> None: ...

    def rotate_and_write_kv(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [num_tokens] int64
        cos2: torch.Tensor,  # [max_positions, head_dim] fp32 (RotaryEmbedding's tables)
        sin2: torch.Tensor,
        kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [num_tokens] int64
        kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32: a per-head FP8 cache
    ) -> None:
        """The CUDA path of engine.llama.Attention: rotate q and k in place (the Triton rotary
        kernel), then write_kv. A backend with a fused kernel overrides it."""
        from engine.kernels.rotary import apply_rotary_

        apply_rotary_(q, k, positions, cos2, sin2)
        self.write_kv(kv_cache_layer, k, v, slot_mapping, kv_scales)

    def epilogue_kv_views(
        self,
        kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, row]
        kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32: a per-head FP8 cache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """(k_cache, v_cache, k_scale, v_scale) for a QKV GEMV that writes the K/V in its
        epilogue (engine.kernels.rotary_kv_epilogue) instead of rotate_and_write_kv, or None
        where this backend's cache is not written that way (the default)."""
        return None

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        kv_cache_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k: torch.Tensor | None = None,  # this step's keys [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor | None = None,  # and values (a backend may attend over them directly)
        kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32: a per-head FP8 cache
        amax_out: torch.Tensor | None = None,  # [num_tokens, num_heads] fp32 (writes_amax only)
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """With `amax_out` (backends that have writes_amax, decode-only steps), also writes
        there each head's max |output| as returned: each row's max over it is the row's amax
        (engine.quantization.Fp8Pending)."""


class TorchAttention(AttentionBackend):
    """The reference: plain torch, exact, used on CPU."""

    uses_decode_mask = True

    def write_kv(self, kv_cache_layer, k, v, slot_mapping, kv_scales=None):  # type: ignore[no-untyped-def]
        write_kv(kv_cache_layer, k, v, slot_mapping, kv_scales)

    def forward(self, q, kv_cache_layer, meta, scale, k=None, v=None, kv_scales=None):  # type: ignore[no-untyped-def]
        return paged_attention_ref(q, kv_cache_layer, meta, scale, kv_scales)


def select_backend(device: torch.device) -> AttentionBackend:
    """Triton kernels on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        from engine.triton_attention import TritonAttention

        return TritonAttention()
    return TorchAttention()


def write_kv(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
    kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32: a per-head FP8 cache
) -> None:
    """Store new keys and values at their slots (the torch reference; no padding slots),
    quantized with their scales for an FP8 cache."""
    if is_any_fp8_cache(kv_cache_layer):
        write_kv_fp8_ref(kv_cache_layer, k, v, slot_mapping, kv_scales)
        return
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    flat = kv_cache_layer.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k if k.dtype == flat.dtype else k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v if v.dtype == flat.dtype else v.to(flat.dtype))


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32: a per-head FP8 cache
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each new token over its sequence's cached context (new tokens
    included: write_kv runs first)."""
    num_decode = meta.num_decode_tokens
    cache = _Cache.of(kv_cache_layer, kv_scales)
    if num_decode == q.shape[0] and meta.decode_mask is not None:  # decodes only
        return _decode_attention(q, cache, meta.decode_block_tables, meta.decode_mask, scale)
    out = torch.empty_like(q)
    if num_decode:
        assert meta.decode_mask is not None, "decodes need a mask"
        out[:num_decode] = _decode_attention(
            q[:num_decode], cache, meta.decode_block_tables, meta.decode_mask, scale
        )
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        out[rows] = _prefill_attention(q[rows], cache, chunk, scale)
    return out


def causal_self_attention(
    q: torch.Tensor,  # [len, heads, head_dim]
    k: torch.Tensor,  # [len, kv_heads, head_dim]
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # [len, heads, head_dim]
    """Causal attention of one sequence over its own keys and values (torch's fused SDPA, GQA),
    no cache: the dense fresh prefill (engine.triton_attention) and KV calibration."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        is_causal=True,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def decode_mask(context_lens: torch.Tensor, num_key_slots: int) -> torch.Tensor:
    """[num_decodes, 1, 1, num_key_slots] bool: key slot s is attended iff s < context_len."""
    positions = torch.arange(num_key_slots, device=context_lens.device)
    return (positions[None, :] < context_lens[:, None])[:, None, None, :]


class _Cache(NamedTuple):
    """One layer's cache as the reference reads it: the values, and for an FP8 cache the
    scales' views (engine.kv_quant.layer_fp8_views)."""

    values: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    scales: torch.Tensor | None  # [2, num_blocks, block_size, num_kv_heads] fp32, FP8 only

    @classmethod
    def of(cls, kv_cache_layer: torch.Tensor, kv_scales: torch.Tensor | None) -> _Cache:
        return cls(*layer_values_and_scales(kv_cache_layer, kv_scales))


def _gather_context(
    cache: _Cache, block_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the given blocks, as [..., num_kv_heads, num_blocks * block_size, head_dim]
    (an FP8 cache's dequantized to `dtype` in fp32; a float cache's as stored)."""
    # K and V separately, each an index_select over the leading (block) dim: one select over
    # dim 1 of the [2, ...] layer tensor measured 1.8x slower per decode step at batch 8.
    flat_ids = block_ids.reshape(-1)
    k = cache.values[0].index_select(0, flat_ids)  # [n, block_size, num_kv_heads, head_dim]
    v = cache.values[1].index_select(0, flat_ids)
    if cache.scales is not None:
        k_s = cache.scales[0].index_select(0, flat_ids)  # [n, block_size, num_kv_heads]
        v_s = cache.scales[1].index_select(0, flat_ids)
        k = (k.float() * k_s[..., None]).to(dtype)
        v = (v.float() * v_s[..., None]).to(dtype)
    shape = (*block_ids.shape[:-1], -1, k.shape[-2], k.shape[-1])
    return k.reshape(shape).transpose(-3, -2), v.reshape(shape).transpose(-3, -2)


def _decode_attention(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    cache: _Cache,
    block_tables: torch.Tensor,  # [num_decodes, max_blocks]
    mask: torch.Tensor,  # [num_decodes, 1, 1, max_blocks * block_size] bool
    scale: float,
) -> torch.Tensor:
    k, v = _gather_context(cache, block_tables, q.dtype)  # [B, kv_heads, S, D]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )  # [B, heads, 1, D]
    return out.squeeze(2)


def _prefill_attention(
    q: torch.Tensor,  # [query_len, num_heads, head_dim]
    cache: _Cache,
    chunk: PrefillChunk,
    scale: float,
) -> torch.Tensor:
    k, v = _gather_context(cache, chunk.block_ids, q.dtype)  # [kv_heads, S, D]
    # A leading batch dim of 1: torch's fused CPU kernel takes 4-d inputs only (3-d ones fall
    # back to the unfused math path, measured 4x slower for a 512-token prompt).
    k = k[None, :, : chunk.context_len]  # [1, kv_heads, context_len, D]
    v = v[None, :, : chunk.context_len]
    qh = q.transpose(0, 1)[None].to(k.dtype)  # [1, heads, query_len, D]
    if chunk.query_len == chunk.context_len:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        first_position = chunk.context_len - chunk.query_len
        q_pos = torch.arange(first_position, chunk.context_len, device=q.device)
        k_pos = torch.arange(chunk.context_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [query_len, context_len]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1).to(q.dtype)
