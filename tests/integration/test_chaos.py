"""The chaos run (issue 22.5) at a small size: streaming gRPC requests (greedy and seeded)
against the disaggregated service while a decode worker and a prefill worker are killed at
seeded random moments and redis-server (the prefix index) restarts. Every request finishes
with the single engine's output, and the surviving workers hold no KV block and pass
check_integrity. The run itself is bench.chaos; this test asserts its three zeros."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]


def test_chaos_run_loses_nothing_changes_nothing_leaks_nothing(tmp_path: Path) -> None:
    """`python -m bench.chaos` in a process of its own, as an operator runs it (its Ray
    cluster and its in-memory span exporter, which sees which requests migrated, end with
    it)."""
    out = tmp_path / "chaos.json"
    flags = ["--mode", "disaggregated", "--num-requests", "6", "--seed", "3",
             "--duration-s", "5", "--arrival-s", "2", "--kill-start-s", "1",
             "--decode-kills", "1", "--prefill-kills", "1", "--redis-restarts", "1",
             "--min-tokens", "8", "--max-tokens", "24", "--settle-timeout-s", "60",
             "--out", str(out)]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run([sys.executable, "-m", "bench.chaos", *flags], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    summary, requests = report["summary"], report["requests"]
    assert summary["faults_injected"] == summary["faults_planned"] == 3, report["faults"]
    assert summary["nofault_lost"] == summary["nofault_differing"] == 0, requests
    assert summary["lost"] == 0, [r for r in requests if r["status"] != "OK"]
    assert summary["differing"] == 0, [r for r in requests if not r["equal"]]
    assert summary["leaked_blocks"] == 0, report["settle"]
    assert summary["pools_recovered"], report["settle"]
    assert run.returncode == 0, run.stderr[-3000:]
