"""`tandem profile` at a tiny size with the real default model and a real gloo pair channel:
the file it writes loads as a Profile whose grids are the sizes asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from planner.profile import load_profile

pytestmark = pytest.mark.integration


def test_tandem_profile_measures_the_grid_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    argv = ["profile", "--device", "cpu", "--prefill-tokens", "8,16", "--prefill-context",
            "0,16", "--decode-batch", "1,2", "--decode-context", "16", "--transfer-bytes",
            "1024,65536", "--repeats", "1", "--kv-cache-gb", "0.05", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    profile = load_profile(out)
    assert profile.prefill.rows == (8, 16) and profile.prefill.columns == (0, 16)
    assert profile.decode.rows == (1, 2) and profile.decode.columns == (16,)
    assert profile.transfer.points == (1024, 65536)
    assert profile.device.startswith("cpu") and profile.max_num_batched_tokens == 2048
    assert profile.kv_bytes_per_token == 30 * 2 * 3 * 64 * 4  # SmolLM2-135M, float32 KV
