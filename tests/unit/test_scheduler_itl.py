"""Prefill chunks sized to protect running decodes' inter-token latency (issue 21.2): with
`target_step_s`, a step that decodes holds only the tokens the measured step-time line says fit
under the target (never fewer than the decodes plus MIN_CHUNK_TOKENS); without decodes, without
a target, or before the line is known, the fixed budget applies. The engine feeds every step's
time to the scheduler and takes the target from EngineConfig.target_itl_s."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduler import MIN_CHUNK_TOKENS, Scheduler, SchedulerConfig, StepTimeModel
from tests.conftest import greedy, make_engine
from tests.unit.test_scheduler import BS, add, step

FIXED_S, PER_TOKEN_S = 0.010, 0.001  # the line the tests' steps follow


def known_line() -> StepTimeModel:
    model = StepTimeModel()
    for tokens in (4, 100, 30, 250):
        model.observe(tokens, FIXED_S + PER_TOKEN_S * tokens)
    return model


def scheduler(target_step_s: float | None, budget: int = 512) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget,
                             target_step_s=target_step_s)  # fmt: skip
    sched = Scheduler(config, BlockManager(256, BS, True))
    sched.step_time = known_line()
    return sched


def test_the_step_time_line_is_fitted_from_measured_steps() -> None:
    model = StepTimeModel()
    assert model.line() is None and model.max_tokens(1.0) is None
    model.observe(8, 0.5)
    model.observe(8, 0.5)
    assert model.line() is None  # one size only: no slope yet
    line = known_line().line()
    assert line is not None
    assert line[0] == pytest.approx(FIXED_S) and line[1] == pytest.approx(PER_TOKEN_S)
    assert known_line().max_tokens(0.040) == 30  # (40 - 10) ms / 1 ms
    assert known_line().max_tokens(0.005) == 0  # the fixed cost alone is over it


def decoding(sched: Scheduler, num: int) -> None:
    for i in range(num):
        add(sched, f"d{i}", 4)
    step(sched)  # their prefills: from now on they decode


def test_with_decodes_running_the_prefill_chunk_keeps_the_step_under_the_target() -> None:
    sched = scheduler(target_step_s=0.040)  # 30 tokens fit
    decoding(sched, 3)
    long = add(sched, "long", 200)
    plan, _ = step(sched)
    assert plan[-1] == ("long", 30 - 3, False)  # the decodes' 3 tokens and a 27-token chunk
    assert long.num_computed_tokens == 27
    assert sum(n for _, n, _ in plan) == 30


def test_the_chunk_is_never_capped_below_the_minimum() -> None:
    sched = scheduler(target_step_s=0.011)  # 1 token fits: too few to progress
    decoding(sched, 2)
    add(sched, "long", 200)
    plan, _ = step(sched)
    assert plan[-1] == ("long", MIN_CHUNK_TOKENS, False)


@pytest.mark.parametrize("case", ["no target", "no decodes", "line unknown", "budget smaller"])
def test_the_fixed_budget_applies_otherwise(case: str) -> None:
    sched = scheduler(None if case == "no target" else 0.040,
                      budget=20 if case == "budget smaller" else 512)  # fmt: skip
    if case == "line unknown":
        sched.step_time = StepTimeModel()
    if case != "no decodes":
        decoding(sched, 3)
    add(sched, "long", 600)
    plan, _ = step(sched)
    expected = {"no target": 509, "no decodes": 512, "line unknown": 509, "budget smaller": 17}
    assert plan[-1][:2] == ("long", expected[case])


def test_bad_targets_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="target_step_s=0 must be > 0 seconds or None"):
        SchedulerConfig(target_step_s=0)
    with pytest.raises(ValueError, match=r"target_itl_s=-1\.0 must be > 0 seconds or None"):
        EngineConfig(target_itl_s=-1.0)


def test_the_engine_times_its_steps_and_takes_the_target_from_its_config() -> None:
    plain = make_engine()
    assert plain.scheduler.config.target_step_s is None
    config = EngineConfig(**{**_fields(plain.config), "target_itl_s": 0.04})

    engine = Engine(config)
    assert engine.scheduler.config.target_step_s == 0.04
    assert engine.scheduler.config.max_num_batched_tokens == 256  # the rest as configured
    engine.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9]], greedy(max_tokens=3))
    assert engine.scheduler.step_time.num_observed == 3  # the prefill's step and 2 decodes'


def _fields(config: EngineConfig) -> dict[str, object]:
    return {name: getattr(config, name) for name in EngineConfig.__dataclass_fields__}


class FixedLine(StepTimeModel):
    """The test's step-time line, whatever the steps measure (timings never decide a test)."""

    def observe(self, num_tokens: int, seconds: float) -> None:
        self.num_observed += 1

    def line(self) -> tuple[float, float] | None:
        return FIXED_S, PER_TOKEN_S


def test_capped_chunks_beside_running_decodes_leave_every_output_unchanged() -> None:
    from tests.conftest import prompt_ids

    def run(engine: Engine) -> tuple[dict[str, list[int]], list[int]]:
        tokens: dict[str, list[int]] = {"short": [], "long": []}
        engine.add_request("short", None, greedy(max_tokens=30), prompt_token_ids=[3, 4, 5])
        for output in engine.step():  # its prefill: from now on it decodes
            tokens[output.request_id] += output.new_token_ids
        engine.add_request("long", None, greedy(max_tokens=4), prompt_token_ids=prompt_ids(9, 100))
        chunks, computed = [], 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens[output.request_id] += output.new_token_ids
            seq = engine._sequences.get("long")
            if seq is not None and seq.num_computed_tokens != computed:
                chunks.append(seq.num_computed_tokens - computed)
                computed = seq.num_computed_tokens
        return tokens, chunks

    plain_tokens, plain_chunks = run(make_engine())
    capped = Engine(EngineConfig(**{**_fields(make_engine().config), "target_itl_s": 0.011}))
    capped.scheduler.step_time = FixedLine()
    capped_tokens, capped_chunks = run(capped)
    assert capped_tokens == plain_tokens
    assert plain_chunks[0] == 100  # the fixed budget (256) takes the prompt whole
    assert capped_chunks[:6] == [MIN_CHUNK_TOKENS] * 6  # beside one decode: the floor
    assert sum(capped_chunks[:7]) == 100
