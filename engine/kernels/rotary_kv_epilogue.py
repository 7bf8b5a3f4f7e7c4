"""The rotary embedding and the KV write as the epilogue of a single-row QKV projection.

At one decode row the QKV GEMV (engine.kernels.gemv, or engine.kernels.fp8_gemv for FP8 weights)
is followed by one more launch a layer, kv_write.rotary_write_kv: rotate q and k, store k and v
into the paged cache. Here the GEMV does that work itself on the outputs it already holds:

- its programs take rows in rotary pairs: program p computes pairs p * P .. p * P + P - 1
  (P = BLOCK_N / 2), pair i being rows (head * head_dim + j, head * head_dim + j + head_dim / 2)
  with head = i // (head_dim / 2), j = i % (head_dim / 2), so each program holds both halves
  of every element it rotates (`paired_rows`);
- its epilogue (`rotary_kv_epilogue`) rounds each output to the output dtype (the projection as
  `gemv` stores it), rotates q and k pairs as engine.kernels.rotary does (`rotary.rotate`, the
  same fp32 FMAs), stores q, k and v into the projection's output, and k and v into the cache
  as kv_write does (FP8 caches: quantized with the given per-head scales).

Bitwise the same output and cache as the GEMV followed by `rotary_write_kv`, one launch fewer a
layer. Only for one row (the GEMVs run single rows only in the engine), no bias, and caches
whose write needs no reduction over a head: float caches, or e4m3 with per-head scales
(engine.kv_quant.layer_fp8_views); per-token scales need each head's amax, which no program
holds. `RotaryKvWrite.apply_ref` is the torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import rotary
from engine.kernels.fp8_round import round_to_e4m3
from engine.kernels.kv_write import rotary_write_kv_ref
from engine.kernels.launch import check_kv_scales, given_scales


@dataclass(frozen=True, slots=True)
class RotaryKvWrite:
    """Where a QKV projection's epilogue rotates and writes: one row, its position and slot."""

    num_heads: int  # q heads; the projection's output is [q | k | v] heads of head_dim
    num_kv_heads: int
    head_dim: int
    positions: torch.Tensor  # [1] int32/int64, below cos2's rows
    cos2: torch.Tensor  # [max_positions, head_dim] fp32, RotaryEmbedding.cos2
    sin2: torch.Tensor  # [max_positions, head_dim] fp32, RotaryEmbedding.sin2
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # [1] int32/int64; < 0 (padding) writes no cache
    k_scale: torch.Tensor | None = None  # e4m3 caches: per-head scale views (layer_fp8_views)
    v_scale: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def check(
        self, x: torch.Tensor, out_features: int, block_n: int, out_dtype: torch.dtype
    ) -> None:
        """ValueError naming what does not fit a projection of x ([M, K]) to out_features
        outputs of out_dtype, BLOCK_N rows a program."""
        if x.shape[0] != 1:
            raise ValueError(f"the rotary + KV write epilogue takes one row, got {x.shape[0]}")
        if out_features != self.out_features:
            raise ValueError(
                f"the projection has {out_features} outputs; q, k and v heads of "
                f"({self.num_heads}, {self.num_kv_heads}, {self.num_kv_heads}) x {self.head_dim}"
                f" need {self.out_features}"
            )
        half = self.head_dim // 2
        if self.head_dim % 2 or block_n % 2 or half % (block_n // 2):
            raise ValueError(
                f"BLOCK_N {block_n} must be even and its pairs ({block_n // 2}) divide "
                f"head_dim / 2 ({self.head_dim / 2})"
            )
        if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"out_dtype must be fp32, bf16 or fp16, got {out_dtype}")
        bad_table = any(
            t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != self.head_dim
            or t.stride(1) != 1 for t in (self.cos2, self.sin2)
        )  # fmt: skip
        if bad_table or self.cos2.stride() != self.sin2.stride():
            raise ValueError(
                f"cos2 and sin2 must be [max_positions, {self.head_dim}] fp32 with contiguous "
                f"rows and one layout, got {tuple(self.cos2.shape)} {self.cos2.dtype}"
            )
        for name, t in (("positions", self.positions), ("slot_mapping", self.slot_mapping)):
            if t.shape != (1,) or t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be [1] int32/int64, got {tuple(t.shape)} {t.dtype}")
        expected = (self.num_kv_heads, self.head_dim)
        for name, cache in (("k_cache", self.k_cache), ("v_cache", self.v_cache)):
            if cache.dim() != 4 or tuple(cache.shape[2:]) != expected or cache.stride(3) != 1:
                raise ValueError(
                    f"{name} must be [num_blocks, block_size, {self.num_kv_heads}, "
                    f"{self.head_dim}] with contiguous rows, got {tuple(cache.shape)}"
                )
        if self.k_cache.shape[:2] != self.v_cache.shape[:2] or self.k_cache.dtype != (
            self.v_cache.dtype
        ):
            raise ValueError("k_cache and v_cache must have the same blocks and dtype")
        if check_kv_scales(self.k_cache, self.v_cache, self.k_scale, self.v_scale) and not (
            given_scales(self.k_scale, self.v_scale)
        ):
            raise ValueError(
                "an e4m3 cache with a scale per token needs each head's amax: the epilogue "
                "writes per-head-scale caches only (use kv_write.rotary_write_kv)"
            )
        tensors = (self.positions, self.cos2, self.sin2, self.k_cache, self.v_cache,
                   self.slot_mapping)  # fmt: skip
        if any(t.device != x.device for t in tensors):
            raise ValueError(f"the rotary + KV write tensors must be on x's device {x.device}")

    def kernel_args(self) -> dict:
        """The GEMV kernels' epilogue arguments (ROTARY_KV and what it reads)."""
        is_fp8 = self.k_scale is not None
        num_blocks, block_size = self.k_cache.shape[:2]
        return {
            "positions_ptr": self.positions,
            "cos_ptr": self.cos2,
            "sin_ptr": self.sin2,
            "stride_table": self.cos2.stride(0),
            "slot_mapping_ptr": self.slot_mapping,
            "num_slots": num_blocks * block_size,
            "k_cache_ptr": self.k_cache,
            "v_cache_ptr": self.v_cache,
            "stride_kc_block": self.k_cache.stride(0),
            "stride_kc_slot": self.k_cache.stride(1),
            "stride_kc_head": self.k_cache.stride(2),
            "stride_vc_block": self.v_cache.stride(0),
            "stride_vc_slot": self.v_cache.stride(1),
            "stride_vc_head": self.v_cache.stride(2),
            "k_scale_ptr": self.k_scale if self.k_scale is not None else self.k_cache,
            "v_scale_ptr": self.v_scale if self.v_scale is not None else self.v_cache,
            "stride_ks_head": self.k_scale.stride(2) if self.k_scale is not None else 0,
            "stride_vs_head": self.v_scale.stride(2) if self.v_scale is not None else 0,
            "NUM_HEADS": self.num_heads,
            "NUM_KV_HEADS": self.num_kv_heads,
            "HEAD_DIM": self.head_dim,
            "BLOCK_SIZE": block_size,
            "KV_FP8": is_fp8,
            "ROTARY_KV": True,
        }

    def apply_ref(self, qkv: torch.Tensor) -> None:
        """Torch reference of the epilogue on an unrotated projection output [1, N]: q and k
        rotated in place, k and v written into the cache (kv_write.rotary_write_kv_ref)."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        rotary_write_kv_ref(
            q, k, v, self.positions, self.cos2, self.sin2, self.k_cache, self.v_cache,
            self.slot_mapping, self.k_scale, self.v_scale,
        )  # fmt: skip


def launch_args(rotary_kv: RotaryKvWrite | None) -> dict:
    """A GEMV kernel's epilogue keyword arguments: none without an epilogue (the defaults)."""
    return {} if rotary_kv is None else rotary_kv.kernel_args()


