"""bench.engine_saturation's bound: the limits of docs/benchmarks.md, by hand."""

from __future__ import annotations

import argparse

import pytest

from bench.engine_saturation import request_bound_s
from engine.model_config import NAMED_SHAPES


def args(**overrides: float) -> argparse.Namespace:
    values = dict(input_len=1024, output_len=128, max_num_seqs=256, peak_flops=790e12,
                  peak_bandwidth=3.0e12)  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def test_llama_3_8b_bound_by_hand() -> None:
    config = NAMED_SHAPES["llama-3-8b"]
    # every weight but the embedding table is multiplied once per token: 7.50e9 (8.03e9 params
    # less the 128256 x 4096 embedding)
    matmul = config.num_parameters() - 128256 * 4096
    tokens = 1024 + 128
    attention = 4 * 32 * 32 * 128 * tokens * (tokens + 1) / 2
    bound = request_bound_s(args(), config)
    assert bound["compute_s"] == pytest.approx((2 * matmul * tokens + attention) / 790e12)
    kv_per_token = 32 * 2 * 8 * 128 * 2  # 128 KiB
    reads = sum(1024 + i for i in range(127)) * kv_per_token + 127 * 2 * matmul / 256
    assert bound["memory_s"] == pytest.approx(reads / 3.0e12)
    assert bound["bound_s"] == max(bound["compute_s"], bound["memory_s"])
    assert 0.020 < bound["compute_s"] < 0.025  # ~22 ms a request: ~5,700 output tokens/s


def test_a_smaller_batch_shares_the_weights_among_fewer() -> None:
    config = NAMED_SHAPES["llama-3-8b"]
    assert (
        request_bound_s(args(max_num_seqs=1), config)["memory_s"]
        > request_bound_s(args(max_num_seqs=256), config)["memory_s"]
    )
    # batch 1: every decode step reads all the weights, so memory bounds it
    one = request_bound_s(args(max_num_seqs=1), config)
    assert one["bound_s"] == one["memory_s"]
