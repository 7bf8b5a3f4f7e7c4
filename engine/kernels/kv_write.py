"""Store the keys and values of this step's new tokens into the paged KV cache: one program per
token copies its [num_kv_heads, head_dim] rows into slot // block_size, slot % block_size,
converting to the cache's dtype (FP8 caches: quantized in registers, with one scale per head row
computed and stored, or with the per-head scales given, engine.kv_quant).
Padding tokens (slot < 0) are skipped; it never syncs the host and never writes outside the
cache. `write_kv_ref` is the torch reference. Layout and grid: docs/engine.md.

`rotary_write_kv` is the same launch with the rotary embedding (engine.kernels.rotary) fused in:
each program also rotates its token's q heads and k rows in place, and stores the rotated k, so
one launch does the work of `apply_rotary_` then `write_kv`, bit for bit
(`rotary_write_kv_ref`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import rotary
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
    q_ptr=None,  # with ROTARY: [num_tokens, NUM_HEADS, head_dim], rotated in place
    positions_ptr=None,  # [num_tokens] int32/int64
    cos_ptr=None,  # [max_positions, HEAD_DIM] fp32, RotaryEmbedding.cos2
    sin_ptr=None,  # [max_positions, HEAD_DIM] fp32, RotaryEmbedding.sin2
    stride_q_token=0,
    stride_q_head=0,
    stride_table=0,
    NUM_HEADS: tl.constexpr = 0,
    BLOCK_HEADS_Q: tl.constexpr = 1,  # q heads per tile (rotary.heads_per_tile)
    BLOCK_HALF: tl.constexpr = 1,  # HEAD_DIM // 2 rounded up to a power of two
    ROTARY: tl.constexpr = False,  # rotate q and k in place first (rotary_write_kv)
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    is_valid = (slot >= 0) & (slot < num_slots)  # < 0: padding; >= num_slots: caller bug
    slot = tl.where(is_valid, slot, 0)  # keep the address math in range for skipped tokens
    block_id = slot // BLOCK_SIZE
    slot_in_block = slot % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    in_tile = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    mask = in_tile & is_valid

    # Source rows of this token, [BLOCK_H, BLOCK_D]: element (h, d) at token*stride + h*stride + d.
    k_ptrs = k_ptr + token * stride_k_token + offs_h[:, None] * stride_k_head + offs_d[None, :]
    if ROTARY:  # every token is rotated, padding too (as apply_rotary_ does)
        k = _rotate_q_and_k(
            q_ptr, k_ptrs, positions_ptr, cos_ptr, sin_ptr, token, stride_q_token,
            stride_q_head, stride_table, offs_d, in_tile, NUM_HEADS, HEAD_DIM, BLOCK_HEADS_Q,
            BLOCK_HALF,
        )  # fmt: skip
    else:
        k = tl.load(k_ptrs, mask=mask, other=0.0)  # padding lanes must not reach the FP8 amax
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


@triton.jit
def _rotate_q_and_k(
    q_ptr,  # [num_tokens, NUM_HEADS, head_dim]
    k_ptrs,  # [BLOCK_H, BLOCK_D] pointers to this token's k rows
    positions_ptr,
    cos_ptr,
    sin_ptr,
    token,  # int64
    stride_q_token,
    stride_q_head,
    stride_table,
    offs_d,  # [BLOCK_D] arange
    in_tile,  # [BLOCK_H, BLOCK_D] lanes inside [num_kv_heads, head_dim]
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS_Q: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate the token's q heads in place (rotary._rotate_heads) and its k rows in registers:
    rotated k is stored in place and returned, [BLOCK_H, BLOCK_D] in k's dtype, 0 outside
    `in_tile`. The same fp32 arithmetic as rotary._rotary_kernel, element by element."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(positions_ptr + token).to(tl.int64)
    row = pos * stride_table  # table row of this token's position
    halves = tl.arange(0, BLOCK_HALF)[None, :]
    in_half = halves < HALF
    c1 = tl.load(cos_ptr + row + halves, mask=in_half, other=0.0)
    c2 = tl.load(cos_ptr + row + HALF + halves, mask=in_half, other=0.0)
    s1 = tl.load(sin_ptr + row + halves, mask=in_half, other=0.0)
    s2 = tl.load(sin_ptr + row + HALF + halves, mask=in_half, other=0.0)
    rotary._rotate_heads(
        q_ptr, token, stride_q_token, stride_q_head, c1, c2, s1, s2,
        NUM_HEADS, HALF, BLOCK_HEADS_Q, BLOCK_HALF,
    )  # fmt: skip
    # k whole-row: element d pairs with d + HALF (first half) or d - HALF (second half), and
    # cos2 / sin2 [pos, d] are that element's c and s: out = x * c + partner * s
    partner_d = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    in_row = offs_d < HEAD_DIM
    c = tl.load(cos_ptr + row + offs_d, mask=in_row, other=0.0)[None, :]
    s = tl.load(sin_ptr + row + offs_d, mask=in_row, other=0.0)[None, :]
    x = tl.load(k_ptrs, mask=in_tile, other=0.0).to(tl.float32)
    partner = tl.load(k_ptrs + (partner_d - offs_d)[None, :], mask=in_tile, other=0.0)
    k = rotary.rotate(x, partner.to(tl.float32), c, s).to(k_ptrs.dtype.element_ty)
    # An element and its partner may belong to different warps (one KV head: column d to
    # warp d // 32, no shared-memory exchange, no barrier in the PTX): every partner must be
    # loaded before any rotated value overwrites it.
    tl.debug_barrier()
    tl.store(k_ptrs, k, mask=in_tile)
    return k


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
    num_kv_heads, head_dim = k.shape[1:]
    block_d = triton.next_power_of_2(head_dim)
    block_h = triton.next_power_of_2(num_kv_heads)
    num_warps = 4 if block_h * block_d >= 2048 else 2
    _launch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, is_fp8, num_warps, {})


def rotary_write_kv(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim] fp32/bf16/fp16, rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] q's dtype, rotated in place
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int32/int64, each below max_positions
    cos2: torch.Tensor,  # [max_positions, head_dim] fp32, RotaryEmbedding.cos2
    sin2: torch.Tensor,  # [max_positions, head_dim] fp32, RotaryEmbedding.sin2
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32 or int64; < 0 skips the token's write
    k_scale: torch.Tensor | None = None,  # FP8 caches, as for write_kv
    v_scale: torch.Tensor | None = None,
) -> None:
    """`apply_rotary_(q, k, positions, cos2, sin2)` then `write_kv(k, v, k_cache, v_cache,
    slot_mapping, k_scale, v_scale)` in one launch, with bitwise the same q, k, cache and
    scales: every token's q and k are rotated in place (padding tokens' too), and the rotated k
    with v is written as write_kv writes it. q, k and v may be views of one fused qkv output
    (head_dim contiguous) but must not overlap. Raises ValueError where either of the two
    would. Never syncs the host."""
    rotary.check_inputs(q, k, positions, cos2, sin2)
    _check_inputs(k, v, k_cache, v_cache, slot_mapping)
    is_fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    num_heads, head_dim = q.shape[1:]
    block_half = triton.next_power_of_2(head_dim // 2)
    rotation = {
        "q_ptr": q,
        "positions_ptr": positions,
        "cos_ptr": cos2,
        "sin_ptr": sin2,
        "stride_q_token": q.stride(0),
        "stride_q_head": q.stride(1),
        "stride_table": cos2.stride(0),
        "NUM_HEADS": num_heads,
        "BLOCK_HEADS_Q": rotary.heads_per_tile(num_heads, block_half),
        "BLOCK_HALF": block_half,
        "ROTARY": True,
    }
    _launch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, is_fp8, 4, rotation)


def _launch(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    is_fp8: bool,
    num_warps: int,
    rotation: dict,  # _kv_write_kernel's rotary arguments, or none
) -> None:
    """One program per token of checked inputs."""
    num_tokens, num_kv_heads, head_dim = k.shape
    num_blocks, block_size = k_cache.shape[:2]
    if num_tokens == 0:
        return
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
            BLOCK_H=triton.next_power_of_2(num_kv_heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
            k_scale_ptr=k_scale if k_scale is not None else k_cache,  # placeholder without FP8
            v_scale_ptr=v_scale if v_scale is not None else v_cache,
            **_scale_strides(k_scale, v_scale),
            KV_FP8=is_fp8,
            GIVEN_SCALES=is_fp8 and given_scales(k_scale, v_scale),
            ROWS_4B=is_fp8 and only_4_byte_aligned(k_cache, v_cache),
            **rotation,
            num_warps=num_warps,
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


def rotary_write_kv_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    v: torch.Tensor,
    positions: torch.Tensor,  # [num_tokens]
    cos2: torch.Tensor,  # [max_positions, head_dim] fp32
    sin2: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]; < 0 skips the token's write
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """The same in plain torch: rotary.apply_rotary_ref's q and k copied into q and k, then
    write_kv_ref."""
    rotated_q, rotated_k = rotary.apply_rotary_ref(q, k, positions, cos2, sin2)
    q.copy_(rotated_q)
    k.copy_(rotated_k)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


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
