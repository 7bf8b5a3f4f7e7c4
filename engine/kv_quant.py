"""The FP8 (e4m3) KV cache: its two layouts, and quantizing and dequantizing in plain torch.

Per head (`kv_cache_scales="per_head"`, the default): the cache is int8 storage holding e4m3
values only, [..., num_blocks, block_size, kv_heads, head_dim], exactly half a bf16 cache; the
scales, one fp32 per (layer, K or V, kv head), live beside it (LlamaModel.kv_scales), fixed for
the engine's lifetime (calibrated at start-up: engine.kv_calibration), powers of two:

    x[d] ~= q[d] * s[layer, K|V, head]

Per token (`kv_cache_scales="per_token"`): one uint8 tensor [..., num_blocks, block_size,
kv_heads, head_dim + 4], whose bytes per block hold the block's e4m3 values, then their fp32
scales (one per token and kv head):

    block bytes [0, B*H*D)            values q[slot, head, d]   (row-major [B, H, D])
    block bytes [B*H*D, B*H*(D + 4))  scales s[slot, head]      (row-major [B, H] fp32)
    s = max_d |x[d]| / 448,   x[d] ~= q[d] * s

The storage dtype tells the layouts apart (int8: per head, uint8: per token), so block copies,
prefix caching and KV transfer move blocks unchanged in both, and every value row starts
16-byte aligned when head_dim % 16 == 0 (the kernels then load 16 bytes at a time). The packed
layout requires head_dim % 4 == 0; only whole blocks can be split into values and scales. This
module only describes and converts (the Triton kernels do the same in registers); why two
schemes and which is the default: docs/engine.md.
"""

from __future__ import annotations

import hashlib

import torch

from engine.config import KV_CACHE_SCALES

KV_FP8_DTYPE = torch.float8_e4m3fn
KV_FP8_STORAGE = torch.uint8  # what an FP8 cache tensor is allocated as
SCALE_BYTES = 4  # one fp32 scale per row
FP8_MAX = 448.0
_MIN_AMAX = 1e-12  # an all-zero row still gets a positive scale
_MIN_CALIBRATION_AMAX = 2.0**-20  # a head calibration never saw non-zero still gets a scale
SCALE_SCHEME = "block_tail_fp32"  # how kvtransfer names this layout's scales
KV_FP8_PER_HEAD_STORAGE = torch.int8  # an FP8 cache whose scales are per (layer, K|V, head)
PER_HEAD_SCHEME = "per_head_fp32"  # kvtransfer's name, ":" and the scales' digest after it
# A calibrated scale leaves this factor of room above the largest value calibration saw (before
# rounding up to a power of two): values up to 2-4x that amax are stored unclipped.
CALIBRATION_HEADROOM = 2.0


def packed_row_bytes(head_dim: int) -> int:
    """Bytes of one (token, kv head) row of an FP8 cache."""
    if head_dim % SCALE_BYTES:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 4 for an FP8 KV cache")
    return head_dim + SCALE_BYTES


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    """Whether a cache tensor (or a slice of one) is the packed (per-token scales) FP8 format."""
    return kv_cache.dtype == KV_FP8_STORAGE


def is_per_head_fp8_cache(kv_cache: torch.Tensor) -> bool:
    """Whether a cache tensor (or a slice of one) holds e4m3 values with per-head scales."""
    return kv_cache.dtype == KV_FP8_PER_HEAD_STORAGE


def is_any_fp8_cache(kv_cache: torch.Tensor) -> bool:
    """Whether a cache tensor holds e4m3 values, with either scale scheme."""
    return is_fp8_cache(kv_cache) or is_per_head_fp8_cache(kv_cache)


def fp8_storage(scales: str) -> torch.dtype:
    """The storage dtype of an FP8 cache with `scales` ("per_head" or "per_token")."""
    if scales not in KV_CACHE_SCALES:
        raise ValueError(f"kv_cache_scales={scales!r} must be one of {KV_CACHE_SCALES}")
    return KV_FP8_PER_HEAD_STORAGE if scales == "per_head" else KV_FP8_STORAGE


def fp8_row_bytes(head_dim: int, scales: str) -> int:
    """Bytes of one (token, kv head) row of an FP8 cache with `scales`."""
    fp8_storage(scales)  # checks the name
    return head_dim if scales == "per_head" else packed_row_bytes(head_dim)


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


