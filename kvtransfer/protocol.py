"""What both ends of the transfer protocol share: TransferConfig, TransferResult and its status,
TransferMetrics, payload tags derived from transfer ids (`transfer_tag`), and when a receiver
posts chunks ahead of their headers (`posts_ahead`). KVSender and KVReceiver implement the
ownership rules (who frees which blocks when, so nothing leaks and nothing is freed twice),
written out in docs/kvtransfer.md.
"""

from __future__ import annotations

import enum
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kvtransfer.channel import MAX_POSTED
from kvtransfer.chunking import PIPELINE_PART_BYTES

_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """Timing of the protocol (one per worker)."""

    lease_s: float = 30.0  # sender: how long blocks stay pinned after Done without an Ack
    ready_timeout_s: float = 10.0  # sender: Offer -> Ready (or Abort)
    stall_timeout_s: float = 30.0  # either side: the longest wait for the next payload
    done_timeout_s: float = 10.0  # receiver: last chunk -> Done
    poll_interval_s: float = 0.05  # how often the control threads check deadlines
    checksum: bool = True  # CRC-32 of the payload (CPU tensors only; 0 = not computed); a
    # receiver with it off acks on the last chunk's arrival, without waiting for Done
    max_finished: int = 4096  # finished transfers remembered for duplicate/late messages
    part_bytes: int = PIPELINE_PART_BYTES  # sender: pipelined parts of a chunk (the receiver
    # follows the sizes announced in each payload's header)
    direct_receive: bool = False  # sender: when the destination blocks form at most
    # MAX_DIRECT_RUNS runs, send each chunk as slices that land in them directly (no staging
    # or scatter on the receiver; coalesce.DirectPlan); the receiver follows the header
    receive_ahead: int = 2  # receiver: chunks of an overlapped transfer posted before their
    # headers arrive (see posts_ahead), each holding a staging lease until it is in
    copy_programs: int | None = None  # gathers and scatters on CUDA with this many
    # persistent programs (engine.kernels.block_copy: leaves SMs to NCCL's kernel of the
    # neighbouring part); None: torch's copies over the whole GPU

    def __post_init__(self) -> None:
        for name in ("lease_s", "ready_timeout_s", "stall_timeout_s", "done_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name}={value!r} must be a positive finite number")
        if not 0 < self.poll_interval_s <= 1:
            raise ValueError(f"poll_interval_s={self.poll_interval_s!r} must be in (0, 1]")
        if type(self.max_finished) is not int or self.max_finished < 1:
            raise ValueError(f"max_finished={self.max_finished!r} must be an int >= 1")
        if type(self.part_bytes) is not int or self.part_bytes < 1:
            raise ValueError(f"part_bytes={self.part_bytes!r} must be an int >= 1")
        if type(self.receive_ahead) is not int or not 1 <= self.receive_ahead <= MAX_POSTED:
            raise ValueError(f"receive_ahead={self.receive_ahead!r} must be in [1, {MAX_POSTED}]")
        if self.copy_programs is not None and (
            type(self.copy_programs) is not int or self.copy_programs < 1
        ):
            raise ValueError(f"copy_programs={self.copy_programs!r} must be None or an int >= 1")


def posts_ahead(num_chunks: int, first_chunk_parts: int, direct: bool) -> bool:
    """Whether the receiver posts chunks 1.. of a transfer ahead of their headers (so the
    sender must send all of them, VOID once stopped): several chunks, and chunk 0 went as one
    staged part. Both ends decide from chunk 0 (the receiver from its header), so they agree;
    only chunks no larger than chunk 0 follow it, so they go as one part too."""
    return num_chunks > 1 and first_chunk_parts == 1 and not direct


class TransferStatus(enum.Enum):
    COMPLETED = "completed"  # sender: acknowledged; receiver: KV in reserved blocks, verified
    FAILED = "failed"  # rejected, timed out, broken pair, bad checksum, ...
    ABORTED = "aborted"  # ended by this side's abort() or the peer's TransferAbort
    LEASE_EXPIRED = "lease_expired"  # sender: no Ack within the lease; blocks unpinned


@dataclass(frozen=True, slots=True)
class TransferResult:
    transfer_id: str
    request_id: str
    status: TransferStatus
    reason: str = ""
    num_bytes: int = 0
    seconds: float = 0.0  # offer to end
    # when each step happened (time.monotonic(), comparable across processes of one host):
    # sender "offer", "staged", "ready", ("direct": sent as direct slices), "sent", "end"; receiver
    # "offer", "first_header", "data", "end"; with several chunks also per chunk i: sender
    # "ready{i}" (its layers computed, i > 0), "sent{i}"; receiver "header{i}" (i > 0, read
    # before its receive was posted) or "posted{i}" (posted ahead of its header), "in{i}"
    timeline: tuple[tuple[str, float], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status is TransferStatus.COMPLETED


@dataclass(slots=True)
class TransferMetrics:
    """Counters of one side of one or more pairs; read them any time (e.g. into Prometheus)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    transfers_completed: int = 0
    transfers_failed: int = 0  # FAILED and ABORTED
    leases_expired: int = 0
    transfer_seconds_total: float = 0.0  # of completed transfers
    # back-pressure of a bounded staging region (receiver, wait_for_room): offers that found
    # no room and waited, and offers refused for no room after waiting
    offers_deferred: int = 0
    offers_refused_for_room: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, result: TransferResult) -> None:
        with self._lock:
            if result.status is TransferStatus.COMPLETED:
                self.transfers_completed += 1
                self.transfer_seconds_total += result.seconds
            elif result.status is TransferStatus.LEASE_EXPIRED:
                self.leases_expired += 1
            else:
                self.transfers_failed += 1

    def add_bytes(self, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received

    def add_back_pressure(self, deferred: int = 0, refused_for_room: int = 0) -> None:
        with self._lock:
            self.offers_deferred += deferred
            self.offers_refused_for_room += refused_for_room

    def absorb(self, other: TransferMetrics) -> None:
        """Add another's counters to these (a pair that is gone keeps counting here)."""
        with other._lock:
            counts = (
                other.bytes_sent,
                other.bytes_received,
                other.transfers_completed,
                other.transfers_failed,
                other.leases_expired,
                other.transfer_seconds_total,
                other.offers_deferred,
                other.offers_refused_for_room,
            )
        with self._lock:
            self.bytes_sent += counts[0]
            self.bytes_received += counts[1]
            self.transfers_completed += counts[2]
            self.transfers_failed += counts[3]
            self.leases_expired += counts[4]
            self.transfer_seconds_total += counts[5]
            self.offers_deferred += counts[6]
            self.offers_refused_for_room += counts[7]


def transfer_tag(transfer_id: str) -> int:
    """The channel tag of a transfer's payloads: 63 bits of its id's BLAKE2b hash."""
    digest = hashlib.blake2b(transfer_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BoundedRecord(Generic[_K, _V]):
    """The last `capacity` finished transfers' outcomes, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[_K, _V] = OrderedDict()

    def add(self, key: _K, value: _V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, key: _K) -> _V | None:
        return self._items.get(key)
