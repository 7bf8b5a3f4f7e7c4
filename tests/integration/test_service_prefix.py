"""Cache-aware placement through the whole service, with the prefix index in a real
redis-server: two prefill workers and one decode worker (real Ray, gRPC, gloo transfers, the
default model). Requests sharing a prefix go to the worker holding it unless its queue outweighs
the hit; Redis stopped, slow or flushed costs cache hits, never a request; salted tenants never
share hits. The decode worker publishes its cache too: a conversation's second turn ships only
the part of its prompt that the decode worker lacks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from engine.engine import Engine
from proto.tandem.v1 import tandem_pb2 as pb
from tests.conftest import greedy
from tests.integration.test_service import (
    LONG_PROMPT,
    RunningService,
    greedy_sampling,
    local_service,
)
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")

# Two "system prompts" of ~20 blocks each, and questions after them.
SYSTEM = {
    group: f"You are assistant {group}. "
    + " ".join(f"Rule {n}: answer {group}." for n in range(40))
    for group in ("A", "B")
}


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(redis: RedisServer) -> Iterator[RunningService]:
    from cluster.service import ServiceConfig
    from engine.config import EngineConfig
    from prefix_cache.index import IndexConfig

    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=1024, block_size=16),
        mode="disaggregated",
        num_prefill_workers=2,
        num_decode_workers=1,
        port=0,
        # A roomy budget: this 2-core machine runs three model workers beside Redis.
        index=IndexConfig(redis_url=redis.url, lookup_budget_ms=200, retry_interval_s=0.2, ttl_s=5),
    )
    with local_service(config) as running:
        yield running


@pytest.fixture(autouse=True)
def clean_workers(service: RunningService) -> Iterator[None]:
    yield
    service.assert_workers_idle_and_intact()


def ask(service: RunningService, text: str, salt: str = "", max_tokens: int = 2) -> Any:
    """The final response (its usage) of one greedy request."""
    request = pb.GenerateRequest(text=text, sampling=greedy_sampling(max_tokens), cache_salt=salt)
    return list(service.stub.Generate(request, timeout=120))[-1]


def index_metrics(service: RunningService) -> Any:
    assert service.service.prefix_index is not None
    return service.service.prefix_index.metrics


def eventually(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def prefix_tokens(service: RunningService, text: str) -> int:
    """How many of a prompt's tokens a worker holding its whole prefix reports cached."""
    tokens = service.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30).token_ids
    return len(tokens) // 16 * 16


