"""How a transfer's KV is cut into messages, derived the same way on both ends: chunks of
layers (`split_for_overlap`, shipped while prefill computes later layers), parts of a chunk's
staging tensor (`pipeline_parts` on the sender, `parts_of_layers` on the receiver), and direct
plans that land a chunk straight in contiguous runs of destination blocks (`direct_plan`).
Pure planning: no tensors are copied here (kvtransfer.coalesce does that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TransferChunk:
    """One piece of a transfer: these layers of these blocks, moved as one message."""

    layer_start: int
    layer_stop: int  # exclusive
    block_ids: tuple[int, ...]

    @property
    def layers(self) -> slice:
        return slice(self.layer_start, self.layer_stop)


def split_for_overlap(
    block_ids: Sequence[int],
    num_layers: int,
    layers_per_chunk: int,
    max_blocks_per_chunk: int | None = None,
) -> tuple[TransferChunk, ...]:
    """Plan a transfer as chunks in layer-major order (all blocks of layers [0, k), then of
    [k, 2k), ...), the order in which prefill finishes them, so each chunk can be shipped
    while later layers compute. `max_blocks_per_chunk` also splits the block list, bounding
    each chunk's staging bytes.

    Sender and receiver call this with the same counts and their own block ids (same length):
    chunk i of one side pairs with chunk i of the other, their staging shapes match.
    Raises ValueError for non-positive counts or an empty block list.
    """
    _check_positive("num_layers", num_layers)
    _check_positive("layers_per_chunk", layers_per_chunk)
    if max_blocks_per_chunk is not None:
        _check_positive("max_blocks_per_chunk", max_blocks_per_chunk)
    if len(block_ids) == 0:
        raise ValueError("block_ids is empty; nothing to transfer")
    ids = tuple(int(b) for b in block_ids)
    step = max_blocks_per_chunk or len(ids)
    return tuple(
        TransferChunk(start, min(start + layers_per_chunk, num_layers), ids[i : i + step])
        for start in range(0, num_layers, layers_per_chunk)
        for i in range(0, len(ids), step)
    )


# The most contiguous runs of destination blocks a chunk may land in directly (one message per
# run, layer and K/V, all in one NCCL group): beyond it, staging and a scatter cost less than
# the extra messages. Sender and receiver must use the same value.
MAX_DIRECT_RUNS = 4


@dataclass(frozen=True, slots=True)
class DirectPlan:
    """How a chunk lands straight in the receiver's cache, with no staging there: the sender
    gathers its blocks in ascending destination order, so that every run of consecutive
    destination blocks is one contiguous slice of the staging tensor per (layer, K/V):

        dst_block_ids [9, 3, 4, 10, 5]  ->  order (1, 2, 4, 0, 3): dst 3 4 5 | 9 10
        runs ((0, 3, 3), (3, 9, 2))         staging[l, kv, 0:3] -> cache[l, kv, 3:6]
                                            staging[l, kv, 3:5] -> cache[l, kv, 9:11]
    """

    order: tuple[int, ...]  # positions in the transfer's block lists, by destination block
    runs: tuple[tuple[int, int, int], ...]  # (first position in `order`, first dst block, count)


def direct_plan(dst_block_ids: Sequence[int], max_runs: int = MAX_DIRECT_RUNS) -> DirectPlan | None:
    """The DirectPlan of a chunk going to `dst_block_ids` (distinct), or None if they form more
    than `max_runs` runs of consecutive blocks. Both ends derive it from the same ids."""
    order = tuple(sorted(range(len(dst_block_ids)), key=lambda i: dst_block_ids[i]))
    runs: list[tuple[int, int, int]] = []
    for position, i in enumerate(order):
        block = dst_block_ids[i]
        if runs and runs[-1][1] + runs[-1][2] == block:
            start, first, count = runs[-1]
            runs[-1] = (start, first, count + 1)
        elif len(runs) == max_runs:
            return None
        else:
            runs.append((position, block, 1))
    return DirectPlan(order, tuple(runs))


def direct_slices(
    tensor: torch.Tensor, plan: DirectPlan, layers: range, *, in_cache: bool
) -> list[torch.Tensor]:
    """The pieces of a direct chunk, in the order both ends post them (layer, K/V, run): of
    the staging tensor [len(layers), 2, n, ...] (in_cache=False) or of the destination cache
    (in_cache=True, `layers` its layer numbers). Each is contiguous."""
    pieces = []
    for index, layer in enumerate(layers):
        for kv in range(2):
            for start, first, count in plan.runs:
                if in_cache:
                    pieces.append(tensor[layer, kv, first : first + count])
                else:
                    pieces.append(tensor[index, kv, start : start + count])
    return pieces


# Target size of one part of a pipelined message. Measured on 2x H100 (bench.kvtransfer_nccl,
# docs/benchmarks.md): 64 MiB parts made the 256 MiB transfer slower (2.30 ms) than one part
# (1.30 ms), likely because each gather/scatter kernel fills every SM and NCCL's kernel waits
# for them. Until that is solved, only chunks over 1 GiB are split.
PIPELINE_PART_BYTES = 1 << 30


def pipeline_parts(
    num_layers: int, bytes_per_layer: int, part_bytes: int = PIPELINE_PART_BYTES
) -> tuple[slice, ...]:
    """Split a staging tensor of `num_layers` layers (dim 0) into parts of about part_bytes,
    whole layers each, as equal as possible with the last not larger: the pieces of one
    pipelined message (PairChannel.send_parts), so the gather of part i + 1 and the scatter of
    part i - 1 overlap part i on the link. Both ends derive the same parts from the same chunk.

        staging [8 layers, 2, n, ...] of 256 MiB, part_bytes 64 MiB -> [0:2] [2:4] [4:6] [6:8]

    Fewer, larger parts cost less per message (~15 us each on H100 NVLink); more, smaller
    parts leave less of the first gather and the last scatter exposed, in principle."""
    _check_positive("num_layers", num_layers)
    _check_positive("bytes_per_layer", bytes_per_layer)
    _check_positive("part_bytes", part_bytes)
    num_parts = min(num_layers, -(-num_layers * bytes_per_layer // part_bytes))
    per_part = -(-num_layers // num_parts)
    return tuple(
        slice(start, min(start + per_part, num_layers)) for start in range(0, num_layers, per_part)
    )


def parts_of_layers(num_layers: int, layers_per_part: int) -> tuple[slice, ...]:
    """Parts of `layers_per_part` whole layers (the last may have fewer): how a receiver
    splits a staging tensor to match the part size the sender's header announced."""
    _check_positive("num_layers", num_layers)
    _check_positive("layers_per_part", layers_per_part)
    return tuple(
        slice(start, min(start + layers_per_part, num_layers))
        for start in range(0, num_layers, layers_per_part)
    )


def _check_positive(name: str, value: int) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
