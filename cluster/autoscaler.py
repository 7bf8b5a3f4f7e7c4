"""When a pool should grow or shrink: one PoolScaler per pool, fed its load signals.

Each signal is a measured load over its target; the pool's load is the largest. Above 1 the
pool grows at once to the size that brings it back to target; it shrinks one worker at a time,
only after a long spell below a lower threshold, so it does not flap (signals and policy:
docs/operations.md, "Autoscaling"). Pure logic, torch-free: the service applies the decisions
(starting workers, draining and removing them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PREFILL_SIGNALS = ("queued_tokens", "ttft")
DECODE_SIGNALS = ("kv_usage", "running", "itl")


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    min_workers: int = 1
    max_workers: int = 1
    targets: dict[str, float] = field(default_factory=dict)  # signal -> target value
    scale_down_below: float = 0.5  # the load under which the pool may shrink
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 120.0

    def __post_init__(self) -> None:
        if type(self.min_workers) is not int or self.min_workers < 1:
            raise ValueError(f"min_workers={self.min_workers!r} must be an int >= 1")
        if type(self.max_workers) is not int or self.max_workers < self.min_workers:
            raise ValueError(
                f"max_workers={self.max_workers!r} must be an int >= min_workers "
                f"({self.min_workers})"
            )
        known = PREFILL_SIGNALS + DECODE_SIGNALS
        for name, target in self.targets.items():
            if name not in known:
                raise ValueError(f"unknown scaling signal {name!r}: use one of {known}")
            if not target > 0:
                raise ValueError(f"target for {name}={target!r} must be > 0")
        if not 0 < self.scale_down_below < 1:
            raise ValueError(f"scale_down_below={self.scale_down_below!r} must be in (0, 1)")
        for name in ("up_cooldown_s", "down_cooldown_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")


def default_targets(pool: str) -> dict[str, float]:
    """Targets that suit each pool when none are given (TTFT and ITL have none: they depend
    on the model and the hardware)."""
    prefill = {"queued_tokens": 8192.0}
    decode = {"kv_usage": 0.8, "running": 48.0}
    return {"prefill": prefill, "decode": decode}.get(pool, {**prefill, **decode})


@dataclass(frozen=True, slots=True)
class AutoscalingConfig:
    """`enabled` False: the pools keep their configured sizes (dead workers are replaced)."""

    enabled: bool = False
    interval_s: float = 2.0
    prefill: ScalingPolicy = field(default_factory=ScalingPolicy)
    decode: ScalingPolicy = field(default_factory=ScalingPolicy)  # colocated: the one pool
    drain_timeout_s: float = 600.0  # a leaving worker's requests get this long to finish
    # (prefill, decode): the prefill pool follows the decode pool's size at this ratio instead
    # of its own signals (a split `tandem plan` found best; disaggregated mode). None: signals
    prefill_decode_ratio: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        ratio = self.prefill_decode_ratio
        if ratio is not None and (
            len(ratio) != 2 or any(type(v) is not int or v < 1 for v in ratio)
        ):
            raise ValueError(f"prefill_decode_ratio={ratio!r} must be two ints >= 1")
        if not self.interval_s > 0:
            raise ValueError(f"interval_s={self.interval_s!r} must be > 0")
        if not self.drain_timeout_s > 0:
            raise ValueError(f"drain_timeout_s={self.drain_timeout_s!r} must be > 0")


@dataclass(frozen=True, slots=True)
class Decision:
    pool: str
    current: int
    target: int
    load: float
    signals: dict[str, float]  # the ratios it was taken on

    @property
    def direction(self) -> str:
        return "up" if self.target > self.current else "down"


class PoolScaler:
    def __init__(self, pool: str, policy: ScalingPolicy) -> None:
        self.pool = pool
        self.policy = policy
        self.targets = policy.targets or default_targets(pool)
        self._last_up = -math.inf
        self._last_change = -math.inf
        self._low_since: float | None = None

    def ratios(self, signals: dict[str, float | None]) -> dict[str, float]:
        """Measured / target for each signal that has both."""
        return {
            name: value / self.targets[name]
            for name, value in signals.items()
            if value is not None and name in self.targets
        }

    def decide(
        self, num_workers: int, signals: dict[str, float | None], now: float
    ) -> Decision | None:
        """The pool's new size, or None to stay. `signals`: measured values by name (None:
        no measurement, e.g. no TTFT in the window)."""
        policy = self.policy
        ratios = self.ratios(signals)
        load = max(ratios.values(), default=0.0)
        target = num_workers
        if num_workers < policy.min_workers or num_workers > policy.max_workers:
            target = min(max(num_workers, policy.min_workers), policy.max_workers)
        elif load > 1.0:
            self._low_since = None
            if now - self._last_up >= policy.up_cooldown_s:
                wanted = max(num_workers + 1, math.ceil(num_workers * load))
                target = min(wanted, policy.max_workers)
        elif load < policy.scale_down_below:
            if self._low_since is None:
                self._low_since = now
            calm = now - self._low_since >= policy.down_cooldown_s
            if calm and now - self._last_change >= policy.down_cooldown_s:
                target = max(num_workers - 1, policy.min_workers)
        else:
            self._low_since = None
        if target == num_workers:
            return None
        if target > num_workers:
            self._last_up = now
        self._last_change = now
        self._low_since = None
        return Decision(self.pool, num_workers, target, load, ratios)


def ratio_decision(
    num_prefill: int, num_decode: int, ratio: tuple[int, int], policy: ScalingPolicy
) -> Decision | None:
    """The prefill pool's size for `num_decode` decode workers at prefill:decode `ratio`
    (rounded up, within the policy's bounds); None when it is that size already."""
    wanted = math.ceil(num_decode * ratio[0] / ratio[1])
    target = min(max(wanted, policy.min_workers), policy.max_workers)
    if target == num_prefill:
        return None
    load = target / max(num_prefill, 1)
    return Decision("prefill", num_prefill, target, load, {"ratio": ratio[0] / ratio[1]})


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100, nearest rank) of `values`; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


def pool_signals(pool: str, loads: list[Any], recent: dict[str, list[float]]) -> dict[str, Any]:
    """The measured signals of a pool from its workers' loads (router.placement.WorkerLoad,
    live ones) and recent latencies ("ttft", "itl": seconds)."""
    live = [load for load in loads if not load.down and not load.draining] or loads
    n = max(len(live), 1)
    signals: dict[str, float | None] = {}
    if pool in ("prefill", "colocated"):
        signals["queued_tokens"] = sum(load.queued_tokens for load in live) / n
        signals["ttft"] = percentile(recent.get("ttft", []), 90)
    if pool in ("decode", "colocated"):
        reported = [load for load in live if load.num_blocks]
        signals["kv_usage"] = (
            sum(load.kv_used for load in reported) / len(reported) if reported else None
        )
        signals["running"] = sum(load.in_flight for load in live) / n
        signals["itl"] = percentile(recent.get("itl", []), 90)
    return signals
