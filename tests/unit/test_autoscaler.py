"""The autoscaler's decisions on given signals and times: grow at once to the size that brings
the load to target (within max, after the up cool-down), shrink one worker at a time only
after the load stayed low for the down cool-down, hold in between (hysteresis)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from cluster.autoscaler import (
    AutoscalingConfig,
    PoolScaler,
    ScalingPolicy,
    percentile,
    pool_signals,
    ratio_decision,
)
from cluster.scaling import Autoscaler
from router.placement import Member, WorkerLoad
from router.workers import WorkerClient
from telemetry.metrics import ServiceMetrics
from tests.unit.test_planner import profile_json

POLICY = ScalingPolicy(
    min_workers=1, max_workers=4, targets={"queued_tokens": 1000.0, "ttft": 0.5},
    up_cooldown_s=10, down_cooldown_s=60,
)  # fmt: skip


def test_grows_to_bring_the_load_back_to_target_within_max() -> None:
    scaler = PoolScaler("prefill", POLICY)
    decision = scaler.decide(1, {"queued_tokens": 2500.0, "ttft": None}, now=0.0)
    assert decision is not None and decision.target == 3 and decision.direction == "up"
    assert decision.signals == {"queued_tokens": 2.5}
    assert scaler.decide(3, {"queued_tokens": 3000.0}, now=5.0) is None  # up cool-down
    decision = scaler.decide(3, {"queued_tokens": 3000.0}, now=10.0)
    assert decision is not None and decision.target == 4  # 9 wanted, 4 at most


def test_the_worst_signal_decides_and_latency_counts() -> None:
    scaler = PoolScaler("prefill", POLICY)
    decision = scaler.decide(2, {"queued_tokens": 100.0, "ttft": 0.8}, now=0.0)
    assert decision is not None and decision.target == 4  # ceil(2 x 1.6) = 4
    assert decision.load == pytest.approx(1.6)


def test_shrinks_one_at_a_time_after_staying_low() -> None:
    scaler = PoolScaler("prefill", POLICY)
    low = {"queued_tokens": 100.0}
    assert scaler.decide(3, low, now=0.0) is None
    assert scaler.decide(3, low, now=59.0) is None
    decision = scaler.decide(3, low, now=60.0)
    assert decision is not None and decision.target == 2 and decision.direction == "down"
    assert scaler.decide(2, low, now=61.0) is None  # the timer starts over
    decision = scaler.decide(2, low, now=121.0)
    assert decision is not None and decision.target == 1
    assert scaler.decide(1, low, now=500.0) is None  # never below min


def test_the_band_between_thresholds_holds_and_resets_the_low_timer() -> None:
    scaler = PoolScaler("prefill", POLICY)
    assert scaler.decide(2, {"queued_tokens": 100.0}, now=0.0) is None
    assert scaler.decide(2, {"queued_tokens": 700.0}, now=50.0) is None  # 0.7: in the band
    assert scaler.decide(2, {"queued_tokens": 100.0}, now=70.0) is None  # low again since 70
    assert scaler.decide(2, {"queued_tokens": 100.0}, now=129.0) is None
    assert scaler.decide(2, {"queued_tokens": 100.0}, now=130.0) is not None


def test_out_of_bounds_sizes_are_corrected_first() -> None:
    scaler = PoolScaler("decode", ScalingPolicy(min_workers=2, max_workers=3))
    decision = scaler.decide(1, {}, now=0.0)
    assert decision is not None and decision.target == 2


def test_bad_policies_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="max_workers=1 must be an int >= min_workers"):
        ScalingPolicy(min_workers=2, max_workers=1)
    with pytest.raises(ValueError, match="unknown scaling signal 'latency'"):
        ScalingPolicy(targets={"latency": 1.0})
    with pytest.raises(ValueError, match="target for ttft=0"):
        ScalingPolicy(targets={"ttft": 0})
    with pytest.raises(ValueError, match="scale_down_below"):
        ScalingPolicy(scale_down_below=1.5)


def test_pool_signals_from_loads_and_latencies() -> None:
    loads = [
        WorkerLoad(in_flight=4, queued_tokens=3000, num_blocks=100, num_free_blocks=20),
        WorkerLoad(in_flight=2, queued_tokens=1000, num_blocks=100, num_free_blocks=60),
        WorkerLoad(in_flight=9, queued_tokens=9999, draining=True),  # leaving: not counted
    ]
    recent = {"ttft": [0.1, 0.2, 0.3, 0.4, 1.0], "itl": [0.01] * 8 + [0.5, 0.5]}
    prefill = pool_signals("prefill", loads, recent)
    assert prefill == {"queued_tokens": 2000.0, "ttft": 1.0}
    decode = pool_signals("decode", loads, recent)
    assert decode["kv_usage"] == pytest.approx(0.6)
    assert decode["running"] == 3.0
    assert decode["itl"] == 0.5
    assert set(pool_signals("colocated", loads, {})) == {
        "queued_tokens", "ttft", "kv_usage", "running", "itl",
    }  # fmt: skip
    assert percentile([], 90) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


@pytest.mark.parametrize(
    "num_prefill, num_decode, ratio, expected",
    [(1, 3, (1, 3), None), (1, 4, (1, 3), 2), (3, 2, (1, 1), 2), (1, 6, (2, 1), 4)],
)
def test_a_profile_ratio_sizes_the_prefill_pool_to_the_decode_pool(
    num_prefill: int, num_decode: int, ratio: tuple[int, int], expected: int | None
) -> None:
    """ceil(decode x prefill / decode), within the policy's bounds (here at most 4)."""
    decision = ratio_decision(num_prefill, num_decode, ratio, ScalingPolicy(1, 4))
    assert (decision and decision.target) == expected
    if decision is not None:
        assert decision.pool == "prefill" and decision.current == num_prefill


