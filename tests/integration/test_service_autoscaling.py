"""Autoscaling the disaggregated service (real Ray, gRPC, gloo transfers, default model): a ramp
of long prompts grows the prefill pool while the decode pool, not loaded past its targets,
stays; idleness shrinks the prefill pool back to its minimum by draining, while requests keep
flowing. No request fails, no KV block leaks, and every decision shows in metrics and logs."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from proto.tandem.v1 import tandem_pb2 as pb
from tests.integration.test_service import (
    LONG_PROMPT,
    RunningService,
    greedy_sampling,
    local_service,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    from cluster.autoscaler import AutoscalingConfig, ScalingPolicy
    from cluster.service import ServiceConfig
    from engine.config import EngineConfig

    scaling = AutoscalingConfig(
        enabled=True,
        interval_s=0.5,
        prefill=ScalingPolicy(min_workers=1, max_workers=2, targets={"queued_tokens": 330.0},
                              up_cooldown_s=0, down_cooldown_s=4),
        decode=ScalingPolicy(min_workers=1, max_workers=2, targets={"running": 64.0},
                             up_cooldown_s=0, down_cooldown_s=4),
    )  # fmt: skip
    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=512, block_size=16),
        mode="disaggregated",
        port=0,
        autoscaling=scaling,
    )
    with local_service(config) as running:
        yield running


def decisions(service: RunningService, pool: str, direction: str) -> float:
    value = service.service.metrics.registry.get_sample_value(
        "tandem_scaling_decisions_total", {"pool": pool, "direction": direction}
    )
    return value or 0.0


def test_a_ramp_grows_the_prefill_pool_and_idleness_shrinks_it(
    service: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cluster.service")
    caplog.set_level(logging.INFO, logger="cluster.scaling")
    assert len(service.service.prefill_workers) == 1

    def ask(prompt: str, max_tokens: int = 4) -> int:
        request = pb.GenerateRequest(text=prompt, sampling=greedy_sampling(max_tokens))
        return list(service.stub.Generate(request, timeout=300))[-1].usage.completion_tokens

    # The ramp: 6 prompts of ~580 tokens at once, ~3,500 queued tokens against a target of
    # 330 per worker (a load of about 10). The prefill pool grows to its max; the decode pool
    # has no reason to.
    ramp = [f"({n}) {LONG_PROMPT[:2000]}" for n in range(6)]
    with ThreadPoolExecutor(len(ramp)) as pool:
        assert list(pool.map(ask, ramp)) == [4] * len(ramp)
    deadline = time.monotonic() + 120
    while len(service.service.prefill_workers) < 2:  # it may still be joining
        assert time.monotonic() < deadline, "the prefill pool did not grow"
        time.sleep(0.2)
    assert decisions(service, "prefill", "up") >= 1
    assert len(service.service.workers) == 1 and decisions(service, "decode", "up") == 0
    # Now idle but for a trickle of short requests: the pool drains one worker and shrinks
    # back to its minimum while requests keep flowing, none lost.
    served = 0
    while len(service.service.prefill_workers) > 1:
        assert time.monotonic() < deadline, "the prefill pool did not shrink"
        assert ask("Hi", max_tokens=2) == 2
        served += 1
        time.sleep(0.3)
    assert served > 0
    assert decisions(service, "prefill", "down") >= 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("autoscaling prefill: 1 -> 2") for m in messages), messages
    assert any(m.startswith("autoscaling prefill: 2 -> 1") for m in messages), messages
    assert any("draining" in m for m in messages) and any("left the pool" in m for m in messages)
    assert ask("Hello again", max_tokens=3) == 3
    service.assert_workers_idle_and_intact()  # and the remaining workers leaked nothing
