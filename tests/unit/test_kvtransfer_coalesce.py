"""kvtransfer.coalesce: gather/scatter round trips, layer ranges, argument checks, StagingPool."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtransfer.chunking import (
    TransferChunk,
    direct_plan,
    direct_slices,
    parts_of_layers,
    pipeline_parts,
    split_for_overlap,
)
from kvtransfer.coalesce import block_index, gather_blocks, scatter_blocks, staging_shape
from kvtransfer.staging import StagingPool

NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 3, 4, 2, 8


def make_cache(num_blocks: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM] random values."""
    generator = torch.Generator().manual_seed(seed)
    shape = (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=generator).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so comparisons are bit-exact (NaN payloads, -0.0 included)."""
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "src_ids, dst_ids",
    [([5], [0]), ([3, 1], [6, 2]), ([9, 0, 4, 7, 2, 11, 6], [1, 8, 3, 0, 5, 9, 7])],
)
def test_gather_then_scatter_moves_exactly_those_blocks(
    src_ids: list[int], dst_ids: list[int], dtype: torch.dtype
) -> None:
    src = make_cache(12, seed=1, dtype=dtype)
    dst = make_cache(10, seed=2, dtype=dtype)
    expected = dst.clone()
    for s, d in zip(src_ids, dst_ids, strict=True):
        expected[:, :, d] = src[:, :, s]

    staging = gather_blocks(src, src_ids)
    assert staging.shape == (NUM_LAYERS, 2, len(src_ids), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    assert staging.is_contiguous()
    scatter_blocks(dst, dst_ids, staging)

    assert torch.equal(bits(dst), bits(expected))


def test_gather_preserves_block_order_and_accepts_tensor_ids() -> None:
    src = make_cache(8, seed=3)
    ids = torch.tensor([6, 2, 6])  # gathering a block twice is allowed
    staging = gather_blocks(src, ids)
    for i, block_id in enumerate(ids.tolist()):
        assert torch.equal(staging[:, :, i], src[:, :, block_id])


def test_gather_into_out_uses_and_returns_it() -> None:
    src = make_cache(8, seed=4)
    out = torch.empty(staging_shape(src, 2))
    assert gather_blocks(src, [7, 1], out=out) is out
    assert torch.equal(out, src[:, :, [7, 1]])


@pytest.mark.parametrize("layers", [slice(0, 1), slice(1, 3), slice(2, None), slice(None, 2)])
def test_layer_range_moves_only_those_layers(layers: slice) -> None:
    src, dst = make_cache(6, seed=5), make_cache(6, seed=6)
    expected = dst.clone()
    expected[layers, :, [4, 0]] = src[layers, :, [1, 3]]

    staging = gather_blocks(src, [1, 3], layers=layers)
    assert staging.shape[0] == len(range(NUM_LAYERS)[layers])
    scatter_blocks(dst, [4, 0], staging, layers=layers)

    assert torch.equal(dst, expected)


def test_split_for_overlap_round_trip_equals_one_shot() -> None:
    src, dst = make_cache(9, seed=7), make_cache(9, seed=8)
    src_ids, dst_ids = [8, 0, 3, 5, 1], [2, 7, 4, 0, 6]
    expected = dst.clone()
    scatter_blocks(expected, dst_ids, gather_blocks(src, src_ids))

    src_chunks = split_for_overlap(src_ids, NUM_LAYERS, 2, max_blocks_per_chunk=2)
    dst_chunks = split_for_overlap(dst_ids, NUM_LAYERS, 2, max_blocks_per_chunk=2)
    for s, d in zip(src_chunks, dst_chunks, strict=True):
        staging = gather_blocks(src, s.block_ids, layers=s.layers)
        scatter_blocks(dst, d.block_ids, staging, layers=d.layers)

    assert torch.equal(dst, expected)


def test_split_for_overlap_is_layer_major() -> None:
    chunks = split_for_overlap([4, 9, 2], num_layers=5, layers_per_chunk=2, max_blocks_per_chunk=2)
    assert chunks == (
        TransferChunk(0, 2, (4, 9)),
        TransferChunk(0, 2, (2,)),
        TransferChunk(2, 4, (4, 9)),
        TransferChunk(2, 4, (2,)),
        TransferChunk(4, 5, (4, 9)),
        TransferChunk(4, 5, (2,)),
    )
    assert split_for_overlap([1, 2], 3, 8) == (TransferChunk(0, 3, (1, 2)),)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_layers": 0, "layers_per_chunk": 1}, "num_layers=0"),
        ({"num_layers": 2, "layers_per_chunk": 0}, "layers_per_chunk=0"),
        ({"num_layers": 2, "layers_per_chunk": 1, "max_blocks_per_chunk": -1}, "max_blocks"),
    ],
)
def test_split_for_overlap_rejects_bad_counts(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_for_overlap([1], **kwargs)
    with pytest.raises(ValueError, match="empty"):
        split_for_overlap([], 2, 1)


@pytest.mark.parametrize(
    "block_ids, message",
    [
        ([0, 12], "block id 12 out of range: the cache has 12 blocks"),
        ([-1], "block id -1 out of range"),
        ([], "non-empty"),
        ([[1, 2]], "1-D"),
    ],
)
def test_bad_block_ids_are_refused(block_ids: list[int], message: str) -> None:
    cache = make_cache(12, seed=9)
    with pytest.raises(ValueError, match=message):
        gather_blocks(cache, block_ids)
    with pytest.raises(ValueError, match=message):
        scatter_blocks(cache, block_ids, torch.empty(0))


def test_scatter_refuses_repeated_destination_ids() -> None:
    cache = make_cache(4, seed=10)
    before = cache.clone()
    with pytest.raises(ValueError, match="repeat"):
        scatter_blocks(cache, [1, 1], gather_blocks(cache, [0, 2]))
    assert torch.equal(cache, before)


@pytest.mark.parametrize(
    "staging, message",
    [
        (torch.zeros(NUM_LAYERS, 2, 3, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), "shape"),
        (torch.zeros(NUM_LAYERS, 2, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM).half(), "dtype"),
        (
            torch.zeros(NUM_LAYERS, 2, BLOCK_SIZE, 2, NUM_KV_HEADS, HEAD_DIM).transpose(2, 3),
            "contig",
        ),
        (
            torch.zeros(NUM_LAYERS, 2, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="meta"),
            "on meta",
        ),
    ],
)
def test_bad_staging_is_refused(staging: torch.Tensor, message: str) -> None:
    cache = make_cache(4, seed=11)
    with pytest.raises(ValueError, match=message):
        scatter_blocks(cache, [0, 1], staging)
    with pytest.raises(ValueError, match=message):
        gather_blocks(cache, [0, 1], out=staging)


@pytest.mark.parametrize("layers", [slice(3, 3), slice(2, 1), slice(0, 3, 2), 1])
def test_bad_layer_ranges_are_refused(layers: object) -> None:
    with pytest.raises(ValueError, match="layer"):
        gather_blocks(make_cache(4, seed=12), [0], layers=layers)  # type: ignore[arg-type]


def test_cache_of_wrong_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="num_layers, 2, num_blocks"):
        gather_blocks(torch.zeros(2, 3, 4, 4, 2), [0])


def test_block_ids_on_a_device_are_refused() -> None:
    with pytest.raises(ValueError, match="host data"):
        gather_blocks(make_cache(4, seed=13), torch.zeros(1, dtype=torch.int64, device="meta"))


# ---------------------------------------------------------------------------------------------
# StagingPool

KIB = 1024


def make_pool(capacity_bytes: int = 16 * KIB) -> StagingPool:
    """float32 buffers rounded to 1 KiB (256 elements)."""
    return StagingPool(capacity_bytes, "cpu", torch.float32, granularity_bytes=KIB)


def test_pool_hands_out_views_of_the_requested_shape() -> None:
    pool = make_pool()
    lease = pool.acquire((2, 3, 5))
    assert lease is not None
    assert lease.tensor.shape == (2, 3, 5) and lease.tensor.is_contiguous()
    assert lease.tensor.dtype == torch.float32 and lease.tensor.device.type == "cpu"
    assert pool.allocated_bytes == KIB  # 120 bytes, rounded up
    assert pool.leased_bytes == KIB


def test_pool_reuses_a_released_buffer() -> None:
    pool = make_pool()
    first = pool.acquire((512,))  # 2 KiB
    assert first is not None
    pointer = first.tensor.data_ptr()
    pool.release(first)
    second = pool.acquire((300,))  # fits the idle 2 KiB buffer
    assert second is not None
    assert second.tensor.data_ptr() == pointer
    assert pool.allocated_bytes == 2 * KIB


def test_pool_never_exceeds_its_capacity() -> None:
    pool = make_pool(capacity_bytes=4 * KIB)
    leases = [pool.acquire((256,)) for _ in range(4)]  # 4 x 1 KiB: full
    assert all(lease is not None for lease in leases)
    assert pool.acquire((1,)) is None  # can't now
    assert pool.allocated_bytes == 4 * KIB

    pool.release(leases[0])  # type: ignore[arg-type]
    assert pool.acquire((256,)) is not None  # the released buffer comes back
    assert pool.allocated_bytes <= pool.capacity_bytes


def test_pool_drops_idle_buffers_to_make_room() -> None:
    pool = make_pool(capacity_bytes=4 * KIB)
    small = [pool.acquire((256,)) for _ in range(3)]
    for lease in small:
        pool.release(lease)  # type: ignore[arg-type]
    big = pool.acquire((768,))  # 3 KiB: no idle buffer fits, so idle ones are dropped
    assert big is not None
    assert pool.allocated_bytes <= 4 * KIB


def test_pool_keeps_idle_buffers_when_dropping_would_not_help() -> None:
    pool = make_pool(capacity_bytes=4 * KIB)
    held = pool.acquire((768,))  # 3 KiB leased
    idle = pool.acquire((256,))
    assert held is not None and idle is not None
    pool.release(idle)
    assert pool.acquire((512,)) is None  # 3 KiB leased + 2 KiB > 4 KiB
    assert pool.allocated_bytes == 4 * KIB  # the idle 1 KiB buffer was kept


def test_pool_refuses_what_could_never_fit_and_bad_releases() -> None:
    pool = make_pool(capacity_bytes=4 * KIB)
    with pytest.raises(ValueError, match="capacity_bytes"):
        pool.acquire((2048,))
    lease = pool.acquire((4,))
    assert lease is not None
    pool.release(lease)
    with pytest.raises(ValueError, match="not leased"):
        pool.release(lease)
    with pytest.raises(ValueError, match="capacity_bytes=0"):
        StagingPool(0, "cpu", torch.float32)


def test_pool_views_feed_gather_and_scatter() -> None:
    src, dst = make_cache(8, seed=14), make_cache(8, seed=15)
    pool = make_pool(capacity_bytes=64 * KIB)
    lease = pool.acquire(staging_shape(src, 3, layers=slice(1, 3)))
    assert lease is not None
    gather_blocks(src, [7, 2, 5], out=lease.tensor, layers=slice(1, 3))
    scatter_blocks(dst, [0, 1, 2], lease.tensor, layers=slice(1, 3))
    pool.release(lease)
    assert torch.equal(dst[1:3, :, :3], src[1:3, :, [7, 2, 5]])


def test_pool_is_safe_across_threads() -> None:
    pool = make_pool(capacity_bytes=8 * KIB)
    errors: list[str] = []

    def churn() -> None:
        for _ in range(200):
            lease = pool.acquire((256,))
            if lease is None:
                continue
            if pool.allocated_bytes > pool.capacity_bytes:
                errors.append(f"over capacity: {pool.allocated_bytes}")
            pool.release(lease)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pool.leased_bytes == 0


@pytest.mark.parametrize(
    ("num_layers", "bytes_per_layer", "part_bytes", "expected"),
    [
        (32, 8 << 20, 64 << 20, [(0, 8), (8, 16), (16, 24), (24, 32)]),
        (7, 20 << 20, 64 << 20, [(0, 3), (3, 6), (6, 7)]),
        (30, 1 << 20, 64 << 20, [(0, 30)]),
        (2, 100 << 20, 1 << 20, [(0, 1), (1, 2)]),  # never finer than a layer
    ],
)
def test_pipeline_parts_cover_the_layers_in_equal_parts(
    num_layers: int, bytes_per_layer: int, part_bytes: int, expected: list[tuple[int, int]]
) -> None:
    parts = pipeline_parts(num_layers, bytes_per_layer, part_bytes)
    assert [(p.start, p.stop) for p in parts] == expected


@pytest.mark.parametrize(
    ("num_layers", "layers_per_part", "expected"),
    [(8, 2, [(0, 2), (2, 4), (4, 6), (6, 8)]), (7, 3, [(0, 3), (3, 6), (6, 7)]), (3, 5, [(0, 3)])],
)
def test_parts_of_layers_match_what_pipeline_parts_announced(
    num_layers: int, layers_per_part: int, expected: list[tuple[int, int]]
) -> None:
    assert [(p.start, p.stop) for p in parts_of_layers(num_layers, layers_per_part)] == expected
    sent = pipeline_parts(num_layers, 1 << 20, layers_per_part << 20)  # the sender's split
    received = parts_of_layers(num_layers, sent[0].stop - sent[0].start)  # from its part size
    assert sent == received


def test_a_block_index_is_reused_across_parts_and_checked_against_the_cache() -> None:
    src, dst = make_cache(12, seed=20), make_cache(12, seed=21)
    src_ids, dst_ids = block_index(src, [9, 2, 5]), block_index(dst, [0, 7, 3], unique=True)
    assert block_index(src, src_ids) is src_ids and len(src_ids) == 3
    for layer in range(NUM_LAYERS):  # one part per layer, the same index each time
        layers = slice(layer, layer + 1)
        scatter_blocks(dst, dst_ids, gather_blocks(src, src_ids, layers=layers), layers=layers)
    expected = make_cache(12, seed=21)
    scatter_blocks(expected, [0, 7, 3], gather_blocks(src, [9, 2, 5]))
    assert torch.equal(bits(dst), bits(expected))
    with pytest.raises(ValueError, match="unique=True"):
        scatter_blocks(dst, src_ids, gather_blocks(src, src_ids))
    with pytest.raises(ValueError, match="8-block cache"):
        gather_blocks(make_cache(8, seed=22), src_ids)


@pytest.mark.parametrize(
    ("dst_ids", "max_runs", "expected_runs"),
    [
        ([9, 3, 4, 10, 5], 4, [(0, 3, 3), (3, 9, 2)]),
        ([7, 6, 5, 4], 1, [(0, 4, 4)]),  # descending, as a released-then-reserved list comes
        ([0, 2, 4], 2, None),  # three runs, two allowed
        ([11], 1, [(0, 11, 1)]),
    ],
)
def test_direct_plan_orders_blocks_into_runs(
    dst_ids: list[int], max_runs: int, expected_runs: list[tuple[int, int, int]] | None
) -> None:
    plan = direct_plan(dst_ids, max_runs)
    if expected_runs is None:
        assert plan is None
        return
    assert plan is not None and list(plan.runs) == expected_runs
    assert [dst_ids[i] for i in plan.order] == sorted(dst_ids)


def test_direct_slices_of_the_staging_land_like_a_scatter() -> None:
    src, dst = make_cache(12, seed=40), make_cache(12, seed=41)
    src_ids, dst_ids = [5, 0, 8, 2, 11], [9, 3, 4, 10, 5]
    plan = direct_plan(dst_ids)
    assert plan is not None
    staging = gather_blocks(src, [src_ids[i] for i in plan.order], layers=slice(1, 3))
    sent = direct_slices(staging, plan, range(2), in_cache=False)
    for piece, target in zip(
        sent, direct_slices(dst, plan, range(1, 3), in_cache=True), strict=True
    ):
        assert piece.is_contiguous() and target.is_contiguous()
        target.copy_(piece)
    expected = make_cache(12, seed=41)
    scatter_blocks(
        expected, dst_ids, gather_blocks(src, src_ids, layers=slice(1, 3)), layers=slice(1, 3)
    )
    assert torch.equal(bits(dst), bits(expected))
