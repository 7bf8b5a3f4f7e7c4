"""`tandem bench` without a server: metrics from handcrafted timestamps (exact values), arrival
schedules, the runner's concurrency cap and conversations, workloads, SLO parsing, plots and
the compare table."""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from pathlib import Path

import pytest

from bench.common import write_json
from bench.serving import cli
from bench.serving.arrival import ArrivalConfig, arrival_offsets_s
from bench.serving.metrics import (
    LatencyStats,
    RequestRecord,
    itls_s,
    percentile,
    summarize,
    tpot_s,
)
from bench.serving.report import RunReport, compare_table, load_runs, result_json, with_slo
from bench.serving.runner import Completion, run_sessions
from bench.serving.slo import Slo, parse_slo
from bench.serving.workload import (
    Answer,
    MixedWorkload,
    MultiTurnWorkload,
    Prompt,
    RandomWorkload,
    SharedPrefixWorkload,
    next_prompt,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(
    index: int,
    start: float,
    chunks: tuple[float, ...],
    end: float,
    output_tokens: int,
    error: str | None = None,
    input_tokens: int = 10,
) -> RequestRecord:
    return RequestRecord(index, "random", start, chunks, end, input_tokens, output_tokens, 0, error)


# Three completed requests (one with a single output token, one whose last chunk carries two
# tokens) and two failed ones, over a 4-second run.
RECORDS = [
    record(0, 0.0, (0.5, 0.6, 0.8), 0.8, 3, input_tokens=10),
    record(1, 1.0, (1.2,), 1.25, 1, input_tokens=20),
    record(2, 2.0, (2.1, 2.2, 2.3, 2.4, 2.5), 2.5, 6, input_tokens=30),
    record(3, 3.0, (3.1,), 3.2, 1, error="UNAVAILABLE"),
    record(4, 3.5, (), 3.9, 0, error="DEADLINE_EXCEEDED"),
]


def assert_stats(stats: LatencyStats | None, *expected: float) -> None:
    assert stats is not None
    got = (stats.count, stats.mean_ms, stats.p50_ms, stats.p90_ms, stats.p99_ms)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_per_request_metrics() -> None:
    assert tpot_s(RECORDS[0]) == pytest.approx(0.15)  # (0.8 - 0.5) / (3 - 1)
    assert tpot_s(RECORDS[1]) is None  # one token: undefined
    assert tpot_s(RECORDS[2]) == pytest.approx(0.08)  # (0.5 - 0.1) / (6 - 1)
    assert tpot_s(RECORDS[3]) is None  # failed
    assert itls_s(RECORDS[0]) == pytest.approx([0.1, 0.2])
    assert itls_s(RECORDS[1]) == []
    assert itls_s(RECORDS[3]) == []


def test_percentile_interpolates_linearly() -> None:
    assert percentile([100.0, 200.0, 500.0], 50) == 200.0
    assert percentile([100.0, 200.0, 500.0], 90) == pytest.approx(440.0)
    assert percentile([100.0, 200.0, 500.0], 100) == 500.0
    assert percentile([7.0], 99) == 7.0


def test_summary_of_handcrafted_requests() -> None:
    summary = summarize(RECORDS, duration_s=4.0, slo=Slo(ttft_s=0.3, tpot_s=0.1))
    assert (summary.num_requests, summary.num_completed, summary.num_failed) == (5, 3, 2)
    assert summary.errors == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert (summary.total_input_tokens, summary.total_output_tokens) == (60, 10)
    assert summary.request_throughput == pytest.approx(0.75)
    assert summary.output_throughput == pytest.approx(2.5)
    assert summary.total_token_throughput == pytest.approx(17.5)
    # TTFT 500, 200, 100 ms; TPOT 150, 80 ms; ITL 100, 200, 100 x 4 ms; E2E 800, 250, 500 ms.
    assert_stats(summary.ttft, 3, 800 / 3, 200, 440, 494)
    assert_stats(summary.tpot, 2, 115, 115, 143, 149.3)
    assert_stats(summary.itl, 6, 700 / 6, 100, 150, 195)
    assert_stats(summary.e2e, 3, 1550 / 3, 500, 740, 794)
    # Good: request 1 (TTFT 200 ms, TPOT undefined) and request 2; request 0's TTFT is 500 ms.
    assert summary.goodput == pytest.approx(0.5)
    assert summary.slo_attainment == pytest.approx(0.4)  # of all five, failed ones included


@pytest.mark.parametrize(
    ("slo", "num_good"),
    [(Slo(ttft_s=0.5), 3), (Slo(ttft_s=0.499), 2), (Slo(tpot_s=0.08), 2), (Slo(e2e_s=0.25), 1)],
)
def test_goodput_counts_requests_within_every_bound(slo: Slo, num_good: int) -> None:
    summary = summarize(RECORDS, duration_s=2.0, slo=slo)
    assert summary.goodput == pytest.approx(num_good / 2.0)


def test_summary_without_slo_or_successes() -> None:
    summary = summarize(RECORDS[3:], duration_s=1.0, slo=None)
    assert summary.goodput is None and summary.slo_attainment is None
    assert summary.ttft is None and summary.itl is None
    assert summary.num_failed == 2 and summary.request_throughput == 0


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals_keep_the_rate_and_set_the_burstiness(burstiness: float) -> None:
    offsets = arrival_offsets_s(50_000, ArrivalConfig(5.0, burstiness), seed=7)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0 and all(gap >= 0 for gap in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.04)  # mean rate 5 / s
    # The coefficient of variation of gamma(k) gaps is 1 / sqrt(k): 1 for Poisson.
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_arrivals_are_seeded() -> None:
    config = ArrivalConfig(2.0)
    assert arrival_offsets_s(50, config, seed=1) == arrival_offsets_s(50, config, seed=1)
    assert arrival_offsets_s(50, config, seed=1) != arrival_offsets_s(50, config, seed=2)
    assert arrival_offsets_s(3, ArrivalConfig(), seed=0) == [0.0, 0.0, 0.0]  # rate inf


@pytest.mark.parametrize("kwargs", [{"request_rate": 0.0}, {"burstiness": -1.0}])
def test_arrival_config_is_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ArrivalConfig(**kwargs)


class FakeServer:
    """A Send that answers `answer_len` tokens after a short pause, counting requests in
    flight; requests whose index is in `failing` fail with UNAVAILABLE."""

    def __init__(self, answer_len: int = 2, failing: frozenset[int] = frozenset()) -> None:
        self.answer_len = answer_len
        self.failing = failing
        self.num_in_flight = 0
        self.max_in_flight = 0
        self.prompts: dict[int, Prompt] = {}

    async def send(self, index: int, label: str, prompt: Prompt, max_tokens: int) -> Completion:
        self.prompts[index] = prompt
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        start = time.perf_counter()
        await asyncio.sleep(0.002 * (1 + index % 3))
        self.num_in_flight -= 1
        end = time.perf_counter()
        error = "UNAVAILABLE" if index in self.failing else None
        ids = tuple(range(100 + index, 100 + index + self.answer_len))
        rec = RequestRecord(index, label, start, (end,), end, 1, len(ids), 0, error)
        return Completion(rec, Answer(ids, f" answer {index}."))


def test_fixed_concurrency_never_exceeds_the_limit() -> None:
    sessions = RandomWorkload(4, 2).sessions(24, vocab_size=50, seed=0)
    server = FakeServer()
    result = asyncio.run(run_sessions(sessions, [0.0] * 24, server.send, max_concurrency=3))
    assert server.max_in_flight == 3
    assert [r.index for r in result.records] == list(range(24))
    assert result.duration_s > 0


def test_runner_waits_for_each_arrival() -> None:
    sessions = RandomWorkload(4, 2).sessions(3, vocab_size=50, seed=0)
    offsets = [0.0, 0.05, 0.1]
    result = asyncio.run(run_sessions(sessions, offsets, FakeServer().send))
    relative = [r.start_s - result.started_s for r in result.records]
    late_enough = [start >= offset - 1e-3 for start, offset in zip(relative, offsets, strict=True)]
    assert all(late_enough), relative


def test_conversations_grow_turn_by_turn_and_stop_at_a_failure() -> None:
    workload = MultiTurnWorkload(num_turns=3, question_len=5, output_len=2, prompt_format="chat")
    sessions = workload.sessions(2, vocab_size=50, seed=0)
    server = FakeServer(failing=frozenset({4}))  # the second conversation's second turn
    result = asyncio.run(run_sessions(sessions, [0.0, 0.0], server.send))
    assert [r.index for r in result.records] == [0, 1, 2, 3, 4]  # turn 3 of session 2 not sent
    assert [r.label for r in result.records] == ["turn-1", "turn-2", "turn-3", "turn-1", "turn-2"]
    turns = [server.prompts[i].messages for i in (0, 1, 2)]
    assert [len(m) for m in turns] == [1, 3, 5]
    assert turns[1][:2] == (turns[0][0], ("assistant", " answer 0."))
    assert turns[2][:3] == turns[1]


def test_next_prompt_appends_the_answer_and_the_question() -> None:
    first = Prompt(token_ids=(1, 2, 3))
    answer = Answer((7, 8), "xy")
    assert next_prompt(first, answer, Prompt(token_ids=(9,))).token_ids == (1, 2, 3, 7, 8, 9)
    assert next_prompt(Prompt(text="Q1"), answer, Prompt(text="Q2")).text == "Q1xyQ2"


def test_random_workload_has_exact_lengths() -> None:
    sessions = RandomWorkload(input_len=37, output_len=5).sessions(20, vocab_size=64, seed=3)
    assert all(len(s.prompt.token_ids) == 37 and s.max_tokens == 5 for s in sessions)
    assert all(0 <= t < 64 for s in sessions for t in s.prompt.token_ids)
    again = RandomWorkload(input_len=37, output_len=5).sessions(20, vocab_size=64, seed=3)
    assert again == sessions


def test_random_workload_range_ratio() -> None:
    sessions = RandomWorkload(100, 10, range_ratio=0.5).sessions(200, vocab_size=64, seed=0)
    input_lens = {len(s.prompt.token_ids) for s in sessions}
    output_lens = {s.max_tokens for s in sessions}
    assert min(input_lens) >= 50 and max(input_lens) <= 150 and len(input_lens) > 20
    assert min(output_lens) >= 5 and max(output_lens) <= 15


def test_shared_prefix_groups_share_their_prefix() -> None:
    workload = SharedPrefixWorkload(num_groups=3, prefix_len=40, suffix_len=6, output_len=4)
    sessions = workload.sessions(9, vocab_size=1000, seed=0)
    prompts = [s.prompt.token_ids for s in sessions]
    assert all(len(p) == 46 and s.max_tokens == 4 for p, s in zip(prompts, sessions, strict=True))
    for i, prompt in enumerate(prompts):
        assert prompt[:40] == prompts[i % 3][:40]
        assert prompt[40:] != prompts[(i + 3) % 9][40:]  # suffixes are the session's own
    assert len({p[:40] for p in prompts}) == 3


def test_mixed_workload_has_the_asked_for_mix() -> None:
    workload = MixedWorkload(0.25, prefill_heavy_lens=(50, 2), decode_heavy_lens=(5, 20))
    sessions = workload.sessions(20, vocab_size=100, seed=1)
    heavy = [s for s in sessions if s.label == "prefill-heavy"]
    light = [s for s in sessions if s.label == "decode-heavy"]
    assert len(heavy) == 5 and len(light) == 15
    assert all(len(s.prompt.token_ids) == 50 and s.max_tokens == 2 for s in heavy)
    assert all(len(s.prompt.token_ids) == 5 and s.max_tokens == 20 for s in light)


def test_multi_turn_token_ids_workload() -> None:
    workload = MultiTurnWorkload(
        num_turns=4, question_len=8, output_len=3, prompt_format="token-ids"
    )
    (session,) = workload.sessions(1, vocab_size=100, seed=0)
    assert session.num_requests == 4 and len(session.prompt.token_ids) == 8
    assert all(len(q.token_ids) == 8 for q in session.follow_ups)
    assert workload.max_total_tokens() == 4 * (8 + 3)


@pytest.mark.parametrize(
    "workload_kwargs", [{"input_len": 0}, {"output_len": 0}, {"range_ratio": 1.0}]
)
def test_workload_config_is_validated(workload_kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(workload_kwargs))):
        RandomWorkload(**workload_kwargs)  # type: ignore[arg-type]


