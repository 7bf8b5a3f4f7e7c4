"""The Engine API on the tiny dummy model: abort frees everything and closes the request with
ABORT, max_tokens and the context end finish with LENGTH, stop_token_ids with STOP (the stop
token included), seeded sampling reproducible across engines and batch compositions, top_k=1
equal to greedy, logprobs of the raw distribution sorted most likely first, penalties change
the output deterministically, and usage counts."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest

from contracts.outputs import FinishReason, RequestOutput
from contracts.sampling_params import SamplingParams
from engine.engine import Engine
from tests.conftest import greedy, make_engine, prompt_ids

PROMPT = prompt_ids(1, 10)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return make_engine()


@pytest.fixture(scope="module")
def greedy_reference(engine: Engine) -> list[int]:
    """PROMPT's 12 greedy tokens, generated alone."""
    return run(engine, PROMPT, greedy(12))


@pytest.fixture(scope="module")
def seeded_reference(engine: Engine) -> list[int]:
    """PROMPT's 12 tokens sampled with seed 7, generated alone."""
    return run(engine, PROMPT, seeded(7))


def seeded(seed: int | None, max_tokens: int = 12, **kwargs: object) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True, **kwargs
    )


def run(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return engine.generate([prompt], params)[0].token_ids


def drain(engine: Engine) -> dict[str, list[RequestOutput]]:
    """Step until every request has finished; the outputs of each request, in order."""
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    return outputs


def tokens_of(outputs: Iterable[RequestOutput]) -> list[int]:
    return [t for output in outputs for t in output.new_token_ids]


def assert_idle(engine: Engine) -> None:
    assert not engine.has_unfinished_requests()
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


def test_abort_mid_generation_frees_everything(engine: Engine) -> None:
    other_alone = run(engine, prompt_ids(2, 7), greedy(10))
    engine.add_request("victim", prompt_token_ids=PROMPT, sampling_params=greedy(20))
    engine.add_request("other", prompt_token_ids=prompt_ids(2, 7), sampling_params=greedy(10))
    for _ in range(3):
        assert {o.request_id for o in engine.step()} == {"victim", "other"}
    assert engine.block_manager.num_free_blocks < engine.num_kv_blocks
    final = engine.abort_request("victim")
    assert final is not None
    assert final.request_id == "victim"
    assert final.finished and final.finish_reason is FinishReason.ABORT
    assert final.new_token_ids == ()
    assert final.usage.prompt_tokens == len(PROMPT)
    assert final.usage.completion_tokens == 3
    engine.check_integrity()
    assert engine.abort_request("victim") is None  # already gone
    rest = drain(engine)
    assert set(rest) == {"other"}
    assert len(rest["other"]) == 7
    assert tokens_of(rest["other"]) == other_alone[3:]  # the abort did not disturb it
    assert_idle(engine)


def test_abort_before_the_first_step(engine: Engine) -> None:
    engine.add_request("queued", prompt_token_ids=PROMPT, sampling_params=greedy(4))
    final = engine.abort_request("queued")
    assert final is not None and final.finish_reason is FinishReason.ABORT
    assert final.usage.completion_tokens == 0
    assert engine.step() == []
    assert_idle(engine)


def test_abort_unknown_request_returns_none(engine: Engine) -> None:
    assert engine.abort_request("no-such-request") is None
    assert_idle(engine)


def test_closing_a_stream_aborts_its_request(engine: Engine) -> None:
    stream = engine.stream("streamed", None, greedy(10), prompt_token_ids=PROMPT)
    first = [next(stream), next(stream)]
    assert [len(o.new_token_ids) for o in first] == [1, 1]
    assert not first[-1].finished
    stream.close()
    assert_idle(engine)


@pytest.mark.parametrize("max_tokens", [1, 4, 9])
def test_max_tokens_ends_with_length(engine: Engine, max_tokens: int) -> None:
    engine.add_request("r", prompt_token_ids=PROMPT, sampling_params=greedy(max_tokens))
    outputs = drain(engine)["r"]
    assert len(outputs) == max_tokens
    assert [o.finished for o in outputs] == [False] * (max_tokens - 1) + [True]
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert_idle(engine)


def test_end_of_context_ends_with_length() -> None:
    engine = make_engine(max_model_len=16)
    completion = engine.generate([PROMPT], greedy(16))[0]
    assert completion.finish_reason is FinishReason.LENGTH
    assert len(completion.token_ids) == 16 - len(PROMPT)
    assert_idle(engine)


def test_stop_token_ends_with_stop_and_is_included(
    engine: Engine, greedy_reference: list[int]
) -> None:
    reference = greedy_reference
    # A token that first appears at position 2 or later, so the stop is visibly early.
    stop = next(t for t in reference if reference.index(t) >= 2)
    expected = reference[: reference.index(stop) + 1]
    assert len(expected) < 12
    completion = engine.generate([PROMPT], greedy(12, stop_token_ids=(stop, 511)))[0]
    assert completion.finish_reason is FinishReason.STOP
    assert completion.token_ids == expected
    assert completion.token_ids[-1] == stop
    assert completion.usage.completion_tokens == len(expected)
    assert_idle(engine)


def test_seeded_sampling_is_reproducible_across_engines(
    seeded_reference: list[int], greedy_reference: list[int]
) -> None:
    assert run(make_engine(), PROMPT, seeded(7)) == seeded_reference
    assert len(set(seeded_reference)) > 1  # it really samples
    assert seeded_reference != greedy_reference


@pytest.mark.parametrize("position", [0, 5])
def test_seeded_sampling_ignores_the_rest_of_the_batch(
    engine: Engine, seeded_reference: list[int], position: int
) -> None:
    others = [
        (prompt_ids(100 + i, 3 + 4 * i), seeded(None if i % 2 else i, max_tokens=4 + 2 * i))
        for i in range(5)
    ]
    for i, (prompt, params) in enumerate(others):
        if i == position:
            engine.add_request("seeded", prompt_token_ids=PROMPT, sampling_params=seeded(7))
        engine.add_request(f"other-{i}", prompt_token_ids=prompt, sampling_params=params)
    if position == len(others):
        engine.add_request("seeded", prompt_token_ids=PROMPT, sampling_params=seeded(7))
    outputs = drain(engine)
    assert len(outputs) == 6
    assert tokens_of(outputs["seeded"]) == seeded_reference
    assert_idle(engine)


def test_different_seeds_differ(engine: Engine, seeded_reference: list[int]) -> None:
    samples = [seeded_reference] + [run(engine, PROMPT, seeded(seed)) for seed in (8, 9)]
    assert len({tuple(s) for s in samples}) == 3


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_k_1_equals_greedy(
    engine: Engine, greedy_reference: list[int], temperature: float
) -> None:
    params = SamplingParams(max_tokens=12, temperature=temperature, top_k=1, ignore_eos=True)
    assert run(engine, PROMPT, params) == greedy_reference


def test_greedy_logprobs_are_sorted_and_match_the_chosen_token(engine: Engine) -> None:
    engine.add_request("lp", prompt_token_ids=PROMPT, sampling_params=greedy(6, logprobs=3))
    outputs = drain(engine)["lp"]
    assert len(outputs) == 6
    for output in outputs:
        (logprobs,) = output.logprobs
        assert logprobs.token_id == output.new_token_ids[0]
        assert len(logprobs.top) == 3
        values = [value for _, value in logprobs.top]
        assert values == sorted(values, reverse=True)
        assert all(value <= 0.0 for value in values)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        assert len({token for token, _ in logprobs.top}) == 3
        # Greedy picks the most likely token.
        assert logprobs.top[0] == (logprobs.token_id, logprobs.logprob)
    assert_idle(engine)


def test_logprobs_are_of_the_raw_distribution(engine: Engine) -> None:
    """Forcing the second most likely token with a logit bias reports its raw logprob."""
    engine.add_request("ref", prompt_token_ids=PROMPT, sampling_params=greedy(1, logprobs=3))
    (reference,) = drain(engine)["ref"][0].logprobs
    second, second_logprob = reference.top[1]
    params = greedy(1, logprobs=3, logit_bias=((second, 100.0),))
    engine.add_request("forced", prompt_token_ids=PROMPT, sampling_params=params)
    (forced,) = drain(engine)["forced"][0].logprobs
    assert forced.token_id == second
    assert forced.logprob == pytest.approx(second_logprob, abs=1e-5)
    assert [t for t, _ in forced.top] == [t for t, _ in reference.top]
    assert [v for _, v in forced.top] == pytest.approx([v for _, v in reference.top], abs=1e-5)
    assert_idle(engine)


def test_no_logprobs_unless_asked_and_zero_gives_only_the_chosen(engine: Engine) -> None:
    engine.add_request("none", prompt_token_ids=PROMPT, sampling_params=greedy(2))
    engine.add_request("zero", prompt_token_ids=PROMPT, sampling_params=greedy(2, logprobs=0))
    outputs = drain(engine)
    assert all(o.logprobs == () for o in outputs["none"])
    for output in outputs["zero"]:
        (logprobs,) = output.logprobs
        assert logprobs.top == ()
        assert logprobs.token_id == output.new_token_ids[0]
        assert logprobs.logprob <= 0.0
    assert_idle(engine)


@pytest.mark.parametrize(
    "penalty",
    [
        {"repetition_penalty": 1.5},
        {"frequency_penalty": 1.0},
        {"presence_penalty": 1.0},
        {"presence_penalty": -1.0},
    ],
)
def test_penalties_change_the_output_deterministically(
    engine: Engine, greedy_reference: list[int], penalty: dict[str, float]
) -> None:
    penalized = run(engine, PROMPT, greedy(12, **penalty))
    assert penalized != greedy_reference
    assert run(engine, PROMPT, greedy(12, **penalty)) == penalized
    assert_idle(engine)


def test_usage_counts(engine: Engine) -> None:
    prompt = prompt_ids(777, 11)  # a prompt no other test uses: nothing cached yet
    first = engine.generate([prompt], greedy(5))[0]
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (11, 5)
    assert first.usage.cached_tokens == 0
    again = engine.generate([prompt], greedy(3))[0]
    assert (again.usage.prompt_tokens, again.usage.completion_tokens) == (11, 3)
    assert again.usage.cached_tokens == 8  # two full blocks of 4 hit the prefix cache
    assert again.token_ids == first.token_ids[:3]
    assert_idle(engine)


def test_queue_time_counts_the_wait_for_a_running_slot() -> None:
    engine = make_engine(max_num_seqs=1)
    engine.add_request("first", None, greedy(3), prompt_token_ids=prompt_ids(1, 5))
    engine.add_request("second", None, greedy(3), prompt_token_ids=prompt_ids(2, 5))
    engine.step()  # only "first" runs: "second" waits for its slot
    outputs: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    first, second = outputs["first"].usage.queue_seconds, outputs["second"].usage.queue_seconds
    assert 0 <= first < second  # "second" queued behind all of "first"'s steps
