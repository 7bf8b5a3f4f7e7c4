"""Per-request prefill placement through the real service (router.disagg): one prefill and two
decode workers, every request prefilled on its decode worker (`never`). A decode worker killed
mid-prefill moves its request to the other one, with the single engine's output, and is
replaced; nothing leaks. The placement modes on the usual pools: tests/integration/
test_service.py (test_disagg_*)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from proto.tandem.v1 import tandem_pb2 as pb
from tests.conftest import greedy
from tests.integration.test_service import (
    LONG_PROMPT,
    RunningService,
    generate,
    greedy_sampling,
    local_service,
    placed,
    wait_replaced,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    from cluster.service import ServiceConfig
    from router.disagg import DisaggPolicy

    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=512, block_size=16),
        mode="disaggregated",
        num_prefill_workers=1,
        num_decode_workers=2,
        disagg=DisaggPolicy(mode="never"),
        port=0,
    )
    with local_service(config) as running:
        yield running


def busy_decode_worker(service: RunningService, timeout_s: float = 30) -> int:
    """The index of a decode worker with a request in flight."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        for index, worker in enumerate(service.service.workers):
            if ray.get(worker.stats.remote(), timeout=30).num_requests:
                return index
        assert time.monotonic() < deadline, "no decode worker started the request"
        time.sleep(0.02)


def test_a_decode_worker_killed_mid_local_prefill_moves_its_request_to_the_other(
    service: RunningService, default_model_engine: Engine
) -> None:
    prompt = "(local, killed) " + LONG_PROMPT  # unique from its start: no cached prefix
    call = service.stub.Generate(
        pb.GenerateRequest(text=prompt, sampling=greedy_sampling(4)), timeout=120
    )
    busy = busy_decode_worker(service)
    victim = service.service.workers[busy]
    servicer = service.service._servicer
    assert servicer is not None
    retried = servicer.num_retried
    ray.kill(victim, no_restart=True)
    responses = list(call)  # nothing had streamed: the client never sees the loss
    expected = default_model_engine.generate([prompt], greedy(max_tokens=4))[0]
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert servicer.num_retried == retried + 1
    assert placed(service, "local", "forced_local") >= 1
    prefill_stats = ray.get(service.service.prefill_workers[0].stats.remote(), timeout=30)
    assert prefill_stats.kv.transfers_completed == 0  # the prefill pool was never used
    wait_replaced(lambda: service.service.workers, busy, victim)
    assert generate(service.stub, text="Hi", sampling=greedy_sampling(3))[-1].usage
    service.assert_workers_idle_and_intact()


def test_a_stream_whose_decode_worker_dies_resumes_on_the_other_prefilled_there(
    service: RunningService, default_model_engine: Engine
) -> None:
    """F4 on the local path (issue 22.1): a seeded stream whose decode worker is killed
    mid-stream resumes on the other decode worker, which prefills the prompt and the streamed
    tokens itself (`never`: no KV moves), continuing the same random stream."""
    from contracts.sampling_params import SamplingParams

    prompt = "(local replay) Once upon a time"
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=21, ignore_eos=True)
    sampling = pb.SamplingParameters(max_tokens=24, temperature=1.0, seed=21, ignore_eos=True)
    expected = default_model_engine.generate([prompt], params)[0]
    servicer = service.service._servicer
    assert servicer is not None
    migrated = servicer.num_migrated
    call = service.stub.Generate(pb.GenerateRequest(text=prompt, sampling=sampling), timeout=120)
    responses = [next(call) for _ in range(3)]
    busy = busy_decode_worker(service)
    victim = service.service.workers[busy]
    ray.kill(victim, no_restart=True)
    responses += list(call)
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert "".join(r.text for r in responses) == expected.text
    assert servicer.num_migrated == migrated + 1
    prefill_stats = ray.get(service.service.prefill_workers[0].stats.remote(), timeout=30)
    assert prefill_stats.kv.transfers_completed == 0  # replayed on the decode worker itself
    wait_replaced(lambda: service.service.workers, busy, victim)
    service.assert_workers_idle_and_intact()