def test_a_bad_ratio_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"prefill_decode_ratio=\(1, 0\)"):
        AutoscalingConfig(prefill_decode_ratio=(1, 0))


def test_serve_takes_the_ratio_from_a_profile(tmp_path: Path) -> None:
    from cluster.cli import autoscaling_config, build_parser

    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile_json(prefill_decode_ratio=[1, 2])))
    argv = ["serve", "--autoscale", "--decode-max-workers", "4", "--prefill-max-workers", "2"]
    args = build_parser().parse_args([*argv, "--autoscale-ratio-profile", str(path)])
    assert autoscaling_config(args).prefill_decode_ratio == (1, 2)
    path.write_text(json.dumps(profile_json()))  # no split saved
    with pytest.raises(ValueError, match="holds no split"):
        autoscaling_config(args)


class _Pool:
    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self._members = [Member(cast(WorkerClient, _Client(f"{name}-{i}"))) for i in range(size)]

    def members(self) -> list[Member]:
        return self._members


@dataclass(frozen=True)
class _Client:
    worker_id: str


class _Service:
    """What the Autoscaler reads of a Service; start_worker records the pools it grows."""

    def __init__(self, ratio: tuple[int, int], num_prefill: int, num_decode: int) -> None:
        policy = ScalingPolicy(1, 8)
        self.config = SimpleNamespace(autoscaling=AutoscalingConfig(
            enabled=True, prefill=policy, decode=policy, prefill_decode_ratio=ratio))  # fmt: skip
        self.metrics = ServiceMetrics()
        self.disaggregated = True
        self.pools = {
            "prefill": _Pool("prefill", num_prefill),
            "decode": _Pool("decode", num_decode),
        }
        self.started: list[str] = []

    def recent_latencies(self) -> dict[str, list[float]]:
        return {}

    async def start_worker(self, pool: str) -> tuple[Any, Any]:
        self.started.append(pool)
        raise RuntimeError("no workers in this test")  # logged by the autoscaler, not raised


def test_the_prefill_pool_follows_the_decode_pool_at_the_profile_ratio() -> None:
    """4 decode workers at 1:2 want 2 prefill workers: the autoscaler starts one more, and
    only for the prefill pool (the decode pool has no load to scale on)."""
    service = _Service((1, 2), num_prefill=1, num_decode=4)

    async def one_step() -> None:
        autoscaler = Autoscaler(cast(Any, service))
        autoscaler.step(now=0.0)
        await asyncio.gather(*autoscaler._changing.values())

    asyncio.run(one_step())
    assert service.started == ["prefill"]
