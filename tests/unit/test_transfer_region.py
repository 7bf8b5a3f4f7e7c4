"""The transfer staging region's bookkeeping (engine.transfer_region) and its tie to the block
manager's owners: allocation is all or nothing, `release(owner)` frees an owner's staging with
its blocks, and check_integrity finds staging that nobody's blocks account for."""

from __future__ import annotations

import threading

import pytest

from engine.block_manager import BlockManager
from engine.transfer_region import TransferRegion


def test_allocation_is_all_or_nothing_and_freeing_is_idempotent() -> None:
    staging = TransferRegion(4)
    assert staging.allocate("a", 3) == [0, 1, 2]
    assert staging.allocate("b", 2) is None, "not now: only 1 free"
    assert staging.ids_of("b") is None and staging.num_free_blocks == 1
    assert staging.free("a") and not staging.free("a")
    assert staging.allocate("b", 4) is not None
    staging.check_integrity(holders=["b"])


@pytest.mark.parametrize("count", [0, 5, "1"])
def test_a_count_outside_the_region_is_refused(count: object) -> None:
    with pytest.raises(ValueError, match=r"must be in \[1, 4\] \(the staging region's size\)"):
        TransferRegion(4).allocate("a", count)  # type: ignore[arg-type]


def test_keep_tail_passes_the_suffix_on_and_frees_the_rest() -> None:
    staging = TransferRegion(4)
    staging.allocate("a", 3)
    assert staging.keep_tail("a", "a:suffix", 1) == [1, 2]
    assert staging.ids_of("a") is None and staging.num_free_blocks == 2
    staging.check_integrity(holders=["a:suffix"])


def test_release_frees_an_owners_staging_with_its_blocks() -> None:
    staging = TransferRegion(2)
    manager = BlockManager(8, 4, transfer_region=staging)
    manager.reserve("kv-in:t", 2)
    staging.allocate("kv-in:t", 2)
    manager.check_integrity([], holders=["kv-in:t"])
    assert manager.release("kv-in:t")
    assert staging.num_free_blocks == 2
    manager.check_integrity([], holders=[])


def test_integrity_finds_staging_held_by_an_owner_without_blocks() -> None:
    staging = TransferRegion(2)
    manager = BlockManager(8, 4, transfer_region=staging)
    staging.allocate("ghost", 1)  # its blocks were released some other way: a leak
    with pytest.raises(AssertionError, match=r"owners that hold no blocks: \['ghost'\]"):
        manager.check_integrity()


def test_a_waiter_wakes_when_blocks_free() -> None:
    staging = TransferRegion(2)
    staging.allocate("a", 2)
    freer = threading.Timer(0.05, staging.free, args=("a",))
    freer.start()
    assert staging.wait_for_free(2, timeout_s=10.0)
    freer.join()
    assert not staging.wait_for_free(3, timeout_s=0.0)
