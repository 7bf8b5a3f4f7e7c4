"""The global prefix-cache index, router side: which worker holds how much of a prompt.

A hint for placement, never a dependency: a lookup answers within a small time budget or returns
None, and the caller places by load alone. `PrefixIndex` asks Redis (one set of block hashes per
live worker incarnation); without Redis, `LocalPrefixIndex` keeps the same answers in the router
process, fed by the workers' cache events (key layout and lookup: docs/operations.md,
"Prefix-cache index"). Both run on the router's event loop; neither is thread-safe. Torch-free;
`redis` is imported only when a Redis URL is configured.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from contracts.block_hash import BlockHash
from contracts.workers import WorkerKey

if TYPE_CHECKING:
    import redis
    import redis.asyncio

logger = logging.getLogger(__name__)

_URL_SCHEMES = ("redis", "rediss", "unix")
_MAX_QUERIES_IN_FLIGHT = 64  # past this many unanswered lookups, Redis counts as too slow


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """Where the index lives and how long it may take. `redis_url` None: in-process index.

    `redis_password` overrides one in the URL; `redis_tls_ca_file` (rediss:// only) verifies
    the server against that CA bundle.
    """

    redis_url: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    redis_tls_ca_file: str | None = None
    namespace: str = "tandem:prefix"
    ttl_s: float = 30.0  # entries of a worker that stops refreshing them vanish after this
    flush_interval_s: float = 0.05  # worker side: how often buffered cache events are written
    lookup_budget_ms: float = 5.0  # router side: a lookup slower than this is abandoned
    retry_interval_s: float = 1.0  # after a failure, Redis is not tried again for this long
    redis_timeout_s: float = 1.0  # socket timeout of a connect or command (both sides)

    def __post_init__(self) -> None:
        for name in ("ttl_s", "flush_interval_s", "lookup_budget_ms", "redis_timeout_s"):
            _check_positive(name, getattr(self, name))
        if not (type(self.retry_interval_s) in (int, float) and self.retry_interval_s >= 0):
            raise ValueError(f"retry_interval_s={self.retry_interval_s!r} must be >= 0")
        if self.flush_interval_s >= self.ttl_s:
            raise ValueError(
                f"flush_interval_s={self.flush_interval_s} must be below ttl_s={self.ttl_s}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", self.namespace):
            raise ValueError(f"namespace={self.namespace!r}: use 1-64 of [A-Za-z0-9_.:-]")
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
            is_tls = self.redis_url.startswith("rediss://")
            if self.redis_tls_ca_file is not None and not is_tls:
                raise ValueError("redis_tls_ca_file is set but redis_url is not rediss://")
        elif self.redis_password is not None or self.redis_tls_ca_file is not None:
            raise ValueError("redis_password or redis_tls_ca_file is set without redis_url")

    @property
    def heartbeat_interval_s(self) -> float:
        """How often a publisher refreshes its entries' TTL when nothing changes."""
        return self.ttl_s / 3


def _check_positive(name: str, value: object) -> None:
    if type(value) not in (int, float) or not 0 < value < float("inf"):  # type: ignore[operator]
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


def check_redis_url(url: str) -> None:
    """Raise ValueError naming what is wrong with a Redis URL (its password never shown)."""
    if not isinstance(url, str):
        raise ValueError(f"redis_url must be a str, not {type(url).__name__}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"redis_url is malformed: {error}") from None
    shown = f"{parts.scheme}://{parts.hostname or ''}" + (f":{port}" if port else "")
    if parts.scheme not in _URL_SCHEMES:
        raise ValueError(
            f"redis_url {shown!r}: scheme must be one of {', '.join(_URL_SCHEMES)} "
            "(e.g. redis://host:6379/0)"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("redis_url unix:// needs a socket path (unix:///run/redis.sock)")
        return
    if not parts.hostname:
        raise ValueError(f"redis_url {shown!r} has no host (e.g. redis://host:6379/0)")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"redis_url {shown!r}: database {db!r} must be a number")


@dataclass(frozen=True, slots=True)
class CacheEventBatch:
    """Changes to one worker's cached hashes since the batch numbered `seq - 1`; or, when
    `is_full`, its whole set (`added`) replacing whatever was known."""

    worker: WorkerKey
    seq: int
    is_full: bool
    added: tuple[BlockHash, ...]
    removed: tuple[BlockHash, ...] = ()


def blocks_key(namespace: str, worker: WorkerKey) -> str:
    return f"{namespace}:blocks:{worker.worker_id}:{worker.epoch}"


def epoch_key(namespace: str, worker_id: str) -> str:
    return f"{namespace}:epoch:{worker_id}"


def leading_hits(flags: Iterable[object]) -> int:
    """How many of `flags` are true before the first false one."""
    count = 0
    for flag in flags:
        if not flag:
            break
        count += 1
    return count


def redis_client(config: IndexConfig, *, is_async: bool) -> Any:
    """A redis-py client (redis.asyncio's when `is_async`) with no retries of its own: the
    callers decide when to try again."""
    assert config.redis_url is not None, "redis_client needs config.redis_url"
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if is_async:
        from redis.asyncio import Redis as AsyncRedis
        from redis.asyncio.retry import Retry as AsyncRetry

        factory: Any = AsyncRedis.from_url
        retry: Any = AsyncRetry(NoBackoff(), 0)
    else:
        from redis import Redis

        factory, retry = Redis.from_url, Retry(NoBackoff(), 0)
    kwargs: dict[str, Any] = {}
    if config.redis_password is not None:
        kwargs["password"] = config.redis_password
    if config.redis_tls_ca_file is not None:
        kwargs["ssl_ca_certs"] = config.redis_tls_ca_file
    return factory(
        config.redis_url,
        socket_timeout=config.redis_timeout_s,
        socket_connect_timeout=config.redis_timeout_s,
        retry=retry,
        health_check_interval=0,
        **kwargs,
    )


@dataclass(slots=True)
class IndexMetrics:
    """Counters of one router's lookups (read by its metrics exporter)."""

    num_lookups: int = 0  # answered from the index
    num_degraded: int = 0  # gave up (index down, slow, broken): placed by load alone
    num_blocks_queried: int = 0  # prompt blocks looked up
    num_blocks_found: int = 0  # of which the best worker held (its leading run)

    def record(self, num_queried: int, counts: Sequence[int]) -> None:
        """One answered lookup of `num_queried` blocks over `len(counts)` workers."""
        self.num_lookups += 1
        if counts:  # with no worker to ask, nothing was queried
            self.num_blocks_queried += num_queried
            self.num_blocks_found += max(counts)

    @property
    def hit_rate(self) -> float:
        return self.num_blocks_found / self.num_blocks_queried if self.num_blocks_queried else 0.0


class PrefixLookup(Protocol):
    """What placement needs: `PrefixIndex` (Redis) or `LocalPrefixIndex` (in-process)."""

    metrics: IndexMetrics

    async def lookup(
        self, block_hashes: Sequence[BlockHash], workers: Sequence[WorkerKey]
    ) -> list[int] | None: ...

    async def close(self) -> None: ...


class PrefixIndex:
    """Lookups in Redis within `config.lookup_budget_ms`, from the router's event loop.

    A lookup waits for its query at most the budget, but never cancels it: a query cut off
    mid-reply would spoil its connection, and one that is merely slow (a cold connect, a TLS
    handshake) finishes in the background and warms the connection for the next lookup. The
    socket timeout (`redis_timeout_s`) bounds it; at most `_MAX_QUERIES_IN_FLIGHT` run at once.
    """

    def __init__(self, config: IndexConfig, clock: Callable[[], float] = time.monotonic) -> None:
        if config.redis_url is None:
            raise ValueError("PrefixIndex needs config.redis_url (else use LocalPrefixIndex)")
        self.config = config
        self.metrics = IndexMetrics()
        self._clock = clock
        self._budget_s = config.lookup_budget_ms / 1000
        self._client: redis.asyncio.Redis | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._queries: set[asyncio.Task[list[int]]] = set()
        self._retry_at = 0.0
        self._is_degraded = False

    async def lookup(
        self, block_hashes: Sequence[BlockHash], workers: Sequence[WorkerKey]
    ) -> list[int] | None:
        """For each worker, how many leading blocks of `block_hashes` it holds; None when the
        index cannot answer within the budget (counted in `metrics.num_degraded`). After a
        failure, answers None at once for `retry_interval_s`, then tries (reconnects) again."""
        if not workers or not block_hashes:
            self.metrics.record(len(block_hashes), [])
            return [0] * len(workers)
        now = self._clock()
        if now < self._retry_at or len(self._queries) >= _MAX_QUERIES_IN_FLIGHT:
            self.metrics.num_degraded += 1
            return None
        query = asyncio.ensure_future(self._query(list(block_hashes), workers))
        self._queries.add(query)
        query.add_done_callback(self._query_done)
        done, _ = await asyncio.wait({query}, timeout=self._budget_s)
        from redis.exceptions import RedisError

        error = query.exception() if done else TimeoutError("over the lookup budget")
        if isinstance(error, (RedisError, OSError)):
            self._fail(now, error)
            return None
        counts = query.result()  # re-raises anything else: a bug, not a Redis fault
        if self._is_degraded:
            logger.info("prefix index: Redis answers again")
            self._is_degraded = False
        self.metrics.record(len(block_hashes), counts)
        return counts

    async def close(self) -> None:
        """Cancel queries still running and close the connections."""
        for query in list(self._queries):
            query.cancel()
        await asyncio.gather(*self._queries, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await client.aclose()

    async def _query(
        self, block_hashes: list[BlockHash], workers: Sequence[WorkerKey]
    ) -> list[int]:
        pipe = self._connection().pipeline(transaction=False)
        for worker in workers:
            pipe.smismember(blocks_key(self.config.namespace, worker), block_hashes)
        return [leading_hits(flags) for flags in await pipe.execute()]

    def _connection(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = redis_client(self.config, is_async=True)
            self._client_loop = loop
        assert self._client is not None, "client just made"
        return self._client

    def _query_done(self, query: asyncio.Task[list[int]]) -> None:
        self._queries.discard(query)
        if not query.cancelled() and query.exception() is not None:  # retrieved: no warning
            logger.debug("prefix index: query failed: %r", query.exception())

    def _fail(self, now: float, error: BaseException) -> None:
        self.metrics.num_degraded += 1
        self._retry_at = now + self.config.retry_interval_s
        if not self._is_degraded:
            logger.warning("prefix index: Redis unusable (%s); placing by load alone", error)
            self._is_degraded = True


@dataclass(slots=True)
class _LocalEntry:
    epoch: str
    seq: int | None  # of the last batch applied; None: out of step, ask for a full batch
    hashes: set[BlockHash]
    expires_at: float


class LocalPrefixIndex:
    """The in-process index of a single router, for when there is no Redis.

    The router pulls each worker's batches (`drain(index.next_drain_seq(worker_id))` on the
    worker's CacheEventLog, through an actor call) every so often and `apply`s them here. A
    worker not heard from for `ttl_s` counts as holding nothing.
    """

    def __init__(self, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        _check_positive("ttl_s", ttl_s)
        self.ttl_s = ttl_s
        self.metrics = IndexMetrics()
        self._clock = clock
        self._entries: dict[str, _LocalEntry] = {}

    def next_drain_seq(self, worker_id: str) -> int | None:
        """What to pass to the worker's `drain`: the last batch applied, or None for a full
        set (worker unknown, or a batch went missing)."""
        entry = self._entries.get(worker_id)
        return None if entry is None else entry.seq

    def apply(self, batch: CacheEventBatch) -> bool:
        """Take in a worker's batch. False (nothing changed) for a delta that does not follow
        the last batch applied of the same epoch: the next drain then asks for a full set."""
        now = self._clock()
        self._drop_expired(now)
        worker = batch.worker
        entry = self._entries.get(worker.worker_id)
        if batch.is_full:
            hashes = set(batch.added)
            self._entries[worker.worker_id] = _LocalEntry(worker.epoch, batch.seq, hashes, 0.0)
        elif entry is None or entry.epoch != worker.epoch or entry.seq != batch.seq - 1:
            if entry is not None:
                entry.seq = None
            return False
        else:
            entry.hashes.update(batch.added)
            entry.hashes.difference_update(batch.removed)
            entry.seq = batch.seq
        self._entries[worker.worker_id].expires_at = now + self.ttl_s
        return True

    def forget(self, worker_id: str) -> None:
        """Drop a worker's entries (it died or left the pool)."""
        self._entries.pop(worker_id, None)

    async def lookup(
        self, block_hashes: Sequence[BlockHash], workers: Sequence[WorkerKey]
    ) -> list[int] | None:
        """Like PrefixIndex.lookup; never None."""
        self._drop_expired(self._clock())
        counts = []
        for worker in workers:
            entry = self._entries.get(worker.worker_id)
            if entry is None or entry.epoch != worker.epoch:
                counts.append(0)
                continue
            counts.append(leading_hits(h in entry.hashes for h in block_hashes))
        self.metrics.record(len(block_hashes), counts)
        return counts

    async def close(self) -> None:
        self._entries.clear()

    def _drop_expired(self, now: float) -> None:
        for worker_id in [w for w, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[worker_id]


def make_prefix_index(config: IndexConfig) -> PrefixLookup:
    """The router's index: Redis when `config.redis_url` is set, else in-process."""
    if config.redis_url is None:
        return LocalPrefixIndex(config.ttl_s)
    return PrefixIndex(config)
