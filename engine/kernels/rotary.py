"""Rotary position embedding ("rotate half") applied in place to q and k, from
engine.llama.RotaryEmbedding's full-width fp32 tables (row p for position p):

    out = x * [cos, cos] + roll(x, head_dim / 2) * [-sin, sin]    (fp32, stored in x's dtype)

each element as one FMA, fma(x, cos2, partner * sin2) (`rotate`, shared with kv_write's fused
rotary + KV write so that both round alike).

q and k may be strided views of a fused qkv output. Positions are not bounds-checked on the
device: each must be below max_positions. `apply_rotary_ref` is the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one half-tile [BLOCK_HEADS, BLOCK_HALF] a program holds at a time.
_MAX_TILE = 2048


@triton.jit
def rotate(x, partner, c, s):
    """fp32 "rotate half" of elements x whose partners (d +- head_dim / 2) are `partner`, with
    that element's cos2 / sin2: x * c + partner * s as one explicit FMA. Left as a sum of two
    products, the compiler fuses one of them into an FMA, and which one follows LLVM's operand
    order (for sm_90, x * c for half of the elements and partner * s for the others): written
    out, every kernel that calls this rounds each element the same way."""
    return tl.fma(x, c, partner * s)


@triton.jit
def _rotate_heads(
    x_ptr,  # [num_tokens, NUM_HEADS, head_dim], rotated in place
    token,  # int64 token index
    token_stride,
    head_stride,
    c1,  # [1, BLOCK_HALF] fp32 cos2[pos, :HALF]
    c2,  # [1, BLOCK_HALF] fp32 cos2[pos, HALF:]
    s1,  # [1, BLOCK_HALF] fp32 sin2[pos, :HALF]  (= -sin)
    s2,  # [1, BLOCK_HALF] fp32 sin2[pos, HALF:]  (= +sin)
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    dims = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF] offset within a half
    # Tiles of BLOCK_HEADS heads; usually one, and the loop is unrolled at compile time.
    for head_start in tl.static_range(0, NUM_HEADS, BLOCK_HEADS):
        heads = head_start + tl.arange(0, BLOCK_HEADS)[:, None]  # [BLOCK_HEADS, 1]
        mask = (heads < NUM_HEADS) & (dims < HALF)
        # x[token, head, d] for d in the first half; the second half is HALF further on.
        ptrs = x_ptr + token * token_stride + heads * head_stride + dims
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, rotate(x1, x2, c1, s1).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + HALF, rotate(x2, x1, c2, s2).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [num_tokens, NUM_HEADS, head_dim]
    k_ptr,  # [num_tokens, NUM_KV_HEADS, head_dim]
    positions_ptr,  # [num_tokens] int32/int64
    cos_ptr,  # [max_positions, head_dim] fp32
    sin_ptr,  # [max_positions, head_dim] fp32
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    table_stride,
    NUM_HEADS: tl.constexpr,  # model constants: one compile per model, masks fold away
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_HEADS_Q: tl.constexpr,
    BLOCK_HEADS_K: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
):
    # One program per token; it rotates all of that token's q heads, then all its k heads,
    # with the token's table row loaded once.
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < HALF
    row = pos * table_stride + dims  # table[pos, d] for d in the first half
    c1 = tl.load(cos_ptr + row, mask=dim_mask, other=0.0)
    c2 = tl.load(cos_ptr + row + HALF, mask=dim_mask, other=0.0)
    s1 = tl.load(sin_ptr + row, mask=dim_mask, other=0.0)
    s2 = tl.load(sin_ptr + row + HALF, mask=dim_mask, other=0.0)
    _rotate_heads(
        q_ptr, token, q_token_stride, q_head_stride, c1, c2, s1, s2,
        NUM_HEADS, HALF, BLOCK_HEADS_Q, BLOCK_HALF,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, token, k_token_stride, k_head_stride, c1, c2, s1, s2,
        NUM_KV_HEADS, HALF, BLOCK_HEADS_K, BLOCK_HALF,
    )  # fmt: skip


def apply_rotary_(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim] fp32/bf16/fp16, rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] q's dtype, rotated in place
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos2: torch.Tensor,  # [max_positions, head_dim] fp32
    sin2: torch.Tensor,  # [max_positions, head_dim] fp32
) -> None:
    """Rotates q and k in place (returns nothing). q and k may be any views whose head_dim has
    stride 1 (e.g. slices of a fused qkv output); they must not overlap each other. Raises
    ValueError on a bad device, dtype, shape or stride.
    """
    check_inputs(q, k, positions, cos2, sin2)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos2,
        sin2,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos2.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_HEADS_Q=heads_per_tile(num_heads, block_half),
        BLOCK_HEADS_K=heads_per_tile(num_kv_heads, block_half),
        BLOCK_HALF=block_half,
        num_warps=4,
    )


def heads_per_tile(num_heads: int, block_half: int) -> int:
    """BLOCK_HEADS of `_rotate_heads`: all heads, at most _MAX_TILE // block_half (a power of
    two) at a time."""
    return min(triton.next_power_of_2(num_heads), max(1, _MAX_TILE // block_half))


def apply_rotary_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens]
    cos2: torch.Tensor,  # [max_positions, head_dim] fp32
    sin2: torch.Tensor,  # [max_positions, head_dim] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch reference: new rotated (q, k) in the inputs' dtype; inputs are not modified."""
    cos = cos2[positions].unsqueeze(1)  # [num_tokens, 1, head_dim]
    sin = sin2[positions].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)

    return rotate(q), rotate(k)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos2: torch.Tensor,
    sin2: torch.Tensor,
) -> None:
    """ValueError unless q, k, positions and the tables are what `apply_rotary_` takes."""
    if not q.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(f"q must be on a CUDA device (or TRITON_INTERPRET=1), got {q.device}")
    for name, t in (("k", k), ("positions", positions), ("cos2", cos2), ("sin2", sin2)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be 3-D, got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a float dtype, got {q.dtype} and {k.dtype}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"head_dim must have stride 1, got {q.stride()} and {k.stride()}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be [{num_tokens}] int32/int64, got "
            f"{tuple(positions.shape)} {positions.dtype}"
        )
    if positions.stride(0) != 1 and num_tokens > 1:
        raise ValueError(f"positions must be contiguous, got stride {positions.stride()}")
    for name, t in (("cos2", cos2), ("sin2", sin2)):
        if t.dim() != 2 or t.shape[1] != head_dim or t.dtype != torch.float32:
            raise ValueError(
                f"{name} must be [max_positions, {head_dim}] fp32, got {tuple(t.shape)} {t.dtype}"
            )
    if cos2.shape != sin2.shape or cos2.stride() != sin2.stride() or cos2.stride(1) != 1:
        raise ValueError(
            f"cos2 and sin2 must share shape and row-major strides, got {cos2.stride()} and "
            f"{sin2.stride()}"
        )
