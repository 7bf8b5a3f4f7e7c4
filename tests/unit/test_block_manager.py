"""BlockManager alone: exact block ids on allocation and growth, all-or-nothing allocation,
shared prefix blocks and their ref counts, prefix hits that leave a token to compute, LRU
eviction order of freed blocks, cache salts, prefix caching off, resetting the cache, duplicate
computation of one block, and check_integrity catching corrupted bookkeeping."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from contracts.block_hash import root_hash
from contracts.sampling_params import SamplingParams
from engine.block_manager import BlockManager
from engine.sequence import Sequence
from tests.conftest import prompt_ids

BS = 4  # block size
MODEL = "dummy:tiny"


def make_seq(tokens: list[int], salt: str | None = None, request_id: str = "r") -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(), root_hash(MODEL, salt))


def compute(
    bm: BlockManager, seq: Sequence, num_new: int, computed: list[int] | None = None
) -> None:
    """Allocate for `num_new` tokens, mark them computed and cache the full blocks (one step)."""
    assert bm.allocate_slots(seq, num_new, computed)
    seq.num_computed_tokens += num_new
    bm.cache_computed_blocks(seq)


def prefill(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit `seq` with its prefix-cache hits and compute the rest of it; returns the hits."""
    hits = bm.get_computed_blocks(seq)
    compute(bm, seq, seq.num_tokens - len(hits) * BS, hits)
    return hits


def free_order(bm: BlockManager) -> list[int]:
    return list(bm.free_queue)


def test_fresh_allocation_takes_blocks_in_order() -> None:
    bm = BlockManager(8, BS)
    a, b = make_seq(prompt_ids(1, 10), request_id="a"), make_seq(prompt_ids(2, 5), request_id="b")
    assert bm.allocate_slots(a, 10)
    assert bm.allocate_slots(b, 5)
    assert a.block_ids == [0, 1, 2]
    assert b.block_ids == [3, 4]
    assert bm.ref_counts == [1, 1, 1, 1, 1, 0, 0, 0]
    assert free_order(bm) == [5, 6, 7]
    assert bm.num_free_blocks == 3
    assert bm.usage == pytest.approx(5 / 8)
    # Allocation alone computes nothing.
    assert a.num_computed_tokens == b.num_computed_tokens == 0
    bm.check_integrity([a, b])


def test_growth_by_one_block_at_each_boundary() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq(prompt_ids(3, 7))
    compute(bm, seq, 7)
    assert seq.block_ids == [0, 1]
    expected_blocks = {8: [0, 1], 9: [0, 1, 2], 12: [0, 1, 2], 13: [0, 1, 2, 3], 16: [0, 1, 2, 3]}
    for token in prompt_ids(4, 9):
        seq.append_token(token)
        compute(bm, seq, 1)
        if seq.num_tokens in expected_blocks:
            assert seq.block_ids == expected_blocks[seq.num_tokens], seq.num_tokens
        assert len(seq.block_ids) == bm.num_blocks_for(seq.num_tokens)
        bm.check_integrity([seq])
    assert seq.num_tokens == 16
    assert seq.block_ids == [0, 1, 2, 3]
    assert free_order(bm) == [4, 5, 6, 7]


def test_allocation_fails_without_change_when_out_of_blocks() -> None:
    bm = BlockManager(4, BS)
    a, b = make_seq(prompt_ids(5, 12), request_id="a"), make_seq(prompt_ids(6, 8), request_id="b")
    compute(bm, a, 12)
    assert a.block_ids == [0, 1, 2]
    before = (list(bm.ref_counts), free_order(bm), dict(bm.hash_to_block))
    assert not bm.allocate_slots(b, 8)
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert (list(bm.ref_counts), free_order(bm), dict(bm.hash_to_block)) == before
    # A running sequence that cannot grow keeps what it has.
    assert bm.allocate_slots(a, 4)
    assert a.block_ids == [0, 1, 2, 3]
    assert not bm.allocate_slots(a, 5)
    assert a.block_ids == [0, 1, 2, 3]
    # What fits still fits.
    assert bm.allocate_slots(b, 0)
    assert b.block_ids == []
    bm.check_integrity([a, b])


