"""ChunkShipper: the prefill side's data path for one chunk of KV (a range of layers of a
transfer's blocks): a staging lease, its block index, a gather part by part while the channel
sends the previous part, and the lease back once the send has read it. Also the fillers a
stopped transfer owes the receiver: VOID payloads for chunks it posted ahead, or a marker.
KVSender (kvtransfer.sender) decides what to send when; this class only moves bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtransfer.channel import PairChannel
from kvtransfer.chunking import DirectPlan, TransferChunk, direct_slices, pipeline_parts
from kvtransfer.coalesce import (
    BlockIndex,
    block_index,
    gather_blocks,
    on_stream,
    staging_shape,
    tensor_crc32,
)
from kvtransfer.protocol import TransferConfig
from kvtransfer.staging import StagingLease, StagingPool, numel


@dataclass(eq=False)
class StagedChunk:
    """A chunk's staging lease while the transfer thread fills and sends it."""

    lease: StagingLease
    ids: BlockIndex
    layer_start: int
    parts: tuple[slice, ...]  # of the staging tensor's layers, one message each
    plan: DirectPlan | None = None  # staged in its order, sent as its slices
    gathered: set[int] = field(default_factory=set)  # parts already gathered
    released: bool = False


class ChunkShipper:
    """Stages and sends chunks of `kv_cache` over `channel`, on the sender's transfer thread.
    Device work runs on `stream` (None: the current one, CPU caches)."""

    def __init__(
        self,
        channel: PairChannel,
        kv_cache: torch.Tensor,
        staging: StagingPool,
        config: TransferConfig,
        stream: torch.cuda.Stream | None,
    ) -> None:
        self.channel = channel
        self.kv_cache = kv_cache
        self.config = config
        self._staging = staging
        self._stream = stream

    def stage(self, chunk: TransferChunk, plan: DirectPlan | None = None) -> StagedChunk:
        """A staging lease for `chunk`, its block index on the device and its parts. With a
        `plan`, the blocks are staged in its order, as one part, to go as direct slices.
        Waits up to stall_timeout_s for staging memory."""
        shape = staging_shape(self.kv_cache, len(chunk.block_ids), chunk.layers)
        lease = self._staging.acquire_within(shape, self.config.stall_timeout_s)
        layer_bytes = numel(shape[1:]) * self.kv_cache.element_size()
        parts = pipeline_parts(shape[0], layer_bytes, self.config.part_bytes)
        block_ids = chunk.block_ids
        if plan is not None:
            assert len(plan.order) == len(block_ids), "direct plans cover every block of a chunk"
            parts, block_ids = (slice(0, shape[0]),), tuple(block_ids[i] for i in plan.order)
        try:
            with on_stream(self._stream):
                ids = block_index(self.kv_cache, block_ids)  # once for all parts
        except BaseException:
            self._staging.release(lease)
            raise
        return StagedChunk(lease, ids, chunk.layer_start, parts, plan)

    def gather_first(self, staged: StagedChunk) -> None:
        """Queue the gather of part 0 now (on the device), ahead of the send."""
        with on_stream(self._stream):
            self._gather(staged, 0)

    def unstage(self, staged: StagedChunk) -> None:
        """Give the lease back once, after any gather still queued into it."""
        if staged.released:
            return
        staged.released = True
        if self._stream is not None and staged.gathered:
            self._stream.synchronize()  # never hand out memory a gather may still write
        self._staging.release(staged.lease)

    def send(self, staged: StagedChunk, tag: int, crc: int) -> tuple[int, int]:
        """Send a staged chunk, gathering each part as the previous one goes, and give its
        lease back: (bytes sent, `crc` extended by them where checksums are on and the cache
        is on the CPU). Raises KVTransferError if the channel fails."""
        lease = staged.lease
        views = [lease.tensor[part] for part in staged.parts]
        try:
            with on_stream(self._stream):  # NCCL's stream waits for the gathers on this one
                if staged.plan is not None:  # slices in the order the receiver posts them
                    self._gather(staged, 0)
                    layers = range(lease.tensor.shape[0])
                    self.channel.send_group(
                        direct_slices(lease.tensor, staged.plan, layers, in_cache=False),
                        tag=tag,
                        timeout_s=self.config.stall_timeout_s,
                    )
                else:
                    self.channel.send_parts(
                        views,
                        tag=tag,
                        fill=lambda index: self._gather(staged, index),
                        timeout_s=self.config.stall_timeout_s,
                    )
            if self._stream is None and self.config.checksum:
                crc = tensor_crc32(lease.tensor, crc)
        finally:
            staged.released = True  # the send waited for every gather and read
            self._staging.release(lease)
        return lease.tensor.numel() * lease.tensor.element_size(), crc

    def send_void(self, chunk: TransferChunk, tag: int) -> None:
        """Fill the place of a chunk the receiver posted ahead: zeros, flagged VOID."""
        shape = staging_shape(self.kv_cache, len(chunk.block_ids), chunk.layers)
        lease = self._staging.acquire_within(shape, self.config.stall_timeout_s)
        try:
            with on_stream(self._stream):
                lease.tensor.zero_()  # nothing of other requests' KV crosses
                self.channel.send_parts(
                    [lease.tensor], tag=tag, void=True, timeout_s=self.config.stall_timeout_s,
                )  # fmt: skip
        finally:
            self._staging.release(lease)  # the send waited for the zeroing and its read

    def send_marker(self, tag: int) -> None:
        """Tell the receiver that the payload under `tag` will not come."""
        with on_stream(self._stream):  # not the default stream, where the engine prefills
            self.channel.send_marker(tag=tag, timeout_s=self.config.stall_timeout_s)

    def _gather(self, staged: StagedChunk, index: int) -> None:
        """Gather part `index` of a staged chunk (on the current stream), once."""
        if index in staged.gathered:
            return
        part = staged.parts[index]
        layers = slice(staged.layer_start + part.start, staged.layer_start + part.stop)
        gather_blocks(
            self.kv_cache, staged.ids, staged.lease.tensor[part], layers=layers,
            num_programs=self.config.copy_programs,
        )  # fmt: skip
        staged.gathered.add(index)
