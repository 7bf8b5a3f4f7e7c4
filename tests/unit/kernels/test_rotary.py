"""The in-place rotary kernel matches `apply_rotary_ref` and `engine.llama.apply_rotary`.

q and k are strided views into a fused qkv tensor, as in `engine.llama.Attention`; the tables
come from `engine.llama.RotaryEmbedding`. On CPU it runs under TRITON_INTERPRET=1 in fp32
(atol = rtol = 1e-5). On CUDA it runs in bf16 and fp16 against the same-dtype reference: both
compute in fp32 and round once, but the kernel computes x*c + y*s as one FMA (rotary.rotate),
which can flip that rounding by one ulp, hence bf16 atol = rtol = 1.6e-2 and fp16 2e-3.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engine.kernels.rotary import apply_rotary_, apply_rotary_ref
from engine.llama import RotaryEmbedding, apply_rotary
from engine.model_config import ModelConfig

pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
MAX_POSITIONS = 2048
PAD = 5  # extra columns per qkv row, so no row stride is a neat multiple of anything
HEAD_SHAPES = [  # (num_heads, num_kv_heads, head_dim)
    (9, 3, 64),  # SmolLM2-135M
    (32, 8, 128),  # Llama-3-8B
    (40, 8, 128),  # more q heads than one tile holds: the head loop runs twice, masked
    (4, 1, 80),  # head_dim / 2 not a power of two: masked lanes
]


def rope_tables(head_dim: int, rope_theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    config = ModelConfig(
        vocab_size=1,
        hidden_size=head_dim,
        intermediate_size=1,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=rope_theta,
    )
    rotary = RotaryEmbedding(config).to(DEVICE)
    return rotary.cos2, rotary.sin2


def fused_qkv(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qkv, q, k): q [num_tokens, num_heads, head_dim] and k views into one padded buffer."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    gen = torch.Generator().manual_seed(num_tokens * 1000 + num_heads)
    width = q_size + 2 * kv_size + PAD
    qkv = torch.randn(num_tokens, width, generator=gen).to(DEVICE, dtype)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k


def random_positions(num_tokens: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(num_tokens)
    return torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
def test_matches_reference(
    num_tokens: int, head_shape: tuple[int, int, int], dtype: torch.dtype
) -> None:
    num_heads, num_kv_heads, head_dim = head_shape
    cos2, sin2 = rope_tables(head_dim)
    qkv, q, k = fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    qkv_before = qkv.clone()
    positions = random_positions(num_tokens)
    expected_q, expected_k = apply_rotary_ref(q, k, positions, cos2, sin2)

    apply_rotary_(q, k, positions, cos2, sin2)

    torch.testing.assert_close(q, expected_q, **TOLERANCES[dtype])
    torch.testing.assert_close(k, expected_k, **TOLERANCES[dtype])
    untouched = (num_heads + num_kv_heads) * head_dim  # v and the padding
    assert torch.equal(qkv[:, untouched:], qkv_before[:, untouched:]), "wrote outside q and k"


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_llama_apply_rotary(dtype: torch.dtype) -> None:
    num_heads, num_kv_heads, head_dim = 9, 3, 64
    cos2, sin2 = rope_tables(head_dim, rope_theta=100000.0)
    qkv, q, k = fused_qkv(17, num_heads, num_kv_heads, head_dim, dtype)
    positions = random_positions(17)
    # What engine.llama.Attention does: q and k heads rotated together as one view.
    qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(17, -1, head_dim)
    expected = apply_rotary(qk, (cos2[positions].unsqueeze(1), sin2[positions].unsqueeze(1)))

    apply_rotary_(q, k, positions, cos2, sin2)

    torch.testing.assert_close(qk, expected, **TOLERANCES[dtype])


def test_int32_positions_and_contiguous_inputs() -> None:
    dtype = DTYPES[0]
    cos2, sin2 = rope_tables(64)
    _, q_view, k_view = fused_qkv(3, 4, 2, 64, dtype)
    q, k = q_view.contiguous(), k_view.contiguous()
    positions = random_positions(3, torch.int32)
    expected_q, expected_k = apply_rotary_ref(q, k, positions, cos2, sin2)

    apply_rotary_(q, k, positions, cos2, sin2)

    torch.testing.assert_close(q, expected_q, **TOLERANCES[dtype])
    torch.testing.assert_close(k, expected_k, **TOLERANCES[dtype])


def test_position_zero_is_identity() -> None:
    dtype = DTYPES[0]
    cos2, sin2 = rope_tables(128)
    qkv, q, k = fused_qkv(3, 8, 2, 128, dtype)
    qkv_before = qkv.clone()

    apply_rotary_(q, k, torch.zeros(3, dtype=torch.int64, device=DEVICE), cos2, sin2)

    assert torch.equal(qkv, qkv_before)


def test_zero_tokens() -> None:
    cos2, sin2 = rope_tables(64)
    _, q, k = fused_qkv(0, 4, 2, 64, DTYPES[0])
    apply_rotary_(q, k, torch.zeros(0, dtype=torch.int64, device=DEVICE), cos2, sin2)


@pytest.mark.parametrize(
    "case", ["k_dtype", "k_head_dim", "positions_len", "table_width", "dim_stride", "odd_dim"]
)
def test_rejects_bad_inputs(case: str) -> None:
    cos2, sin2 = rope_tables(64)
    _, q, k = fused_qkv(3, 4, 2, 64, DTYPES[0])
    kwargs: dict[str, torch.Tensor] = dict(
        q=q, k=k, positions=random_positions(3), cos2=cos2, sin2=sin2
    )
    if case == "k_dtype":
        kwargs["k"] = k.to(torch.float64)
    elif case == "k_head_dim":
        kwargs["k"] = k[..., :32]
    elif case == "positions_len":
        kwargs["positions"] = random_positions(4)
    elif case == "table_width":
        kwargs["cos2"], kwargs["sin2"] = rope_tables(128)
    elif case == "dim_stride":
        kwargs["q"] = q.transpose(1, 2).contiguous().transpose(1, 2)  # head_dim stride 4
    elif case == "odd_dim":
        kwargs["q"], kwargs["k"] = q[..., :63], k[..., :63]
    with pytest.raises(ValueError):
        apply_rotary_(**kwargs)