def test_allocation_counts_prefix_hits_in_the_free_queue_as_used() -> None:
    bm = BlockManager(4, BS)
    a = make_seq(prompt_ids(7, 9), request_id="a")
    compute(bm, a, 9)
    assert a.block_ids == [0, 1, 2]
    bm.free(a)
    assert free_order(bm) == [3, 2, 1, 0]
    b = make_seq(prompt_ids(7, 9)[:8] + prompt_ids(8, 12), request_id="b")
    hits = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    # 2 hits + 3 fresh blocks > 4: taking the hits out of the free queue leaves only 2.
    before = (list(bm.ref_counts), free_order(bm), dict(bm.hash_to_block))
    assert not bm.allocate_slots(b, 12, hits)
    assert (list(bm.ref_counts), free_order(bm), dict(bm.hash_to_block)) == before
    assert b.block_ids == [] and b.num_computed_tokens == 0
    # A smaller chunk fits: the hits first, then fresh blocks from the queue's head.
    assert bm.allocate_slots(b, 8, hits)
    assert b.block_ids == [0, 1, 3, 2]
    assert b.num_computed_tokens == 8
    assert bm.num_free_blocks == 0
    bm.check_integrity([b])


def test_shared_prefix_blocks_are_ref_counted() -> None:
    bm = BlockManager(8, BS)
    prefix = prompt_ids(9, 8)
    a = make_seq([*prefix, 1, 2], request_id="a")
    b = make_seq([*prefix, 3, 4, 5], request_id="b")
    assert prefill(bm, a) == []
    assert a.block_ids == [0, 1, 2]
    assert prefill(bm, b) == [0, 1]
    assert b.block_ids == [0, 1, 3]
    assert b.num_computed_tokens == 11
    assert bm.ref_counts[:4] == [2, 2, 1, 1]
    assert bm.num_prefix_hits == 2
    bm.check_integrity([a, b])
    bm.free(a)
    assert bm.ref_counts[:4] == [1, 1, 0, 1]
    assert free_order(bm) == [4, 5, 6, 7, 2]
    bm.check_integrity([b])
    bm.free(b)
    assert bm.ref_counts == [0] * 8
    # b's tail first, then the shared blocks once their last user is gone.
    assert free_order(bm) == [4, 5, 6, 7, 2, 3, 1, 0]
    bm.check_integrity([])


@pytest.mark.parametrize("num_full_blocks", [1, 2, 3])
@pytest.mark.parametrize("extra_tokens", [0, 1, 3])
def test_prefix_hit_leaves_at_least_one_token_to_compute(
    num_full_blocks: int, extra_tokens: int
) -> None:
    bm = BlockManager(16, BS)
    tokens = prompt_ids(10, num_full_blocks * BS + extra_tokens)
    a = make_seq(tokens, request_id="a")
    prefill(bm, a)
    b = make_seq(tokens, request_id="b")
    hits = bm.get_computed_blocks(b)
    expected_hits = num_full_blocks - 1 if extra_tokens == 0 else num_full_blocks
    assert hits == a.block_ids[:expected_hits]
    assert bm.allocate_slots(b, b.num_tokens - len(hits) * BS, hits)
    assert b.num_computed_tokens == expected_hits * BS
    assert b.num_tokens - b.num_computed_tokens >= 1
    assert len(b.block_ids) == bm.num_blocks_for(b.num_tokens)
    bm.check_integrity([a, b])


def test_lru_eviction_takes_tails_first_and_oldest_freed_first() -> None:
    bm = BlockManager(6, BS)
    a_tokens, b_tokens = prompt_ids(11, 12), prompt_ids(12, 12)
    a = make_seq(a_tokens, request_id="a")
    b = make_seq(b_tokens, request_id="b")
    prefill(bm, a)
    prefill(bm, b)
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [3, 4, 5])
    assert len(bm.hash_to_block) == 6
    bm.free(a)
    bm.free(b)
    assert free_order(bm) == [2, 1, 0, 5, 4, 3]
    a_hashes = list(a.block_hashes)

    c = make_seq(prompt_ids(13, 8), request_id="c")
    assert bm.allocate_slots(c, 8)
    assert c.block_ids == [2, 1]  # a's tail blocks, evicted from the cache
    assert a_hashes[2] not in bm.hash_to_block and a_hashes[1] not in bm.hash_to_block
    assert bm.hash_to_block[a_hashes[0]] == 0
    assert bm.block_hashes[1] is None and bm.block_hashes[2] is None
    bm.check_integrity([c])

    # a again: only its head block survived, so the chain breaks after one hit.
    a2 = make_seq(a_tokens, request_id="a2")
    assert bm.get_computed_blocks(a2) == [0]
    # b again: untouched, all hits but the last token's block.
    b2 = make_seq(b_tokens, request_id="b2")
    assert bm.get_computed_blocks(b2) == [3, 4]
    bm.check_integrity([c])


