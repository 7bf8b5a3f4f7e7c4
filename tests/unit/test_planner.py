"""The capacity planner without an engine: the simulator against hand-computed cases (the
engine's own scheduler, the router's own placement), profile files and their typed errors,
and `tandem plan` end to end at a tiny size."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from bench.serving.slo import Slo
from cluster.cli import main
from planner.plan import best_ratio, layouts, predict
from planner.profile import ProfileError, load_profile, profile_of, save_ratio
from planner.simulator import Layout, SimRequest, Simulation
from router.disagg import DisaggPolicy

PREFILL_S, DECODE_S, TRANSFER_S = 0.1, 0.01, 0.05


def profile_json(**changes: Any) -> dict[str, Any]:
    """Fixed step times: any prefill step 0.1 s, any decode step 0.01 s, any transfer 0.05 s."""
    data: dict[str, Any] = {
        "version": 1, "model": "m", "device": "cpu", "block_size": 16, "num_kv_blocks": 256,
        "max_num_seqs": 8, "max_num_batched_tokens": 2048, "kv_bytes_per_token": 100,
        "prefill": {"tokens": [1, 4096], "context": [0, 4096],
                    "seconds": [[PREFILL_S, PREFILL_S], [PREFILL_S, PREFILL_S]]},
        "decode": {"batch": [1, 64], "context": [0, 4096],
                   "seconds": [[DECODE_S, DECODE_S], [DECODE_S, DECODE_S]]},
        "transfer": {"bytes": [1], "seconds": [TRANSFER_S]},
    }  # fmt: skip
    data.update(changes)
    return data


def request(index: int, arrival_s: float, num_prompt: int, max_tokens: int) -> SimRequest:
    ids = tuple(1000 * index + i for i in range(num_prompt))  # no prefix shared between them
    return SimRequest(index, "r", arrival_s, ids, max_tokens)


def token_times(layout: Layout, requests: list[SimRequest], **profile: Any) -> list[list[float]]:
    records = Simulation(profile_of(profile_json(**profile)), layout).run(requests)
    assert all(r.is_ok for r in records)
    return [list(r.chunk_times_s) for r in records]


COLOCATED_1 = Layout("colocated", 0, 1)


def test_one_request_prefills_then_decodes() -> None:
    (times,) = token_times(COLOCATED_1, [request(0, 0.0, 32, 3)])
    assert times == pytest.approx([0.1, 0.11, 0.12])


def test_a_second_request_joins_the_running_batch() -> None:
    """A prefills alone [0, 0.1]; B (arrived at 0.05) prefills in the step beside A's first
    decode [0.1, 0.2] (a mixed step costs the prefill); then both decode [0.2, 0.21]."""
    a, b = token_times(COLOCATED_1, [request(0, 0.0, 32, 3), request(1, 0.05, 32, 2)])
    assert a == pytest.approx([0.1, 0.2, 0.21])
    assert b == pytest.approx([0.2, 0.21])  # TTFT 0.15, ITL 0.01


def test_the_scheduler_chunks_a_prompt_over_its_token_budget() -> None:
    (times,) = token_times(COLOCATED_1, [request(0, 0.0, 40, 2)], max_num_batched_tokens=16)
    assert times == pytest.approx([0.3, 0.31])  # 16 + 16 + 8 tokens: three prefill steps


def test_placement_spreads_requests_over_colocated_workers() -> None:
    """Two requests at once: one worker started the first before the second came (its
    prefill waits a step); two workers take one each."""
    requests = [request(0, 0.0, 32, 2), request(1, 0.0, 32, 2)]
    one = token_times(COLOCATED_1, requests)
    two = token_times(Layout("colocated", 0, 2), requests)
    assert [t[0] for t in one] == pytest.approx([0.1, 0.2])
    assert [t[0] for t in two] == pytest.approx([0.1, 0.1])


def test_disaggregated_first_token_at_prefill_end_then_kv_transfer() -> None:
    """Prefill worker [0, 0.1]: the first token streams at 0.1; the KV lands at 0.15 and the
    decode worker decodes [0.15, 0.16], [0.16, 0.17]."""
    (times,) = token_times(Layout("1P1D", 1, 1, DisaggPolicy("always")), [request(0, 0, 32, 3)])
    assert times == pytest.approx([0.1, 0.16, 0.17])


def test_auto_placement_prefills_a_short_prompt_on_the_decode_worker() -> None:
    auto = Layout("1P1D-auto", 1, 1, DisaggPolicy("auto", local_max_tokens=256))
    (short,) = token_times(auto, [request(0, 0.0, 32, 3)])
    (long,) = token_times(auto, [request(0, 0.0, 300, 3)])
    assert short == pytest.approx([0.1, 0.11, 0.12])  # local: no transfer
    assert long == pytest.approx([0.1, 0.16, 0.17])  # remote


def test_predict_judges_goodput_as_the_benchmark_does() -> None:
    profile = profile_of(profile_json())
    requests = [request(0, 0.0, 32, 3), request(1, 0.05, 32, 2)]
    # TTFTs 0.1 and 0.15 s; durations 0 -> 0.21 s
    summary = predict(profile, COLOCATED_1, requests, Slo(ttft_s=0.12))
    assert summary.slo_attainment == pytest.approx(0.5)
    assert summary.goodput == pytest.approx(1 / 0.21)
    assert summary.ttft is not None and summary.ttft.count == 2


def test_layouts_cover_colocated_and_every_split() -> None:
    names = [layout.name for layout in layouts(3)]
    assert names == ["colocated", "1P2D", "1P2D-auto", "2P1D", "2P1D-auto"]
    with pytest.raises(ValueError, match="num_gpus=0"):
        layouts(0)


def test_profile_interpolates_between_points() -> None:
    grid = {"tokens": [100, 200], "context": [0, 1000], "seconds": [[1.0, 2.0], [3.0, 4.0]]}
    profile = profile_of(profile_json(prefill=grid))
    assert profile.prefill.at(150, 500) == pytest.approx(2.5)
    assert profile.prefill.at(50, 0) == pytest.approx(1.0)  # below the first: the first
    assert profile.prefill.at(300, 0) == pytest.approx(5.0)  # beyond the last: extended
    assert profile.step_s([(150, 500)], []) == pytest.approx(2.5)


BAD_PROFILES = [
    ({"version": 3}, "version=3: this planner reads versions 1, 2"),
    ({"version": 1, "mixed": {}}, r"version=1 with \['mixed'\]"),
    ({"version": 1, "decode": {"batch": [1], "context": [0], "seconds": [[1.0]],
                               "samples": [[[1.0]]]}}, "version 1 profiles hold no samples"),
    ({"version": 2, "decode": {"batch": [1], "context": [0], "seconds": [[1.0]],
                               "samples": [[[1.0, 3.0, 4.0]]]}}, "median 3.0 is not decode"),
    ({"version": 2, "decode": {"batch": [1], "context": [0], "seconds": [[1.0]],
                               "samples": [[[]]]}}, r"decode.samples\[0\]\[0\] must be a non-emp"),
    ({"version": 2, "mixed": {"tokens": [8], "batch": [1, 8], "context": 16,
                              "seconds": [[1.0, 1.0]]}}, "must start at 0"),
    ({"version": 2, "mixed": {"tokens": [8], "batch": [0, 8], "context": 0,
                              "seconds": [[1.0, 1.0]]}}, "mixed.context=0"),
    ({"version": 2, "overhead": {"source": "guess", "step_s": [0.0], "request_s": [0.0]}},
     "overhead.source='guess'"),
    ({"version": 2, "overhead": {"source": "service", "step_s": [-0.001], "request_s": [0.0]}},
     "overhead.step_s holds -0.001"),
    ({"version": 2, "overhead": {"source": "service", "step_s": [0.0], "request_s": []}},
     "overhead.request_s=\\[\\] must be a non-empty"),
    ({"model": ""}, "model=''"),
    ({"num_kv_blocks": 0}, "num_kv_blocks=0"),
    ({"block_size": 16.0}, "block_size=16.0"),
    ({"prefill": []}, "prefill must be an object"),
    ({"decode": {"batch": [4, 1], "context": [0], "seconds": [[1.0], [1.0]]}}, "strictly asc"),
    ({"decode": {"batch": [1, 4], "context": [0], "seconds": [[1.0]]}}, "one list per batch"),
    ({"decode": {"batch": [1], "context": [0, 8], "seconds": [[1.0]]}}, r"decode.seconds\[0\]"),
    ({"transfer": {"bytes": [1], "seconds": [-1.0]}}, "times must be positive"),
    ({"transfer": {"bytes": [1], "seconds": [True]}}, "times must be positive"),
    ({"prefill_decode_ratio": [1, 0]}, "prefill_decode_ratio"),
]  # fmt: skip


@pytest.mark.parametrize("changes, message", BAD_PROFILES)
def test_bad_profiles_are_refused_naming_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        profile_of(profile_json(**changes))


def test_bad_profile_files_name_the_file(tmp_path: Path) -> None:
    missing, garbled = tmp_path / "missing.json", tmp_path / "garbled.json"
    garbled.write_text("{not json")
    with pytest.raises(ProfileError, match=r"missing\.json: cannot read"):
        load_profile(missing)
    with pytest.raises(ProfileError, match=r"garbled\.json: not JSON"):
        load_profile(garbled)


def test_a_saved_ratio_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_json()))
    save_ratio(path, (1, 3))
    assert load_profile(path).prefill_decode_ratio == (1, 3)


def test_tandem_plan_prints_every_configuration(tmp_path: Path, capsys: Any) -> None:
    path, out = tmp_path / "p.json", tmp_path / "plan.json"
    path.write_text(json.dumps(profile_json()))
    argv = ["plan", "--profile", str(path), "--gpus", "2", "--num-prompts", "6", "--rates",
            "2,4", "--prefill-heavy-lens", "64:4", "--decode-heavy-lens", "16:8", "--out",
            str(out), "--no-plot", "--save-ratio"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "recommended:" in printed and "| 1P1D-auto | 4 |" in printed
    written = json.loads(out.read_text())
    assert {p["configuration"] for p in written["predictions"]} == {
        "colocated", "1P1D", "1P1D-auto"}  # fmt: skip
    assert len(written["predictions"]) == 6
    assert load_profile(path).prefill_decode_ratio == (1, 1)


def test_tandem_plan_refuses_a_bad_profile(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_json(decode={"batch": [1]})))
    assert main(["plan", "--profile", str(path), "--gpus", "2", "--no-plot"]) == 2
    assert "p.json: decode.context=None" in capsys.readouterr().err


def test_best_ratio_is_the_best_split() -> None:
    assert best_ratio([]) is None


def test_plan_and_bench_build_the_same_workload_from_the_same_flags() -> None:
    """`tandem plan` predicts what `tandem bench` measures: one set of shape flags with one
    set of defaults (the planner's mixed workload was 70% prefill-heavy, the bench's 50%)."""
    from bench.serving.cli import add_arguments as add_bench_arguments
    from bench.serving.workload import workload_from_args
    from planner.cli import add_plan_arguments

    for flags in ([], ["--prefill-heavy-fraction", "0.7", "--decode-heavy-lens", "32:64"]):
        plan_parser, bench_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
        add_plan_arguments(plan_parser)
        add_bench_arguments(bench_parser)
        planned = plan_parser.parse_args(["--profile", "p.json", "--gpus", "2", *flags])
        measured = bench_parser.parse_args(["--workload", "mixed", *flags])
        assert workload_from_args(planned) == workload_from_args(measured)


# profile version 2: what the simulator adds to the median steps, each against a hand count


def v2(**changes: Any) -> dict[str, Any]:
    return profile_json(version=2, **changes)


def test_a_version_1_profile_still_loads_without_spread_mixed_or_overhead() -> None:
    profile = load_profile(Path(__file__).parents[2] / "bench/data/h100_planner_profile_v1.json")
    assert profile.mixed is None and profile.overhead is None
    assert profile.prefill.spread(2048, 0) == (1.0,) and profile.decode.samples is None


def test_a_version_2_profile_round_trips(tmp_path: Path) -> None:
    data = v2(
        decode={"batch": [1, 64], "context": [0], "seconds": [[0.01], [0.02]],
                "samples": [[[0.005, 0.01, 0.03]], [[0.02, 0.02]]]},
        mixed={"tokens": [32], "batch": [0, 1], "context": 16, "seconds": [[0.1, 0.13]]},
        overhead={"source": "engine loop", "step_s": [0.001], "request_s": [0.02, 0.03]},
    )  # fmt: skip
    path = tmp_path / "p.json"
    profile_of(data).save(path)
    assert load_profile(path) == profile_of(data)


def test_request_overhead_delays_the_first_token_and_step_overhead_every_step() -> None:
    """The request reaches its worker 0.02 s after it arrived; each step lasts its 0.1 s
    prefill or 0.01 s decode plus the loop's 0.001 s: tokens at 0.121, 0.132, 0.143."""
    overhead = {"source": "service", "step_s": [0.001], "request_s": [0.02]}
    (times,) = token_times(COLOCATED_1, [request(0, 0.0, 32, 3)], version=2, overhead=overhead)
    assert times == pytest.approx([0.121, 0.132, 0.143])


