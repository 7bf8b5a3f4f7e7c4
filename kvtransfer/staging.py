"""StagingPool: reusable staging buffers for one (device, dtype), bounded in bytes, shared by
the transfer threads of every pair of a worker. "Can't now" is a return value (`acquire` gives
None); `acquire_within` waits for a release up to a deadline.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from contracts.errors import KVTransferError


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


def _check_positive(name: str, value: int) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
