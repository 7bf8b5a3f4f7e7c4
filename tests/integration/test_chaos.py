"""The chaos run (issue 22.5) at a small size: streaming gRPC requests (greedy and seeded)
against the disaggregated service while a decode worker and a prefill worker are killed at
seeded random moments and redis-server (the prefix index) restarts. Every request finishes
with the single engine's output, and the surviving workers hold no KV block and pass
check_integrity. The run itself is bench.chaos; this test asserts its three zeros."""

from __future__ import annotations

import pytest

from engine.engine import Engine

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pytest.importorskip("ray")


def test_chaos_run_loses_nothing_changes_nothing_leaks_nothing(
    default_model_engine: Engine,
) -> None:
    from bench.chaos import ChaosConfig, run_chaos

    config = ChaosConfig(
        mode="disaggregated", num_requests=6, seed=3, duration_s=5.0, arrival_s=2.0,
        kill_start_s=1.0, decode_kills=1, prefill_kills=1, redis_restarts=1,
        min_tokens=8, max_tokens=24, settle_timeout_s=60.0,
    )  # fmt: skip
    report = run_chaos(config, default_model_engine)
    summary, requests = report["summary"], report["requests"]
    assert summary["faults_injected"] == summary["faults_planned"] == 3, report["faults"]
    assert summary["nofault_lost"] == summary["nofault_differing"] == 0, requests
    assert summary["lost"] == 0, [r for r in requests if r["status"] != "OK"]
    assert summary["differing"] == 0, [r for r in requests if not r["equal"]]
    assert summary["leaked_blocks"] == 0, report["settle"]
    assert summary["pools_recovered"], report["settle"]
