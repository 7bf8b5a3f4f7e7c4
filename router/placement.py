"""Where a request runs: the router's view of each worker pool and its load.

    prefill pool   the worker with the fewest queued prompt tokens (prompts the router sent
                   it and has not had back, less what each found cached), then the fewest
                   requests
    decode pool    the lowest load = running sequences / the worker's sequence cap
                   + KV blocks in use / its blocks; running sequences are the router's own
                   count, block use the worker's last report (`observe`, every health check)

Prefix-aware: given how many of the prompt's tokens each worker holds in its prefix cache (the
global index's answer), the pool that prefills picks the lowest
    queued tokens - cache_weight x cached tokens
an estimate of the work ahead of the request's first token (weight 1: queued and cached
tokens cost the same). A worker holding the prefix stops winning once its queue outgrows what
the cache saves, so a hot prefix never sends everyone to one worker. Weight 0: load only.

A worker whose call failed with a lost-worker error is `mark_down`: skipped until the service
replaces it (`replace`). The prefix-aware policy (a worker already holding a prompt's prefix)
builds on these loads. Torch-free, Ray-free: workers are opaque handles here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from contracts.errors import WorkerUnavailable
from contracts.workers import WorkerStats


@dataclass(slots=True)
class WorkerLoad:
    in_flight: int = 0  # requests the router has placed here and not had back
    queued_tokens: int = 0  # their prompt tokens (the prefill pool's queue)
    num_blocks: int = 0  # the worker's last report (0: none yet)
    num_free_blocks: int = 0
    max_num_seqs: int = 0
    down: bool = False  # a call found it dead; skipped until replaced
    draining: bool = False  # leaving the pool: skipped, its requests finish

    @property
    def kv_used(self) -> float:
        """Fraction of its KV blocks in use at its last report (0 before any)."""
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def decode_load(self) -> float:
        seqs = self.in_flight / self.max_num_seqs if self.max_num_seqs else float(self.in_flight)
        return seqs + self.kv_used


class Pool:
    """One pool's workers: handles, stable ids (e.g. "decode-3", kept by a replacement),
    prefix-index identities, and their loads. Workers come and go (`add`, `remove`): hold a
    worker's handle or id across awaits, not its index."""

    def __init__(
        self,
        name: str,
        workers: list[Any],
        ids: list[str] | None = None,
        index_keys: list[Any] | None = None,
        cache_weight: float = 1.0,
    ) -> None:
        if not workers:
            raise ValueError(f"the {name} pool needs at least one worker")
        if not cache_weight >= 0:
            raise ValueError(f"cache_weight={cache_weight!r} must be >= 0")
        ids = ids if ids is not None else [f"{name}-{i}" for i in range(len(workers))]
        index_keys = index_keys if index_keys is not None else [None] * len(workers)
        if not len(ids) == len(index_keys) == len(workers):
            raise ValueError("one id and one index key per worker")
        self.name = name
        self.workers = list(workers)
        self.ids = list(ids)
        self.index_keys: list[Any] = list(index_keys)  # each one's prefix-index identity
        self.loads = [WorkerLoad() for _ in workers]
        self.cache_weight = cache_weight

    def __len__(self) -> int:
        return len(self.workers)

    def pick(self, exclude: Collection[int] = (), cached: Sequence[int] | None = None) -> int:
        """The index of the least loaded live worker not in `exclude`, weighing the prompt
        tokens each worker has cached (`cached`, per worker) if known. Raises
        WorkerUnavailable if there is none."""
        candidates = [
            i for i, load in enumerate(self.loads)
            if not (load.down or load.draining) and i not in exclude
        ]  # fmt: skip
        if not candidates:
            raise WorkerUnavailable(f"no live {self.name} worker left to place the request on")
        if cached is None or not self.cache_weight or not any(cached[i] for i in candidates):
            return min(candidates, key=self._key)
        weight = self.cache_weight
        return min(
            candidates,
            key=lambda i: (self.loads[i].queued_tokens - weight * cached[i], *self._key(i)),
        )

    def _key(self, index: int) -> tuple[float, ...]:
        load = self.loads[index]
        if self.name == "prefill":
            return (load.queued_tokens, load.in_flight, index)
        return (load.decode_load, load.in_flight, index)

    @contextmanager
    def assigned(self, index: int, prompt_tokens: int) -> Iterator[Any]:
        """Count a request against worker `index` while it runs there; yields its handle."""
        load = self.loads[index]
        load.in_flight += 1
        load.queued_tokens += prompt_tokens
        try:
            yield self.workers[index]
        finally:
            load.in_flight -= 1
            load.queued_tokens -= prompt_tokens

    def load_of(self, worker: Any) -> WorkerLoad | None:
        index = self._index(worker)
        return None if index is None else self.loads[index]

    def mark_down(self, worker: Any) -> None:
        """A call to `worker` found it lost: place nothing more on it."""
        load = self.load_of(worker)
        if load is not None:
            load.down = True

    def drain(self, worker: Any) -> None:
        """Place nothing more on `worker` (it is leaving); what it has runs to the end."""
        load = self.load_of(worker)
        if load is not None:
            load.draining = True

    def add(self, worker: Any, worker_id: str, index_key: Any = None) -> None:
        self.workers.append(worker)
        self.ids.append(worker_id)
        self.index_keys.append(index_key)
        self.loads.append(WorkerLoad())

    def remove(self, worker: Any) -> bool:
        """Take a (drained) worker out of the pool. False if it is not here."""
        index = self._index(worker)
        if index is None:
            return False
        for column in (self.workers, self.ids, self.index_keys, self.loads):
            del column[index]
        return True

    def replace(self, old: Any, new: Any, index_key: Any = None) -> bool:
        """Put `new` where `old` was (same id; live, no report yet). False if `old` is not
        here."""
        index = self._index(old)
        if index is None:
            return False
        self.workers[index] = new
        self.loads[index] = WorkerLoad()  # the old one's requests count on the old load
        self.index_keys[index] = index_key
        return True

    def observe(self, worker: Any, stats: WorkerStats) -> None:
        """Record a worker's reported KV and sequence figures (WorkerBase.stats)."""
        load = self.load_of(worker)
        if load is not None:
            load.num_blocks = stats.num_blocks
            load.num_free_blocks = stats.num_free_blocks
            load.max_num_seqs = stats.max_num_seqs

    def _index(self, worker: Any) -> int | None:
        for index, current in enumerate(self.workers):
            if current is worker:
                return index
        return None
