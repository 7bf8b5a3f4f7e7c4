"""The engine with an FP8 KV cache (`kv_cache_dtype="fp8"`) on CPU, tiny dummy model, with
either scale scheme (engine.kv_quant): per head (the default, scales calibrated at start-up)
or per token (the packed cache: e4m3 values and a scale per (token, kv head) in each block).

Either way every row is quantized once, when written, and never rescaled. So reusing blocks
changes nothing: greedy outputs are the same with prefix caching on or off, and every block is
back at the end. Chunked prefill and preemption recompute K/V in other batches; on this tiny
model the tokens stay the same, but FP8 rounding can amplify the last-bit differences of fp32
sums taken in another batch, so on a real model they need not (docs/benchmarks.md,
"Determinism"). The packed cache's layout is tested here; the per-head cache's, its
calibration and its KV transfer naming in tests/unit/test_fp8_kv_per_head.py.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_quant import (
    dequantize_rows,
    is_fp8_cache,
    is_per_head_fp8_cache,
    pack_blocks,
    packed_row_bytes,
    split_fp8_cache,
    write_kv_fp8_ref,
)
from tests.conftest import greedy, make_engine, prompt_ids

PROMPTS = [prompt_ids(seed, length) for seed, length in ((1, 23), (2, 9), (3, 41), (4, 16))]
SCHEMES = pytest.mark.parametrize("scales", ["per_head", "per_token"])


def outputs(engine: Engine, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    result = [c.token_ids for c in engine.generate(prompts, greedy(max_tokens))]
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return result


def fp8_engine(scales: str, **kwargs: object) -> Engine:
    return make_engine(kv_cache_dtype="fp8", kv_cache_scales=scales, **kwargs)  # type: ignore[arg-type]


def test_the_per_token_cache_is_packed_fp8_with_scales() -> None:
    engine = fp8_engine("per_token")
    cache = engine.runner.kv_cache
    config = engine.model_config
    assert is_fp8_cache(cache) and not is_per_head_fp8_cache(cache)
    assert cache.shape[-1] == packed_row_bytes(config.head_dim) == config.head_dim + 4
    # no calibration, no scales beside the cache, nothing for KV transfer to compare
    assert engine.model.kv_scales is None and engine.kv_scales_digest is None
    assert all(layer.self_attn.kv_scales is None for layer in engine.model.decoder_layers)


def test_value_rows_start_16_byte_aligned_and_scales_follow_each_block() -> None:
    """Each block holds its e4m3 values [block_size, kv_heads, head_dim], then its fp32 scales:
    at head_dim 128 every value row starts 16-byte aligned, so the attention kernels load 16
    bytes at a time (rows followed by their own scale were 132 bytes apart: byte loads, and
    FP8 KV decode 6x slower than bf16 at batch 64 on an H100, docs/benchmarks.md)."""
    layers, blocks, block_size, heads, head_dim = 2, 3, 4, 2, 128
    x = torch.randn(layers, 2, blocks, block_size, heads, head_dim)
    cache = pack_blocks(x)
    assert cache.shape == (layers, 2, blocks, block_size, heads, head_dim + 4)
    values, scales = split_fp8_cache(cache[1])
    assert values.shape == (2, blocks, block_size, heads, head_dim)
    assert scales.shape == (2, blocks, block_size, heads) and scales.dtype == torch.float32
    assert all(stride % 16 == 0 for stride in values.stride()[:-1])
    assert (values.data_ptr() - cache.data_ptr()) % 16 == 0
    block_bytes = block_size * heads * (head_dim + 4)
    first_block = cache[1, 0, 0].reshape(-1)[:block_bytes]
    assert torch.equal(first_block[: block_size * heads * head_dim],
                       values[0, 0].reshape(-1).view(torch.uint8))  # fmt: skip
    assert torch.equal(first_block[block_size * heads * head_dim :].view(torch.float32),
                       scales[0, 0].reshape(-1))  # fmt: skip
    # values round-trip within e4m3 precision; the reference write lands in the same bytes
    assert ((dequantize_rows(cache) - x).abs() <= x.abs() * 2**-4 + 1e-3).all()
    rewritten = torch.zeros_like(cache[1])
    slots = torch.arange(blocks * block_size)
    k = x[1, 0].reshape(-1, heads, head_dim)
    v = x[1, 1].reshape(-1, heads, head_dim)
    write_kv_fp8_ref(rewritten, k, v, slots)
    assert torch.equal(rewritten, cache[1])


def test_only_whole_blocks_split_into_values_and_scales() -> None:
    cache = pack_blocks(torch.randn(3, 4, 2, 8))
    with pytest.raises(ValueError, match="whole blocks"):
        split_fp8_cache(cache[:, 1:])


@SCHEMES
def test_prefix_caching_does_not_change_fp8_outputs(scales: str) -> None:
    shared = prompt_ids(9, 20)
    prompts = [shared + p[:5] for p in PROMPTS]
    cached = fp8_engine(scales, enable_prefix_caching=True)
    first = outputs(cached, prompts)
    hits = cached.block_manager.num_prefix_hits
    assert outputs(cached, prompts) == first  # the second pass hits the prefix cache
    assert cached.block_manager.num_prefix_hits > hits
    assert outputs(fp8_engine(scales, enable_prefix_caching=False), prompts) == first


@SCHEMES
def test_chunked_prefill_does_not_change_fp8_outputs(scales: str) -> None:
    whole = outputs(fp8_engine(scales), PROMPTS)
    chunked = fp8_engine(scales, max_prefill_chunk_tokens=5, max_num_batched_tokens=16)
    assert outputs(chunked, PROMPTS) == whole


@SCHEMES
def test_preemption_does_not_change_fp8_outputs(scales: str) -> None:
    roomy = outputs(fp8_engine(scales, num_kv_blocks=64), PROMPTS, max_tokens=20)
    tight = fp8_engine(scales, num_kv_blocks=26, max_model_len=80)
    assert outputs(tight, PROMPTS, max_tokens=20) == roomy
    assert tight.scheduler.num_preemptions > 0


@SCHEMES
def test_fp8_outputs_stay_close_to_full_precision(scales: str) -> None:
    ids = prompt_ids(5, 30)
    full, fp8 = make_engine(), fp8_engine(scales)
    want, got = outputs(full, [ids], 16)[0], outputs(fp8, [ids], 16)[0]
    assert got[:4] == want[:4]  # random tiny weights: only the first tokens are robust


def test_the_same_bytes_hold_about_twice_the_blocks_of_bf16_with_per_token_scales() -> None:
    def blocks(kv_cache_dtype: str) -> int:
        config = EngineConfig(
            model="dummy:tiny", device="cpu", dtype="bfloat16", kv_cache_bytes=1 << 22,
            kv_cache_dtype=kv_cache_dtype, kv_cache_scales="per_token",
        )  # fmt: skip
        return Engine(config).num_kv_blocks

    bf16, fp8 = blocks("auto"), blocks("fp8")
    head_dim = make_engine().model_config.head_dim  # 16: rows of 16 + 4 bytes against 32
    assert abs(fp8 / bf16 - 2 * head_dim / (head_dim + 4)) < 0.01