@triton.jit
def paired_rows(pid, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[BLOCK_N] output rows of program pid: element 2 * i + h is half h of pair pid * P + i."""
    P: tl.constexpr = BLOCK_N // 2
    HALF: tl.constexpr = HEAD_DIM // 2
    idx = tl.arange(0, BLOCK_N)
    pair = pid * P + idx // 2
    return (pair // HALF) * HEAD_DIM + pair % HALF + (idx % 2) * HALF


@triton.jit
def rotary_kv_epilogue(
    values,  # [BLOCK_N] fp32: this program's outputs in paired_rows order, not yet rounded
    pid,
    out_ptr,  # [1, N] the projection's output
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_table,
    slot_mapping_ptr,
    num_slots,
    k_cache_ptr,
    v_cache_ptr,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    k_scale_ptr,
    v_scale_ptr,
    stride_ks_head,
    stride_vs_head,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Round, rotate (q and k heads), store the output, and write k and v into the cache."""
    P: tl.constexpr = BLOCK_N // 2
    HALF: tl.constexpr = HEAD_DIM // 2
    out_ty = out_ptr.dtype.element_ty
    stored = values.to(out_ty).to(tl.float32)  # the projection as the GEMV alone stores it
    a, b = tl.split(tl.reshape(stored, [P, 2]))  # first and second halves of each pair
    pair = pid * P + tl.arange(0, P)
    head = pair // HALF  # one head for the whole program (P divides HALF)
    j = pair % HALF
    row_a = head * HEAD_DIM + j

    table = tl.load(positions_ptr).to(tl.int64) * stride_table
    c1 = tl.load(cos_ptr + table + j)
    c2 = tl.load(cos_ptr + table + HALF + j)
    s1 = tl.load(sin_ptr + table + j)
    s2 = tl.load(sin_ptr + table + HALF + j)
    rotates = head < NUM_HEADS + NUM_KV_HEADS  # q and k heads; v heads pass through
    a_out = tl.where(rotates, rotary.rotate(a, b, c1, s1), a).to(out_ty)
    b_out = tl.where(rotates, rotary.rotate(b, a, c2, s2), b).to(out_ty)
    tl.store(out_ptr + row_a, a_out)
    tl.store(out_ptr + row_a + HALF, b_out)

    slot = tl.load(slot_mapping_ptr).to(tl.int64)
    valid = (slot >= 0) & (slot < num_slots)  # < 0: padding
    slot = tl.where(valid, slot, 0)
    block_id = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    is_k = (head >= NUM_HEADS) & rotates
    is_v = head >= NUM_HEADS + NUM_KV_HEADS
    kv_head = tl.where(is_k, head - NUM_HEADS, head - NUM_HEADS - NUM_KV_HEADS)
    kv_head = tl.where(is_k | is_v, kv_head, 0)  # q programs store nothing: any head in range
    a_kv = a_out.to(tl.float32)
    b_kv = b_out.to(tl.float32)
    k_dst = k_cache_ptr + block_id * stride_kc_block + in_block * stride_kc_slot
    v_dst = v_cache_ptr + block_id * stride_vc_block + in_block * stride_vc_slot
    k_dst = k_dst + kv_head * stride_kc_head + j
    v_dst = v_dst + kv_head * stride_vc_head + j
    if KV_FP8:  # as kv_write with given per-head scales: x / scale, clamped, rounded to e4m3
        k_s = tl.load(k_scale_ptr + kv_head * stride_ks_head)
        v_s = tl.load(v_scale_ptr + kv_head * stride_vs_head)
        scale = tl.where(is_k, k_s, v_s)
        a_kv = round_to_e4m3(tl.clamp(a_kv / scale, -448.0, 448.0))
        b_kv = round_to_e4m3(tl.clamp(b_kv / scale, -448.0, 448.0))
    cache_ty = k_cache_ptr.dtype.element_ty
    tl.store(k_dst, a_kv.to(cache_ty), mask=is_k & valid)
    tl.store(k_dst + HALF, b_kv.to(cache_ty), mask=is_k & valid)
    tl.store(v_dst, a_kv.to(cache_ty), mask=is_v & valid)
    tl.store(v_dst + HALF, b_kv.to(cache_ty), mask=is_v & valid)
