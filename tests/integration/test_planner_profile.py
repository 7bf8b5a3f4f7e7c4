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
            "1024,65536", "--repeats", "1", "--kv-cache-gb", "0.05", "--no-mixed",
            "--loop-requests", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    profile = load_profile(out)
    assert profile.prefill.rows == (8, 16) and profile.prefill.columns == (0, 16)
    assert profile.decode.rows == (1, 2) and profile.decode.columns == (16,)
    assert profile.transfer.points == (1024, 65536)
    assert profile.device.startswith("cpu") and profile.max_num_batched_tokens == 2048
    assert profile.kv_bytes_per_token == 30 * 2 * 3 * 64 * 4  # SmolLM2-135M, float32 KV
    assert profile.mixed is None and profile.overhead is None  # --no-mixed, --loop-requests 0


def test_tandem_profile_keeps_repeats_mixed_steps_and_the_loop_overhead(tmp_path: Path) -> None:
    """Version 2's sections: every point's repeats (their median is the point), mixed steps
    beside decodes, the engine loop's overhead; transfer times from --transfer-gbps."""
    out = tmp_path / "profile.json"
    argv = ["profile", "--device", "cpu", "--prefill-tokens", "8", "--prefill-context", "0",
            "--decode-batch", "1", "--decode-context", "16", "--decode-steps", "3",
            "--mixed-tokens", "8", "--mixed-batch", "0,2", "--mixed-context", "16",
            "--loop-requests", "2", "--loop-batch", "2", "--transfer-bytes", "1000,2000000",
            "--transfer-gbps", "1", "--repeats", "3", "--kv-cache-gb", "0.05",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    profile = load_profile(out)
    assert profile.prefill.samples is not None and len(profile.prefill.samples[0][0]) == 3
    assert sorted(profile.prefill.samples[0][0])[1] == profile.prefill.seconds[0][0]
    assert profile.decode.samples is not None and len(profile.decode.samples[0][0]) == 3
    assert profile.mixed is not None and profile.mixed.grid.columns == (0, 2)
    assert profile.mixed.context == 16 and len(profile.mixed.grid.samples[0][1]) == 3  # type: ignore[index]
    overhead = profile.overhead
    assert overhead is not None and overhead.source == "engine loop"
    assert len(overhead.request_s) == 2 and len(overhead.step_s) >= 2
    assert profile.transfer.seconds == pytest.approx((1e-6, 2e-3))  # bytes / 1 GB/s


@pytest.mark.slow
def test_tandem_profile_times_the_overhead_through_a_real_service(tmp_path: Path) -> None:
    """--service-requests: a real one-worker `tandem serve` (Ray, router, gRPC) answers the
    requests; the overhead is the service's, one sample per request, the gaps per step."""
    out = tmp_path / "profile.json"
    argv = ["profile", "--device", "cpu", "--prefill-tokens", "16", "--prefill-context", "0",
            "--decode-batch", "1,2", "--decode-context", "16", "--decode-steps", "2",
            "--no-mixed", "--loop-requests", "0", "--service-requests", "2",
            "--service-batch", "2", "--transfer-gbps", "1", "--repeats", "1",
            "--kv-cache-gb", "0.05", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    overhead = load_profile(out).overhead
    assert overhead is not None and overhead.source == "service"
    assert len(overhead.request_s) == 2
    assert 1 <= len(overhead.step_s) <= 2 * 2 + 2 * 2  # 2 gaps of 3 tokens, 4 requests at most
    assert Path(f"{out}.serve.log").stat().st_size > 0
