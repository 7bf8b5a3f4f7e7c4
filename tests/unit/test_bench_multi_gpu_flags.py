"""The flags issue 25's multi-GPU run adds to benchmarks that ran on the CPU or in bf16 only,
checked on the CPU: bench.chaos --device and --model (a dummy shape, as the device machine can
hold: token-id prompts), bench.kvtransfer_nccl --kv-dtype fp8 (the bytes it counts and the
packed cache it moves)."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench.chaos import PROMPTS, ChaosConfig, grpc_request, make_jobs
from bench.kvtransfer_nccl import cache_for, row_bytes
from engine.kv_quant import dequantize_rows, is_fp8_cache


def test_chaos_runs_on_cpu_or_cuda_only() -> None:
    assert ChaosConfig(device="cuda").device == "cuda"
    with pytest.raises(ValueError, match=r"^device='tpu' must be 'cpu' or 'cuda'"):
        ChaosConfig(device="tpu")


def test_chaos_on_a_dummy_model_sends_token_ids_on_the_same_schedule() -> None:
    text_jobs = make_jobs(ChaosConfig(num_requests=4))
    id_jobs = make_jobs(ChaosConfig(num_requests=4, model="dummy:smollm2-135m"))
    assert [j.prompt for j in text_jobs][:2] == ["(0) " + PROMPTS[0], "(1) " + PROMPTS[1]]
    assert all(isinstance(j.prompt, list) and j.prompt for j in id_jobs)
    schedule = [(j.max_tokens, j.seed, j.arrival_s) for j in text_jobs]
    assert [(j.max_tokens, j.seed, j.arrival_s) for j in id_jobs] == schedule
    request = grpc_request(id_jobs[0], "salt")
    assert request.WhichOneof("input") == "token_ids"
    assert list(request.token_ids.ids) == id_jobs[0].prompt
    assert grpc_request(text_jobs[0], "salt").text == text_jobs[0].prompt


def test_fp8_kv_moves_the_engines_packed_blocks_about_half_the_bytes() -> None:
    bf16 = argparse.Namespace(kv_dtype="bf16", cpu_dry_run=True)
    fp8 = argparse.Namespace(kv_dtype="fp8", cpu_dry_run=True)
    assert (row_bytes(bf16, 128), row_bytes(fp8, 128)) == (256, 132)  # values + fp32 scale
    reference, packed = cache_for(bf16, "tiny", "cpu"), cache_for(fp8, "tiny", "cpu")
    assert is_fp8_cache(packed) and packed.shape == (*reference.shape[:-1], 16 + 4)
    torch.testing.assert_close(  # the same KV, quantized (e4m3: 3 mantissa bits)
        dequantize_rows(packed), reference.float(), atol=0.1, rtol=0.0725
    )