def test_the_scheduler_learns_step_times_without_the_loop_overhead() -> None:
    """The engine times its own step (observe_step), not the loop's time around it."""
    profile = profile_of(v2(overhead={"source": "service", "step_s": [0.5], "request_s": [0.0]}))
    simulation = Simulation(profile, COLOCATED_1)
    simulation.run([request(0, 0.0, 32, 3)])
    model = simulation.decode[0].scheduler.step_time
    per_token_s = (0.1 - 0.01) / 31  # through (32 tokens, 0.1 s) and (1 token, 0.01 s)
    assert model.num_observed == 3
    assert model.line() == pytest.approx((0.01 - per_token_s, per_token_s))


def test_grid_spread_is_the_nearest_points_repeats_over_its_median() -> None:
    grid = {"batch": [1, 64], "context": [0], "seconds": [[0.01], [0.02]],
            "samples": [[[0.005, 0.01, 0.03]], [[0.02, 0.02]]]}  # fmt: skip
    profile = profile_of(v2(decode=grid))
    assert profile.decode.spread(8, 500) == pytest.approx((0.5, 1.0, 3.0))  # nearest: 1
    assert profile.decode.spread(60, 0) == pytest.approx((1.0, 1.0))
    # a step's time: the interpolated median times the spread of its nearest point
    median_s, spread = profile.step([], [0] * 8)
    assert median_s == pytest.approx(0.01 + 0.01 * 7 / 63) and spread == pytest.approx(
        (0.5, 1.0, 3.0))  # fmt: skip


