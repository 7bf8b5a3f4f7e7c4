"""The prefix index without Redis: configuration checks, the worker's CacheEventLog (deltas,
full sets on a missed batch, bounded memory), the router's LocalPrefixIndex fed by drains
(epochs, TTL, out-of-step batches), the publisher's resync logic over a scripted writer, and
an engine's cache events reaching the index under the router's own hashes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from contracts.block_hash import prompt_block_hashes
from contracts.workers import WorkerKey
from engine.engine import Engine
from prefix_cache.index import (
    CacheEventBatch,
    IndexConfig,
    LocalPrefixIndex,
    leading_hits,
    make_prefix_index,
)
from prefix_cache.publisher import CacheEventLog, IndexPublisher, RedisIndexWriter
from tests.conftest import greedy, make_engine, prompt_ids

A = WorkerKey("prefill-0", "epoch1")
B = WorkerKey("prefill-1", "epoch1")


def hashes(n: int, tag: str = "h") -> list[bytes]:
    return [f"{tag}{i:014d}".encode() for i in range(n)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lookup(
    index: LocalPrefixIndex, block_hashes: Sequence[bytes], *workers: WorkerKey
) -> list[int]:
    counts = asyncio.run(index.lookup(block_hashes, workers))
    assert counts is not None, "the local index always answers"
    return counts


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://host:6379", "scheme must be one of redis, rediss, unix"),
        ("redis://:secret@", "has no host"),
        ("redis://host:notaport/0", "malformed"),
        ("redis://host:6379/zero", "database 'zero' must be a number"),
        ("unix://", "needs a socket path"),
    ],
)
def test_malformed_redis_urls_are_named(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        IndexConfig(redis_url=url)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl_s": 0}, "ttl_s=0"),
        ({"lookup_budget_ms": float("nan")}, "lookup_budget_ms=nan"),
        ({"flush_interval_s": 40.0}, "flush_interval_s=40.0 must be below ttl_s"),
        ({"retry_interval_s": -1}, "retry_interval_s=-1"),
        ({"namespace": "a b"}, "namespace='a b'"),
        ({"redis_password": "pw"}, "without redis_url"),
        ({"redis_url": "redis://h", "redis_tls_ca_file": "ca.pem"}, "not rediss://"),
    ],
)
def test_bad_index_config_names_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IndexConfig(**kwargs)  # type: ignore[arg-type]


def test_good_configs_and_the_password_stays_out_of_repr() -> None:
    for url in ("redis://h:6379/1", "rediss://user:pw@h", "unix:///run/redis.sock"):
        IndexConfig(redis_url=url)
    config = IndexConfig(redis_url="rediss://h", redis_password="hunter2", redis_tls_ca_file="c")
    assert "hunter2" not in repr(config)
    assert isinstance(make_prefix_index(IndexConfig()), LocalPrefixIndex)


@pytest.mark.parametrize("field", ["worker_id", "epoch"])
@pytest.mark.parametrize("value", ["", "a:b", "x" * 65, "a b"])
def test_worker_key_rejects_names_that_would_break_keys(field: str, value: str) -> None:
    kwargs = {"worker_id": "w", "epoch": "e", field: value}
    with pytest.raises(ValueError, match=field):
        WorkerKey(**kwargs)


def test_leading_hits_stops_at_the_first_miss() -> None:
    assert [leading_hits(f) for f in ([], [1, 1, 0, 1], [1, 1], [0, 1])] == [0, 2, 2, 0]


def test_log_drains_net_changes_then_a_full_set_when_out_of_step() -> None:
    log = CacheEventLog(A)
    h = hashes(6)
    first = log.drain(None)
    assert (first.seq, first.is_full, first.added) == (1, True, ())
    log.on_cache_event(h[:4], [])
    assert log.drain(1) == CacheEventBatch(A, 2, False, tuple(h[:4]), ())
    log.on_cache_event([h[5]], [])
    log.on_cache_event([], [h[5]])  # added and removed between drains: never reported
    log.on_cache_event([h[4]], [h[0], h[3]])
    delta = log.drain(2)
    assert (delta.seq, delta.is_full) == (3, False)
    assert (set(delta.added), set(delta.removed)) == ({h[4]}, {h[0], h[3]})
    log.on_cache_event([], [h[1]])
    log.on_cache_event([h[1]], [])  # removed and back: nothing changed since the last drain
    assert log.drain(3) == CacheEventBatch(A, 4, False, (), ())
    # A consumer that missed batch 4 (or restarted) gets the whole set.
    full = log.drain(3)
    assert (full.seq, full.is_full, set(full.added)) == (5, True, {h[1], h[2], h[4]})
    assert log.num_cached == 3


def test_log_delta_stays_bounded_by_the_cache_when_nobody_drains() -> None:
    log = CacheEventLog(A)
    for round_ in range(50):  # a cache of 8 blocks churning through 400 distinct hashes
        block = hashes(8, tag=f"r{round_:02d}")
        log.on_cache_event(block, [])
        log.on_cache_event([], block)
    assert log.num_cached == 0 and len(log._delta) == 0
    log.on_cache_event(hashes(8), [])
    assert len(log._delta) <= 8


def test_local_index_follows_drained_batches() -> None:
    clock = FakeClock()
    index = LocalPrefixIndex(ttl_s=10, clock=clock)
    logs = {A: CacheEventLog(A), B: CacheEventLog(B)}
    h = hashes(5)
    logs[A].on_cache_event(h[:4], [])
    logs[B].on_cache_event(h[:1] + h[2:4], [])

    def pull() -> None:
        for worker, log in logs.items():
            assert index.apply(log.drain(index.next_drain_seq(worker.worker_id)))

    pull()
    assert lookup(index, h, A, B) == [4, 1]
    logs[A].on_cache_event([], [h[1]])
    logs[B].on_cache_event([h[1]], [])
    pull()
    assert lookup(index, h, A, B) == [1, 4]
    assert lookup(index, hashes(3, tag="x"), A, B) == [0, 0]
    assert lookup(index, [], A, B) == [0, 0]
    assert index.metrics.num_lookups == 4 and index.metrics.num_degraded == 0
    assert (index.metrics.num_blocks_queried, index.metrics.num_blocks_found) == (13, 8)


def test_local_index_trusts_only_the_live_epoch() -> None:
    index = LocalPrefixIndex(ttl_s=10, clock=FakeClock())
    h = hashes(3)
    old = CacheEventLog(A)
    old.on_cache_event(h, [])
    index.apply(old.drain(None))
    restarted = WorkerKey(A.worker_id, "epoch2")
    assert lookup(index, h, restarted) == [0]  # the router asks for the new epoch only
    new = CacheEventLog(restarted)
    new.on_cache_event(h[:1], [])
    # A delta of a new epoch is refused until a full set arrives.
    assert index.apply(new.drain(None)) and lookup(index, h, restarted, A) == [1, 0]


def test_local_index_asks_for_a_full_set_after_a_lost_batch() -> None:
    index = LocalPrefixIndex(ttl_s=10, clock=FakeClock())
    log = CacheEventLog(A)
    h = hashes(4)
    log.on_cache_event(h[:2], [])
    assert index.apply(log.drain(index.next_drain_seq(A.worker_id)))
    log.on_cache_event(h[2:], [])
    log.drain(index.next_drain_seq(A.worker_id))  # its reply never reached the router
    log.on_cache_event([], [h[0]])
    stale = log.drain(1)  # a delta against batch 1: the log answers with the full set
    assert stale.is_full and index.apply(stale)
    assert lookup(index, h[1:], A) == [3]
    bad = CacheEventBatch(A, seq=99, is_full=False, added=(h[0],))
    assert not index.apply(bad)
    assert index.next_drain_seq(A.worker_id) is None  # next drain: full
    assert lookup(index, h[1:], A) == [3]


def test_local_index_forgets_workers_silent_past_the_ttl() -> None:
    clock = FakeClock()
    index = LocalPrefixIndex(ttl_s=2, clock=clock)
    log = CacheEventLog(A)
    h = hashes(2)
    log.on_cache_event(h, [])
    index.apply(log.drain(None))
    clock.now += 1.5
    index.apply(log.drain(index.next_drain_seq(A.worker_id)))  # an empty batch keeps it alive
    clock.now += 1.5
    assert lookup(index, h, A) == [2]
    clock.now += 2.0
    assert lookup(index, h, A) == [0]
    assert index.next_drain_seq(A.worker_id) is None
    index.apply(log.drain(None))
    index.forget(A.worker_id)
    assert lookup(index, h, A) == [0]


class ScriptedWriter:
    """A RedisIndexWriter stand-in that records calls and fails or loses state on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.fail = False
        self.lost = False

    def _check(self) -> None:
        if self.fail:
            raise ConnectionError("redis down")

    def replace(self, worker: WorkerKey, block_hashes: Sequence[bytes]) -> None:
        self._check()
        self.calls.append(("replace", len(block_hashes), 0))

    def apply(
        self, worker: WorkerKey, added: Sequence[bytes], removed: Sequence[bytes], expect: bool
    ) -> bool:
        self._check()
        self.calls.append(("apply", len(added), len(removed)))
        return not (self.lost and expect)