def test_prefix_hit_takes_a_cached_block_out_of_the_free_queue() -> None:
    bm = BlockManager(6, BS)
    tokens = prompt_ids(14, 10)
    a = make_seq(tokens, request_id="a")
    prefill(bm, a)
    bm.free(a)
    assert free_order(bm) == [3, 4, 5, 2, 1, 0]
    b = make_seq(tokens, request_id="b")
    assert prefill(bm, b) == [0, 1]
    assert bm.ref_counts[0] == bm.ref_counts[1] == 1
    assert 0 not in bm.free_queue and 1 not in bm.free_queue
    assert b.block_ids == [0, 1, 3]  # the fresh block comes from the head, not a hit
    assert free_order(bm) == [4, 5, 2]
    # Fresh allocations never hand out a block in use.
    c = make_seq(prompt_ids(15, 12), request_id="c")
    assert bm.allocate_slots(c, 12)
    assert c.block_ids == [4, 5, 2]
    assert not bm.allocate_slots(make_seq([1], request_id="d"), 1)
    bm.check_integrity([b, c])
    # Used again, the hit blocks go to the tail of the LRU order when freed.
    bm.free(c)
    bm.free(b)
    assert free_order(bm) == [2, 5, 4, 3, 1, 0]
    bm.check_integrity([])


@pytest.mark.parametrize(
    ("salt_a", "salt_b", "shared"),
    [
        (None, None, True),
        ("tenant-1", "tenant-1", True),
        ("tenant-1", "tenant-2", False),
        (None, "tenant-1", False),
    ],
)
def test_cache_salt_separates_tenants(salt_a: str | None, salt_b: str | None, shared: bool) -> None:
    bm = BlockManager(8, BS)
    tokens = prompt_ids(16, 9)
    a = make_seq(tokens, salt_a, "a")
    b = make_seq(tokens, salt_b, "b")
    prefill(bm, a)
    hits = prefill(bm, b)
    assert hits == ([0, 1] if shared else [])
    assert b.block_ids == ([0, 1, 3] if shared else [3, 4, 5])
    assert len(bm.hash_to_block) == (2 if shared else 4)
    bm.check_integrity([a, b])


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    tokens = prompt_ids(17, 9)
    a = make_seq(tokens, request_id="a")
    prefill(bm, a)
    assert bm.hash_to_block == {}
    assert bm.block_hashes == [None] * 8
    b = make_seq(tokens, request_id="b")
    assert prefill(bm, b) == []
    assert b.block_ids == [3, 4, 5]
    bm.free(a)
    bm.free(b)
    c = make_seq(tokens, request_id="c")
    assert bm.get_computed_blocks(c) == []
    assert bm.num_prefix_queries == bm.num_prefix_hits == 0
    bm.check_integrity([])


def test_reset_prefix_cache_forgets_unused_blocks_only() -> None:
    bm = BlockManager(8, BS)
    freed_tokens, live_tokens = prompt_ids(18, 9), prompt_ids(19, 9)
    freed = make_seq(freed_tokens, request_id="freed")
    live = make_seq(live_tokens, request_id="live")
    prefill(bm, freed)
    prefill(bm, live)
    bm.free(freed)
    assert len(bm.hash_to_block) == 4
    order = free_order(bm)
    bm.reset_prefix_cache()
    assert set(bm.hash_to_block.values()) == {3, 4}  # the live sequence's full blocks
    assert bm.block_hashes[0] is None and bm.block_hashes[1] is None
    assert free_order(bm) == order
    assert bm.get_computed_blocks(make_seq(freed_tokens, request_id="x")) == []
    assert bm.get_computed_blocks(make_seq(live_tokens, request_id="y")) == [3, 4]
    bm.check_integrity([live])