def test_slo_parsing() -> None:
    assert parse_slo("ttft=500ms,tpot=30ms") == Slo(ttft_s=0.5, tpot_s=0.03)
    assert parse_slo(" e2e = 2s , TTFT=0.25s") == Slo(ttft_s=0.25, e2e_s=2.0)
    assert parse_slo("ttft=500ms,tpot=30ms").describe() == "ttft=500ms,tpot=30ms"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ttft=500", "no unit"),
        ("ttft=5min", "unknown unit 'min'"),
        ("itl=5ms", "unknown metric 'itl'"),
        ("ttft", "not NAME=VALUEUNIT"),
        ("ttft=0ms", "must be positive"),
        ("ttft=1ms,ttft=2ms", "given twice"),
        ("", "empty"),
    ],
)
def test_slo_parsing_errors_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_slo(spec)


def test_bad_slo_flag_is_a_clear_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--slo", "ttft=500"])
    assert exit_info.value.code == 2
    assert "--slo: SLO item 'ttft=500': no unit (use ms or s)" in capsys.readouterr().err


def run_report(rate: float | None, records: list[RequestRecord], duration_s: float) -> RunReport:
    slo = Slo(ttft_s=0.3, tpot_s=0.1)
    return RunReport(rate, 1.0, None, summarize(records, duration_s, slo), {}, tuple(records))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path


