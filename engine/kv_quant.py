"""The FP8 (e4m3) KV cache: its packed layout, and quantizing and dequantizing in plain torch. The
cache stays one uint8 tensor [..., num_blocks, block_size, kv_heads, head_dim + 4], whose bytes
per block hold the block's e4m3 values, then their fp32 scales (one per token and kv head):

    block bytes [0, B*H*D)            values q[slot, head, d]   (row-major [B, H, D])
    block bytes [B*H*D, B*H*(D + 4))  scales s[slot, head]      (row-major [B, H] fp32)
    s = max_d |x[d]| / 448,   x[d] ~= q[d] * s

so block copies, prefix caching and KV transfer move blocks unchanged, and every value row
starts 16-byte aligned when head_dim % 16 == 0 (the kernels then load 16 bytes at a time).
Requires head_dim % 4 == 0. Only whole blocks can be split into values and scales. This
module only describes and converts (the Triton kernels do the same in registers); why one
scale per token and head: docs/engine.md.
"""

from __future__ import annotations

import torch

KV_FP8_DTYPE = torch.float8_e4m3fn
KV_FP8_STORAGE = torch.uint8  # what an FP8 cache tensor is allocated as
SCALE_BYTES = 4  # one fp32 scale per row
FP8_MAX = 448.0
_MIN_AMAX = 1e-12  # an all-zero row still gets a positive scale
SCALE_SCHEME = "block_tail_fp32"  # how kvtransfer names this layout's scales


def packed_row_bytes(head_dim: int) -> int:
    """Bytes of one (token, kv head) row of an FP8 cache."""
    if head_dim % SCALE_BYTES:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 4 for an FP8 KV cache")
    return head_dim + SCALE_BYTES


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    """Whether a cache tensor (or a slice of one) is the packed FP8 format."""
    return kv_cache.dtype == KV_FP8_STORAGE


def _split_bytes(
    kv_cache: torch.Tensor,  # [..., block_size, num_kv_heads, head_dim + 4] uint8, whole blocks
) -> tuple[torch.Tensor, torch.Tensor]:  # ([..., head_dim] uint8, [...] fp32), views
    assert is_fp8_cache(kv_cache), f"not an FP8 cache: {kv_cache.dtype}"
    *lead, block_size, num_kv_heads, row = kv_cache.shape
    head_dim = row - SCALE_BYTES
    lead_strides = kv_cache.stride()[:-3]
    block_bytes = block_size * num_kv_heads * row
    whole_blocks = not lead or lead_strides[-1] == block_bytes
    if kv_cache.stride()[-3:] != (num_kv_heads * row, row, 1) or not whole_blocks:
        raise ValueError(f"an FP8 cache splits by whole blocks only, got strides "
                         f"{kv_cache.stride()} for shape {tuple(kv_cache.shape)}")  # fmt: skip
    offset = kv_cache.storage_offset()
    values = kv_cache.as_strided(
        (*lead, block_size, num_kv_heads, head_dim),
        (*lead_strides, num_kv_heads * head_dim, head_dim, 1),
        offset,
    )
    scale_bytes = kv_cache.as_strided(
        (*lead, block_size, num_kv_heads, SCALE_BYTES),
        (*lead_strides, num_kv_heads * SCALE_BYTES, SCALE_BYTES, 1),
        offset + block_size * num_kv_heads * head_dim,
    )
    return values, scale_bytes.view(torch.float32).squeeze(-1)


def split_fp8_cache(
    kv_cache: torch.Tensor,  # [..., block_size, num_kv_heads, head_dim + 4] uint8, whole blocks
) -> tuple[torch.Tensor, torch.Tensor]:  # ([..., head_dim] e4m3 view, [...] fp32 view)
    """Views (no copies) of the values and the scales of a packed FP8 cache, or of any part of
    it made of whole blocks (a layer, its K or V, selected blocks). ValueError otherwise."""
    values, scales = _split_bytes(kv_cache)
    return values.view(KV_FP8_DTYPE), scales


def quantize_rows(
    x: torch.Tensor,  # [..., head_dim]
) -> tuple[torch.Tensor, torch.Tensor]:  # ([..., head_dim] e4m3, [...] fp32)
    """Each row's amax maps to 448."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=_MIN_AMAX) / FP8_MAX
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(KV_FP8_DTYPE)
    return q, scale


def pack_blocks(x: torch.Tensor) -> torch.Tensor:
    """[..., block_size, num_kv_heads, head_dim] float -> the packed uint8 blocks
    [..., block_size, num_kv_heads, head_dim + 4]."""
    q, scale = quantize_rows(x)
    packed = torch.empty(
        (*x.shape[:-1], packed_row_bytes(x.shape[-1])), dtype=KV_FP8_STORAGE, device=x.device
    )
    values, scales = _split_bytes(packed)
    values.copy_(q.view(KV_FP8_STORAGE))
    scales.copy_(scale)
    return packed


def dequantize_rows(
    packed: torch.Tensor,  # [..., block_size, num_kv_heads, head_dim + 4] uint8, whole blocks
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [..., block_size, num_kv_heads, head_dim] dtype
    """Values of packed blocks, computed in fp32 and returned in `dtype`."""
    values, scales = split_fp8_cache(packed)
    return (values.float() * scales[..., None]).to(dtype)


def write_kv_fp8_ref(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim + 4] uint8
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, no padding slots
) -> None:
    """Quantize and store new keys and values at their flat slots (torch reference)."""
    values, scales = _split_bytes(kv_cache_layer)  # [2, blocks, B, H, D] uint8, [2, blocks, B, H]
    block_size = kv_cache_layer.shape[2]
    blocks, slots = slot_mapping // block_size, slot_mapping % block_size
    for i, x in enumerate((k, v)):
        q, scale = quantize_rows(x)
        values[i][blocks, slots] = q.view(KV_FP8_STORAGE)
        scales[i][blocks, slots] = scale