def decode_gaps(seed: int) -> list[float]:
    grid = {"batch": [1, 64], "context": [0, 4096], "seconds": [[0.01, 0.01], [0.01, 0.01]],
            "samples": [[[0.005, 0.01, 0.03]] * 2] * 2}  # fmt: skip
    profile = profile_of(v2(decode=grid))
    (record,) = Simulation(profile, COLOCATED_1, seed=seed).run([request(0, 0.0, 32, 301)])
    times = record.chunk_times_s
    assert times[0] == pytest.approx(0.1)  # prefill: no samples, its median
    return [round(b - a, 9) for a, b in itertools.pairwise(times)]


def test_decode_steps_are_drawn_from_their_repeats_deterministically_by_seed() -> None:
    gaps = decode_gaps(seed=0)
    assert len(gaps) == 300 and set(gaps) == {0.005, 0.01, 0.03}  # the measured ones only
    assert min(gaps.count(v) for v in (0.005, 0.01, 0.03)) >= 70  # each about a third
    assert decode_gaps(seed=0) == gaps  # deterministic
    assert decode_gaps(seed=1) != gaps  # the seed picks the draws


MIXED = {"tokens": [32, 2048], "batch": [0, 1, 8], "context": 16,
         "seconds": [[0.1, 0.13, 0.15], [0.1, 0.13, 0.15]]}  # fmt: skip


