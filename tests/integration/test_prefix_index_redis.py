"""The prefix index against a real redis-server (docs/reliability.md, R1-R3, S3, S4): publish,
evict and look up with exact counts; a restarted worker's old entries never trusted; TTL expiry; two
routers sharing the index; Redis killed and restarted, answering slowly, flushed, or asking for
a password: lookups give up within their budget and count it, publishing never raises into the
worker, and both sides recover on their own. Salted tenants never hit each other's entries."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from contracts.block_hash import prompt_block_hashes
from contracts.workers import WorkerKey
from prefix_cache.index import IndexConfig, PrefixIndex, blocks_key
from prefix_cache.publisher import CacheEventLog, IndexPublisher
from tests.conftest import prompt_ids
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

MODEL = "dummy:tiny"
BS = 4
A = WorkerKey("prefill-0", "epoch1")
B = WorkerKey("prefill-1", "epoch1")
# Generous on a slow 2-core machine; the budget tests use a tight one.
ROOMY_BUDGET_MS = 500.0


def config(server: RedisServer, **kwargs: object) -> IndexConfig:
    defaults: dict[str, object] = {
        "redis_url": server.url,
        "lookup_budget_ms": ROOMY_BUDGET_MS,
        "retry_interval_s": 0.05,
        "flush_interval_s": 0.02,
    }
    return IndexConfig(**(defaults | kwargs))  # type: ignore[arg-type]


def chain(seed: int, num_blocks: int, salt: str | None = None) -> list[bytes]:
    return prompt_block_hashes(prompt_ids(seed, num_blocks * BS), BS, MODEL, salt)


def publisher_for(
    worker: WorkerKey, cfg: IndexConfig, cached: Sequence[bytes] = ()
) -> tuple[CacheEventLog, IndexPublisher]:
    log = CacheEventLog(worker)
    log.on_cache_event(list(cached), [])
    return log, IndexPublisher(log, cfg)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll `check` (plain or async) until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, f"condition not met within {timeout_s} s"
        await asyncio.sleep(0.02)


def answers(
    index: PrefixIndex, hashes: Sequence[bytes], workers: Sequence[WorkerKey], want: list[int]
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await index.lookup(hashes, workers) == want

    return check


def test_publish_evict_and_lookup_exact_counts(redis_server: RedisServer) -> None:
    cfg = config(redis_server)
    prompt = chain(1, 6)
    log_a, pub_a = publisher_for(A, cfg, prompt[:5])
    log_b, pub_b = publisher_for(B, cfg, prompt[:2] + prompt[3:])

    async def scenario() -> None:
        index = PrefixIndex(cfg)
        pub_a.step()
        pub_b.step()
        assert await index.lookup(prompt, [A, B]) == [5, 2]
        assert await index.lookup(prompt, [B]) == [2]
        log_a.on_cache_event([], [prompt[2]])  # evicted on A
        log_b.on_cache_event([prompt[2]], [])  # committed on B
        pub_a.step()
        pub_b.step()
        assert await index.lookup(prompt, [A, B]) == [2, 6]
        assert await index.lookup(chain(2, 3), [A, B]) == [0, 0]
        assert await index.lookup([], [A, B]) == [0, 0]
        assert await index.lookup(prompt, []) == []
        metrics = index.metrics
        assert (metrics.num_lookups, metrics.num_degraded) == (6, 0)
        assert (metrics.num_blocks_queried, metrics.num_blocks_found) == (6 + 6 + 6 + 3, 5 + 2 + 6)
        await index.close()

    asyncio.run(scenario())
    pub_a.stop()
    with redis_server.client() as client:
        assert client.exists(blocks_key(cfg.namespace, A)) == 0  # a clean stop removes them
        assert client.scard(blocks_key(cfg.namespace, B)) == 6
    pub_b.stop(remove_entries=False)


def test_a_restarted_worker_invalidates_its_old_entries(redis_server: RedisServer) -> None:
    cfg = config(redis_server)
    prompt = chain(3, 4)
    _, old = publisher_for(A, cfg, prompt)
    old.step()
    old.stop(remove_entries=False)  # died without cleaning up
    restarted = WorkerKey(A.worker_id, "epoch2")
    _, new = publisher_for(restarted, cfg, prompt[:1])
    new.step()

    async def scenario() -> None:
        index = PrefixIndex(cfg)
        assert await index.lookup(prompt, [restarted]) == [1]
        await index.close()

    asyncio.run(scenario())
    with redis_server.client() as client:
        assert client.exists(blocks_key(cfg.namespace, A)) == 0  # old set deleted, not left to TTL
    new.stop()


def test_entries_live_while_refreshed_and_expire_after_the_ttl(redis_server: RedisServer) -> None:
    cfg = config(redis_server, ttl_s=0.6)
    prompt = chain(4, 3)
    _, publisher = publisher_for(A, cfg, prompt)
    publisher.start()

    async def scenario() -> None:
        index = PrefixIndex(cfg)
        await eventually(answers(index, prompt, [A], [3]))
        await asyncio.sleep(1.5)  # well past the TTL: the heartbeat kept them
        assert await index.lookup(prompt, [A]) == [3]
        publisher.stop(remove_entries=False)  # a worker that dies stops refreshing
        await eventually(answers(index, prompt, [A], [0]), timeout_s=3.0)
        await index.close()

    asyncio.run(scenario())


def test_two_routers_share_the_index(redis_server: RedisServer) -> None:
    cfg = config(redis_server)
    prompt = chain(5, 4)
    log, publisher = publisher_for(A, cfg, prompt[:3])
    publisher.step()

    async def scenario() -> None:
        first, second = PrefixIndex(cfg), PrefixIndex(cfg)
        assert await first.lookup(prompt, [A]) == await second.lookup(prompt, [A]) == [3]
        log.on_cache_event([prompt[3]], [])
        publisher.step()
        assert await first.lookup(prompt, [A]) == await second.lookup(prompt, [A]) == [4]
        await first.close()
        await second.close()

    asyncio.run(scenario())
    publisher.stop()


def test_salted_tenants_never_hit_each_other(redis_server: RedisServer) -> None:
    cfg = config(redis_server)
    tokens = prompt_ids(6, 5 * BS)
    tenant_a = prompt_block_hashes(tokens, BS, MODEL, "tenant-a")
    tenant_b = prompt_block_hashes(tokens, BS, MODEL, "tenant-b")
    unsalted = prompt_block_hashes(tokens, BS, MODEL, None)
    _, publisher = publisher_for(A, cfg, tenant_a)
    publisher.step()

    async def scenario() -> None:
        index = PrefixIndex(cfg)
        assert await index.lookup(tenant_a, [A]) == [5]
        assert await index.lookup(tenant_b, [A]) == [0]
        assert await index.lookup(unsalted, [A]) == [0]
        await index.close()

    asyncio.run(scenario())
    publisher.stop()


def test_redis_killed_and_back_degrades_then_recovers(redis_server: RedisServer) -> None:
    cfg = config(redis_server, lookup_budget_ms=100.0, retry_interval_s=0.1)
    prompt = chain(7, 4)
    log, publisher = publisher_for(A, cfg, prompt[:2])
    publisher.start()

    async def scenario() -> None:
        index = PrefixIndex(cfg)
        await eventually(answers(index, prompt, [A], [2]))
        redis_server.stop()
        for _ in range(5):
            started = time.monotonic()
            assert await index.lookup(prompt, [A]) is None
            assert time.monotonic() - started < 1.0
        assert index.metrics.num_degraded == 5
        started = time.monotonic()
        for i in range(1000):  # the engine's hook never waits on Redis
            log.on_cache_event([bytes([i % 256, i // 256]) * 8], [])
            log.on_cache_event([], [bytes([i % 256, i // 256]) * 8])
        log.on_cache_event(prompt[2:], [])  # changed while Redis was away
        assert time.monotonic() - started < 1.0
        await eventually(lambda: publisher.metrics.num_errors > 0)
        redis_server.start()  # same port, empty: the publisher must resync
        await eventually(answers(index, prompt, [A], [4]))
        assert publisher.metrics.num_resyncs >= 2
        await index.close()

    asyncio.run(scenario())
    publisher.stop()


def test_a_slow_redis_costs_at_most_the_budget(redis_server: RedisServer) -> None:
    cfg = config(redis_server, lookup_budget_ms=50.0, retry_interval_s=0.05)
    prompt = chain(8, 3)
    _, publisher = publisher_for(A, cfg, prompt)
    publisher.step()
    sleeper = threading.Thread(
        target=lambda: redis_server.client().execute_command("DEBUG", "SLEEP", "1.5")
    )

    async def scenario() -> None:
        index = PrefixIndex(cfg)
        assert await index.lookup(prompt, [A]) == [3]
        sleeper.start()
        await asyncio.sleep(0.1)  # let DEBUG SLEEP reach the server first
        started = time.monotonic()
        assert await index.lookup(prompt, [A]) is None
        elapsed = time.monotonic() - started
        assert elapsed < 0.5, f"a lookup took {elapsed:.3f} s against a 50 ms budget"
        assert index.metrics.num_degraded == 1
        sleeper.join()
        # The abandoned reply must not answer a later lookup: fresh connection, right answer.
        await eventually(answers(index, prompt, [A], [3]))
        assert await index.lookup(prompt[:1], [A]) == [1]
        await index.close()

    asyncio.run(scenario())
    publisher.stop()


def test_flushall_costs_misses_until_the_resync(redis_server: RedisServer) -> None:
    cfg = config(redis_server, ttl_s=0.6)
    prompt = chain(9, 4)
    _, publisher = publisher_for(A, cfg, prompt)
    publisher.start()

    async def scenario() -> None:
        index = PrefixIndex(cfg)
        await eventually(answers(index, prompt, [A], [4]))
        with redis_server.client() as client:
            client.flushall()
        assert await index.lookup(prompt, [A]) in ([0], [4])  # a miss, never an error
        await eventually(answers(index, prompt, [A], [4]))  # the heartbeat found it and resynced
        assert publisher.metrics.num_lost >= 1
        assert index.metrics.num_degraded == 0
        await index.close()

    asyncio.run(scenario())
    publisher.stop()


def test_redis_with_a_password_refuses_clients_without_it(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        prompt = chain(10, 2)
        good = config(server, redis_password="s3cret")
        _, publisher = publisher_for(A, good, prompt)
        publisher.step()
        _, intruder = publisher_for(B, config(server), prompt)
        intruder.step()  # refused, logged, never raised
        assert intruder.metrics.num_errors == 1 and not intruder.is_synced

        async def scenario() -> None:
            with_password, without = PrefixIndex(good), PrefixIndex(config(server))
            assert await with_password.lookup(prompt, [A]) == [2]
            assert await without.lookup(prompt, [A]) is None
            assert without.metrics.num_degraded == 1
            await with_password.close()
            await without.close()

        asyncio.run(scenario())
        publisher.stop()
        intruder.stop()
    finally:
        server.stop()
