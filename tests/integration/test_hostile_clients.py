"""What hostile or unlucky clients did to a running service (issue 16, RELIABILITY I10/I11).

One real service for the module: a local Ray cluster, one prefill and one decode worker with
the default model (KV moving between them over gloo), the gRPC router on loopback, real
clients. Each case is a probe that once broke the service; each ends by checking that the
workers hold no request and no KV block. Runs in CI (kept under a minute here: one service,
short generations).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from engine.config import EngineConfig
from proto.tandem.v1 import tandem_pb2 as pb
from tests.integration.test_service import RunningService, local_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    from cluster.service import ServiceConfig

    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=256, block_size=16),
        mode="disaggregated",
        num_prefill_workers=1,
        num_decode_workers=1,
        port=0,
    )
    with local_service(config) as running:
        yield running


@pytest.fixture(autouse=True)
def clean_workers(service: RunningService) -> Iterator[None]:
    yield
    service.assert_workers_idle_and_intact()
    assert all(s["failure"] is None for s in service.worker_stats()), "a worker's engine died"


def greedy(max_tokens: int) -> pb.SamplingParameters:
    return pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def tokens_of(responses: list[pb.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def generate(stub: Any, **fields: Any) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))


def test_a_request_id_reused_in_sequence_is_served_each_time(service: RunningService) -> None:
    """Once: INTERNAL 'transfer_id already used' and 94 leaked blocks, then a dead engine."""
    runs = [
        generate(service.stub, request_id="same", text="Hello there", sampling=greedy(4))
        for _ in range(3)
    ]
    assert all(r[-1].request_id == "same" for r in runs)
    assert tokens_of(runs[0]) == tokens_of(runs[1]) == tokens_of(runs[2])


def test_a_live_request_id_is_refused_and_never_gets_another_clients_tokens(
    service: RunningService,
) -> None:
    expected = tokens_of(generate(service.stub, text="Count to ten:", sampling=greedy(24)))
    first = service.stub.Generate(
        pb.GenerateRequest(request_id="dup", text="Count to ten:", sampling=greedy(24)),
        timeout=60,
    )
    received = list(next(first).token_ids)  # live now
    with pytest.raises(grpc.RpcError) as raised:
        generate(service.stub, request_id="dup", text="Something else", sampling=greedy(4))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "dup" in raised.value.details()
    received += [t for r in first for t in r.token_ids]
    assert received == expected


def test_concurrent_duplicates_each_get_their_own_tokens_or_already_exists(
    service: RunningService,
) -> None:
    prompts = [f"Say the number {n}." for n in range(6)]
    expected = [tokens_of(generate(service.stub, text=p, sampling=greedy(8))) for p in prompts]
    results: list[Any] = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        start.wait()
        try:
            results[i] = tokens_of(
                generate(service.stub, request_id="shared", text=prompts[i], sampling=greedy(8))
            )
        except grpc.RpcError as e:
            results[i] = e.code()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    served = [i for i, r in enumerate(results) if isinstance(r, list)]
    assert served, results
    for i, result in enumerate(results):
        assert result == expected[i] or result == grpc.StatusCode.ALREADY_EXISTS, (i, result)
