"""One KV transfer on the decode side (IncomingTransfer): its offer, the destination blocks
reserved for it, its chunks over them and how far they have landed; what a finished transfer
answers to a duplicate message (FinalAnswer); and a completed one handed to the engine
(ReceivedKV). Plain state: KVReceiver (kvtransfer.receiver) owns the locking.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvtransfer.chunking import TransferChunk, split_for_overlap
from kvtransfer.coalesce import tensor_crc32
from kvtransfer.messages import Message, TransferDone, TransferOffer
from kvtransfer.protocol import TransferResult, TransferStatus, transfer_tag


@dataclass(frozen=True, slots=True)
class ReceivedKV:
    """A completed transfer: the prompt's KV is in `block_ids`, held by `owner` until the
    engine adopts them (Engine.add_transferred_request(kv_owner=owner)) or releases them."""

    transfer_id: str
    request_id: str
    owner: str
    block_ids: tuple[int, ...]
    num_tokens: int
    completed_at: float  # time.monotonic() when the KV was in place and verified


@dataclass(eq=False)
class IncomingTransfer:
    offer: TransferOffer
    owner: str
    dst_block_ids: tuple[int, ...]
    tag: int
    chunks: tuple[TransferChunk, ...]  # over the destination blocks
    started: float
    state: str = "receiving"  # receiving -> data_done -> (ended)
    next_chunk: int = 0
    num_bytes: int = 0
    crc: int = 0
    done: TransferDone | None = None
    done_deadline: float = 0.0
    local_abort: str | None = None
    peer_abort: str | None = None
    void: bool = False  # a VOID chunk came: the sender stopped after its payload began
    timeline: list[tuple[str, float]] = field(default_factory=list)

    @classmethod
    def start(
        cls, offer: TransferOffer, owner: str, dst_block_ids: Sequence[int], num_layers: int
    ) -> IncomingTransfer:
        """A transfer whose destination blocks are reserved, its chunks over them."""
        assert offer.layers_per_chunk is not None
        incoming = cls(
            offer=offer,
            owner=owner,
            dst_block_ids=tuple(dst_block_ids),
            tag=transfer_tag(offer.transfer_id),
            chunks=split_for_overlap(dst_block_ids, num_layers, offer.layers_per_chunk),
            started=time.monotonic(),
        )
        incoming.timeline.append(("offer", incoming.started))
        return incoming

    def chunk_in(self, nbytes: int, void: bool = False) -> None:
        """The next chunk has landed (`void`: as VOID filler, the sender stopped)."""
        self.void = self.void or void
        self.num_bytes += nbytes
        if len(self.chunks) > 1:  # per-chunk steps, for overlap analysis
            self.timeline.append((f"in{self.next_chunk}", time.monotonic()))
        self.next_chunk += 1

    def posted_ahead(self, offset: int) -> None:
        """A chunk was posted ahead of its header, `offset` after the next one to land."""
        self.timeline.append((f"posted{self.next_chunk + offset}", time.monotonic()))

    def fold_crc(self, data: torch.Tensor) -> None:
        """Fold landed bytes (in the sender's staging order) into the transfer's CRC."""
        self.crc = tensor_crc32(data, self.crc)

    def mismatch(self, checks_crc: bool) -> str | None:
        """How the landed data differs from what the sender's Done announced (None: it does
        not, or no Done yet); the CRC only where this side computes one."""
        done = self.done
        if done is not None and done.num_bytes != self.num_bytes:
            return f"received {self.num_bytes} bytes, sender sent {done.num_bytes}"
        if done is not None and checks_crc and done.checksum not in (0, self.crc):
            return f"checksum {self.crc:#x} != sender's {done.checksum:#x}"
        return None

    def result(self, status: TransferStatus, reason: str) -> TransferResult:
        now = time.monotonic()
        return TransferResult(
            self.offer.transfer_id,
            self.offer.request_id,
            status,
            reason,
            self.num_bytes,
            now - self.started,
            (*self.timeline, ("end", now)),
        )

    def received(self) -> ReceivedKV:
        """The completed transfer, handed to the engine by KVReceiver.poll."""
        return ReceivedKV(
            self.offer.transfer_id,
            self.offer.request_id,
            self.owner,
            self.dst_block_ids,
            self.offer.num_tokens,
            time.monotonic(),
        )


@dataclass(frozen=True, slots=True)
class FinalAnswer:
    """What a finished transfer answers to a duplicate Offer or Done."""

    result: TransferResult
    reply: Message | None
    acked_before_done: bool = False  # the sender's Done is still to come: drop it, once
