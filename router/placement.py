"""Where a request runs: scoring the members of a pool by their load.

The decode pool picks the lowest load (running sequences and KV blocks in use, each over the
worker's capacity) less `cache_weight` x the share of the prompt the prefix index says each
worker holds (a multi-turn conversation goes back to the worker that decoded its last turn);
the prefill pool the fewest queued prompt tokens less `cache_weight` x the tokens each worker
holds, so a hot prefix never sends everyone to one worker (the formulas: docs/operations.md,
"Placement"). Membership is the control plane's
(cluster.membership): the router reads a `PoolView` and reports a worker a call found lost
(`mark_down`); it is skipped until replaced.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from contracts.errors import WorkerUnavailable
from contracts.workers import WorkerKey, WorkerStats
from router.workers import WorkerClient

ITL_SMOOTHING = 16  # gaps a worker's recent ITL averages over (roughly)


@dataclass(slots=True)
class WorkerLoad:
    in_flight: int = 0  # requests the router has placed here and not had back
    queued_tokens: int = 0  # their prompt tokens (the prefill pool's queue)
    num_blocks: int = 0  # the worker's last report (0: none yet)
    num_free_blocks: int = 0
    max_num_seqs: int = 0
    down: bool = False  # a call found it lost; skipped until replaced
    draining: bool = False  # leaving the pool: skipped, its requests finish
    recent_itl_s: float | None = None  # its streams' inter-token gaps, averaged (router.disagg)

    @property
    def kv_used(self) -> float:
        """Fraction of its KV blocks in use at its last report (0 before any)."""
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def decode_load(self) -> float:
        seqs = self.in_flight / self.max_num_seqs if self.max_num_seqs else float(self.in_flight)
        return seqs + self.kv_used

    def observe_itl(self, gap_s: float) -> None:
        """One gap between two outputs of a request streaming from this worker (an
        exponential average over the last ~ITL_SMOOTHING gaps)."""
        last = self.recent_itl_s
        self.recent_itl_s = gap_s if last is None else last + (gap_s - last) / ITL_SMOOTHING

    def observe(self, stats: WorkerStats) -> None:
        """Take a worker's reported KV and sequence figures."""
        self.num_blocks = stats.num_blocks
        self.num_free_blocks = stats.num_free_blocks
        self.max_num_seqs = stats.max_num_seqs


@dataclass(eq=False, slots=True)
class Member:
    """One incarnation of a worker in a pool: its client, its prefix-index key, its load (a
    replacement is a new Member with a fresh load; requests on the old one end on its books)."""

    client: WorkerClient
    index_key: WorkerKey | None = None
    load: WorkerLoad = field(default_factory=WorkerLoad)

    @property
    def worker_id(self) -> str:
        return self.client.worker_id

    @property
    def placeable(self) -> bool:
        return not (self.load.down or self.load.draining)


class PoolView(Protocol):
    """A pool as the router sees it; the control plane owns who is in it."""

    @property
    def name(self) -> str: ...

    def members(self) -> Sequence[Member]:
        """The members now, in a stable order (replacements keep their predecessor's place)."""
        ...

    def mark_down(self, member: Member) -> None:
        """A call to `member` found it lost: place nothing more on it."""
        ...


@dataclass(frozen=True, slots=True)
class Placement:
    """The scoring policy of one pool (see the module docstring)."""

    prefill: bool  # score by queued prompt tokens (else by decode load)
    cache_weight: float = 1.0
    # Weigh cached tokens as their share of the prompt against the decode load (the decode pool
    # of disaggregated mode); else against queued prompt tokens (workers that prefill).
    cache_as_share: bool = False

    def __post_init__(self) -> None:
        if not self.cache_weight >= 0:
            raise ValueError(f"cache_weight={self.cache_weight!r} must be >= 0")

    def pick(
        self,
        pool: str,
        members: Sequence[Member],
        exclude: Collection[Member] = (),
        cached: Sequence[int] | None = None,
        prompt_tokens: int = 0,
    ) -> int:
        """The index in `members` of the least loaded placeable member not in `exclude`,
        weighing the prompt tokens each member has cached (`cached`, aligned with `members`)
        if known (`prompt_tokens`: the prompt's length, for `cache_as_share`). Raises
        WorkerUnavailable if there is none."""
        candidates = [
            i for i, member in enumerate(members) if member.placeable and member not in exclude
        ]
        if not candidates:
            raise WorkerUnavailable(f"no live {pool} worker left to place the request on")
        key = self._key_of(members)
        if cached is None or not self.cache_weight or not any(cached[i] for i in candidates):
            return min(candidates, key=key)
        weight = self.cache_weight
        if self.cache_as_share:
            share = weight / max(prompt_tokens, 1)
            return min(
                candidates, key=lambda i: (members[i].load.decode_load - share * cached[i], *key(i))
            )
        return min(
            candidates,
            key=lambda i: (members[i].load.queued_tokens - weight * cached[i], *key(i)),
        )

    def _key_of(self, members: Sequence[Member]) -> _Key:
        def key(index: int) -> tuple[float, ...]:
            load = members[index].load
            if self.prefill:
                return (load.queued_tokens, load.in_flight, index)
            return (load.decode_load, load.in_flight, index)

        return key


class _Key(Protocol):
    def __call__(self, index: int) -> tuple[float, ...]: ...


@contextmanager
def assigned(member: Member, prompt_tokens: int) -> Iterator[WorkerClient]:
    """Count a request against `member` while it runs there; yields its client."""
    load = member.load
    load.in_flight += 1
    load.queued_tokens += prompt_tokens
    try:
        yield member.client
    finally:
        load.in_flight -= 1
        load.queued_tokens -= prompt_tokens
