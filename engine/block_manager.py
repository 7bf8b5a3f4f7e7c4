"""Paged KV-cache bookkeeping: which sequence owns which block, and the prefix cache. Pure Python
over block ids (the tensors live in the model runner); allocation returns False for "not now"
and then changes nothing. A block is in use (ref_count > 0), cached (free but hashed, reusable
by a prefix hit until evicted, LRU) or free. Named owners hold blocks for KV in flight (`hold`,
`reserve`, `adopt`, idempotent `release`); an owner may also hold transfer staging blocks
(engine.transfer_region, private-KV tensor parallelism), which `release` frees with its
blocks. An optional listener hears cache events. One lock guards every public method. The
block table, states and hold rules: docs/engine.md.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from typing import Concatenate, ParamSpec, TypeAlias, TypeVar

from contracts.block_hash import BlockHash
from engine.sequence import Sequence
from engine.transfer_region import TransferRegion

_P = ParamSpec("_P")
_R = TypeVar("_R")

# (hashes added to the prefix cache, hashes removed from it); the two lists are disjoint.
CacheListener: TypeAlias = Callable[[list[BlockHash], list[BlockHash]], None]


def _locked(
    method: Callable[Concatenate[BlockManager, _P], _R],
) -> Callable[Concatenate[BlockManager, _P], _R]:
    @functools.wraps(method)
    def wrapper(self: BlockManager, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class BlockManager:
    """Owns the reference counts and hashes of `num_blocks` KV blocks of `block_size` tokens."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        transfer_region: TransferRegion | None = None,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self.hash_to_block: dict[BlockHash, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_prefix_queries = 0  # blocks looked up in the prefix cache
        self.num_prefix_hits = 0  # of which found
        self.holds: dict[str, list[int]] = {}  # owner -> blocks it holds one reference on
        # transfer staging blocks (private-KV TP), freed with their owner's holds
        self.transfer_region = transfer_region
        self.cache_listener: CacheListener | None = None
        self._evicted_hashes: list[BlockHash] = []  # since the last event, with a listener only
        self._lock = threading.RLock()

    def exclusive(self) -> threading.RLock:
        """A context in which no other thread reserves or releases blocks (the manager's own
        lock, re-entrant): for reads and allocations that must see the same free blocks."""
        return self._lock

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free or cached-but-unused)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @_locked
    def set_cache_listener(self, listener: CacheListener | None) -> None:
        """Send prefix-cache changes to `listener` (None: to nobody). It first hears, at once,
        every hash cached now, so that it can mirror the cache exactly from then on."""
        self.cache_listener = listener
        self._evicted_hashes = []
        if listener is not None and self.hash_to_block:
            listener(list(self.hash_to_block), [])

    @_locked
    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """The longest run of cached blocks that starts the sequence, leaving >= 1 token to run.

        Does not take references; pass the result to `allocate_slots`.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = seq.full_block_hashes(self.block_size)[:max_blocks]
        block_ids: list[int] = []
        for block_hash in hashes:
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        self.num_prefix_queries += len(hashes)
        self.num_prefix_hits += len(block_ids)
        return block_ids

    @_locked
    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed_block_ids: list[int] | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more KV entries of `seq`; False (no change) if it can't.

        `computed_block_ids`, given on a sequence's first allocation, are prefix-cache hits that
        become the head of its block table, and `num_computed_tokens` advances over them.
        """
        computed = computed_block_ids or []
        assert not computed or not seq.block_ids, "prefix hits only on a fresh sequence"
        num_tokens_after = seq.num_computed_tokens + len(computed) * self.block_size
        num_tokens_after += num_new_tokens
        num_needed = self.num_blocks_for(num_tokens_after) - len(seq.block_ids) - len(computed)
        num_computed_free = sum(1 for b in computed if self.ref_counts[b] == 0)
        if num_needed > self.num_free_blocks - num_computed_free:
            return False
        for block_id in computed:
            self._take(block_id)
        seq.block_ids.extend(computed)
        seq.num_computed_tokens += len(computed) * self.block_size
        for _ in range(max(num_needed, 0)):
            seq.block_ids.append(self._allocate_fresh())
        self._emit_evictions()
        return True

    @_locked
    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        start = seq.num_registered_blocks
        if num_full <= start:
            return  # nothing new since the last call (most decode steps)
        hashes = seq.full_block_hashes(self.block_size)
        added: list[BlockHash] = []
        leading = True  # every block before this one is registered
        for index in range(start, num_full):
            block_id, block_hash = seq.block_ids[index], hashes[index]
            if self.block_hashes[block_id] is None and block_hash not in self.hash_to_block:
                self.block_hashes[block_id] = block_hash
                self.hash_to_block[block_hash] = block_id
                added.append(block_hash)
            # else: registered already, or computed twice concurrently (the first one stays
            # cached, this one private: checked again next time, it may take over)
            leading = leading and self.block_hashes[block_id] is not None
            if leading:
                seq.num_registered_blocks = index + 1
        if added and self.cache_listener is not None:
            self.cache_listener(added, [])

    @_locked
    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; its blocks become free (or cached) at ref 0."""
        for block_id in reversed(seq.block_ids):
            self._drop(block_id)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    @_locked
    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-unused block (in-use blocks keep their hashes)."""
        for block_id in self.free_queue:
            self._evict(block_id)
        self._emit_evictions()

    # -- holds: KV in flight between workers ------------------------------------------------

    @_locked
    def hold(self, owner: str, block_ids: Iterable[int]) -> None:
        """Take one reference on each block for `owner` (a sender pinning the KV it ships): the
        blocks keep their contents, whatever happens to the sequence that computed them, until
        `release(owner)`. Raises ValueError for an owner that already holds blocks, a repeated
        block or one out of range (nothing taken then)."""
        ids = list(block_ids)
        self._check_new_owner(owner)
        if len(set(ids)) != len(ids):
            raise ValueError(f"hold({owner!r}): repeated block ids")
        bad = [b for b in ids if not (type(b) is int and 0 <= b < self.num_blocks)]
        if bad:
            raise ValueError(f"hold({owner!r}): block ids {bad[:4]} not in [0, {self.num_blocks})")
        for block_id in ids:
            self._take(block_id)
        self.holds[owner] = ids

    @_locked
    def hold_cached(self, owner: str, block_hashes: list[BlockHash]) -> list[int] | None:
        """Hold, for `owner`, the cached blocks of `block_hashes` (a prefix of a sequence whose
        later blocks will arrive from another worker); None, taking nothing, unless every one
        of them is cached now. Raises ValueError for an owner that already holds blocks."""
        self._check_new_owner(owner)
        if not self.enable_prefix_caching:
            return None
        block_ids = [self.hash_to_block.get(block_hash) for block_hash in block_hashes]
        if any(block_id is None for block_id in block_ids):
            return None
        ids = [b for b in block_ids if b is not None]
        self.hold(owner, ids)
        return ids

    @_locked
    def reserve(self, owner: str, num_blocks: int) -> list[int] | None:
        """Allocate `num_blocks` fresh blocks held by `owner` (a receiver's destination for
        incoming KV); None, changing nothing, if fewer are free. Raises ValueError for an owner
        that already holds blocks or a count < 1."""
        self._check_new_owner(owner)
        if type(num_blocks) is not int or num_blocks < 1:
            raise ValueError(f"reserve({owner!r}): num_blocks={num_blocks!r} must be >= 1")
        if num_blocks > self.num_free_blocks:
            return None
        ids = [self._allocate_fresh() for _ in range(num_blocks)]
        self.holds[owner] = ids
        self._emit_evictions()
        return ids

    @_locked
    def reserve_staged(self, owner: str, num_blocks: int) -> list[int] | None:
        """`reserve` and as many staging blocks for `owner` (a receiver's destination under
        private-KV tensor parallelism), both or neither: the staging ids, or None, changing
        nothing (no cached block evicted), if either kind is short, a transfer larger than
        the whole staging region included. Raises ValueError as `reserve` does."""
        assert self.transfer_region is not None, "reserve_staged needs a staging region"
        self._check_new_owner(owner)
        if type(num_blocks) is not int or num_blocks < 1:
            raise ValueError(f"reserve({owner!r}): num_blocks={num_blocks!r} must be >= 1")
        if num_blocks > min(self.transfer_region.num_blocks, self.num_free_blocks):
            return None
        # staging first: its shortage evicts no cached block
        staged = self.transfer_region.allocate(owner, num_blocks)
        if staged is None:
            return None
        reserved = self.reserve(owner, num_blocks)
        assert reserved is not None, "free blocks were counted under the lock"
        return staged

    @_locked
    def split_hold(self, owner: str, new_owner: str, num_dropped: int) -> list[int] | None:
        """Pass `owner`'s blocks after its first `num_dropped` (and their staging blocks, if it
        holds staging) to `new_owner`, dropping the first ones (a transfer that ships only a
        suffix of its kept KV): the new owner's staging ids ([] without staging), or None,
        changing nothing, if `owner` holds no blocks (released meanwhile). Raises ValueError
        for a `new_owner` that holds blocks already or a bad count."""
        ids = self.holds.get(owner)
        if ids is None:
            return None
        if type(num_dropped) is not int or not 0 <= num_dropped <= len(ids):
            raise ValueError(
                f"split_hold({owner!r}): num_dropped={num_dropped!r} must be in [0, {len(ids)}]"
            )
        staged = None if self.transfer_region is None else self.transfer_region.ids_of(owner)
        self.hold(new_owner, ids[num_dropped:])
        if staged is not None:
            assert self.transfer_region is not None
            self.transfer_region.keep_tail(owner, new_owner, num_dropped)
        self.release(owner)
        return [] if staged is None else staged[num_dropped:]

    @_locked
    def release(self, owner: str) -> bool:
        """Drop `owner`'s references (its blocks become free or cached at ref 0) and free its
        staging blocks. Idempotent: False if it holds nothing, e.g. released already or
        adopted."""
        ids = self.holds.pop(owner, None)
        if self.transfer_region is not None:
            self.transfer_region.free(owner)
        if ids is None:
            return False
        for block_id in reversed(ids):
            self._drop(block_id)
        return True

    @_locked
    def adopt(
        self, owner: str, seq: Sequence, num_computed_tokens: int, prefix_owner: str | None = None
    ) -> None:
        """Make `owner`'s blocks the block table of `seq`, a sequence without blocks, whose first
        `num_computed_tokens` tokens' KV they hold (a completed transfer joining the decode
        batch); with `prefix_owner`, its blocks (`hold_cached`) come first and `owner`'s after
        them. The references pass from the owners to the sequence. Raises ValueError if an
        owner holds nothing, `seq` has blocks, or the blocks cannot hold that many tokens."""
        ids = self.holds.get(owner)
        if ids is None:
            raise ValueError(f"adopt({owner!r}): holds no blocks (released, or never held)")
        if prefix_owner is not None:
            prefix = self.holds.get(prefix_owner)
            if prefix is None:
                raise ValueError(f"adopt({prefix_owner!r}): holds no blocks for the prefix")
            ids = prefix + ids
        if seq.block_ids or seq.num_computed_tokens:
            raise ValueError(f"adopt({owner!r}): {seq} already has blocks")
        if not 0 < num_computed_tokens <= min(len(ids) * self.block_size, seq.num_tokens):
            raise ValueError(
                f"adopt({owner!r}): {num_computed_tokens} computed tokens do not fit "
                f"{len(ids)} blocks of {self.block_size} and {seq.num_tokens} tokens"
            )
        if self.transfer_region is not None:
            assert self.transfer_region.ids_of(owner) is None, f"{owner!r} adopted while staged"
        del self.holds[owner]
        if prefix_owner is not None:
            del self.holds[prefix_owner]
        seq.block_ids = ids
        seq.num_computed_tokens = num_computed_tokens
        seq.num_registered_blocks = 0

    def _check_new_owner(self, owner: str) -> None:
        if not isinstance(owner, str) or not owner:
            raise ValueError(f"owner={owner!r} must be a non-empty str")
        if owner in self.holds:
            raise ValueError(f"{owner!r} already holds blocks")

    def _drop(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
        if self.ref_counts[block_id] == 0:
            self.free_queue[block_id] = None

    def _take(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_queue[block_id]
        self.ref_counts[block_id] += 1

    def _allocate_fresh(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        self._evict(block_id)
        self.ref_counts[block_id] = 1
        return block_id

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            del self.hash_to_block[block_hash]
            self.block_hashes[block_id] = None
            if self.cache_listener is not None:
                self._evicted_hashes.append(block_hash)

    def _emit_evictions(self) -> None:
        if self._evicted_hashes and self.cache_listener is not None:
            removed, self._evicted_hashes = self._evicted_hashes, []
            self.cache_listener([], removed)

    @_locked
    def check_integrity(
        self, live_sequences: list[Sequence] | None = None, holders: Collection[str] = ()
    ) -> None:
        """Assert the bookkeeping is consistent; with `live_sequences`, that refs match them
        and the holds, and that exactly `holders` hold blocks (any other hold is a leak).

        Called by tests after every scenario, faults included: at rest (no live sequences, no
        holders) every block must be free or cached.
        """
        for block_id, ref in enumerate(self.ref_counts):
            assert ref >= 0, f"block {block_id} has negative ref count {ref}"
            assert (ref == 0) == (block_id in self.free_queue), (
                f"block {block_id}: ref_count {ref} but in_free_queue={block_id in self.free_queue}"
            )
        for block_hash, block_id in self.hash_to_block.items():
            assert self.block_hashes[block_id] == block_hash, f"hash map stale at block {block_id}"
        num_hashed = sum(h is not None for h in self.block_hashes)
        assert num_hashed == len(self.hash_to_block), "a hashed block is missing from the map"
        if self.transfer_region is not None:
            self.transfer_region.check_integrity(self.holds)
        if live_sequences is None:
            return
        leaked = sorted(set(self.holds) - set(holders))
        assert not leaked, f"blocks held by unexpected owners (leaked): {leaked[:8]}"
        expected = [0] * self.num_blocks
        for block_ids in [seq.block_ids for seq in live_sequences] + list(self.holds.values()):
            for block_id in block_ids:
                expected[block_id] += 1
        assert expected == self.ref_counts, "ref counts do not match the live tables and holds"
