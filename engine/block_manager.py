"""Paged KV-cache bookkeeping: which sequence owns which block, and the prefix cache.

Pure Python over block ids; the KV tensors themselves live in the model runner. Allocation
returns False for "not now" and changes nothing in that case.

    block table of a sequence (block_size = 4):
    tokens  | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .  .  |
    blocks  |     17      |      3      |     42      |   seq.block_ids = [17, 3, 42]
    hashes  |     h0      |     h1      |  (partial)  |   only full blocks are cached

A block is in exactly one of three states:
    in use   ref_count > 0 (shared prefix blocks have ref_count > 1)
    cached   ref_count == 0, has a hash, in the free queue: reusable by a prefix hit until evicted
    free     ref_count == 0, no hash, in the free queue

The free queue is in LRU order: allocation takes from its head, evicting the cached block
there; freeing appends to its tail, a sequence's last blocks first so that its first blocks,
the most shareable, are evicted last.
"""

from __future__ import annotations

from collections import OrderedDict

from engine.block_hash import BlockHash
from engine.sequence import Sequence


class BlockManager:
    """Owns the reference counts and hashes of `num_blocks` KV blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
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

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free or cached-but-unused)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

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
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        hashes = seq.full_block_hashes(self.block_size)
        for block_id, block_hash in zip(seq.block_ids[:num_full], hashes[:num_full], strict=True):
            if self.block_hashes[block_id] is not None:
                continue
            if block_hash in self.hash_to_block:
                continue  # computed twice concurrently: keep the first, this one stays private
            self.block_hashes[block_id] = block_hash
            self.hash_to_block[block_hash] = block_id

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; its blocks become free (or cached) at ref 0."""
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None
        seq.block_ids = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-unused block (in-use blocks keep their hashes)."""
        for block_id in self.free_queue:
            self._evict(block_id)

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

    def check_integrity(self, live_sequences: list[Sequence] | None = None) -> None:
        """Assert the bookkeeping is consistent; with `live_sequences`, that refs match them.

        Called by tests after every scenario, faults included: at rest (no live sequences) every
        block must be free or cached.
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
        if live_sequences is None:
            return
        expected = [0] * self.num_blocks
        for seq in live_sequences:
            for block_id in seq.block_ids:
                expected[block_id] += 1
        assert expected == self.ref_counts, "ref counts do not match the live sequences' tables"