def test_duplicate_computation_keeps_the_first_mapping() -> None:
    bm = BlockManager(8, BS)
    tokens = prompt_ids(20, 9)
    a = make_seq(tokens, request_id="a")
    b = make_seq(tokens, request_id="b")
    # Both admitted before either is computed: both miss, both compute the same blocks.
    assert bm.get_computed_blocks(a) == []
    assert bm.get_computed_blocks(b) == []
    assert bm.allocate_slots(a, 9)
    assert bm.allocate_slots(b, 9)
    a.num_computed_tokens = b.num_computed_tokens = 9
    bm.cache_computed_blocks(a)
    bm.cache_computed_blocks(b)
    assert bm.hash_to_block == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}
    assert bm.block_hashes[3] is None and bm.block_hashes[4] is None  # b's stay private
    bm.check_integrity([a, b])
    # b's private copies come back as plain free blocks; a's stay cached and are hit.
    bm.free(b)
    bm.free(a)
    assert len(bm.hash_to_block) == 2
    c = make_seq(tokens, request_id="c")
    assert bm.get_computed_blocks(c) == [0, 1]
    bm.check_integrity([])


def test_exact_full_prompt_recomputes_its_last_block_privately() -> None:
    bm = BlockManager(8, BS)
    tokens = prompt_ids(21, 8)
    a = make_seq(tokens, request_id="a")
    prefill(bm, a)
    b = make_seq(tokens, request_id="b")
    assert prefill(bm, b) == [0]
    assert b.block_ids == [0, 2]
    # Block 2 holds the same tokens as block 1, which keeps the cache entry.
    assert b.block_hashes[1] == a.block_hashes[1]
    assert bm.hash_to_block[a.block_hashes[1]] == 1
    assert bm.block_hashes[2] is None
    bm.check_integrity([a, b])


def test_free_resets_the_sequence() -> None:
    bm = BlockManager(4, BS)
    seq = make_seq(prompt_ids(22, 6))
    prefill(bm, seq)
    bm.free(seq)
    assert seq.block_ids == [] and seq.num_computed_tokens == 0
    bm.free(seq)  # nothing left to drop
    assert bm.ref_counts == [0] * 4
    bm.check_integrity([])


def _bump_free_ref(bm: BlockManager, seq: Sequence) -> None:
    bm.ref_counts[bm.num_blocks - 1] += 1


def _bump_used_ref(bm: BlockManager, seq: Sequence) -> None:
    bm.ref_counts[seq.block_ids[0]] += 1


def _negative_ref(bm: BlockManager, seq: Sequence) -> None:
    bm.ref_counts[seq.block_ids[0]] = -1


def _drop_from_free_queue(bm: BlockManager, seq: Sequence) -> None:
    del bm.free_queue[bm.num_blocks - 1]


def _stale_hash_map(bm: BlockManager, seq: Sequence) -> None:
    bm.hash_to_block[seq.block_hashes[0]] = seq.block_ids[1]


def _hash_missing_from_map(bm: BlockManager, seq: Sequence) -> None:
    del bm.hash_to_block[seq.block_hashes[0]]


def _table_without_ref(bm: BlockManager, seq: Sequence) -> None:
    seq.block_ids.append(bm.num_blocks - 1)


@pytest.mark.parametrize(
    "corrupt",
    [
        _bump_free_ref,
        _bump_used_ref,
        _negative_ref,
        _drop_from_free_queue,
        _stale_hash_map,
        _hash_missing_from_map,
        _table_without_ref,
    ],
)
def test_check_integrity_catches_corruption(
    corrupt: Callable[[BlockManager, Sequence], None],
) -> None:
    bm = BlockManager(8, BS)
    seq = make_seq(prompt_ids(23, 10))
    prefill(bm, seq)
    bm.check_integrity([seq])
    corrupt(bm, seq)
    with pytest.raises(AssertionError):
        bm.check_integrity([seq])


