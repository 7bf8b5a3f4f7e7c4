"""The service with a tensor-parallel decode pool (issue 24): one prefill worker at TP=1 and one
decode worker at TP=3 (the default model: 9 heads, 3 KV heads; three processes, gloo, each rank
holding its own KV head as GPU ranks do: the service makes a disaggregated pool's engines
kv_transfer ones, so rank 0 keeps a transfer staging region), a real local Ray cluster,
gRPC on loopback. Greedy output equals the single engine's whether the decode worker prefills
the prompt itself (--disagg never) or its KV comes from the prefill worker (TP=1 -> TP=3,
--disagg always); a killed rank takes its worker down as a unit (the router sees it lost), the
pool replaces it and the stream resumes there; nothing leaks."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from proto.tandem.v1 import tandem_pb2 as pb
from tests.conftest import greedy
from tests.integration.test_service import (
    RunningService,
    assert_greedy_as_the_engine,
    generate,
    greedy_sampling,
    kv_transfers,
    local_service,
    placing,
    wait_replaced,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")

DECODE_TP = 3


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    from cluster.service import ServiceConfig
    from router.disagg import DisaggPolicy

    small = {"device": "cpu", "num_kv_blocks": 256, "block_size": 16}
    config = ServiceConfig(
        engine=EngineConfig(  # type: ignore[arg-type]
            tensor_parallel_size=DECODE_TP, tensor_parallel_shared_kv=False, **small
        ),
        prefill_engine=EngineConfig(**small),  # type: ignore[arg-type]
        mode="disaggregated",
        disagg=DisaggPolicy(mode="never"),
        port=0,
    )
    with local_service(config) as running:
        yield running


def follower_pids(actor: Any) -> list[int]:
    """The pids of a tensor-parallel worker's ranks 1..N-1 (its engine's child processes)."""

    def pids(worker: Any) -> list[int]:
        return [p.pid for p in worker.engine.tp.followers.processes]

    return list(ray.get(actor.__ray_call__.remote(pids), timeout=30))


def transfer_heads(actor: Any) -> tuple[bool, int]:
    """A worker's engine's kv_transfer switch and the KV heads of its transfer cache."""

    def heads(worker: Any) -> tuple[bool, int]:
        engine = worker.engine
        return engine.config.kv_transfer, engine.transfer_kv_cache.shape[4]

    return tuple(ray.get(actor.__ray_call__.remote(heads), timeout=30))  # type: ignore[return-value]


def test_a_tp3_decode_worker_serves_greedy_output_equal_to_the_single_engine(
    service: RunningService, default_model_engine: Engine
) -> None:
    assert len(follower_pids(service.service.workers[0])) == DECODE_TP - 1
    assert transfer_heads(service.service.workers[0]) == (True, 3)  # set by the service
    assert_greedy_as_the_engine(service, default_model_engine, "The capital of France is", 6)
    service.assert_workers_idle_and_intact()


def test_kv_prefilled_at_tp1_is_decoded_at_tp3_with_the_single_engines_output(
    service: RunningService, default_model_engine: Engine
) -> None:
    before = kv_transfers(service)  # [decode worker's, prefill worker's]
    with placing(service, mode="always"):
        assert_greedy_as_the_engine(service, default_model_engine, "Name three colors:", 6)
    assert kv_transfers(service) == [n + 1 for n in before]
    service.assert_workers_idle_and_intact()


def test_a_killed_rank_takes_its_worker_down_as_a_unit_and_it_is_replaced(
    service: RunningService, default_model_engine: Engine
) -> None:
    """Rank 1 of the only decode worker is killed mid-stream: the worker goes down as a unit,
    the pool replaces it, and the stream resumes on the replacement by replay (router.failover),
    its greedy tokens those of the single engine; the dead worker's other rank exits too."""
    victim = service.service.workers[0]
    pids = follower_pids(victim)
    servicer = service.service._servicer
    assert servicer is not None
    migrated = servicer.num_migrated
    prompt = "Tell me a long story."
    call = service.stub.Generate(
        pb.GenerateRequest(text=prompt, sampling=greedy_sampling(400)), timeout=300
    )
    tokens = list(next(call).token_ids)  # streaming from the TP=3 worker
    assert tokens
    os.kill(pids[0], 9)  # rank 1
    for response in call:  # resumed once the replacement serves
        tokens += response.token_ids
        if len(tokens) >= 6:
            break
    call.cancel()
    assert servicer.num_migrated == migrated + 1
    expected = default_model_engine.generate([prompt], greedy(max_tokens=len(tokens)))[0]
    assert tokens == expected.token_ids
    wait_replaced(lambda: service.service.workers, 0, victim, timeout_s=300)  # 3 processes
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids):  # its other rank went with it
        assert time.monotonic() < deadline, f"ranks {pids} outlived their worker"
        time.sleep(0.05)
    responses = generate(service.stub, text="Hi", sampling=greedy_sampling(3))
    assert responses[-1].usage.completion_tokens == 3
    assert len(follower_pids(service.service.workers[0])) == DECODE_TP - 1
    service.assert_workers_idle_and_intact()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