def test_publisher_resyncs_after_errors_and_lost_state() -> None:
    clock = FakeClock()
    log, writer = CacheEventLog(A), ScriptedWriter()
    config = IndexConfig(ttl_s=3, retry_interval_s=1.0)
    publisher = IndexPublisher(log, config, writer=writer, clock=clock)  # type: ignore[arg-type]
    h = hashes(4)
    log.on_cache_event(h[:2], [])
    publisher.step()
    log.on_cache_event(h[2:3], [h[0]])
    publisher.step()
    publisher.step()  # nothing changed, heartbeat not due
    clock.now += 1.0
    publisher.step()  # heartbeat: an empty apply refreshes the TTL
    assert writer.calls == [("replace", 2, 0), ("apply", 1, 1), ("apply", 0, 0)]
    writer.fail = True
    log.on_cache_event(h[3:], [])
    publisher.step()
    assert publisher.metrics.num_errors == 1 and not publisher.is_synced
    writer.fail = False
    publisher.step()  # within the retry interval: nothing tried
    clock.now += 1.0
    publisher.step()
    assert writer.calls[3:] == [("replace", 3, 0)] and publisher.is_synced
    writer.lost = True  # e.g. FLUSHALL: the heartbeat finds the set gone
    clock.now += 1.0
    publisher.step()
    writer.lost = False
    publisher.step()
    assert writer.calls[4:] == [("apply", 0, 0), ("replace", 3, 0)]
    assert (publisher.metrics.num_lost, publisher.metrics.num_resyncs) == (1, 3)


