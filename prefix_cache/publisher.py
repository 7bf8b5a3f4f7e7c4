"""The global prefix-cache index, worker side: tell it which block hashes this worker caches.

`CacheEventLog`, the block manager's cache listener, only updates two in-memory sets under a
short lock, so the engine step never waits on the index; consumers `drain` it. `IndexPublisher`
drains it into Redis from its own thread, resyncs after any failure and never raises into the
worker (the pipeline and its memory bound: docs/operations.md, "Prefix-cache index").
Torch-free; imports `redis` only with a Redis URL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from contracts.workers import WorkerKey
from prefix_cache.index import (
    BlockHash,
    CacheEventBatch,
    IndexConfig,
    blocks_key,
    epoch_key,
    redis_client,
)

logger = logging.getLogger(__name__)

_SADD_CHUNK = 4096  # hashes per SADD command of a full resync


class CacheEventLog:
    """One worker incarnation's cached hashes and its changes not yet drained."""

    def __init__(self, worker: WorkerKey) -> None:
        self.worker = worker
        self._cached: set[BlockHash] = set()
        self._delta: dict[BlockHash, bool] = {}  # since the last drain: True added, False removed
        self._seq = 0
        self._lock = threading.Lock()

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def on_cache_event(self, added: list[BlockHash], removed: list[BlockHash]) -> None:
        """The block manager's listener (engine thread, under its lock): O(changes), no I/O."""
        with self._lock:
            for block_hash in added:
                self._cached.add(block_hash)
                self._note(block_hash, True)
            for block_hash in removed:
                self._cached.discard(block_hash)
                self._note(block_hash, False)

    def _note(self, block_hash: BlockHash, is_added: bool) -> None:
        previous = self._delta.get(block_hash)
        if previous is None:
            self._delta[block_hash] = is_added
        elif previous is not is_added:
            del self._delta[block_hash]  # back to what the last drain handed out

    def drain(self, after_seq: int | None) -> CacheEventBatch:
        """The changes since batch `after_seq`, or the full set when `after_seq` is not the
        last batch handed out (None: always full). Any thread; one consumer at a time."""
        with self._lock:
            is_full = after_seq is None or after_seq != self._seq
            self._seq += 1
            removed: tuple[BlockHash, ...] = ()
            if is_full:
                added = tuple(self._cached)
            else:
                added = tuple(h for h, is_added in self._delta.items() if is_added)
                removed = tuple(h for h, is_added in self._delta.items() if not is_added)
            self._delta = {}
            return CacheEventBatch(self.worker, self._seq, is_full, added, removed)


class RedisIndexWriter:
    """Writes one worker's set to Redis (publisher thread only; raises redis errors)."""

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        self.client: Any = redis_client(config, is_async=False)
        self._ttl_ms = max(1, round(config.ttl_s * 1000))

    def replace(self, worker: WorkerKey, hashes: Sequence[BlockHash]) -> None:
        """Make the worker's set exactly `hashes`, atomically; delete its previous epoch's."""
        key, ns = blocks_key(self.config.namespace, worker), self.config.namespace
        pipe = self.client.pipeline(transaction=True)
        pipe.set(epoch_key(ns, worker.worker_id), worker.epoch, px=self._ttl_ms, get=True)
        pipe.delete(key)
        for start in range(0, len(hashes), _SADD_CHUNK):
            pipe.sadd(key, *hashes[start : start + _SADD_CHUNK])
        pipe.pexpire(key, self._ttl_ms)
        old_epoch = pipe.execute()[0]
        if old_epoch is not None and old_epoch != worker.epoch.encode():
            stale = f"{ns}:blocks:{worker.worker_id}:{old_epoch.decode('utf-8', 'replace')}"
            self.client.delete(stale)

    def apply(
        self,
        worker: WorkerKey,
        added: Sequence[BlockHash],
        removed: Sequence[BlockHash],
        expect_existing: bool,
    ) -> bool:
        """Add and remove hashes and refresh the TTL, atomically. False when Redis had lost
        the set (`expect_existing` but no key): the caller must `replace` it."""
        key = blocks_key(self.config.namespace, worker)
        pipe = self.client.pipeline(transaction=True)
        pipe.exists(key)
        if added:
            pipe.sadd(key, *added)
        if removed:
            pipe.srem(key, *removed)
        pipe.pexpire(key, self._ttl_ms)
        pipe.pexpire(epoch_key(self.config.namespace, worker.worker_id), self._ttl_ms)
        existed = pipe.execute()[0] == 1
        return existed or not expect_existing

    def remove(self, worker: WorkerKey) -> None:
        self.client.delete(blocks_key(self.config.namespace, worker))

    def close(self) -> None:
        self.client.close()


