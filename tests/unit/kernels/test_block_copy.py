"""The bounded-grid block gather/scatter (engine.kernels.block_copy) through kvtransfer.coalesce:
bit-exact against torch's index_select / index_copy_, for every program count, layer range and
block set, including fewer rows than programs. On CPU under Triton's interpreter (small
shapes), on a GPU as compiled."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.block_copy import copy_blocks, copy_blocks_ref
from kvtransfer.coalesce import gather_blocks, scatter_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_cache(layers: int, blocks: int, block_size: int, heads: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = (layers, 2, blocks, block_size, heads, dim)
    return torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE)


@pytest.mark.parametrize("num_programs", [1, 3, 64])
@pytest.mark.parametrize(
    ("block_ids", "layers"),
    [([5], slice(None)), ([7, 2, 9, 0], slice(1, 3)), (list(range(11, -1, -1)), slice(2, 3))],
)
def test_gather_then_scatter_match_torch(
    num_programs: int, block_ids: list[int], layers: slice
) -> None:
    cache = random_cache(3, 12, 4, 2, 8, seed=num_programs + len(block_ids))
    ours = gather_blocks(cache, block_ids, layers=layers, num_programs=num_programs)
    theirs = gather_blocks(cache, block_ids, layers=layers)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))

    destination = random_cache(3, 12, 4, 2, 8, seed=99)
    expected = destination.clone()
    targets = [(b * 5 + 3) % 12 for b in range(len(block_ids))]  # distinct for <= 12 ids
    scatter_blocks(destination, targets, ours, layers=layers, num_programs=num_programs)
    scatter_blocks(expected, targets, theirs, layers=layers)
    assert torch.equal(destination.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize(
    ("rows", "num_cache_blocks", "words", "ids", "num_programs"),
    [
        (2, 5, 3, [4, 0, 2], 2),  # a block shorter than one tile
        (3, 7, 1029, [6, 1], 4),  # a block of one full tile and a 5-word remainder
        (1, 3, 8, [2], 8),  # more programs than rows x ids
    ],
)
def test_kernel_matches_its_reference(
    gather: bool, rows: int, num_cache_blocks: int, words: int, ids: list[int], num_programs: int
) -> None:
    """copy_blocks (the kernel) against copy_blocks_ref (torch), bit-exact, over odd shapes."""
    gen = torch.Generator().manual_seed(rows * 100 + words)
    cache = torch.randint(-(2**62), 2**62, (rows, num_cache_blocks, words), generator=gen)
    staging = torch.randint(-(2**62), 2**62, (rows, len(ids), words), generator=gen)
    cache, staging = cache.to(DEVICE), staging.to(DEVICE)
    id_tensor = torch.tensor(ids, dtype=torch.int64, device=DEVICE)
    ours_cache, ours_staging = cache.clone(), staging.clone()
    copy_blocks(ours_cache, ours_staging, id_tensor, gather=gather, num_programs=num_programs)
    copy_blocks_ref(cache, staging, id_tensor, gather=gather)

    assert torch.equal(ours_cache, cache) and torch.equal(ours_staging, staging)
    changed = staging if gather else cache[:, ids]
    assert torch.equal(changed, cache[:, ids] if gather else staging)  # the copy happened


def test_odd_block_sizes_fall_back_to_torch() -> None:
    """Blocks of 3 bf16 values are not whole 8-byte words: torch copies them, same result."""
    cache = random_cache(2, 6, 1, 1, 3, seed=4)
    ours = gather_blocks(cache, [4, 1], num_programs=2)
    assert torch.equal(ours.view(torch.int16), cache[:, :, [4, 1]].view(torch.int16))


def test_bad_arguments_are_refused() -> None:
    cache = torch.zeros(2, 4, 8, dtype=torch.int64, device=DEVICE)
    staging = torch.zeros(2, 2, 8, dtype=torch.int64, device=DEVICE)
    ids = torch.tensor([1, 3], device=DEVICE)
    with pytest.raises(ValueError, match="num_programs"):
        copy_blocks(cache, staging, ids, gather=True, num_programs=0)
    with pytest.raises(ValueError, match="staging shape"):
        copy_blocks(cache, staging[:1], ids, gather=True, num_programs=2)
    with pytest.raises(ValueError, match="int64"):
        copy_blocks(cache.float(), staging, ids, gather=True, num_programs=2)