def test_publisher_needs_redis_or_a_writer() -> None:
    with pytest.raises(ValueError, match="redis_url"):
        IndexPublisher(CacheEventLog(A), IndexConfig())
    assert RedisIndexWriter  # the real writer is exercised by the integration tests


def run_prompt(engine: Engine, request_id: str, tokens: list[int], salt: str) -> None:
    engine.add_request(request_id, None, greedy(3), prompt_token_ids=tokens, cache_salt=salt)
    while engine.has_unfinished_requests():
        engine.step()


def test_engine_cache_events_match_the_router_hashes() -> None:
    engine = make_engine(block_size=4, num_kv_blocks=16)
    log = CacheEventLog(A)
    engine.block_manager.set_cache_listener(log.on_cache_event)
    index = LocalPrefixIndex()
    tokens = prompt_ids(7, 18)
    run_prompt(engine, "a", tokens, "tenant-a")
    index.apply(log.drain(None))
    router_hashes = prompt_block_hashes(tokens, 4, engine.model_id, "tenant-a")
    other_tenant = prompt_block_hashes(tokens, 4, engine.model_id, "tenant-b")
    assert len(router_hashes) == 4
    assert lookup(index, router_hashes, A) == [4]
    assert lookup(index, other_tenant, A) == [0]
    diverging = prompt_block_hashes(tokens[:9] + [1] * 9, 4, engine.model_id, "tenant-a")
    assert lookup(index, diverging, A) == [2]
    # Enough other prompts evict it; the index follows.
    for seed in range(8):
        run_prompt(engine, f"b{seed}", prompt_ids(100 + seed, 18), "tenant-a")
    index.apply(log.drain(index.next_drain_seq(A.worker_id)))
    assert lookup(index, router_hashes, A) == [0]
    assert log.num_cached == len(engine.block_manager.hash_to_block)
