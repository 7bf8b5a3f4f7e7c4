"""bench.poll_latency runs (a short measurement, so the benchmark does not rot)."""

from __future__ import annotations

from bench import poll_latency


def test_every_load_and_slack_setting_yields_one_delay_per_completion() -> None:
    results = poll_latency.measure(samples=20, rounds=2, loads=("idle", "process"))
    assert set(results) == {(load, mode) for load in ("idle", "process")
                            for mode in ("default", "fine")}  # fmt: skip
    for delays in results.values():
        assert len(delays) == 40
        assert all(0 <= d < 1e6 for d in delays)  # noticed after it happened, within 1 s
