"""The FP8 (e4m3) KV cache: its packed layout, and quantizing and dequantizing in plain torch. The
cache stays one uint8 tensor, each (token, kv head) row followed by its fp32 scale:

    kv_cache[layer, K|V, block, slot, kv_head, 0 : head_dim + 4]   e4m3 values, then s
    s = max_d |x[d]| / 448,   x[d] ~= q[d] * s

so block copies, prefix caching and KV transfer move blocks unchanged. Requires head_dim % 4 == 0.
This module only describes and converts (the Triton kernels do the same in registers); why one
scale per token and head: docs/engine.md.
"""

from __future__ import annotations

import torch

KV_FP8_DTYPE = torch.float8_e4m3fn
KV_FP8_STORAGE = torch.uint8  # what an FP8 cache tensor is allocated as
SCALE_BYTES = 4  # one fp32 scale per row
FP8_MAX = 448.0
_MIN_AMAX = 1e-12  # an all-zero row still gets a positive scale
SCALE_SCHEME = "token_head_fp32"  # how kvtransfer names this layout's scales


def packed_row_bytes(head_dim: int) -> int:
    """Bytes of one (token, kv head) row of an FP8 cache."""
    if head_dim % SCALE_BYTES:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 4 for an FP8 KV cache")
    return head_dim + SCALE_BYTES


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    """Whether a cache tensor (or a slice of one) is the packed FP8 format."""
    return kv_cache.dtype == KV_FP8_STORAGE


def split_fp8_cache(
    kv_cache: torch.Tensor,  # [..., head_dim + 4] uint8
) -> tuple[torch.Tensor, torch.Tensor]:  # ([..., head_dim] e4m3 view, [...] fp32 view)
    """Views (no copies) of the values and the scales of a packed FP8 cache or slice."""
    assert is_fp8_cache(kv_cache), f"not an FP8 cache: {kv_cache.dtype}"
    head_dim = kv_cache.shape[-1] - SCALE_BYTES
    values = kv_cache[..., :head_dim].view(KV_FP8_DTYPE)
    scales = kv_cache[..., head_dim:].view(torch.float32).squeeze(-1)
    return values, scales


def quantize_rows(
    x: torch.Tensor,  # [..., head_dim]
) -> tuple[torch.Tensor, torch.Tensor]:  # ([..., head_dim] e4m3, [...] fp32)
    """Each row's amax maps to 448."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=_MIN_AMAX) / FP8_MAX
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(KV_FP8_DTYPE)
    return q, scale


def pack_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] float -> [..., head_dim + 4] uint8 packed rows."""
    q, scale = quantize_rows(x)
    return torch.cat((q.view(torch.uint8), scale[..., None].view(torch.uint8)), dim=-1)


def dequantize_rows(
    packed: torch.Tensor,  # [..., head_dim + 4] uint8
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [..., head_dim] dtype
    """Values of packed rows, computed in fp32 and returned in `dtype`."""
    values, scales = split_fp8_cache(packed)
    return (values.float() * scales[..., None]).to(dtype)


def write_kv_fp8_ref(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim + 4] uint8
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, no padding slots
) -> None:
    """Quantize and store new keys and values at their flat slots (torch reference)."""
    _, num_blocks, block_size, num_kv_heads, row_bytes = kv_cache_layer.shape
    flat = kv_cache_layer.view(2, num_blocks * block_size, num_kv_heads, row_bytes)
    flat[0].index_copy_(0, slot_mapping, pack_rows(k))
    flat[1].index_copy_(0, slot_mapping, pack_rows(v))
