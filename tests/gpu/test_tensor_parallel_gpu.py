"""Tensor parallelism on GPUs (issue 24): the trained test Llama (8 heads, 2 KV heads, head dim
64) at TP=2 gives TP=1's greedy output, each rank running the Triton kernels on its 4 heads and
1 KV head: over NCCL with one rank per GPU, its decode steps in CUDA graphs (which capture the
collectives) and eager; and on ONE GPU, both ranks on cuda:0 with a gloo compute group
(EngineConfig.tensor_parallel_one_device, eager). KV moved TP=2 -> TP=1 and TP=1 -> TP=2 (the
blocks gathered to rank 0, or scattered from it, over the compute group) gives the single
engine's output and leaves nothing held.

Run on the device machine: `pytest tests/gpu/test_tensor_parallel_gpu.py`. The NCCL cases
need 2 GPUs (skipped on one); the one-GPU cases run on any CUDA machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.engine import Engine
from tests.conftest import greedy
from tests.gpu.conftest import gpu_engine, rule_sequence
from tests.unit.test_tensor_parallel_kv import MAX_TOKENS, PROMPT, assert_nothing_held, decode, ship

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="TP over NCCL puts one rank on each GPU: needs 2 CUDA devices "
    "(the one-gpu cases run TP=2 on one)",
)
# how the two ranks are placed: EngineConfig fields, and the compute group's backend
PLACEMENTS = [
    pytest.param({"cuda_graphs": True}, "NCCL", id="nccl-graphs", marks=TWO_GPUS),
    pytest.param({"cuda_graphs": False}, "NCCL", id="nccl-eager", marks=TWO_GPUS),
    pytest.param(
        {"cuda_graphs": False, "tensor_parallel_one_device": True}, "Gloo", id="one-gpu-gloo"
    ),
]
PROMPTS = [rule_sequence(seed=300 + s, length=25 + 31 * s) for s in range(6)]  # 25 to 180


def _tokens(engine: Engine) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(PROMPTS, greedy(24))]


@pytest.fixture(scope="module")
def single(model_dir: Path) -> Iterator[Engine]:
    """TP=1 on cuda:0, CUDA graphs on: the reference."""
    with gpu_engine(model_dir) as engine:
        yield engine


@pytest.fixture(scope="module")
def single_tokens(single: Engine) -> list[list[int]]:
    return _tokens(single)


def tp2_engine(model_dir: Path, placement: dict[str, Any], **kwargs: object) -> Engine:
    return gpu_engine(model_dir, tensor_parallel_size=2, **placement, **kwargs)


@pytest.mark.parametrize(("placement", "backend"), PLACEMENTS)
def test_tp2_greedy_output_equals_tp1(
    model_dir: Path, single_tokens: list[list[int]], placement: dict[str, Any], backend: str
) -> None:
    with tp2_engine(model_dir, placement) as engine:
        assert engine.tp is not None and engine.tp.followers is not None
        assert type(engine.tp.compute).__name__ == f"ProcessGroup{backend}"
        assert engine.model.config.num_heads == 4  # this rank's query heads
        assert engine.runner.kv_cache.shape[-2] == 1  # and its KV head only
        assert engine.runner.kv_cache.is_cuda
        assert _tokens(engine) == single_tokens
        assert _tokens(engine) == single_tokens  # again, from the prefix cache
        engine.check_integrity()
        processes = engine.tp.followers.processes
    assert [p.returncode for p in processes] == [0]  # stopped cleanly


@pytest.mark.parametrize(("placement", "backend"), PLACEMENTS)
def test_kv_moved_between_tp2_and_tp1_gives_the_single_engines_output(
    model_dir: Path, single: Engine, placement: dict[str, Any], backend: str
) -> None:
    """The KV a pair would move (every head, rank 0's staging blocks), copied engine to engine
    on cuda:0; the pair channel itself over NCCL is tests/gpu/test_kvtransfer_nccl.py."""
    expected = single.generate([PROMPT], greedy(MAX_TOKENS))[0].token_ids
    with tp2_engine(model_dir, placement, kv_transfer=True) as engine:
        assert engine.transfer_kv_cache.shape[-2] == 2  # rank 0's staging: whole-head blocks
        for name, src, dst in [("2to1", engine, single), ("1to2", single, engine),
                               ("2to2", engine, engine)]:  # fmt: skip
            assert decode(dst, *ship(src, dst, name)) == expected, name
            assert_nothing_held(src, dst)
