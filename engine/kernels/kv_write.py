"""Store the keys and values of this step's new tokens into the paged KV cache: one program per
token copies its [num_kv_heads, head_dim] rows into slot // block_size, slot % block_size,
converting to the cache's dtype (FP8 caches: quantized in registers, with one scale per head row
computed and stored, or with the per-head scales given, engine.kv_quant).
Padding tokens (slot < 0) are skipped; it never syncs the host and never writes outside the
cache. `write_kv_ref` is the torch reference. Layout and grid: docs/engine.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.fp8_round import round_to_e4m3
from engine.kernels.launch import (
    check_devices,
    check_kv_scales,
    given_scales,
    on_device,
    only_4_byte_aligned,
)
from engine.kv_quant import quantize_rows, quantize_with_scales


@triton.jit
def _kv_write_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int32 or int64
    num_slots,  # num_blocks * block_size
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_H: tl.constexpr,  # NUM_KV_HEADS rounded up to a power of two
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    k_scale_ptr=None,  # [num_blocks, block_size, num_kv_heads] fp32, with KV_FP8
    v_scale_ptr=None,
    stride_ks_block=0,
    stride_ks_slot=0,
    stride_ks_head=0,
    stride_vs_block=0,
    stride_vs_slot=0,
    stride_vs_head=0,
    KV_FP8: tl.constexpr = False,  # quantize to e4m3 with one scale per (token, head)
    GIVEN_SCALES: tl.constexpr = False,  # with KV_FP8: read each head's scale, never write it
    ROWS_4B: tl.constexpr = False,  # e4m3 rows only 4-byte aligned (launch.only_4_byte_aligned)
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    is_valid = (slot >= 0) & (slot < num_slots)  # < 0: padding; >= num_slots: caller bug
    slot = tl.where(is_valid, slot, 0)  # keep the address math in range for skipped tokens
    block_id = slot // BLOCK_SIZE
    slot_in_block = slot % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & is_valid

    # Source rows of this token, [BLOCK_H, BLOCK_D]: element (h, d) at token*stride + h*stride + d.
    k = tl.load(
        k_ptr + token * stride_k_token + offs_h[:, None] * stride_k_head + offs_d[None, :],
        mask=mask,
        other=0.0,  # padding lanes must not reach the FP8 amax
    )
    v = tl.load(
        v_ptr + token * stride_v_token + offs_h[:, None] * stride_v_head + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    # Destination: block block_id, row slot_in_block, same (head, d) tile.
    if ROWS_4B:  # e4m3 rows 4- but not 16-byte aligned (checked by the launcher): said
        # so, Triton moves 4 values at a time instead of one byte
        stride_kc_block, stride_vc_block = (stride_kc_block // 4) * 4, (stride_vc_block // 4) * 4
        stride_kc_slot, stride_vc_slot = (stride_kc_slot // 4) * 4, (stride_vc_slot // 4) * 4
        stride_kc_head, stride_vc_head = (stride_kc_head // 4) * 4, (stride_vc_head // 4) * 4
    kc_ptrs = (
        k_cache_ptr
        + block_id * stride_kc_block
        + slot_in_block * stride_kc_slot
        + offs_h[:, None] * stride_kc_head
        + offs_d[None, :]
    )
    vc_ptrs = (
        v_cache_ptr
        + block_id * stride_vc_block
        + slot_in_block * stride_vc_slot
        + offs_h[:, None] * stride_vc_head
        + offs_d[None, :]
    )
    if KV_FP8:
        mask_h = (offs_h < NUM_KV_HEADS) & is_valid
        ks_ptrs = k_scale_ptr + block_id * stride_ks_block + slot_in_block * stride_ks_slot
        vs_ptrs = v_scale_ptr + block_id * stride_vs_block + slot_in_block * stride_vs_slot
        if GIVEN_SCALES:  # per-head scales, the same for every slot (strides 0 there)
            k_s = tl.load(ks_ptrs + offs_h * stride_ks_head, mask=mask_h, other=1.0)
            v_s = tl.load(vs_ptrs + offs_h * stride_vs_head, mask=mask_h, other=1.0)
        else:  # scale of each head row: its amax maps to 448
            k_s = tl.maximum(tl.max(tl.abs(k.to(tl.float32)), axis=1), 1e-12) / 448.0
            v_s = tl.maximum(tl.max(tl.abs(v.to(tl.float32)), axis=1), 1e-12) / 448.0
        k = round_to_e4m3(tl.clamp(k.to(tl.float32) / k_s[:, None], -448.0, 448.0))
        v = round_to_e4m3(tl.clamp(v.to(tl.float32) / v_s[:, None], -448.0, 448.0))
        if not GIVEN_SCALES:
            tl.store(ks_ptrs + offs_h * stride_ks_head, k_s, mask=mask_h)
            tl.store(vs_ptrs + offs_h * stride_vs_head, v_s, mask=mask_h)
    tl.store(kc_ptrs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptrs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32 or int64; < 0 skips the token
    k_scale: torch.Tensor | None = None,  # FP8 caches: [num_blocks, block_size, num_kv_heads]
    v_scale: torch.Tensor | None = None,  # fp32, kv_quant.layer_fp8_views' scale views
) -> None:
    """Store k and v at their flat slots (block_id * block_size + slot_in_block), in the
    cache's dtype; for an e4m3 cache quantized: with each row's scale stored in k_scale /
    v_scale, or, when those are per-head scales broadcast over blocks and slots (strides 0
    there: `given_scales`), with them. Tokens with slot < 0 are skipped; so are slots >=
    num_blocks * block_size, which are a caller bug (the reference raises for them). Raises
    ValueError for inputs of the wrong device, dtype, shape or layout. Never syncs the host."""
    _check_inputs(k, v, k_cache, v_cache, slot_mapping)
    is_fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = k.shape
    num_blocks, block_size = k_cache.shape[:2]
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = triton.next_power_of_2(num_kv_heads)
    with on_device(k.device):
        _kv_write_kernel[(num_tokens,)](
            k, v, k_cache, v_cache, slot_mapping,
            num_blocks * block_size,
            k.stride(0), k.stride(1),
            v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            k_scale_ptr=k_scale if k_scale is not None else k_cache,  # placeholder without FP8
            v_scale_ptr=v_scale if v_scale is not None else v_cache,
            **_scale_strides(k_scale, v_scale),
            KV_FP8=is_fp8,
            GIVEN_SCALES=is_fp8 and given_scales(k_scale, v_scale),
            ROWS_4B=is_fp8 and only_4_byte_aligned(k_cache, v_cache),
            num_warps=4 if block_h * block_d >= 2048 else 2,
        )  # fmt: skip


def _scale_strides(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> dict:
    if k_scale is None or v_scale is None:
        return {}
    return {
        "stride_ks_block": k_scale.stride(0),
        "stride_ks_slot": k_scale.stride(1),
        "stride_ks_head": k_scale.stride(2),
        "stride_vs_block": v_scale.stride(0),
        "stride_vs_slot": v_scale.stride(1),
        "stride_vs_head": v_scale.stride(2),
    }


def write_kv_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens]; < 0 skips the token
    k_scale: torch.Tensor | None = None,  # FP8 caches: [num_blocks, block_size, num_kv_heads]
    v_scale: torch.Tensor | None = None,
) -> None:
    """The same in plain torch: indexed assignment of the non-padding tokens. Syncs the host
    (boolean indexing) and raises IndexError for a slot >= num_blocks * block_size."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()  # [num_kept]
    if k_scale is not None and v_scale is not None and given_scales(k_scale, v_scale):
        where = (slots // block_size, slots % block_size)
        k_cache[where] = quantize_with_scales(k[keep], k_scale[0, 0])
        v_cache[where] = quantize_with_scales(v[keep], v_scale[0, 0])
        return
    if k_scale is not None and v_scale is not None:
        (kq, ks), (vq, vs) = quantize_rows(k[keep]), quantize_rows(v[keep])
        k_cache[slots // block_size, slots % block_size] = kq
        v_cache[slots // block_size, slots % block_size] = vq
        k_scale[slots // block_size, slots % block_size] = ks
        v_scale[slots // block_size, slots % block_size] = vs
        return
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def _check_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            "k and v must both be [num_tokens, num_kv_heads, head_dim], "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k's [num_kv_heads, head_dim] {tuple(k.shape[1:])} does not match the cache's "
            f"{tuple(k_cache.shape[2:])}"
        )
    block_size = k_cache.shape[1]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ: {k_cache.dtype}, {v_cache.dtype}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim, strides {t.stride()}")
    check_devices(k, v, k_cache, v_cache, slot_mapping)