def test_plots_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.serving.plot import plot_latency_cdfs, plot_sweep

    runs = [run_report(1.0, RECORDS, 4.0), run_report(2.0, RECORDS[:3], 2.0)]
    cdf = plot_latency_cdfs(runs, tmp_path / "cdf.png")
    sweep = plot_sweep({"a": runs, "b": runs[:1]}, tmp_path / "out" / "sweep.png", "ttft=300ms")
    assert_png(cdf)
    assert_png(sweep)


def test_results_round_trip_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs_a = [run_report(1.0, RECORDS, 4.0)]
    runs_b = [run_report(1.0, RECORDS, 2.0)]  # the same requests in half the time
    path_a = write_json(tmp_path / "a.json", result_json({"label": "colocated"}, runs_a))
    path_b = write_json(tmp_path / "b.json", result_json({"label": "disagg"}, runs_b))
    header, loaded = load_runs(path_a)
    assert header["label"] == "colocated" and loaded == runs_a
    assert cli.main(["compare", str(path_a), str(path_b)]) == 0
    table = capsys.readouterr().out
    header_line = next(line for line in table.splitlines() if line.startswith("| metric"))
    assert [c.strip() for c in header_line.split("|")[1:-1]] == [
        "metric",
        "colocated @ 1",
        "disagg @ 1",
        "b/a",
    ]
    throughput = next(line for line in table.splitlines() if "request throughput" in line)
    assert [c.strip() for c in throughput.split("|")[2:5]] == ["0.75", "1.50", "2.00x"]
    assert "| TTFT p99 (ms)" in table


