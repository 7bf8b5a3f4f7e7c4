"""The service end to end, in both modes: a real local Ray cluster, worker actors with the
default model (colocated: two workers; disaggregated: two prefill workers and one decode
worker, KV moving between them over gloo), the gRPC router on loopback, real clients. Greedy
and seeded output equal the single engine's; concurrent streams; bad input refused with the
right status; cancellation and deadlines free the workers' KV; a killed decode worker's streams
resume elsewhere by replay, unchanged (past --max-migrations they end fast with UNAVAILABLE),
a request killed mid-prefill moves to another worker, killed workers are replaced; a drained
decode worker's streams move to another by replay, unchanged; a failed KV transfer is
recomputed on the decode worker."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from contracts.errors import InvalidRequest
from contracts.sampling_params import SamplingParams
from contracts.workers import WorkerStats
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from router.admin import parse_admin_keys
from tests.conftest import greedy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN_KEY = "admin-key-0123456789abcdef"

ray = pytest.importorskip("ray")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# About 3,000 tokens: a prefill of a few seconds on a CPU worker, long enough to act during it.
LONG_PROMPT = " ".join(f"Line {n}: a quick brown fox jumps over the lazy dog." for n in range(200))
# A worker answers stats (how a test finds a request in flight) between engine steps: prefill
# chunks of PREFILL_CHUNK_TOKENS keep its steps short, so a kill lands early in a prefill of
# MID_PREFILL_PROMPT (about 1,500 tokens: three chunks, two left to land it in).
PREFILL_CHUNK_TOKENS = 512
MID_PREFILL_PROMPT = LONG_PROMPT[: len(LONG_PROMPT) // 2]


class RunningService:
    """The asyncio service on a loop thread of its own; tests talk to it with sync stubs."""

    def __init__(self, config: Any) -> None:
        from cluster.service import Service

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = Service(config)
        self.run(self.service.start(), timeout_s=300)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.service.port}")
        self.stub = tandem_pb2_grpc.TandemStub(self.channel)

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def worker_stats(self) -> list[WorkerStats]:
        """Decode (or colocated) workers first, then prefill workers."""
        workers = self.service.workers + self.service.prefill_workers
        return [ray.get(w.stats.remote(), timeout=30) for w in workers]

    @property
    def disaggregated(self) -> bool:
        return bool(self.service.config.mode == "disaggregated")

    def prefilling_workers(self) -> list[Any]:
        """The workers that prefill: the prefill pool, or every colocated worker."""
        return self.service.prefill_workers if self.disaggregated else self.service.workers

    def wait_for_a_prefill(self, timeout_s: float = 30) -> int:
        """The index (in prefilling_workers) of a worker with a request in flight."""
        deadline = time.monotonic() + timeout_s
        while True:
            for index, worker in enumerate(self.prefilling_workers()):
                if ray.get(worker.stats.remote(), timeout=30).num_requests:
                    return index
            assert time.monotonic() < deadline, "no worker started the prefill"
            time.sleep(0.02)

    def assert_workers_idle_and_intact(self, timeout_s: float = 10) -> None:
        """Soon after a case, no worker has a request or holds a block for one (cached
        prefixes count as free): not the request, nor KV shipped or arriving for it."""
        deadline = time.monotonic() + timeout_s
        while any(s.num_requests or s.num_free_blocks != s.num_blocks
                  for s in self.worker_stats()):  # fmt: skip
            assert time.monotonic() < deadline, f"requests or KV still held: {self.worker_stats()}"
            time.sleep(0.05)
        for worker in self.service.workers + self.service.prefill_workers:
            ray.get(worker.check_integrity.remote(), timeout=30)

    def close(self) -> None:
        self.channel.close()
        self.run(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def local_service(config: Any) -> Iterator[RunningService]:
    """The service on a fresh local Ray cluster (4 logical CPUs: room for three workers on
    this 2-core machine), stopped with its cluster afterwards."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        running = RunningService(config)
        try:
            yield running
        finally:
            running.close()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def service(request: pytest.FixtureRequest) -> Iterator[RunningService]:
    from cluster.service import ServiceConfig

    config = ServiceConfig(
        engine=EngineConfig(
            device="cpu",
            num_kv_blocks=512,
            block_size=16,
            scheduler=SchedulerConfig(max_prefill_chunk_tokens=PREFILL_CHUNK_TOKENS),
        ),
        mode=request.param,
        num_workers=2,
        num_prefill_workers=2,
        num_decode_workers=1,
        port=0,
        admin_keys=parse_admin_keys(f"ops:{ADMIN_KEY}", "test"),
    )
    with local_service(config) as running:
        yield running


@pytest.fixture(autouse=True)
def clean_workers(service: RunningService) -> Iterator[None]:
    yield
    service.assert_workers_idle_and_intact()


def generate(stub: Any, **fields: Any) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=120))