def test_check_integrity_without_live_sequences_ignores_tables() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq(prompt_ids(24, 10))
    prefill(bm, seq)
    bm.ref_counts[seq.block_ids[0]] += 1  # still in use, only the count is off
    bm.check_integrity()
    with pytest.raises(AssertionError, match="ref counts"):
        bm.check_integrity([seq])


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (-1, 4)])
def test_rejects_empty_pools(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        BlockManager(num_blocks, block_size)


class EventRecorder:
    """A cache listener that records every (added, removed) call."""

    def __init__(self) -> None:
        self.events: list[tuple[list[bytes], list[bytes]]] = []

    def __call__(self, added: list[bytes], removed: list[bytes]) -> None:
        self.events.append((list(added), list(removed)))


def test_cache_events_name_exact_hashes_on_commit_and_eviction() -> None:
    bm = BlockManager(6, BS)
    events = EventRecorder()
    bm.set_cache_listener(events)
    a = make_seq(prompt_ids(11, 12), request_id="a")
    prefill(bm, a)  # 3 full blocks, committed in one call
    h = list(a.block_hashes)
    assert events.events == [(h, [])]
    bm.free(a)  # freed blocks stay cached: no event
    assert events.events == [(h, [])]
    c = make_seq(prompt_ids(13, 8), request_id="c")
    assert bm.allocate_slots(c, 8)  # free head is [3, 4, 5, 2, 1, 0]: nothing evicted yet
    assert events.events == [(h, [])]
    d = make_seq(prompt_ids(14, 6), request_id="d")
    assert bm.allocate_slots(d, 6)  # blocks 5 (free) and 2 (a's tail, evicted)
    assert events.events[1:] == [([], [h[2]])]
    assert bm.reserve("t", 2) == [1, 0]  # evicts the rest of a, in one event
    assert events.events[2:] == [([], [h[1], h[0]])]
    bm.release("t")
    bm.check_integrity([c, d])


def test_cache_events_mirror_the_cache_through_a_workload() -> None:
    bm = BlockManager(8, BS)
    events = EventRecorder()
    mirror: set[bytes] = set()

    def apply(added: list[bytes], removed: list[bytes]) -> None:
        events(added, removed)
        assert not set(added) & set(removed), "added and removed overlap in one event"
        assert not mirror & set(added), "a hash added twice"
        assert set(removed) <= mirror, "a hash removed that was never added"
        mirror.update(added)
        mirror.difference_update(removed)

    for i in range(12):
        seq = make_seq(prompt_ids(100 + i % 5, 9 + i), request_id=f"s{i}")
        prefill(bm, seq)
        bm.free(seq)
        if i == 3:
            bm.set_cache_listener(apply)  # late: first hears the whole cache
            assert events.events[0] == (list(bm.hash_to_block), [])
        assert mirror == set(bm.hash_to_block) or i < 3
    bm.reset_prefix_cache()
    assert mirror == set() == set(bm.hash_to_block)
    bm.check_integrity([])


def test_cache_events_skip_duplicates_and_stop_with_no_listener() -> None:
    bm = BlockManager(8, BS)
    events = EventRecorder()
    bm.set_cache_listener(events)
    tokens = prompt_ids(21, 8)
    a, b = make_seq(tokens, request_id="a"), make_seq(tokens, request_id="b")
    assert bm.allocate_slots(a, 8) and bm.allocate_slots(b, 8)
    a.num_computed_tokens = b.num_computed_tokens = 8
    bm.cache_computed_blocks(a)
    bm.cache_computed_blocks(b)  # same hashes, computed twice: stays private, no event
    assert events.events == [(list(a.block_hashes), [])]
    bm.set_cache_listener(None)
    bm.free(a)
    bm.free(b)
    bm.reset_prefix_cache()
    assert len(events.events) == 1
    bm.check_integrity([])


def test_cache_events_none_with_prefix_caching_off() -> None:
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    events = EventRecorder()
    bm.set_cache_listener(events)
    seq = make_seq(prompt_ids(31, 12))
    prefill(bm, seq)
    bm.free(seq)
    assert bm.allocate_slots(make_seq(prompt_ids(32, 16)), 16)
    assert events.events == []


def test_a_private_duplicate_takes_over_once_the_cached_block_is_evicted() -> None:
    """cache_computed_blocks skips the leading blocks it registered before, never a private
    duplicate: once the cached copy is evicted, the next call registers the duplicate."""
    bm = BlockManager(4, BS)
    tokens = prompt_ids(22, 8)
    a, b = make_seq(tokens, request_id="a"), make_seq(tokens, request_id="b")
    assert bm.allocate_slots(a, 8) and bm.allocate_slots(b, 8)
    a.num_computed_tokens = b.num_computed_tokens = 8
    bm.cache_computed_blocks(a)
    bm.cache_computed_blocks(b)  # private: a's blocks hold the hashes
    assert [bm.hash_to_block[h] for h in a.block_hashes] == a.block_ids
    bm.free(a)  # cached, free: evicted by the next allocations
    other = make_seq(prompt_ids(23, 8), request_id="other")
    assert bm.allocate_slots(other, 8)
    assert not bm.hash_to_block
    bm.cache_computed_blocks(b)
    assert [bm.hash_to_block[h] for h in b.block_hashes] == b.block_ids
    bm.free(b)
    bm.free(other)
    bm.check_integrity([])
