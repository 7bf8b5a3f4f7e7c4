"""Applying autoscaling decisions to a running service's pools.

Every interval each pool's scaler (cluster.autoscaler.PoolScaler) is asked for a size; a
change runs in the background, one per pool at a time: growing starts and pairs workers
(`Service.start_worker`) and adds them, shrinking drains the least busy worker
(`Service.drain_worker`: a decode worker's streams move to the others with their KV, or by
replay, a prefill worker's prefills finish) and retires it. No request is lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING

from cluster.autoscaler import PoolScaler, pool_signals, ratio_decision

if TYPE_CHECKING:
    from cluster.service import Service

logger = logging.getLogger(__name__)


class Autoscaler:
    """The scaling loop of one service (`run`, cancelled when the service stops)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        scaling = service.config.autoscaling
        self.scalers = {"decode": PoolScaler("decode", scaling.decode)}
        if service.disaggregated:
            self.scalers["prefill"] = PoolScaler("prefill", scaling.prefill)
        self._changing: dict[str, asyncio.Task[None]] = {}  # pool -> its change under way

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.service.config.autoscaling.interval_s)
                self.step(time.monotonic())
        finally:
            for task in self._changing.values():
                task.cancel()

    def step(self, now: float) -> None:
        """Ask every pool's scaler once; start the changes it decides."""
        service, metrics = self.service, self.service.metrics
        recent = service.recent_latencies()
        for name, scaler in self.scalers.items():
            loads = [m.load for m in service.pools[name].members()]
            live = [load for load in loads if not load.draining]
            metrics.target_workers.labels(pool=name).set(len(live))
            if name in self._changing:
                continue
            kind = name if service.disaggregated else "colocated"
            ratio = service.config.autoscaling.prefill_decode_ratio
            if name == "prefill" and ratio is not None:  # follows the decode pool's size
                num_decode = sum(not m.load.draining for m in service.pools["decode"].members())
                decision = ratio_decision(len(live), num_decode, ratio, scaler.policy)
            else:
                decision = scaler.decide(len(live), pool_signals(kind, loads, recent), now)
            if decision is None:
                continue
            logger.info("autoscaling %s: %d -> %d workers (load %.2f: %s)", name,
                        decision.current, decision.target, decision.load,
                        {k: round(v, 2) for k, v in decision.signals.items()})  # fmt: skip
            metrics.scaling_decisions.labels(pool=name, direction=decision.direction).inc()
            metrics.target_workers.labels(pool=name).set(decision.target)
            task = asyncio.create_task(self._resize(name, decision.target - decision.current))
            task.add_done_callback(functools.partial(self._resized, name))
            self._changing[name] = task

    def _resized(self, pool: str, task: asyncio.Task[None]) -> None:
        if self._changing.get(pool) is task:
            del self._changing[pool]

    async def _resize(self, pool: str, delta: int) -> None:
        try:
            if delta > 0:
                await asyncio.gather(*(self._grow(pool) for _ in range(delta)))
            else:
                for _ in range(-delta):
                    await self._shrink(pool)
        except Exception:
            logger.exception("resizing the %s pool by %+d failed", pool, delta)

    async def _grow(self, pool: str) -> None:
        client, info = await self.service.start_worker(pool)
        self.service.pools[pool].add(client, info.index_key)
        logger.info("%s worker %s joined the pool", pool, client.worker_id)

    async def _shrink(self, pool: str) -> None:
        """Drain the least busy worker (Service.drain_worker, at most the drain timeout), then
        it is retired."""
        members = self.service.pools[pool]
        candidates = [
            (member.load.in_flight, index, member)
            for index, member in enumerate(members.members())
            if member.placeable
        ]
        if len(candidates) <= 1:
            return
        _, _, member = min(candidates, key=lambda c: c[:2])
        timeout_s = self.service.config.autoscaling.drain_timeout_s
        await self.service.drain_worker(pool, member, timeout_s)
