"""EngineConfig.overlap_outputs on a GPU with CUDA graphs (pinned decode inputs, the default):
the overlapped engine's outputs equal the synchronous engine's step by step, greedy, through
preemption (few KV blocks); with aborts mid-stream and a request added mid-stream (it joins
one step later overlapped) request by request; every step launched is collected (the CUDA
path: timing events, the wait before an abort frees blocks); no block leaks.

Run on the device machine: `pytest tests/gpu/test_engine_overlap_gpu.py`. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contracts.outputs import FinishReason, RequestOutput
from contracts.sampling_params import SamplingParams
from engine.engine import Engine
from tests.gpu.conftest import rule_sequence
from tests.unit.test_engine_overlap import count_steps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def engine_of(model_dir: Path, overlap: bool | None, num_kv_blocks: int) -> Engine:
    from engine.config import EngineConfig
    from engine.scheduler import SchedulerConfig

    return Engine(
        EngineConfig(
            model=str(model_dir), device="cuda", dtype="bfloat16", num_kv_blocks=num_kv_blocks,
            block_size=16, overlap_outputs=overlap,
            scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512),
        )
    )  # fmt: skip


def steps_of(engine: Engine, abort_and_add: bool) -> list[list[tuple]]:
    """Every step's (request, tokens, finish) in order; with abort_and_add, two requests are
    aborted after step 5 and one is added after step 8."""
    for i in range(9):
        params = SamplingParams(max_tokens=20 + 7 * i, ignore_eos=True)
        prompt = rule_sequence(seed=200 + i, length=40 + 23 * i)
        engine.add_request(f"r{i}", None, params, prompt_token_ids=prompt)
    steps: list[list[tuple]] = []
    while engine.has_unfinished_requests():
        steps.append([summary(o) for o in engine.step()])
        if abort_and_add and len(steps) == 5:
            assert engine.abort_request("r2") is not None
            assert engine.abort_request("r7") is not None
        if abort_and_add and len(steps) == 8:
            late = SamplingParams(max_tokens=30, ignore_eos=True)
            engine.add_request("late", None, late, prompt_token_ids=rule_sequence(9, 50))
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return steps


def summary(output: RequestOutput) -> tuple:
    return output.request_id, output.new_token_ids, output.finish_reason


@pytest.mark.parametrize("abort_and_add", [False, True])
def test_overlapped_greedy_steps_equal_synchronous_ones(
    model_dir: Path, abort_and_add: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = []
    for overlap in (False, True):
        # 32 blocks of 16: the nine requests need ~100 at once, so running ones are preempted
        # (48 admitted them in an order that never ran out: the first H100 run, 2026-12-07)
        engine = engine_of(model_dir, overlap, num_kv_blocks=32)
        assert engine.runner.graphs is not None, "CUDA graphs are on"
        counts = count_steps(monkeypatch, engine)
        steps = steps_of(engine, abort_and_add)
        assert counts["executed"] == counts["collected"], "no step thrown away"
        assert (engine.num_steps_launched_ahead > 0) is overlap
        results.append(by_request(steps) if abort_and_add else steps)
        assert engine.scheduler.num_preemptions > 0, "the workload must preempt"
    assert results[0] == results[1]


def by_request(steps: list[list[tuple]]) -> dict[str, list[tuple]]:
    outputs: dict[str, list[tuple]] = {}
    for step in steps:
        for output in step:
            outputs.setdefault(output[0], []).append(output[1:])
    return outputs


def test_the_default_overlaps_on_cuda(model_dir: Path) -> None:
    """overlap_outputs=None (the default) launches ahead on CUDA; the outputs equal those of
    the engine told to step synchronously."""
    results = []
    for overlap in (None, False):
        engine = engine_of(model_dir, overlap, num_kv_blocks=256)
        assert engine.overlaps_outputs is (overlap is None)
        results.append(steps_of(engine, abort_and_add=False))
        assert (engine.num_steps_launched_ahead > 0) is (overlap is None)
    assert results[0] == results[1]


@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_ids_taken_at_launch_equal_those_taken_at_collection(
    model_dir: Path, overlap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """engine.engine.GREEDY_AT_LAUNCH: the argmax queued behind the step and copied to pinned
    memory gives the same steps as the argmax at collection, through preemption, aborts of
    sequences in flight (their rows dropped from the host copy) and a late request."""
    import engine.engine as engine_module

    results = []
    for at_launch in (False, True):
        monkeypatch.setattr(engine_module, "GREEDY_AT_LAUNCH", at_launch)
        engine = engine_of(model_dir, overlap, num_kv_blocks=32)
        launched_greedy = []
        launch = engine._launch

        def recording_launch(ahead: bool = False, launch=launch, seen=launched_greedy):  # type: ignore[no-untyped-def]
            step = launch(ahead=ahead)
            if step is not None:
                seen.append(step.greedy is not None)
            return step

        monkeypatch.setattr(engine, "_launch", recording_launch)
        results.append(by_request(steps_of(engine, abort_and_add=True)))
        assert any(launched_greedy) is at_launch
        assert engine.scheduler.num_preemptions > 0, "the workload must preempt"
    assert results[0] == results[1]


@pytest.mark.parametrize("pinned", [True, False])
def test_followed_decodes_equal_steps_launched_after_collection(
    model_dir: Path, pinned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """engine.engine.FOLLOW_DECODES on CUDA graphs (pinned decode inputs or not): greedy
    decode steps launched before the step they follow is collected, their tokens copied in
    on the device, give every request the tokens and finishes of steps launched after
    collection: through stop ids the step in flight cannot foresee (picked from a first run's
    tokens: their rows in the step that follows are dropped, their blocks freed once it has
    run), lengths it can, and an abort while a following step is in flight; every step
    launched is collected, no block leaks."""
    import engine.cuda_graph as cuda_graph
    import engine.engine as engine_module

    monkeypatch.setattr(cuda_graph, "PINNED_INPUTS", pinned)
    prompts = {f"r{i}": rule_sequence(seed=300 + i, length=30 + 17 * i) for i in range(6)}

    def run(on: bool, stops: dict[str, int]) -> tuple[dict[str, list[tuple]], int]:
        monkeypatch.setattr(engine_module, "FOLLOW_DECODES", on)
        engine = engine_of(model_dir, True, num_kv_blocks=256)
        counts = count_steps(monkeypatch, engine)
        for i, (request_id, prompt) in enumerate(prompts.items()):
            stop = (stops[request_id],) if request_id in stops else ()
            params = SamplingParams(max_tokens=24 + 9 * i, ignore_eos=True, stop_token_ids=stop)
            engine.add_request(request_id, None, params, prompt_token_ids=prompt)
        outputs: dict[str, list[tuple]] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                outputs.setdefault(output.request_id, []).append(summary(output)[1:])
            steps += 1
            if steps == 12:
                assert engine.abort_request("r5") is not None
        assert counts["executed"] == counts["collected"], "no step thrown away"
        engine.check_integrity()
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
        return outputs, engine.num_steps_followed

    first, _ = run(False, {})
    # r0..r3 stop at a token they produce mid-run (at its first appearance, which may be
    # earlier); r4 runs to its length, r5 is aborted
    stops = {f"r{i}": first[f"r{i}"][6 + 3 * i][0][0] for i in range(4)}
    expected, none_followed = run(False, stops)
    got, followed = run(True, stops)
    assert none_followed == 0 and followed > 20
    assert got == expected
    finishes = [steps[-1][1] for steps in expected.values()]
    assert finishes.count(FinishReason.STOP) == 4