def seed_groups(service: RunningService) -> None:
    """Prefill each group's system prompt once, concurrently: one group per worker."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda g: ask(service, SYSTEM[g] + " Hello?"), ["A", "B"]))
    # Give the workers' publishers a moment to write (every 50 ms).
    time.sleep(0.5)


def test_requests_sharing_a_prefix_go_to_the_worker_holding_it(service: RunningService) -> None:
    seed_groups(service)
    prefill_a = prefix_tokens(service, SYSTEM["A"]) - 16  # the blocks before the question
    for n in range(3):
        for group in ("A", "B"):
            usage = ask(service, f"{SYSTEM[group]} Question {n}?").usage
            # Load alone would send every one of these to worker 0 (both idle: a tie), so one
            # of the two groups would miss every time.
            assert usage.cached_tokens >= prefill_a, (group, n, usage)
    assert index_metrics(service).hit_rate > 0


def test_a_holder_whose_queue_outweighs_the_hit_is_passed_over(service: RunningService) -> None:
    seed_groups(service)
    holder = max(range(2), key=index_counts(service, SYSTEM["A"]).__getitem__)
    # A long prompt that starts with A's prefix goes to A's holder: ~3,000 tokens to compute.
    busy_call = service.stub.Generate(
        pb.GenerateRequest(
            text=SYSTEM["A"] + " (busy) " + LONG_PROMPT, sampling=greedy_sampling(1)
        ),
        timeout=120,
    )
    assert service.wait_for_a_prefill() == holder
    # Its queue now outweighs what A's prefix saves: the next A request goes to the other.
    assert ask(service, SYSTEM["A"] + " Which way now?").usage.cached_tokens == 0
    list(busy_call)
    assert ask(service, SYSTEM["A"] + " And now?").usage.cached_tokens > 0


def test_redis_down_slow_or_flushed_costs_hits_never_requests(
    service: RunningService, redis: RedisServer, default_model_engine: Engine
) -> None:
    seed_groups(service)
    prompts = [f"{SYSTEM['A']} Fault question {n}?" for n in range(3)]
    expected = default_model_engine.generate(prompts, greedy(max_tokens=2))
    metrics = index_metrics(service)

    def all_correct() -> None:
        for prompt, reference in zip(prompts, expected, strict=True):
            responses = list(
                service.stub.Generate(
                    pb.GenerateRequest(text=prompt, sampling=greedy_sampling(2)), timeout=120
                )
            )
            assert [t for r in responses for t in r.token_ids] == reference.token_ids

    degraded = metrics.num_degraded
    redis.stop()
    all_correct()  # placed by load alone: every answer still right
    assert metrics.num_degraded > degraded
    assert index_counts(service, SYSTEM["A"]) is None
    redis.start()  # same port, empty: the publishers resync, the router reconnects
    eventually(lambda: max(index_counts(service, SYSTEM["A"]) or [0]) > 0)

    degraded = metrics.num_degraded
    with ThreadPoolExecutor(1) as pool:
        sleeping = pool.submit(redis.client().execute_command, "DEBUG", "SLEEP", "2")
        time.sleep(0.2)  # the server is now stuck for ~2 s
        started = time.monotonic()
        slow_placed = ask(service, prompts[0])
        waited = time.monotonic() - started
        sleeping.result()
    assert metrics.num_degraded > degraded
    # Placement gave up after its budget (0.2 s): the request did not wait out the 2 s sleep.
    assert waited < 1.5, waited
    assert slow_placed.usage.completion_tokens == 2

    redis.client().flushall()
    all_correct()
    eventually(lambda: max(index_counts(service, SYSTEM["A"]) or [0]) > 0)


def test_salted_tenants_never_share_hits(service: RunningService) -> None:
    prompt = SYSTEM["B"] + " Tenant question?"
    assert ask(service, prompt, salt="tenant-1").usage.cached_tokens == 0
    eventually(lambda: max(index_counts(service, prompt, salt="tenant-1") or [0]) > 0)
    assert ask(service, prompt, salt="tenant-1").usage.cached_tokens > 0
    assert index_counts(service, prompt, salt="tenant-2") == [0, 0]
    assert ask(service, prompt, salt="tenant-2").usage.cached_tokens == 0


def index_counts(service: RunningService, text: str, salt: str | None = None) -> list[int] | None:
    """What placement would learn from the index: prompt tokens each prefill worker holds."""
    servicer = service.service._servicer
    assert servicer is not None
    ids = service.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30).token_ids
    request = SimpleNamespace(prompt_token_ids=list(ids), cache_salt=salt)
    cached = service.run(servicer._cached_tokens(request))
    if cached is None:
        return None
    return [cached.get(member, 0) for member in servicer._prefilling.members()]


def test_a_second_turn_ships_only_what_the_decode_worker_lacks(
    service: RunningService, default_model_engine: Engine
) -> None:
    """The decode worker's blocks reach Redis (two_turns waits for the router to read them
    there); turn 2 goes to the prefill worker holding turn 1's prompt, which computes the rest
    and ships only the suffix after the decode worker's cached blocks."""
    from tests.integration.test_service_disagg import BLOCK, delta, two_turns

    opening = "(redis) You are a careful travel agent. Suggest one city to visit in spring, "
    opening += "then give one reason to go there and one thing to avoid."
    turn1, turn2, reusable, before, after = two_turns(service, default_model_engine, opening)
    suffix, num_blocks = len(turn2) - reusable, -(-len(turn2) // BLOCK) - reusable // BLOCK
    decode, *prefills = [delta(a, b) for a, b in zip(after, before, strict=True)]
    assert reusable >= 2 * BLOCK
    assert decode == {"computed": 0, "tokens_received": suffix, "blocks_received": num_blocks,
                      "tokens_reused": reusable}  # fmt: skip
    computed = len(turn2) - len(turn1) // BLOCK * BLOCK  # turn 1's prompt is cached there
    sent = {"computed": computed, "tokens_sent": suffix, "blocks_sent": num_blocks}
    assert sorted(prefills, key=len) == [{"computed": 0}, sent]
