"""The router's process never imports torch (issue 18): the real service, started in a fresh
process (local Ray, the default model, both modes), serves one request over gRPC and one over
the OpenAI-compatible HTTP edge; the process that ran the router and created the worker actors
reports what it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_the_router_process_serves_without_importing_torch(mode: str) -> None:
    pytest.importorskip("ray")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.torch_free_router", mode],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["num_tokens"] == 3  # it really served
    assert report["num_http_tokens"] == 3  # over HTTP too (Starlette, uvicorn: no torch)
    assert report["torch_imported"] is False
