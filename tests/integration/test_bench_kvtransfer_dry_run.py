"""bench.kvtransfer_nccl's orchestration on CPU (--cpu-dry-run: gloo, tiny caches), so the GPU
benchmark does not rot between device runs: every raw mode, the protocol and the overlap with
two chunkings produce timings (the raw ones also over a bare process group), and every
protocol transfer is bit-exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_the_kv_transfer_benchmark_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    command = [
        sys.executable, "-m", "bench.kvtransfer_nccl", "--cpu-dry-run", "--repeats", "1",
        "--overlap-repeats", "2", "--lengths", "512", "--raw-modes", "one_part,parts1,parts1/bare",
        "--protocol-modes", "1024", "--overlap-layers-per-chunk", "1,2", "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["mismatches"] == []
    for shape in ("tiny", "smollm2-135m"):
        for mode in ("one_part", "parts1", "parts1/bare"):
            assert all(t > 0 for t in result["raw"][f"{shape}/512/{mode}"])
        assert len(result["protocol"][f"{shape}/512/1024"]) == 1
    assert set(result["overlap"]) == {"1", "2"}  # layers per chunk (JSON keys)
    for summary in result["overlap"].values():
        assert summary["prefill_s"] > 0 and summary["transfer_s"] > 0
        assert summary["hidden_fraction"] <= 1
    # 1-layer chunks of the 2-layer tiny model: chunk 1 was posted ahead of its header
    section = run.stdout.split("1 layers per chunk:", 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("| chunk"))
    row = next(line for line in section.splitlines() if line.startswith("| 1 "))
    cells = dict(zip(_cells(header), _cells(row), strict=True))
    assert cells["receiver posted it ahead (ms)"] != "-"
    assert cells["receiver has header (ms)"] == "-"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]
