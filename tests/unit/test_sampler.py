"""engine.sampler: logit bias and penalties are batched tensor operations (issue 16.3).

A bias over the whole vocabulary used to be applied by a Python loop over its entries every
step (one such request took a neighbour's inter-token latency from 60 to 463 ms). The batched
version must equal the per-row reference exactly, never walk a request's bias after it is
added, and the number of entries is capped.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from bench.sampler_bias import per_row_reference
from contracts.errors import InvalidRequest
from contracts.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from engine.sampler import LogitBias, SampleRow, apply_bias_and_penalties
from tests.conftest import greedy, make_engine

VOCAB = 97  # odd on purpose


def _random_row(rng: random.Random, precomputed: bool) -> SampleRow:
    bias = tuple((rng.randrange(VOCAB), rng.uniform(-5, 5)) for _ in range(rng.randrange(0, 9)))
    params = SamplingParams(
        repetition_penalty=rng.choice([1.0, 1.3, 0.7]),
        frequency_penalty=rng.choice([0.0, 0.5, -1.0]),
        presence_penalty=rng.choice([0.0, 1.5]),
        logit_bias=bias,
    )
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))]
    output = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 12))]
    logit_bias = LogitBias.of(params, "cpu") if precomputed else None
    return SampleRow(params, prompt, output, None, logit_bias)


@pytest.mark.parametrize("precomputed", [True, False], ids=["engine-bias", "sampler-bias"])
@pytest.mark.parametrize("seed", range(6))
def test_batched_bias_and_penalties_equal_the_per_row_reference(
    seed: int, precomputed: bool
) -> None:
    rng = random.Random(seed)
    rows = [_random_row(rng, precomputed) for _ in range(7)]
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(seed))
    expected = logits.clone()
    per_row_reference(expected, rows)
    apply_bias_and_penalties(logits, rows)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


class _CountingBias(tuple):  # type: ignore[type-arg]
    """A logit bias that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Any:
        _CountingBias.walks += 1
        return super().__iter__()


def test_a_requests_bias_is_made_into_tensors_once_not_every_step() -> None:
    engine = make_engine()
    bias = _CountingBias((t, -1.0) for t in range(0, 400, 3))
    engine.add_request("b", None, greedy(12, logit_bias=bias), prompt_token_ids=[5] * 6)
    engine.step()  # prefill: validation and the tensors are made by now
    walks = _CountingBias.walks
    for _ in range(10):
        engine.step()
    assert _CountingBias.walks == walks, "the bias was walked in Python during decode steps"


def test_the_number_of_logit_bias_entries_is_capped() -> None:
    too_many = tuple((t, 1.0) for t in range(MAX_LOGIT_BIAS + 1))
    with pytest.raises(InvalidRequest, match=f"at most {MAX_LOGIT_BIAS}"):
        SamplingParams(logit_bias=too_many).validate(vocab_size=50_000)
    SamplingParams(logit_bias=too_many[:-1]).validate(vocab_size=50_000)