def greedy_sampling(max_tokens: int) -> pb.SamplingParameters:
    return pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_greedy_through_the_service_equals_the_engine(
    service: RunningService, default_model_engine: Engine
) -> None:
    prompts = ["Hi", "The capital of France is", "List three colors:", "Tell me a story"]
    for prompt in prompts:
        responses = generate(service.stub, text=prompt, sampling=greedy_sampling(12))
        token_ids = [t for r in responses for t in r.token_ids]
        expected = default_model_engine.generate([prompt], greedy(max_tokens=12))[0]
        assert token_ids == expected.token_ids, prompt
        assert "".join(r.text for r in responses) == expected.text
        last = responses[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 12
        assert last.usage.prompt_tokens == expected.usage.prompt_tokens
        timing = responses[0].timing
        assert 0 < timing.queue_seconds < timing.ttft_seconds <= last.timing.total_seconds
    if service.disaggregated:  # the KV really moved
        decode, *prefills = service.worker_stats()
        assert decode.kv.transfers_completed >= len(prompts), (decode, prefills)
        assert sum(p.kv.transfers_completed for p in prefills) >= len(prompts)


def test_seeded_sampling_through_the_service_equals_the_engine(
    service: RunningService, default_model_engine: Engine
) -> None:
    sampling = pb.SamplingParameters(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True)
    responses = generate(service.stub, text="Once upon a time", sampling=sampling)
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True)
    expected = default_model_engine.generate(["Once upon a time"], params)[0]
    assert [t for r in responses for t in r.token_ids] == expected.token_ids


def test_usage_reports_the_prefix_cache_hits(service: RunningService) -> None:
    prompt = "Summarize the plot of Hamlet in two sentences, for a child who is seven."
    usages = [
        generate(service.stub, text=prompt, sampling=greedy_sampling(2))[-1].usage
        for _ in range(3)  # 3 requests on 2 prefilling workers: one worker sees it twice
    ]
    assert usages[0].cached_tokens == 0
    assert max(u.cached_tokens for u in usages) == usages[0].prompt_tokens // 16 * 16


def test_32_concurrent_streaming_clients_all_complete(
    service: RunningService, default_model_engine: Engine
) -> None:
    prompts = [f"Count to {n}:" for n in range(32)]

    def one(prompt: str) -> list[pb.GenerateResponse]:
        return generate(service.stub, text=prompt, sampling=greedy_sampling(8))

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    expected = default_model_engine.generate(prompts, greedy(max_tokens=8))
    for responses, reference in zip(results, expected, strict=True):
        assert [t for r in responses for t in r.token_ids] == reference.token_ids
        usage = responses[-1].usage
        assert usage.completion_tokens == 8
        assert usage.prompt_tokens == reference.usage.prompt_tokens