@dataclass(slots=True)
class PublisherMetrics:
    num_writes: int = 0  # deltas and heartbeats written
    num_resyncs: int = 0  # full sets written (the first included)
    num_lost: int = 0  # times Redis had lost this worker's set
    num_errors: int = 0  # failed writes (Redis down, slow, refused)


class IndexPublisher:
    """Keeps Redis in step with a CacheEventLog from a daemon thread (`start`/`stop`)."""

    def __init__(
        self,
        log: CacheEventLog,
        config: IndexConfig,
        writer: RedisIndexWriter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.redis_url is None and writer is None:
            raise ValueError("IndexPublisher needs config.redis_url (else the router drains)")
        self.log = log
        self.config = config
        self.metrics = PublisherMetrics()
        self._writer = writer
        self._clock = clock
        self._heartbeat_s = config.heartbeat_interval_s
        self._seq: int | None = None  # last batch written; None: write the full set next
        self._num_published = 0
        self._last_write = 0.0
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_synced(self) -> bool:
        """Whether Redis held this worker's set as of the last write."""
        return self._seq is not None

    def start(self) -> None:
        assert self._thread is None, "IndexPublisher started twice"
        self._thread = threading.Thread(
            target=self._run, name=f"index-publisher-{self.log.worker.worker_id}", daemon=True
        )
        self._thread.start()

    def stop(self, remove_entries: bool = True) -> None:
        """Stop the thread; with `remove_entries`, delete this worker's set (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._writer is None:
            return
        from redis.exceptions import RedisError

        try:
            if remove_entries:
                self._writer.remove(self.log.worker)
        except (RedisError, OSError) as error:
            logger.info("prefix index: could not remove entries at stop: %s", error)
        finally:
            self._writer.close()

    def step(self) -> None:
        """One round: write what changed (or everything, to resync), or a heartbeat."""
        now = self._clock()
        if now < self._retry_at:
            return
        from redis.exceptions import RedisError

        batch = self.log.drain(self._seq)
        try:
            self._write(batch, now)
        except (RedisError, OSError) as error:
            if self._seq is not None or self.metrics.num_errors == 0:
                logger.warning("prefix index: cannot write to Redis (%s); will resync", error)
            self.metrics.num_errors += 1
            self._seq = None
            self._retry_at = now + self.config.retry_interval_s

    def _write(self, batch: CacheEventBatch, now: float) -> None:
        writer = self._writer or self._open()
        if batch.is_full:
            writer.replace(batch.worker, batch.added)
            self.metrics.num_resyncs += 1
            self._num_published = len(batch.added)
        elif (
            batch.added
            or batch.removed
            or now - self._last_write >= self.config.heartbeat_interval_s
        ):
            if not writer.apply(batch.worker, batch.added, batch.removed, self._num_published > 0):
                logger.warning("prefix index: Redis lost this worker's entries; resyncing")
                self.metrics.num_lost += 1
                self._seq = None
                return
            self.metrics.num_writes += 1
            self._num_published += len(batch.added) - len(batch.removed)
        else:
            self._seq = batch.seq
            return
        self._seq = batch.seq
        self._last_write = now

    def _open(self) -> RedisIndexWriter:
        self._writer = RedisIndexWriter(self.config)
        return self._writer

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # the thread's main: a bug must not end publishing silently
                logger.exception("prefix index: publisher step failed; resyncing")
                self._seq = None
            self._stop.wait(self.config.flush_interval_s)
