"""Live migration on drain (issue 22.3) through the real service, in both modes: a real local
Ray cluster, worker actors with the default model, the gRPC router on loopback, real clients.
A decode worker drained out of its pool (`Service.drain_worker`, as the autoscaler and an
operator drain it) has each of its running streams, greedy and seeded, cut at a token boundary
and resumed on the other decode worker by replay; every stream ends with the output of the
run without the drain, no token lost or repeated; the worker is gone while they still run;
the survivors hold no request and leak no KV block (check_integrity)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from contracts.sampling_params import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from proto.tandem.v1 import tandem_pb2 as pb
from tests.conftest import greedy
from tests.integration.test_service import RunningService, local_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")
MAX_TOKENS = 64  # long enough that every stream is still running when the drain starts


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def service(request: pytest.FixtureRequest) -> Iterator[RunningService]:
    """Two decode workers (colocated: two workers; disaggregated: one prefill worker and two
    decode workers)."""
    from cluster.service import ServiceConfig

    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=512, block_size=16),
        mode=request.param,
        num_workers=2,
        num_prefill_workers=1,
        num_decode_workers=2,
        port=0,
    )
    with local_service(config) as running:
        yield running


def test_draining_a_decode_worker_moves_its_streams_unchanged(
    service: RunningService, default_model_engine: Engine
) -> None:
    prompts = ["Tell me a long story.", "Once upon a time", "The capital of France", "Hello"]
    params = [
        greedy(max_tokens=MAX_TOKENS),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=11, ignore_eos=True),
        greedy(max_tokens=MAX_TOKENS),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.9, seed=5,
                       ignore_eos=True),
    ]  # fmt: skip
    expected = [
        default_model_engine.generate([p], s)[0] for p, s in zip(prompts, params, strict=True)
    ]
    samplings = [
        pb.SamplingParameters(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              seed=s.seed or 0, ignore_eos=True)
        for s in params
    ]  # fmt: skip
    servicer = service.service._servicer
    assert servicer is not None
    pool = service.service.pools["decode"]
    leaving, staying = pool.members()
    leaving_actor = service.service.workers[0]
    migrated = servicer.num_migrated
    staying.load.draining = True  # every stream starts on the worker that will leave
    try:
        calls = [
            service.stub.Generate(pb.GenerateRequest(text=p, sampling=s), timeout=180)
            for p, s in zip(prompts, samplings, strict=True)
        ]
        seen = [[next(call) for _ in range(3)] for call in calls]
        assert ray.get(leaving_actor.stats.remote(), timeout=30).num_requests == len(prompts)
    finally:
        staying.load.draining = False
    started = time.monotonic()
    service.run(service.service.drain_worker("decode", leaving, timeout_s=120), timeout_s=150)
    drain_s = time.monotonic() - started
    # Every stream was cut mid-way and moved (none had finished); the worker is gone.
    assert servicer.num_migrated == migrated + len(prompts)
    assert list(pool.members()) == [staying] and service.service.workers != [leaving_actor]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(leaving_actor.stats.remote(), timeout=30)
    for call, responses, reference in zip(calls, seen, expected, strict=True):
        responses += list(call)
        assert [t for r in responses for t in r.token_ids] == reference.token_ids
        assert "".join(r.text for r in responses) == reference.text
        assert responses[-1].usage.completion_tokens == MAX_TOKENS
        assert responses[-1].usage.prompt_tokens == reference.usage.prompt_tokens
    streams_s = time.monotonic() - started
    print(f"{service.service.config.mode}: drain {drain_s:.2f} s, streams done {streams_s:.2f} s")
    service.assert_workers_idle_and_intact()
    responses = list(
        service.stub.Generate(pb.GenerateRequest(text="Hi", sampling=samplings[0]), timeout=120)
    )
    assert responses[-1].usage.completion_tokens == MAX_TOKENS  # the survivor serves on
    service.assert_workers_idle_and_intact()