@pytest.mark.parametrize(
    ("fields", "code", "text"),
    [
        ({"text": ""}, INVALID, "text: prompt is empty"),
        ({"token_ids": pb.TokenIds(ids=[10**6])}, INVALID, "prompt_token_ids"),
        ({"text": "x", "sampling": pb.SamplingParameters(top_p=2.0)}, INVALID, "top_p"),
        ({"text": "x", "model": "gpt-9"}, grpc.StatusCode.NOT_FOUND, "'gpt-9' is not served"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_status_naming_the_problem(
    service: RunningService, fields: dict[str, Any], code: grpc.StatusCode, text: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        generate(service.stub, **fields)
    assert raised.value.code() == code
    assert text in raised.value.details()


def test_cancel_mid_stream_frees_the_request(service: RunningService) -> None:
    call = service.stub.Generate(
        pb.GenerateRequest(text="Tell me a long story.", sampling=greedy_sampling(400)),
        timeout=120,
    )
    first = next(call)
    assert first.token_ids
    call.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    # clean_workers then checks every worker freed it and its KV books are intact


def test_cancel_during_prefill_frees_the_request(service: RunningService) -> None:
    call = service.stub.Generate(
        pb.GenerateRequest(text="(cancel) " + LONG_PROMPT, sampling=greedy_sampling(4)),
        timeout=120,
    )
    service.wait_for_a_prefill()
    call.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    # clean_workers then checks the prefill stopped and freed its KV


def test_deadline_exceeded_frees_the_request(service: RunningService) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(
            service.stub.Generate(
                pb.GenerateRequest(text="Tell me a long story.", sampling=greedy_sampling(400)),
                timeout=0.5,
            )
        )
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cancels_and_deadlines_at_random_moments_leave_nothing_behind(
    service: RunningService,
) -> None:
    """C2/C3 under load: 12 concurrent streams, half cancelled by the client and half given
    a deadline, at random moments from before their prefill to mid-decode (disaggregated:
    also while their KV ships). Each ends CANCELLED, DEADLINE_EXCEEDED or finished; then
    clean_workers requires every worker idle with every block free (nothing shipped or
    arriving is left behind)."""
    rng = random.Random(12)
    started = time.monotonic()
    calls = []
    for i in range(12):
        deadline = i % 2 == 1
        stop_at = rng.uniform(0.0, 2.0)
        call = service.stub.Generate(
            pb.GenerateRequest(text=f"({i}) " + LONG_PROMPT[: 300 + 100 * i],
                               sampling=greedy_sampling(48)),
            timeout=stop_at if deadline else 120,
        )  # fmt: skip
        calls.append((call, None if deadline else stop_at))
    for call, cancel_at in sorted(calls, key=lambda c: c[1] or 0.0):
        if cancel_at is not None:
            time.sleep(max(0.0, started + cancel_at - time.monotonic()))
            call.cancel()
    ends = []
    for call, _ in calls:
        try:
            responses = list(call)
            ends.append("finished" if responses[-1].usage.completion_tokens == 48 else "short")
        except grpc.RpcError as e:
            ends.append(e.code().name)
    assert set(ends) <= {"finished", "CANCELLED", "DEADLINE_EXCEEDED"}, ends
    assert ends.count("CANCELLED") + ends.count("DEADLINE_EXCEEDED") >= 6, ends


def test_tokenize_and_list_models(service: RunningService, default_model_engine: Engine) -> None:
    tokens = service.stub.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=30)
    assert default_model_engine.tokenizer is not None
    assert list(tokens.token_ids) == default_model_engine.tokenizer.encode("Hello world")
    (model,) = service.stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    assert model.id == default_model_engine.model_id
    assert model.vocab_size == default_model_engine.model_config.vocab_size
    assert model.max_model_len == default_model_engine.max_model_len


@contextmanager
def one_decode_worker_placeable(service: RunningService) -> Iterator[int]:
    """While it lasts, only the first decode (or colocated) worker takes new requests (the
    others look draining): requests started in it all run there. Yields its index."""
    members = service.service.pools["decode"].members()
    for member in members[1:]:
        member.load.draining = True
    try:
        yield 0
    finally:
        for member in members[1:]:
            member.load.draining = False


def late_stop_string(text: str) -> str:
    """A piece of `text` whose first occurrence starts past its first half."""
    for start in range(len(text) // 2, len(text) - 8):
        piece = text[start : start + 6]
        if piece.strip() and text.find(piece) == start:
            return piece
    raise AssertionError(f"no late stop string in {text!r}")


def test_a_decode_worker_killed_mid_stream_resumes_its_streams_unchanged(
    service: RunningService, default_model_engine: Engine
) -> None:
    """F4 (issue 22.1): every stream of a decode worker killed mid-stream resumes on another
    (colocated: the other worker; disaggregated: the pool's replacement, prefilled again on
    the prefill pool) by replay: the client sees the stream of the run without the fault,
    greedy with a stop string matched after the move, and seeded sampling."""
    story = "Tell me a long story."
    whole = default_model_engine.generate([story], greedy(max_tokens=40))[0]
    stop = late_stop_string(whole.text)
    greedy_params = greedy(max_tokens=40, stop=(stop,))
    seeded_params = SamplingParams(max_tokens=30, temperature=1.0, seed=11, ignore_eos=True)
    prompts = [story, "Once upon a time"]
    expected = [
        default_model_engine.generate([story], greedy_params)[0],
        default_model_engine.generate([prompts[1]], seeded_params)[0],
    ]
    assert 10 < len(expected[0].token_ids) < 40, "the stop string comes after the kill"
    samplings = [
        pb.SamplingParameters(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]),
        pb.SamplingParameters(max_tokens=30, temperature=1.0, seed=11, ignore_eos=True),
    ]
    servicer = service.service._servicer
    assert servicer is not None
    migrated = servicer.num_migrated
    with one_decode_worker_placeable(service) as busy:
        calls = [
            service.stub.Generate(pb.GenerateRequest(text=p, sampling=s), timeout=120)
            for p, s in zip(prompts, samplings, strict=True)
        ]
        seen = [[next(call) for _ in range(3)] for call in calls]  # both stream there
    victim = service.service.workers[busy]
    ray.kill(victim, no_restart=True)
    for call, responses, reference in zip(calls, seen, expected, strict=True):
        responses += list(call)
        assert [t for r in responses for t in r.token_ids] == reference.token_ids
        assert "".join(r.text for r in responses) == reference.text
        assert responses[-1].usage.completion_tokens == len(reference.token_ids)
        assert responses[-1].usage.prompt_tokens == reference.usage.prompt_tokens
    assert servicer.num_migrated >= migrated + 2  # both moved (one may have moved twice)
    wait_replaced(lambda: service.service.workers, busy, victim)
    responses = generate(service.stub, text="Hi", sampling=greedy_sampling(4))
    assert responses[-1].usage.completion_tokens == 4  # through new KV pairs if disaggregated


def test_past_max_migrations_a_lost_stream_ends_unavailable_fast(service: RunningService) -> None:
    """F1 with the cap: a stream that may not move (--max-migrations 0) ends with UNAVAILABLE
    naming the cap, within seconds of its worker's death; the pool is back to size."""
    from router.failover import FailoverConfig

    servicer = service.service._servicer
    assert servicer is not None
    normal = servicer.failover
    servicer.failover = FailoverConfig(max_migrations=0)
    try:
        call = service.stub.Generate(
            pb.GenerateRequest(text="Tell me a long story.", sampling=greedy_sampling(400)),
            timeout=120,
        )
        assert next(call).token_ids
        assert next(call).token_ids  # the second token: from the decode worker when disaggregated
        busy = next(i for i, s in enumerate(service.worker_stats()) if s.num_requests)
        victim = service.service.workers[busy]
        killed_at = time.monotonic()
        ray.kill(victim, no_restart=True)
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "--max-migrations (0)" in raised.value.details()
        assert time.monotonic() - killed_at < 10, "the stream must end fast, not hang"
    finally:
        servicer.failover = normal
    wait_replaced(lambda: service.service.workers, busy, victim)
    responses = generate(service.stub, text="Hi", sampling=greedy_sampling(4))
    assert responses[-1].usage.completion_tokens == 4  # through new KV pairs if disaggregated


DRAIN_MAX_TOKENS = 48  # every stream is still running when the drain starts
DRAIN_PROMPTS = ["Tell me a long story.", "Once upon a time", "The capital of France", "Hello"]
DRAIN_PARAMS = [
    greedy(max_tokens=DRAIN_MAX_TOKENS),
    SamplingParams(max_tokens=DRAIN_MAX_TOKENS, temperature=1.0, seed=11, ignore_eos=True),
    greedy(max_tokens=DRAIN_MAX_TOKENS),
    SamplingParams(max_tokens=DRAIN_MAX_TOKENS, temperature=0.8, top_p=0.9, seed=5,
                   ignore_eos=True),
]  # fmt: skip


@pytest.fixture(scope="module")
def drain_references(default_model_engine: Engine) -> list[Any]:
    """The single engine's outputs of the drain test's requests (once for both modes)."""
    return [
        default_model_engine.generate([prompt], params)[0]
        for prompt, params in zip(DRAIN_PROMPTS, DRAIN_PARAMS, strict=True)
    ]


@pytest.mark.parametrize("how", ["replay", "kv", "kv_failing", "kv_sender_stalls"])
def test_draining_a_decode_worker_moves_its_streams_unchanged(
    service: RunningService, drain_references: list[Any], how: str
) -> None:
    """F5 (issue 22.3): a decode worker drained out of its pool (Service.drain_worker, as the
    autoscaler shrinks it) has each running stream, greedy and seeded, moved to the other
    decode worker: outputs equal to the run without the drain, the worker gone empty while
    they still run (every stream moved), no KV leaked. replay: cut at a token boundary and
    recomputed there; kv (--drain-move-kv): its KV shipped over a decode->decode pair and
    continued there, nothing recomputed; kv_failing: two of those transfers aborted by the
    sender (the fault hook); kv_sender_stalls: two never offered, the draining worker then
    stopped with them pending (its pairs fail): either way those two recomputed by the
    receiving worker, the output still unchanged. Disaggregated: a second decode worker joins
    first; colocated: one joins after."""
    from dataclasses import replace

    max_tokens, prompts, expected = DRAIN_MAX_TOKENS, DRAIN_PROMPTS, drain_references
    samplings = [
        pb.SamplingParameters(max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
                              seed=s.seed or 0, ignore_eos=True)
        for s in DRAIN_PARAMS
    ]  # fmt: skip
    servicer = service.service._servicer
    assert servicer is not None
    pool = service.service.pools["decode"]
    size = len(pool.members())
    if size < 2:
        client, info = service.run(service.service.start_worker("decode"), timeout_s=300)
        pool.add(client, info.index_key)
    leaving = pool.members()[0]
    leaving_actor = service.service.workers[0]
    migrated, moves = servicer.num_migrated, dict(servicer.num_drain_moves)
    staying = service.service.workers[1:]

    def recomputed() -> tuple[int, int]:
        """The staying decode workers' prompts recomputed for want of KV, prompt tokens run."""
        stats = [ray.get(w.stats.remote(), timeout=30) for w in staying]
        return (sum(sum(s.kv.prompts_recomputed_by_reason.values()) for s in stats),
                sum(s.num_prompt_tokens_computed for s in stats))  # fmt: skip

    before = recomputed()
    normal = servicer.failover
    servicer.failover = replace(normal, move_kv_on_drain=how != "replay")
    if how == "kv_failing":
        ray.get(leaving_actor.inject_move_faults.remote(2), timeout=30)
    elif how == "kv_sender_stalls":
        ray.get(leaving_actor.inject_move_faults.remote(2, "hold"), timeout=30)
    try:
        with one_decode_worker_placeable(service):  # every stream starts on the leaving worker
            calls = [
                service.stub.Generate(pb.GenerateRequest(text=p, sampling=s), timeout=180)
                for p, s in zip(prompts, samplings, strict=True)
            ]
            seen = [[next(call) for _ in range(3)] for call in calls]
        drain = service.service.drain_worker("decode", leaving, timeout_s=120)
        assert service.run(drain, timeout_s=150).left_empty
    finally:
        servicer.failover = normal
    assert servicer.num_migrated == migrated + len(prompts)  # none had finished: all moved
    by_kv = 0 if how == "replay" else len(prompts)  # all running with their KV computed
    assert servicer.num_drain_moves["kv"] == moves["kv"] + by_kv
    assert servicer.num_drain_moves["replay"] == moves["replay"] + len(prompts) - by_kv
    assert leaving not in pool.members()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(leaving_actor.stats.remote(), timeout=30)
    for call, responses, reference in zip(calls, seen, expected, strict=True):
        responses += list(call)
        assert [t for r in responses for t in r.token_ids] == reference.token_ids
        assert "".join(r.text for r in responses) == reference.text
        assert responses[-1].usage.completion_tokens == max_tokens
        assert responses[-1].usage.prompt_tokens == reference.usage.prompt_tokens
    (failed, computed) = recomputed()
    assert failed - before[0] == (2 if how in ("kv_failing", "kv_sender_stalls") else 0)
    if how == "kv":  # nothing recomputed where they went: decoded from the moved KV only
        assert computed == before[1]
    service.assert_workers_idle_and_intact()
    if len(pool.members()) < size:  # the pool back to its size for the tests after this one
        client, info = service.run(service.service.start_worker("decode"), timeout_s=300)
        pool.add(client, info.index_key)
    assert generate(service.stub, text="Hi", sampling=greedy_sampling(4))[-1].usage


def test_a_node_drain_of_an_unknown_node_or_the_routers_own_is_refused_and_changes_nothing(
    service: RunningService,
) -> None:
    """Issue 22.3 (operator drain), through the Admin gRPC service with the admin key: an
    address no live Ray node has is NOT_FOUND naming the live ones; the router's own node (the
    only one of this local cluster) is FAILED_PRECONDITION, refused before Ray is asked to
    drain it; a malformed address INVALID_ARGUMENT; a missing key UNAUTHENTICATED (counted in
    tandem_admin_refusals).
    The pools keep their workers and no drain is remembered (a later drain of the node runs
    afresh)."""
    from proto.tandem.v1 import admin_pb2, admin_pb2_grpc

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    own_ip = node["NodeManagerAddress"]
    before = {name: list(pool.members()) for name, pool in service.service.pools.items()}
    stub = admin_pb2_grpc.AdminStub(service.channel)
    metadata = (("authorization", f"Bearer {ADMIN_KEY}"),)
    cases = [
        ("192.0.2.7", metadata, grpc.StatusCode.NOT_FOUND, f"(live nodes: {own_ip})"),
        (own_ip, metadata, grpc.StatusCode.FAILED_PRECONDITION, "runs this router"),
        ("node-b", metadata, grpc.StatusCode.INVALID_ARGUMENT, "is not an IP address"),
        (own_ip, (), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
    ]
    registry = service.service.metrics.registry
    labels = {"reason": "missing"}
    refusals_before = registry.get_sample_value("tandem_admin_refusals_total", labels) or 0.0
    for node_ip, call_metadata, code, says in cases:
        request = admin_pb2.DrainNodeRequest(node_ip=node_ip, timeout_s=30)
        with pytest.raises(grpc.RpcError) as raised:
            stub.DrainNode(request, timeout=60, metadata=call_metadata)
        assert raised.value.code() == code, (node_ip, raised.value.details())
        assert says in (raised.value.details() or ""), raised.value.details()
    refusals = registry.get_sample_value("tandem_admin_refusals_total", labels)
    assert refusals == refusals_before + 1  # the call without a key, counted by its reason
    with pytest.raises(InvalidRequest, match=r"timeout_s: 0 must be in"):
        service.run(service.service.drain_node(own_ip, 0))
    assert {name: list(pool.members()) for name, pool in service.service.pools.items()} == before
    assert not any(m.load.draining for pool in before.values() for m in pool)
    assert len(service.service.node_drains) == 0


def test_a_failed_kv_transfer_is_recomputed_on_the_decode_worker(
    service: RunningService, default_model_engine: Engine
) -> None:
    """T1 (issue 22.2): a KV transfer that fails (aborted by its sender, through the fault
    hook) no longer fails its request: the decode worker prefills it again, and the client
    gets the single engine's output, greedy and seeded."""
    if not service.disaggregated:
        pytest.skip("colocated workers ship no KV")
    prefills = service.service.prefill_workers
    recomputed = service.worker_stats()[0].kv.prompts_recomputed_by_reason.get("aborted", 0)
    cases = [
        ("The capital of France is", greedy(max_tokens=8), greedy_sampling(8)),
        (
            "Once upon a time",
            SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True),
            pb.SamplingParameters(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True),
        ),
    ]
    ray.get([w.inject_kv_faults.remote(1000) for w in prefills], timeout=30)
    try:
        for prompt, params, sampling in cases:
            responses = generate(service.stub, text=prompt, sampling=sampling)
            expected = default_model_engine.generate([prompt], params)[0]
            assert [t for r in responses for t in r.token_ids] == expected.token_ids
            assert "".join(r.text for r in responses) == expected.text
    finally:
        ray.get([w.inject_kv_faults.remote(0) for w in prefills], timeout=30)
    decode = service.worker_stats()[0]
    assert decode.kv.prompts_recomputed_by_reason.get("aborted", 0) == recomputed + len(cases)


def test_a_prefill_worker_lost_before_shipping_its_kv_is_recomputed_on_the_decode_worker(
    service: RunningService, default_model_engine: Engine
) -> None:
    """Issue 22.2: the prefill worker returned the first token, then died before its KV was
    offered (held by the fault hook, then killed): the decode worker sees the pair fail and
    prefills the request itself; the client gets the single engine's output."""
    if not service.disaggregated:
        pytest.skip("colocated workers ship no KV")
    prefills = service.service.prefill_workers
    recomputed = service.worker_stats()[0].kv.prompts_recomputed_by_reason.get("pair_failed", 0)
    ray.get([w.inject_kv_faults.remote(1, "hold") for w in prefills], timeout=30)
    prompt = "(held) The capital of France is"
    call = service.stub.Generate(
        pb.GenerateRequest(text=prompt, sampling=greedy_sampling(8)), timeout=120
    )
    responses = [next(call)]  # the first token: the prefill is done, its KV held there
    stats = ray.get([w.stats.remote() for w in prefills], timeout=30)
    held = [i for i, s in enumerate(stats) if s.num_free_blocks < s.num_blocks]
    assert len(held) == 1, held
    victim = prefills[held[0]]
    ray.kill(victim, no_restart=True)
    responses += list(call)
    expected = default_model_engine.generate([prompt], greedy(max_tokens=8))[0]
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert "".join(r.text for r in responses) == expected.text
    ray.get([w.inject_kv_faults.remote(0) for w in prefills if w is not victim], timeout=30)
    wait_replaced(service.prefilling_workers, held[0], victim)
    decode_stats = ray.get(service.service.workers[0].stats.remote(), timeout=30)
    assert decode_stats.kv.prompts_recomputed_by_reason.get("pair_failed", 0) == recomputed + 1


def test_a_worker_killed_mid_prefill_moves_its_request_to_another(
    service: RunningService, default_model_engine: Engine
) -> None:
    prompt = "(killed) " + MID_PREFILL_PROMPT  # unique from its start: no cached prefix
    call = service.stub.Generate(
        pb.GenerateRequest(text=prompt, sampling=greedy_sampling(6)), timeout=120
    )
    busy = service.wait_for_a_prefill()
    workers = service.prefilling_workers()
    victim = workers[busy]
    retried = service.service._servicer.num_retried  # type: ignore[union-attr]
    ray.kill(victim, no_restart=True)
    responses = list(call)  # nothing had streamed: the client never sees the loss
    expected = default_model_engine.generate([prompt], greedy(max_tokens=6))[0]
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert service.service._servicer.num_retried == retried + 1  # type: ignore[union-attr]
    wait_replaced(service.prefilling_workers, busy, victim)
    assert len(service.prefilling_workers()) == 2  # the pool is back to size
    assert generate(service.stub, text="Hi", sampling=greedy_sampling(3))[-1].usage


def wait_replaced(
    workers: Callable[[], list[Any]], index: int, dead: Any, timeout_s: float = 120
) -> None:
    """Until the pool position `index` holds a replacement of the `dead` actor."""
    deadline = time.monotonic() + timeout_s
    while workers()[index] is dead:
        assert time.monotonic() < deadline, "the dead worker was not replaced"
        time.sleep(0.2)


def test_overload_is_refused_early_with_resource_exhausted(service: RunningService) -> None:
    from router.admission import Admission, AdmissionLimits

    servicer = service.service._servicer
    assert servicer is not None
    normal = servicer.admission
    servicer.admission = Admission(AdmissionLimits(max_requests=1))
    try:
        long_call = service.stub.Generate(
            pb.GenerateRequest(text="Tell me a long story.", sampling=greedy_sampling(400)),
            timeout=120,
        )
        assert next(long_call).token_ids  # admitted and running
        with pytest.raises(grpc.RpcError) as raised:
            generate(service.stub, text="Hi", sampling=greedy_sampling(4))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 requests in flight (limit 1)" in raised.value.details()
        long_call.cancel()
    finally:
        servicer.admission = normal
    assert generate(service.stub, text="Hi", sampling=greedy_sampling(4))[-1].usage


class _RssPeak:
    """The peak growth of this process's resident memory over a `with` block (sampled every
    10 ms from /proc/self/status)."""

    def __init__(self) -> None:
        self.growth_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss_bytes() -> int:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def _sample(self, base: int) -> None:
        while not self._stop.wait(0.01):
            self.growth_bytes = max(self.growth_bytes, self._rss_bytes() - base)

    def __enter__(self) -> _RssPeak:
        self._thread = threading.Thread(target=self._sample, args=(self._rss_bytes(),))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_thousand_concurrent_clients_the_excess_is_refused_the_rest_served(
    service: RunningService, default_model_engine: Engine
) -> None:
    """O1 (issue 22.4): 1,000 clients at once against a service admitting 16 requests: every
    call ends OK (the single engine's tokens) or RESOURCE_EXHAUSTED, none with anything else
    or past its deadline; the process's memory (router and clients) grows by less than 128
    MiB meanwhile; the router holds nothing of them afterwards."""
    if service.disaggregated:
        pytest.skip("admission is the same in both modes: checked once, colocated")
    from router.admission import Admission, AdmissionLimits

    servicer = service.service._servicer
    assert servicer is not None
    normal = servicer.admission
    servicer.admission = Admission(AdmissionLimits(max_requests=16))
    prompt = "Count to three:"
    expected = default_model_engine.generate([prompt], greedy(max_tokens=2))[0].token_ids
    request = pb.GenerateRequest(text=prompt, sampling=greedy_sampling(2))

    async def one(stub: Any) -> tuple[grpc.StatusCode, list[int]]:
        tokens: list[int] = []
        try:
            async for response in stub.Generate(request, timeout=300):
                tokens += response.token_ids
        except grpc.aio.AioRpcError as e:
            return e.code(), tokens
        return grpc.StatusCode.OK, tokens

    async def clients() -> list[tuple[grpc.StatusCode, list[int]]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.service.port}") as channel:
            stub = tandem_pb2_grpc.TandemStub(channel)
            return await asyncio.gather(*(one(stub) for _ in range(1000)))

    rss = _RssPeak()  # the router runs in this process (with the 1,000 clients)
    try:
        with rss:
            results = asyncio.run(clients())
    finally:
        servicer.admission = normal
    # bounded: 1,000 calls' worth of client and router state, not an unbounded queue of them
    assert rss.growth_bytes < 128 << 20, f"RSS grew {rss.growth_bytes >> 20} MiB"
    codes = [code for code, _ in results]
    served = [tokens for code, tokens in results if code is grpc.StatusCode.OK]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    assert served and len(served) < 1000, "some served, the excess refused"
    assert all(tokens == expected for tokens in served)
    assert all(not tokens for code, tokens in results if code is not grpc.StatusCode.OK)
    assert servicer.outputs.num_open == 0 and not servicer._live_ids


def test_health_reports_each_pool_and_reflection_lists_the_api(service: RunningService) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    health = health_pb2_grpc.HealthStub(service.channel)
    pools = ["decode"] + (["prefill"] if service.service.config.mode == "disaggregated" else [])
    for name in ["", "tandem.v1.Tandem"] + [f"tandem.pool.{pool}" for pool in pools]:
        response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name
    services = ProtoReflectionDescriptorDatabase(service.channel).get_services()
    assert "tandem.v1.Tandem" in services and "grpc.health.v1.Health" in services


# The first token through the service, streamed as the single engine streams it. In the
# disaggregated mode the prefill worker samples it and the decode worker turns it into text,
# so these cases catch a handoff that ends the text early or decides the finish twice.
BYTE_C3 = 142  # the default model's byte-fallback token for 0xC3: half of a 2-byte character
EOS = 2  # the default model's end-of-sequence token
FIRST_TOKEN_CASES = {
    "partial-utf8": ("The capital of France is", {"max_tokens": 4, "logit_bias": {BYTE_C3: 15.0}}),
    "partial-utf8-only-token": (
        "The capital of France is", {"max_tokens": 1, "logit_bias": {BYTE_C3: 15.0}}
    ),
    "stop-string-over-tokens-1-2": ("The capital of France is", {"max_tokens": 8, "stop": ["s."]}),
    "eos-first": ("The capital of France is", {"max_tokens": 8, "logit_bias": {EOS: 100.0}}),
}  # fmt: skip
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@pytest.mark.parametrize("case", list(FIRST_TOKEN_CASES))
def test_first_token_edge_cases_stream_as_on_the_single_engine(
    service: RunningService, default_model_engine: Engine, case: str
) -> None:
    prompt, fields = FIRST_TOKEN_CASES[case]
    bias = fields.get("logit_bias", {})
    sampling = pb.SamplingParameters(
        temperature=0.0, max_tokens=fields["max_tokens"], stop=fields.get("stop", []),
        logit_bias=bias,
    )  # fmt: skip
    params = SamplingParams(
        temperature=0.0, max_tokens=fields["max_tokens"], stop=tuple(fields.get("stop", ())),
        logit_bias=tuple(bias.items()),
    )  # fmt: skip
    responses = generate(service.stub, text=prompt, sampling=sampling)
    expected = list(default_model_engine.stream(f"first-{case}", prompt, params))
    got = [(list(r.token_ids), r.text) for r in responses]
    assert got == [(list(o.new_token_ids), o.text_delta) for o in expected]
    last, reference = responses[-1], expected[-1]
    assert reference.finish_reason is not None
    assert last.finish_reason == FINISH[reference.finish_reason.value]
    usage = (last.usage.prompt_tokens, last.usage.cached_tokens, last.usage.completion_tokens)
    assert usage == (reference.usage.prompt_tokens, 0, reference.usage.completion_tokens)
    assert reference.usage.cached_tokens == 0  # a prompt shorter than one block
    # clean_workers then checks that no KV block is left on either side


@contextmanager
def placing(service: RunningService, **policy: Any) -> Iterator[None]:
    """The running service's router places prefills by `DisaggPolicy(**policy)` meanwhile."""
    from router.disagg import DisaggPolicy

    servicer = service.service._servicer
    assert servicer is not None
    normal = servicer.disagg
    servicer.disagg = DisaggPolicy(**policy)
    try:
        yield
    finally:
        servicer.disagg = normal


def placed(service: RunningService, path: str, reason: str) -> float:
    """tandem_prefill_placement_total{path, reason} as the router's /metrics has it now."""
    value = service.service.metrics.registry.get_sample_value(
        "tandem_prefill_placement_total", {"path": path, "reason": reason}
    )
    return value or 0.0


def kv_transfers(service: RunningService) -> list[int]:
    return [s.kv.transfers_completed for s in service.worker_stats()]


def assert_greedy_as_the_engine(
    service: RunningService, engine: Engine, prompt: str, max_tokens: int
) -> None:
    responses = generate(service.stub, text=prompt, sampling=greedy_sampling(max_tokens))
    expected = engine.generate([prompt], greedy(max_tokens=max_tokens))[0]
    assert [t for r in responses for t in r.token_ids] == expected.token_ids, prompt
    assert "".join(r.text for r in responses) == expected.text
    assert responses[-1].usage.completion_tokens == max_tokens


def test_disagg_never_prefills_every_request_on_its_decode_worker(
    service: RunningService, default_model_engine: Engine
) -> None:
    if not service.disaggregated:
        pytest.skip("prefill placement is disaggregated mode's")
    cases = [("Hi", 6), ("The capital of France is", 6), ("List three colors:", 1)]
    before, transfers = placed(service, "local", "forced_local"), kv_transfers(service)
    with placing(service, mode="never"):
        for prompt, max_tokens in cases:
            assert_greedy_as_the_engine(service, default_model_engine, prompt, max_tokens)
    assert placed(service, "local", "forced_local") == before + len(cases)
    assert kv_transfers(service) == transfers  # no KV moved: the decode worker prefilled


def test_disagg_auto_places_each_request_by_its_inputs(
    service: RunningService, default_model_engine: Engine
) -> None:
    if not service.disaggregated:
        pytest.skip("prefill placement is disaggregated mode's")
    short = "Hi there"  # a few tokens
    long = "(auto) " + " ".join(f"item {n}," for n in range(20))  # ~60 tokens
    reasons = [("local", "short_prompt"), ("remote", "long_prompt"), ("local", "prefill_queue")]
    before = [placed(service, *reason) for reason in reasons]
    decode_transfers = kv_transfers(service)[0]
    with placing(service, mode="auto", local_max_tokens=16):
        assert_greedy_as_the_engine(service, default_model_engine, short, 5)
        assert_greedy_as_the_engine(service, default_model_engine, long, 5)
    # every prefill worker's queue "long": a long prompt too prefills locally (another one:
    # the decode worker holds most of `long` now, which would make it short)
    long_again = "(auto, queue) " + " ".join(f"item {n}," for n in range(20))
    with placing(service, mode="auto", local_max_tokens=16, prefill_queue_tokens=0):
        assert_greedy_as_the_engine(service, default_model_engine, long_again, 5)
    after = [placed(service, *reason) for reason in reasons]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert kv_transfers(service)[0] == decode_transfers + 1  # the remote one's KV only


def test_with_no_prefill_worker_placeable_the_decode_worker_prefills_even_when_forced_remote(
    service: RunningService, default_model_engine: Engine
) -> None:
    """Promise 2 (found by bench.chaos): while the whole prefill pool is down (every worker
    dead, its replacements still loading; here: marked draining), a new request or a stream
    resuming after its decode worker died is prefilled on its decode worker, even under
    --disagg always, instead of ending UNAVAILABLE."""
    if not service.disaggregated:
        pytest.skip("prefill placement is disaggregated mode's")
    before = placed(service, "local", "no_prefill_worker")
    members = service.service.pools["prefill"].members()
    for member in members:
        member.load.draining = True
    try:
        with placing(service, mode="always"):
            assert_greedy_as_the_engine(service, default_model_engine, "(no prefill) Hi", 5)
    finally:
        for member in members:
            member.load.draining = False
    assert placed(service, "local", "no_prefill_worker") == before + 1


def test_the_last_prefill_worker_lost_mid_prefill_moves_the_request_to_its_decode_worker(
    service: RunningService, default_model_engine: Engine
) -> None:
    """F2 with no other prefill worker (found by bench.chaos): the only placeable prefill
    worker dies mid-prefill; the request is prefilled on its decode worker instead of ending
    UNAVAILABLE, with the single engine's output."""
    if not service.disaggregated:
        pytest.skip("prefill placement is disaggregated mode's")
    members = service.service.pools["prefill"].members()
    for member in members[1:]:
        member.load.draining = True
    prompt = "(last prefill) " + MID_PREFILL_PROMPT
    try:
        with placing(service, mode="always"):
            call = service.stub.Generate(
                pb.GenerateRequest(text=prompt, sampling=greedy_sampling(4)), timeout=120
            )
            busy = service.wait_for_a_prefill()
            assert busy == 0
            victim = service.prefilling_workers()[0]
            ray.kill(victim, no_restart=True)
            responses = list(call)
    finally:
        for member in members[1:]:
            member.load.draining = False
    expected = default_model_engine.generate([prompt], greedy(max_tokens=4))[0]
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    wait_replaced(service.prefilling_workers, 0, victim)
