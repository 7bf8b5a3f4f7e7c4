"""Rank 0's transfer staging region under private-KV tensor parallelism: which of its bounded
whole-head blocks hold which transfer's KV. Pure bookkeeping over staging ids (the tensor is
TensorParallelGroup.whole_kv_cache); knows nothing of ranks or transfers.

Each rank keeps only its own KV heads, so a transfer (which moves every head) goes through a
region on rank 0 of `num_blocks` whole-head blocks with ids of their own, 0..num_blocks-1:

    engine block ids (every rank, its heads)        staging ids (rank 0, every head)
      kept KV / landed KV  [17, 4, 23]   <-- map -->  [0, 1, 2]   owner "kept:r#3"

The staging blocks of a transfer belong to the same owner as its engine blocks (a sender's
pin, a receiver's reservation) and are freed with them: BlockManager.release(owner) frees
both, so every path that ends a hold (Ack, abort, lease expiry, a dead pair or rank) frees
staging too. `allocate` returns None for "not now" and changes nothing. Thread-safe: the
engine thread allocates, transfer threads release.

Named a transfer region (Engine.transfer_region, BlockManager.transfer_region) to keep it apart
from a worker's StagingPool (kvtransfer.staging, WorkerBase.staging): the host or device
buffers a pair's chunks pass through on the wire. Its blocks are still "staging blocks".
"""

from __future__ import annotations

import threading
from collections.abc import Collection


class TransferRegion:
    """Owns `num_blocks` staging block ids: free, or held by one owner each."""

    def __init__(self, num_blocks: int) -> None:
        if type(num_blocks) is not int or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} must be an int >= 1")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._owned: dict[str, list[int]] = {}
        self._freed = threading.Condition()

    @property
    def num_free_blocks(self) -> int:
        with self._freed:
            return len(self._free)

    def allocate(self, owner: str, num_blocks: int) -> list[int] | None:
        """`num_blocks` staging ids for `owner`, or None (nothing taken) if fewer are free.
        Raises ValueError for an owner that holds staging already or a bad count."""
        if type(num_blocks) is not int or not 1 <= num_blocks <= self.num_blocks:
            raise ValueError(
                f"staging for {owner!r}: num_blocks={num_blocks!r} must be in "
                f"[1, {self.num_blocks}] (the staging region's size)"
            )
        with self._freed:
            if owner in self._owned:
                raise ValueError(f"{owner!r} already holds staging blocks")
            if num_blocks > len(self._free):
                return None
            ids = [self._free.pop() for _ in range(num_blocks)]
            self._owned[owner] = ids
            return ids

    def ids_of(self, owner: str) -> list[int] | None:
        """The staging ids `owner` holds, in its blocks' order; None if it holds none."""
        with self._freed:
            ids = self._owned.get(owner)
            return None if ids is None else list(ids)

    def free(self, owner: str) -> bool:
        """Give `owner`'s staging blocks back (waking `wait_for_free`). Idempotent: False if
        it holds none."""
        with self._freed:
            ids = self._owned.pop(owner, None)
            if ids is None:
                return False
            self._free.extend(reversed(ids))
            self._freed.notify_all()
            return True

    def keep_tail(self, owner: str, new_owner: str, num_dropped: int) -> list[int] | None:
        """Pass `owner`'s staging ids after its first `num_dropped` to `new_owner`, freeing
        those first ones (a transfer that ships only a suffix of its kept KV). None if `owner`
        holds none."""
        with self._freed:
            ids = self._owned.pop(owner, None)
            if ids is None:
                return None
            assert new_owner not in self._owned, f"{new_owner!r} already holds staging blocks"
            self._free.extend(reversed(ids[:num_dropped]))
            if ids[num_dropped:]:
                self._owned[new_owner] = ids[num_dropped:]
            self._freed.notify_all()
            return ids[num_dropped:]

    def wait_for_free(self, num_blocks: int, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until `num_blocks` are free; whether they are."""
        with self._freed:
            return self._freed.wait_for(lambda: len(self._free) >= num_blocks, timeout_s)

    def check_integrity(self, holders: Collection[str]) -> None:
        """Assert every id is free or held by exactly one owner, and only `holders` (the
        block manager's owners) hold any: staging held by anyone else has leaked."""
        with self._freed:
            held = [b for ids in self._owned.values() for b in ids]
            every = sorted(held + self._free)
            assert every == list(range(self.num_blocks)), "staging ids lost or held twice"
            leaked = sorted(set(self._owned) - set(holders))
            assert not leaked, f"staging blocks held by owners that hold no blocks: {leaked[:8]}"