def test_a_mixed_step_costs_its_prefill_plus_what_the_measured_decodes_add() -> None:
    """As test_a_second_request_joins_the_running_batch, but B's prefill beside A's decode
    now costs 0.1 + (0.13 - 0.1) measured (1 decode beside a chunk): [0.1, 0.23]."""
    requests = [request(0, 0.0, 32, 3), request(1, 0.05, 32, 2)]
    a, b = token_times(COLOCATED_1, requests, version=2, mixed=MIXED)
    assert a == pytest.approx([0.1, 0.23, 0.24])
    assert b == pytest.approx([0.23, 0.24])


def test_mixed_pricing_adds_longer_decode_contexts_as_the_decode_grid_does() -> None:
    """Measured at decode context 16; decodes at 2,064 add what the decode grid says 2,048
    more tokens of context cost at their batch: 0.04 * 2048 / 4096 = 0.02."""
    decode = {"batch": [1, 64], "context": [0, 4096], "seconds": [[0.01, 0.05], [0.01, 0.05]]}
    profile = profile_of(v2(mixed=MIXED, decode=decode))
    assert profile.step_s([(32, 0)], [16]) == pytest.approx(0.13)
    assert profile.step_s([(32, 0)], [2064]) == pytest.approx(0.15)
    assert profile.step_s([(32, 0)], [16] * 8) == pytest.approx(0.15)
    assert profile.step_s([(32, 0)], [16] * 4) == pytest.approx(0.1 + 0.03 + 0.02 * 3 / 7)
    # without the mixed section (version 1's pricing): the decodes' added cost over one
    assert profile_of(v2(decode=decode)).step_s([(32, 0)], [16] * 8) == pytest.approx(0.1)


