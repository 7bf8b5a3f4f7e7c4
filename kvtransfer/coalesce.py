"""Coalescing scattered KV blocks into one contiguous staging tensor, and back.

A request's KV is spread over blocks anywhere in the cache. Sending one message per block is
slow (10-70 GB/s between H100s for 128 blocks); gathering them into one buffer and sending once
reaches ~270 GB/s (docs: DESIGN.md, Hardware). So the sender gathers, the transport moves one
tensor, and the receiver scatters it into its own (different) block ids:

    kv_cache  [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
                                 |
              gather_blocks(kv_cache, [7, 2, 9], layers=slice(a, b))   one index_select, dim 2
                                 v
    staging   [b - a, 2, 3, block_size, num_kv_heads, head_dim]        contiguous
              staging[l, kv, i] == kv_cache[a + l, kv, block_ids[i]]
                                 |
              (transport: one send / one recv)
                                 v
              scatter_blocks(dst_cache, [4, 11, 0], staging, layers=slice(a, b))   index_copy_

Layer ranges let prefill ship KV per layer group while it computes the next layers
(`split_for_overlap` plans the pieces). `StagingPool` bounds the memory staging buffers take.

This module only copies memory on one device; it never talks to another process.
Argument problems (shapes, dtypes, devices, block ids) raise ValueError naming the problem.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import zlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from contracts.errors import KVTransferError

BlockIds = Sequence[int] | torch.Tensor  # host data: a list/tuple of ints or a CPU tensor
ALL_LAYERS = slice(None)
_BLOCK_DIM = 2


# ---------------------------------------------------------------------------------------------
# Gather and scatter


def staging_shape(
    kv_cache: torch.Tensor, num_blocks: int, layers: slice = ALL_LAYERS
) -> tuple[int, ...]:
    """Shape of the staging tensor for `num_blocks` blocks of the layer range `layers`:
    [num_layers_in_range, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
    _check_cache(kv_cache)
    start, stop = _layer_range(layers, kv_cache.shape[0])
    return (stop - start, 2, num_blocks, *kv_cache.shape[3:])


def gather_blocks(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: BlockIds | BlockIndex,
    out: torch.Tensor | None = None,
    *,
    layers: slice = ALL_LAYERS,
    num_programs: int | None = None,
) -> torch.Tensor:  # [num_layers_in_range, 2, len(block_ids), block_size, num_kv_heads, head_dim]
    """Copy blocks `block_ids` (in that order) of the layers in `layers` into one contiguous
    tensor: `out` if given (checked, e.g. a StagingPool view), else a new one. Returns it.
    `block_ids` may be a BlockIndex made once for several calls (pipelined parts).
    `num_programs`: copy with that many persistent programs (engine.kernels.block_copy: a
    bounded share of the GPU, so NCCL's kernel for a neighbouring part can run beside it);
    None: torch's index_select, over the whole GPU.

    Asynchronous on CUDA like any copy: order later work on the same stream or synchronize.
    Raises ValueError for a cache that is not 6-D [L, 2, ...], out-of-range block ids, an empty
    or non-contiguous layer range, or an `out` of the wrong shape, dtype, device or layout.
    """
    _check_cache(kv_cache)
    ids = block_index(kv_cache, block_ids).ids
    start, stop = _layer_range(layers, kv_cache.shape[0])
    source = kv_cache[start:stop]
    if out is None:
        out = torch.empty(staging_shape(kv_cache, len(ids), layers), dtype=kv_cache.dtype,
                          device=kv_cache.device)  # fmt: skip
    else:
        _check_staging("out", out, kv_cache, staging_shape(kv_cache, len(ids), layers))
    if not _copy_with_kernel(source, out, ids, num_programs, gather=True):
        wide_source, wide_out = _as_words(source, out)
        torch.index_select(wide_source, _BLOCK_DIM, ids, out=wide_out)
    return out


def scatter_blocks(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: BlockIds | BlockIndex,
    staging: torch.Tensor,  # [num_layers_in_range, 2, len(block_ids), block_size, ...]
    *,
    layers: slice = ALL_LAYERS,
    num_programs: int | None = None,
) -> None:
    """Write staging[:, :, i] into block block_ids[i] of the layers in `layers`, in place.
    Every other block and layer of the cache is left untouched.

    Raises ValueError like gather_blocks, and for repeated block ids (the write order of
    duplicates is undefined). `num_programs` as for gather_blocks.
    """
    _check_cache(kv_cache)
    index = block_index(kv_cache, block_ids, unique=True)
    if not index.unique:
        raise ValueError("scatter_blocks needs a BlockIndex made with unique=True")
    ids = index.ids
    _check_staging("staging", staging, kv_cache, staging_shape(kv_cache, len(ids), layers))
    start, stop = _layer_range(layers, kv_cache.shape[0])
    if not _copy_with_kernel(kv_cache[start:stop], staging, ids, num_programs, gather=False):
        wide_cache, wide_staging = _as_words(kv_cache[start:stop], staging)
        wide_cache.index_copy_(_BLOCK_DIM, ids, wide_staging)


@dataclass(frozen=True, slots=True)
class BlockIndex:
    """Checked block ids already on the cache's device (`block_index`): made once per chunk,
    used by the gathers or scatters of all its parts. Building it between the posted receive
    of one part and the next would copy ids from pageable host memory, which may wait for the
    stream and so for the part still arriving."""

    ids: torch.Tensor  # [num_ids] int64, on the cache's device
    num_blocks: int  # of the cache they index (checked against it at use)
    unique: bool  # checked to hold no repeated id (required by scatter_blocks)

    def __len__(self) -> int:
        return self.ids.numel()


def block_index(
    kv_cache: torch.Tensor, block_ids: BlockIds | BlockIndex, *, unique: bool = False
) -> BlockIndex:
    """`block_ids` checked (non-empty, 1-D, in range, no repeats if `unique`) and copied to
    the cache's device, on the current stream. A BlockIndex is returned as is once it fits
    this cache. Raises ValueError like gather_blocks."""
    num_blocks, device = kv_cache.shape[_BLOCK_DIM], kv_cache.device
    if isinstance(block_ids, BlockIndex):
        if block_ids.num_blocks != num_blocks or block_ids.ids.device != device:
            raise ValueError(
                f"BlockIndex of a {block_ids.num_blocks}-block cache on {block_ids.ids.device} "
                f"used with a {num_blocks}-block cache on {device}"
            )
        return block_ids
    ids = _block_id_tensor(block_ids, num_blocks, device, unique)
    return BlockIndex(ids, num_blocks, unique)


def _copy_with_kernel(
    cache: torch.Tensor,  # a layer range of the cache
    staging: torch.Tensor,
    ids: torch.Tensor,
    num_programs: int | None,
    *,
    gather: bool,
) -> bool:
    """Copy with engine.kernels.block_copy when asked to and the memory allows it (contiguous,
    viewable as 8-byte words, on a GPU or under Triton's interpreter); False: not done."""
    if num_programs is None or not (cache.is_contiguous() and staging.is_contiguous()):
        return False
    from engine.kernels.block_copy import copy_blocks
    from engine.kernels.launch import interpreting

    if cache.device.type != "cuda" and not interpreting():
        return False
    words = _as_words(cache, staging)
    if words[0].dtype != torch.int64:
        return False

    rows = cache.shape[0] * cache.shape[1]
    wide_cache = words[0].reshape(rows, cache.shape[_BLOCK_DIM], -1)
    wide_staging = words[1].reshape(rows, staging.shape[_BLOCK_DIM], -1)
    copy_blocks(wide_cache, wide_staging, ids, gather=gather, num_programs=num_programs)
    return True


def _as_words(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same memory viewed as int64 words when every tensor allows it (rows of a multiple of
    8 bytes, 8-byte aligned), else the tensors as they are. The copy kernels move one element
    per thread step: 8-byte words make the gather and scatter ~2x faster than bf16 elements
    (256 MiB of Llama-3-8B KV on an H100: 0.21 ms instead of 0.45 ms). Bits are unchanged."""
    if all(_viewable_as_words(t) for t in tensors):
        return tuple(t.view(torch.int64) for t in tensors)
    return tensors


def _viewable_as_words(tensor: torch.Tensor) -> bool:
    itemsize = tensor.element_size()
    return (
        tensor.dim() > 0
        and tensor.stride(-1) == 1
        and tensor.shape[-1] * itemsize % 8 == 0
        and all(stride * itemsize % 8 == 0 for stride in tensor.stride()[:-1])
        and tensor.data_ptr() % 8 == 0
    )


def on_stream(stream: torch.cuda.Stream | None) -> AbstractContextManager[object]:
    """Run the block's copies on `stream` (CUDA), or as they are (None: CPU tensors)."""
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def tensor_crc32(tensor: torch.Tensor, crc: int = 0) -> int:
    """zlib CRC-32 of a contiguous CPU tensor's bytes, continuing from `crc` (no copy)."""
    return zlib.crc32(memoryview(tensor.view(torch.uint8).numpy()), crc)  # type: ignore[arg-type]


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


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError(
            f"kv_cache shape {tuple(kv_cache.shape)} is not "
            "[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]"
        )


def _layer_range(layers: slice, num_layers: int) -> tuple[int, int]:
    """(start, stop) of a non-empty, step-1 layer slice within [0, num_layers)."""
    if not isinstance(layers, slice):
        raise ValueError(f"layers={layers!r} must be a slice")
    start, stop, step = layers.indices(num_layers)
    if step != 1 or stop <= start:
        raise ValueError(
            f"layers={layers} selects no contiguous layer range of the {num_layers} layers"
        )
    return start, stop


def _block_id_tensor(
    block_ids: BlockIds, num_blocks: int, device: torch.device, unique: bool = False
) -> torch.Tensor:
    """block_ids as int64 on `device`, checked on the host: non-empty, 1-D, in [0, num_blocks)."""
    if isinstance(block_ids, torch.Tensor) and block_ids.device.type != "cpu":
        raise ValueError(f"block_ids must be host data, got a tensor on {block_ids.device}")
    ids = torch.as_tensor(block_ids, dtype=torch.int64)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"block_ids must be a non-empty 1-D list, got shape {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_blocks:
        bad = low if low < 0 else high
        raise ValueError(f"block id {bad} out of range: the cache has {num_blocks} blocks")
    if unique and ids.unique().numel() != ids.numel():
        raise ValueError(f"block_ids repeat an id: {ids.tolist()}")
    # Not pinned: pinning a new host block (cudaHostAlloc) may wait for the whole device, e.g.
    # for a prefill running beside the transfer; a pageable copy waits for this stream at most.
    return ids.to(device, non_blocking=True)


def _check_staging(
    name: str, staging: torch.Tensor, kv_cache: torch.Tensor, shape: tuple[int, ...]
) -> None:
    if tuple(staging.shape) != shape:
        raise ValueError(f"{name} shape {tuple(staging.shape)} != expected {shape}")
    if staging.dtype != kv_cache.dtype:
        raise ValueError(f"{name} dtype {staging.dtype} != kv_cache dtype {kv_cache.dtype}")
    if staging.device != kv_cache.device:
        raise ValueError(f"{name} is on {staging.device}, kv_cache on {kv_cache.device}")
    if not staging.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


# ---------------------------------------------------------------------------------------------
# Staging buffers


@dataclass(frozen=True, slots=True)
class StagingLease:
    """A staging view handed out by a StagingPool; give it back with `StagingPool.release`."""

    tensor: torch.Tensor  # the requested shape, a view of the front of one pool buffer
    buffer_id: int


class StagingPool:
    """Reusable staging buffers for one (device, dtype), holding at most `capacity_bytes`.

        buffers (flat, each rounded up to granularity_bytes; reused best-fit)
        +---------------------------+   +----------------+   +--------+
        | lease: view [L,2,n,bs,h,d] |   | free           |   | lease  |
        +---------------------------+   +----------------+   +--------+
        <---------------- allocated_bytes <= capacity_bytes ---------------->

    A staging tensor of n blocks over L layers costs n * L * 2 * block_size * num_kv_heads *
    head_dim * itemsize bytes (Llama-3-8B bf16, block 16: 64 KiB per block and layer, so 2 MiB
    per block over all 32 layers). A sending pair holds one lease at a time (its transfer
    thread gathers, sends, releases), a receiving pair up to TransferConfig.receive_ahead + 1
    (chunks posted ahead); the pool's memory is at most capacity_bytes whatever the number of
    pairs; `split_for_overlap` keeps one chunk under a budget.

    `acquire` returns None ("can't now") when granting would exceed the capacity: the caller
    retries after a release or splits the transfer finer. Idle buffers are dropped, largest
    first, to make room. On CUDA, dropped memory goes back to torch's caching allocator, which
    may keep it cached. Thread-safe: transfer threads of several pairs share one pool.
    """

    def __init__(
        self,
        capacity_bytes: int,
        device: torch.device | str,
        dtype: torch.dtype,
        granularity_bytes: int = 1 << 20,
    ) -> None:
        _check_positive("capacity_bytes", capacity_bytes)
        _check_positive("granularity_bytes", granularity_bytes)
        self.capacity_bytes = capacity_bytes
        self.device = torch.device(device)
        self.dtype = dtype
        self.granularity_bytes = granularity_bytes
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self._lock = threading.Lock()
        self._buffers: dict[int, torch.Tensor] = {}  # buffer id -> flat [numel] tensor
        self._free_ids: set[int] = set()
        self._next_id = 0

    @property
    def allocated_bytes(self) -> int:
        """Bytes held by the pool's buffers, leased or idle."""
        with self._lock:
            return self._allocated_bytes()

    @property
    def leased_bytes(self) -> int:
        """Bytes of the buffers currently leased out."""
        with self._lock:
            leased = self._buffers.keys() - self._free_ids
            return sum(self._nbytes(self._buffers[i]) for i in leased)

    def acquire(self, shape: Sequence[int]) -> StagingLease | None:
        """A lease on a contiguous `shape` staging view, or None if it cannot fit now.
        The view's contents are undefined. Raises ValueError for a request larger than the
        whole capacity (it could never be granted)."""
        num_elements = numel(shape)
        need_bytes = self._round_up(num_elements * self._itemsize)
        if need_bytes > self.capacity_bytes:
            raise ValueError(
                f"staging of shape {tuple(shape)} needs {need_bytes} bytes, over the pool's "
                f"capacity_bytes={self.capacity_bytes}; split the transfer (split_for_overlap)"
            )
        with self._lock:
            buffer_id = self._best_fit(num_elements)
            if buffer_id is None:
                buffer_id = self._allocate(need_bytes)
            if buffer_id is None:
                return None
            self._free_ids.discard(buffer_id)
            view = self._buffers[buffer_id][:num_elements].view(tuple(shape))
            return StagingLease(tensor=view, buffer_id=buffer_id)

    def acquire_within(self, shape: Sequence[int], timeout_s: float) -> StagingLease:
        """`acquire`, retrying as leases come back, for up to timeout_s. Raises
        KVTransferError if no room opens in time (the pool is stuck: a stalled transfer)."""
        deadline = time.monotonic() + timeout_s
        while (lease := self.acquire(shape)) is None:
            if time.monotonic() > deadline:
                raise KVTransferError(f"no staging memory for {tuple(shape)} within {timeout_s} s")
            time.sleep(0.001)
        return lease

    def release(self, lease: StagingLease) -> None:
        """Return a lease; its view must no longer be used (on CUDA: after the work that reads
        or writes it is complete). Raises ValueError for a lease that is not out."""
        with self._lock:
            if lease.buffer_id not in self._buffers or lease.buffer_id in self._free_ids:
                raise ValueError(f"staging buffer {lease.buffer_id} is not leased from this pool")
            self._free_ids.add(lease.buffer_id)

    def _best_fit(self, numel: int) -> int | None:
        """The smallest idle buffer of at least numel elements."""
        fitting = [i for i in self._free_ids if self._buffers[i].numel() >= numel]
        return min(fitting, key=lambda i: self._buffers[i].numel(), default=None)

    def _allocate(self, nbytes: int) -> int | None:
        """A new buffer of nbytes, dropping idle buffers (largest first) to stay under the cap;
        None, dropping nothing, if the leased buffers alone leave no room."""
        idle = sorted(self._free_ids, key=lambda i: self._buffers[i].numel(), reverse=True)
        idle_bytes = sum(self._nbytes(self._buffers[i]) for i in idle)
        if self._allocated_bytes() - idle_bytes + nbytes > self.capacity_bytes:
            return None
        while self._allocated_bytes() + nbytes > self.capacity_bytes:
            buffer_id = idle.pop(0)
            self._free_ids.discard(buffer_id)
            del self._buffers[buffer_id]
        buffer_id, self._next_id = self._next_id, self._next_id + 1
        numel = nbytes // self._itemsize
        self._buffers[buffer_id] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buffer_id

    def _allocated_bytes(self) -> int:
        return sum(self._nbytes(b) for b in self._buffers.values())

    def _nbytes(self, buffer: torch.Tensor) -> int:
        return buffer.numel() * self._itemsize

    def _round_up(self, nbytes: int) -> int:
        unit = math.lcm(self.granularity_bytes, self._itemsize)
        return max(unit, -(-nbytes // unit) * unit)


def numel(shape: Sequence[int]) -> int:
    """Elements of a tensor of `shape`."""
    numel = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise ValueError(f"shape {tuple(shape)} must hold non-negative ints")
        numel *= dim
    return numel
