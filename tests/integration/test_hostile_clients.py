"""What hostile or unlucky clients did to a running service (issue 16, docs/reliability.md I10/I11).

One real service for the module: a local Ray cluster, one prefill and one decode worker with
the default model (KV moving between them over gloo), the gRPC router on loopback, real
clients. Each case is a probe that once broke the service; each ends by checking that the
workers hold no request and no KV block. Runs in CI (kept under a minute here: one service,
short generations).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
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
    assert all(s.failure is None for s in service.worker_stats()), "a worker's engine died"


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


HEALTH_DEADLINE_S = 0.1  # a liveness probe's timeout (the bound)


def probe_health_while(service: RunningService, work: Callable[[], Any]) -> tuple[Any, list]:
    """Run `work` while a client checks health back to back, each check with a 100 ms
    deadline. Returns (what work returned or raised, the checks' failures)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(service.channel)
    failures: list[Any] = []
    latencies_s: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_DEADLINE_S)
            except grpc.RpcError as e:
                failures.append(e.code())
            latencies_s.append(time.monotonic() - started)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        result: Any = work()
    except grpc.RpcError as e:
        result = e
    finally:
        done.set()
        prober.join(10)
    assert latencies_s, "no health check ran"
    print(f"health checks: {len(latencies_s)}, slowest {max(latencies_s) * 1000:.0f} ms")
    return result, failures


def test_health_answers_while_a_4mb_prompt_is_refused_untokenized(
    service: RunningService,
) -> None:
    """Once: a 4 MB prompt stalled every RPC, health checks included, for 6.9 s."""
    huge = "word " * 800_000  # 4,000,000 characters, just under gRPC's 4 MiB message limit
    refused, failures = probe_health_while(
        service, lambda: generate(service.stub, text=huge, sampling=greedy(1))
    )
    assert isinstance(refused, grpc.RpcError), refused
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "characters" in refused.details() and "context" in refused.details()
    assert failures == []
    tokenize_refused, failures = probe_health_while(
        service, lambda: service.stub.Tokenize(pb.TokenizeRequest(text=huge), timeout=60)
    )
    assert isinstance(tokenize_refused, grpc.RpcError), tokenize_refused
    assert tokenize_refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failures == []


def test_the_longest_text_worth_tokenizing_is_tokenized_and_refused_for_the_context(
    service: RunningService,
) -> None:
    """Text just under the size limit is tokenized (off the event loop: see
    tests/unit/test_router_event_loop.py), then refused for not fitting the context."""
    limit = service.service._servicer.model.max_prompt_chars  # type: ignore[union-attr]
    text = ("lorem ipsum " * (limit // 12 + 1))[: limit - 1]
    with pytest.raises(grpc.RpcError) as refused:
        generate(service.stub, text=text, sampling=greedy(1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokens; the context is" in refused.value.details()


@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff", b"\x1a\x02\xc3\x28"],  # not protobuf; text (field 3) not UTF-8
    ids=["malformed", "invalid-utf8"],
)
@pytest.mark.parametrize("method", ["Generate", "Tokenize"])
def test_a_message_that_does_not_parse_is_invalid_argument(
    service: RunningService, method: str, data: bytes
) -> None:
    """Once: UNKNOWN with the parser's text."""
    path = f"/tandem.v1.Tandem/{method}"
    call = (service.channel.unary_stream if method == "Generate" else service.channel.unary_unary)(
        path, request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as raised:
        response = call(data, timeout=30)
        if method == "Generate":
            list(response)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in raised.value.details()


def test_deadline_expiries_are_counted_as_deadline_exceeded(service: RunningService) -> None:
    """Once: 12 of 20 expiries counted as CANCELLED (the client's deadline passes first)."""
    metrics = service.service.metrics

    def count(code: str) -> float:
        return float(metrics.requests.labels(code=code)._value.get())

    before = {code: count(code) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    for timeout_s in (0.3, 0.6, 0.9, 1.2):
        with pytest.raises(grpc.RpcError) as raised:
            list(
                service.stub.Generate(
                    pb.GenerateRequest(text="Tell me a long story.", sampling=greedy(400)),
                    timeout=timeout_s,
                )
            )
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while count("DEADLINE_EXCEEDED") - before["DEADLINE_EXCEEDED"] < 4:
        assert time.monotonic() < deadline, "expiries not counted"
        time.sleep(0.02)
    assert count("CANCELLED") == before["CANCELLED"]


OVERSIZED = [
    ("stop_token_ids", {"stop_token_ids": [2] * 1_000_000}, "at most 256"),
    ("logit_bias", {"logit_bias": {t: -1.0 for t in range(49152)}}, "at most 1024"),
    ("top_k", {"top_k": 2**32 - 5}, "top_k"),
]


@pytest.mark.parametrize(
    ("field", "sampling", "words"), OVERSIZED, ids=[case[0] for case in OVERSIZED]
)
def test_oversized_fields_are_refused_naming_the_limit(
    service: RunningService, field: str, sampling: dict[str, Any], words: str
) -> None:
    """Once: 1M stop ids accepted (+35 MB per request per process), a bias over the whole
    vocabulary slowed every neighbour, top_k -5 wrapped to 4294967291 and was accepted."""
    with pytest.raises(grpc.RpcError) as raised:
        generate(service.stub, text="Hi", sampling=pb.SamplingParameters(max_tokens=2, **sampling))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details() and words in raised.value.details()


def test_chat_roles_are_capped(service: RunningService) -> None:
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="r" * 1_000_000, content="hi")])
    with pytest.raises(grpc.RpcError) as raised:
        generate(service.stub, chat=chat, sampling=greedy(2))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "role" in raised.value.details()