def layer_fp8_views(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, row] uint8 or int8
    kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32, with a per-head cache
) -> tuple[torch.Tensor, torch.Tensor]:  # ([2, ..., head_dim] e4m3, [2, blocks, B, H] fp32)
    """The values and the scales of one layer's FP8 cache, as views (no copies): a packed
    cache's own scales, or a per-head cache's `kv_scales` broadcast over blocks and slots
    (strides 0: every kernel that reads a scale per key reads these unchanged). ValueError
    when `kv_scales` is missing for a per-head cache or given for a packed one."""
    if is_fp8_cache(kv_cache_layer):
        if kv_scales is not None:
            raise ValueError("a packed (per-token) FP8 cache carries its own scales")
        return split_fp8_cache(kv_cache_layer)
    if not is_per_head_fp8_cache(kv_cache_layer):
        raise ValueError(f"not an FP8 cache: {kv_cache_layer.dtype}")
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache_layer.shape
    if kv_scales is None or kv_scales.shape != (2, num_kv_heads):
        got = None if kv_scales is None else tuple(kv_scales.shape)
        raise ValueError(f"a per-head FP8 cache needs kv_scales [2, {num_kv_heads}], got {got}")
    scales = kv_scales[:, None, None, :].expand(2, num_blocks, block_size, num_kv_heads)
    return kv_cache_layer.view(KV_FP8_DTYPE), scales


def layer_values_and_scales(
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, row]
    kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32, with a per-head cache
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([2, ..., head_dim], [2, blocks, B, H] | None)
    """Any layer's values and, for an FP8 cache, its scale views (layer_fp8_views); a float
    cache as it is, without scales."""
    if is_any_fp8_cache(kv_cache_layer):
        return layer_fp8_views(kv_cache_layer, kv_scales)
    return kv_cache_layer, None


def quantize_with_scales(
    x: torch.Tensor,  # [..., num_kv_heads, head_dim]
    scales: torch.Tensor,  # [num_kv_heads] fp32
) -> torch.Tensor:  # [..., num_kv_heads, head_dim] e4m3
    """x / scale per head, clamped to +-448 (a value beyond calibration's range saturates)."""
    return (x.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(KV_FP8_DTYPE)


def calibrated_scales(
    amax: torch.Tensor,  # [...] fp32, the largest |value| calibration saw per (layer, K|V, head)
    headroom: float = CALIBRATION_HEADROOM,
) -> torch.Tensor:  # [...] fp32, powers of two
    """Per-head scales from calibration's amax: amax * headroom maps to <= 448, rounded up to a
    power of two (dividing by it is exact, and two workers whose amax differ in the last bits
    almost always agree on it)."""
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(
            "KV scale calibration saw non-finite keys or values (inf or NaN): the model's "
            "weights or dtype overflow; use kv_cache_scales='per_token'"
        )
    raw = amax.float().clamp(min=_MIN_CALIBRATION_AMAX) * headroom / FP8_MAX
    return torch.exp2(torch.ceil(torch.log2(raw)))


def scales_digest(scales: torch.Tensor) -> str:
    """16 hex digits naming a per-head scale table [layers, 2, num_kv_heads] (its fp32 bytes):
    both ends of a KV transfer must hold the same table (kvtransfer.layout)."""
    raw = scales.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).reshape(-1)
    return hashlib.sha256(bytes(raw.tolist())).hexdigest()[:16]


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
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, row] uint8 | int8
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, no padding slots
    kv_scales: torch.Tensor | None = None,  # [2, num_kv_heads] fp32 for a per-head cache
) -> None:
    """Quantize and store new keys and values at their flat slots (torch reference): with the
    given per-head scales, or each row with its own scale, stored beside it."""
    block_size = kv_cache_layer.shape[2]
    blocks, slots = slot_mapping // block_size, slot_mapping % block_size
    if is_per_head_fp8_cache(kv_cache_layer):
        layer_fp8_views(kv_cache_layer, kv_scales)  # checks kv_scales
        assert kv_scales is not None
        for i, x in enumerate((k, v)):
            q = quantize_with_scales(x, kv_scales[i])
            kv_cache_layer[i][blocks, slots] = q.view(KV_FP8_PER_HEAD_STORAGE)
        return
    values, scales = _split_bytes(kv_cache_layer)  # [2, blocks, B, H, D] uint8, [2, blocks, B, H]
    for i, x in enumerate((k, v)):
        q, scale = quantize_rows(x)
        values[i][blocks, slots] = q.view(KV_FP8_STORAGE)
        scales[i][blocks, slots] = scale