def test_compare_judges_both_under_another_slo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [run_report(1.0, RECORDS, 4.0)]
    path = write_json(tmp_path / "a.json", result_json({"label": "a"}, runs))
    strict = parse_slo("ttft=1ms")  # nobody meets it
    (judged,) = with_slo(runs, strict)
    assert judged.summary.goodput == 0.0 and judged.records == runs[0].records
    assert judged.summary.request_throughput == runs[0].summary.request_throughput
    assert cli.main(["compare", str(path), str(path), "--slo", "ttft=1ms"]) == 0
    goodput = next(line for line in capsys.readouterr().out.splitlines() if "goodput" in line)
    assert [c.strip() for c in goodput.split("|")[2:4]] == ["0.00", "0.00"]


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a `tandem bench` result"):
        load_runs(tmp_path / "x.json")


def test_compare_pairs_runs_by_rate() -> None:
    one, two, four = (run_report(rate, RECORDS, 4.0) for rate in (1.0, 2.0, 4.0))
    table = compare_table("a", [one, two, four], "b", [four, two])
    header_line = table.splitlines()[0]
    assert [c.strip() for c in header_line.split("|")[1:-1]] == [
        "metric",
        *("a @ 2", "b @ 2", "b/a", "a @ 4", "b @ 4", "b/a"),
    ]
    assert "a @ 1 " in compare_table("a", [one], "b", [two])  # no common rate: in order
    with pytest.raises(ValueError, match="nothing to compare: a has 0 runs, b 1"):
        compare_table("a", [], "b", [one])
