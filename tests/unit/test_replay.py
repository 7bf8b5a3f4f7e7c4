"""Replay after a lost worker, engine side (issue 22.1): a seeded draw is a function of (seed,
output position) alone, so a request resumed on another engine from the tokens it had streamed
(`resumed_token_ids`) goes on exactly as it would have: greedy and seeded, run whole on one
engine or prefilled on one and decoded on another. Resumed tokens count as output (max_tokens,
usage) and are checked like any client-supplied token id."""

from __future__ import annotations

import pytest
import torch

from contracts.errors import InvalidRequest
from contracts.sampling_params import SamplingParams
from engine.engine import Engine
from engine.sampler import Sampler, SampleRow, draw_seed
from kvtransfer.coalesce import gather_blocks, scatter_blocks
from tests.conftest import greedy, make_engine, prompt_ids

PROMPT = prompt_ids(4, 11)
VOCAB = 64


def seeded(seed: int, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True)


def test_draw_seed_depends_on_seed_and_position_only() -> None:
    assert draw_seed(7, 3) == draw_seed(7, 3)
    seeds = {draw_seed(seed, position) for seed in range(50) for position in range(50)}
    assert len(seeds) == 2500  # no two (seed, position) pairs share a stream
    assert all(0 <= s < 1 << 63 for s in seeds)
    assert draw_seed(2**64 - 1, 10**9) >= 0  # the largest seed a request may give


def _row(params: SamplingParams, num_outputs: int) -> SampleRow:
    return SampleRow(params, [1, 2, 3], list(range(num_outputs)), params.seed)


def test_a_seeded_draw_is_the_same_whatever_came_before_or_beside_it() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    params = seeded(11)
    alone = Sampler(seed=0)(logits[:1], [_row(params, 5)]).token_ids[0]
    busy = Sampler(seed=123)  # another worker: another shared generator
    for _ in range(7):  # draws of other requests, and of this one at other positions
        busy(logits, [_row(seeded(1), 2), _row(SamplingParams(temperature=1.0), 0),
                      _row(params, 9)])  # fmt: skip
    beside = busy(
        logits, [_row(SamplingParams(temperature=0.7), 3), _row(params, 5), _row(seeded(2), 5)]
    )
    assert beside.token_ids[1] == Sampler(seed=0)(logits[1:2], [_row(params, 5)]).token_ids[0]
    again = [Sampler(seed=s)(logits[:1], [_row(params, 5)]).token_ids[0] for s in (1, 2)]
    assert again == [alone, alone]
    positions = {Sampler()(logits[:1], [_row(params, p)]).token_ids[0] for p in range(40)}
    assert len(positions) > 1  # the position does change the draw


@pytest.fixture(scope="module")
def engine() -> Engine:
    return make_engine()


@pytest.mark.parametrize(
    "params", [greedy(12), seeded(7), seeded(8)], ids=["greedy", "seed7", "seed8"]
)
@pytest.mark.parametrize("streamed", [1, 5, 11])
def test_a_resumed_request_continues_as_the_uninterrupted_run(
    engine: Engine, params: SamplingParams, streamed: int
) -> None:
    reference = engine.generate([PROMPT], params)[0].token_ids
    assert len(reference) == 12
    resumed = make_engine()  # another worker (the seed of dummy weights must match)
    resumed.add_request("r", None, params, prompt_token_ids=PROMPT,
                        resumed_token_ids=reference[:streamed])  # fmt: skip
    outputs = []
    while resumed.has_unfinished_requests():
        outputs += resumed.step()
    assert [t for o in outputs for t in o.new_token_ids] == reference[streamed:]
    last = outputs[-1]
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens == len(PROMPT)
    resumed.check_integrity()


@pytest.mark.parametrize("params", [greedy(12), seeded(7)], ids=["greedy", "seeded"])
def test_a_resumed_request_prefilled_on_one_engine_decodes_on_another(
    engine: Engine, params: SamplingParams
) -> None:
    reference = engine.generate([PROMPT], params)[0].token_ids
    streamed = reference[:6]
    prefill, decode = make_engine(), make_engine()
    prefill.add_request("r", None, params, prompt_token_ids=PROMPT, prefill_only=True,
                        resumed_token_ids=streamed)  # fmt: skip
    while not (done := prefill.take_prefilled()):
        prefill.step()
    (prefilled,) = done
    kept = prefilled.kv
    assert kept.num_tokens == len(PROMPT) + len(streamed)
    dst = decode.block_manager.reserve("in:r", len(kept.block_ids))
    assert dst is not None
    scatter_blocks(decode.runner.kv_cache, dst, gather_blocks(prefill.runner.kv_cache,
                                                              kept.block_ids))  # fmt: skip
    assert prefill.block_manager.release(kept.owner)
    first = decode.add_remote_request("r", PROMPT, prefilled.first_token_id, params,
                                      resumed_token_ids=streamed)  # fmt: skip
    decode.attach_kv("r", "in:r")
    tokens = list(first.new_token_ids)
    while decode.has_unfinished_requests():
        tokens += [t for o in decode.step() for t in o.new_token_ids]
    assert tokens == reference[6:]
    decode.check_integrity()
    prefill.check_integrity()


def test_resumed_tokens_are_checked_like_any_token_id(engine: Engine) -> None:
    vocab = engine.model_config.vocab_size
    cases = [
        ([vocab], "resumed_token_ids"),
        ([1] * 12, "nothing is left"),
        ([-1], "resumed_token_ids"),
    ]
    for resumed, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            engine.add_request("bad", None, greedy(12), prompt_token_ids=PROMPT,
                               resumed_token_ids=resumed)  # fmt: skip
    assert not engine.has_unfinished_requests()
    engine.check_integrity()
