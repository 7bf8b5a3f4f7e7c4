"""The attention backend for CUDA: Triton kernels for KV writes, decode and prefill attention.

Every launch is free of host synchronization, so decode steps can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionBackend, AttentionMetadata
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.kv_write import write_kv
from engine.kernels.prefill_attention import paged_prefill_attention


class TritonAttention(AttentionBackend):
    def write_kv(
        self,
        kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = padding
    ) -> None:
        write_kv(k, v, kv_cache_layer[0], kv_cache_layer[1], slot_mapping)

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        kv_cache_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        # q is a strided view of the fused QKV projection: the kernels take its strides, so
        # no copy (a 2,048-token prefill of the 8B shape copied 16 MiB per layer).
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
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
            )
        if meta.prefills:
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
            )
        return out