def test_tandem_plan_without_a_term_predicts_as_if_it_was_not_measured(tmp_path: Path) -> None:
    """--without overhead: the 0.02 s request overhead is gone from every TTFT (as in the
    hand count of test_request_overhead_delays_the_first_token...)."""
    path = tmp_path / "p.json"
    overhead = {"source": "service", "step_s": [0.0], "request_s": [0.02]}
    path.write_text(json.dumps(v2(overhead=overhead)))
    p50s = []
    for without in ([], ["--without", "overhead"]):
        out = tmp_path / "plan.json"
        argv = ["plan", "--profile", str(path), "--gpus", "1", "--num-prompts", "4", "--rates",
                "0.1", "--prefill-heavy-lens", "32:2", "--decode-heavy-lens", "32:2", "--out",
                str(out), "--no-plot", *without]  # fmt: skip
        assert main(argv) == 0
        p50s.append(json.loads(out.read_text())["predictions"][0]["ttft_p50_ms"])
    assert p50s == pytest.approx([120.0, 100.0])
    with pytest.raises(ValueError, match="unknown terms"):
        profile_of(v2()).without(("guess",))


def test_loop_overhead_is_the_time_between_steps_while_requests_wait() -> None:
    """Steps [0, 1], [1.5, 2], [2.2, 3] then idle (nothing left) until [10, 11]: the loop's
    time beside the steps is 0.5 and 0.2 s; the idle wait is no overhead."""
    from planner.overhead import _StepTimer

    class Engine:
        def step(self) -> list[Any]:
            return []

    timer = _StepTimer(Engine())
    timer.steps = [(0.0, 1.0, True), (1.5, 2.0, True), (2.2, 3.0, False), (10.0, 11.0, True)]
    assert timer.gaps_s() == pytest.approx([0.5, 0.2])


def test_service_step_overhead_is_each_gap_less_the_median_decode_step() -> None:
    """Decode steps are 0.01 s in the profile: gaps of 0.015, 0.012 and 0.008 s are 0.005,
    0.002 and 0 (floored) s of overhead; a stream whose chunk carried 2 tokens is skipped."""
    from bench.serving.metrics import RequestRecord
    from planner.overhead import _step_samples

    def record(times: list[float], num_tokens: int) -> RequestRecord:
        return RequestRecord(0, "r", 0.0, tuple(times), times[-1], 16, num_tokens)

    one_a_chunk = record([0.1, 0.115, 0.127, 0.135], 4)
    two_in_one = record([0.1, 0.2], 3)
    samples = _step_samples(profile_of(profile_json()), [one_a_chunk, two_in_one], batch=1)
    assert samples == pytest.approx([0.005, 0.002, 0.0])
