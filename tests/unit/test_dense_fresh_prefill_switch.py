"""engine.triton_attention's dense fresh prefill: on by default for FP8 caches only, forced either
way by DENSE_FRESH_PREFILL; only chunks that start their sequence with DENSE_MIN_QUERY_LEN queries
or more qualify (the paged kernel attends for the step's other chunks).
(Its numerics against the paged kernel: tests/gpu/test_engine_gpu.py.)"""

from __future__ import annotations

import pytest
import torch

from engine import triton_attention
from engine.attention import AttentionMetadata, PrefillChunk


def meta(*chunks: tuple[int, int]) -> AttentionMetadata:  # (query_len, context_len) each
    empty = torch.empty(0, dtype=torch.int32)
    start, prefills = 0, []
    for query_len, context_len in chunks:
        prefills.append(PrefillChunk(start, query_len, context_len, empty))
        start += query_len
    return AttentionMetadata(torch.empty(0), 0, empty.view(0, 0), empty, tuple(prefills))


@pytest.mark.parametrize(
    ("setting", "fp8", "bf16"), [(None, True, False), (True, True, True), (False, False, False)]
)
def test_the_switch_picks_fp8_caches_by_default(
    setting: bool | None, fp8: bool, bf16: bool
) -> None:
    before = triton_attention.DENSE_FRESH_PREFILL
    try:
        triton_attention.DENSE_FRESH_PREFILL = setting
        assert triton_attention.dense_fresh_prefill(True) is fp8
        assert triton_attention.dense_fresh_prefill(False) is bf16
    finally:
        triton_attention.DENSE_FRESH_PREFILL = before


def test_only_long_fresh_chunks_attend_densely() -> None:
    """A chunk qualifies when it starts its sequence and has DENSE_MIN_QUERY_LEN queries."""
    n = triton_attention.DENSE_MIN_QUERY_LEN
    step = meta((n, n), (n - 1, n - 1), (n, n + 5), (2 * n, 2 * n))  # fresh, short, prefix, fresh
    assert [c.query_len for c in triton_attention.dense_chunks(step, fp8_cache=True)] == [n, 2 * n]
    assert triton_attention.dense_chunks(step, fp8_cache=False) == []  # off for bf16 by default
    assert triton_attention.dense_chunks(meta(), fp8_cache=True) == []


@pytest.mark.parametrize("length", [13, 16, 1])
def test_dense_chunks_are_padded_to_a_bucket_without_changing_their_rows(length: int) -> None:
    """Padding to DENSE_LENGTH_BUCKET bounds the sequence lengths SDPA sees (cuDNN builds a
    plan per length); padding keys come after every real query, so the rows are unchanged."""
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(length, 4, 16, generator=gen)
    k, v = torch.randn(2, length, 2, 16, generator=gen)
    before = triton_attention.DENSE_LENGTH_BUCKET
    try:
        triton_attention.DENSE_LENGTH_BUCKET = 8
        padded = triton_attention._dense_causal(q, k, v, 0.25)
        triton_attention.DENSE_LENGTH_BUCKET = 1
        exact = triton_attention._dense_causal(q, k, v, 0.25)
    finally:
        triton_attention.DENSE_LENGTH_BUCKET = before
    assert padded.shape == (length, 4, 16)
    torch.testing.assert_close(padded, exact, atol=1e-6, rtol=1e-6)
