"""ChunkLander: the decode side's data path for chunks of KV arriving on a pair channel. A
chunk lands in the transfer's reserved cache blocks one of three ways: into a staging lease
and scattered part by part as it arrives, as direct slices straight into a contiguous run of
blocks, or posted ahead of its header (a window of receives, each scattered as it lands).
Staging a receive may still write stays held until the channel has settled. KVReceiver
(kvtransfer.receiver) decides which transfer a payload belongs to; this class only lands bytes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from contracts.errors import KVTransferError
from kvtransfer.backend import PostedReceive
from kvtransfer.channel import PairChannel
from kvtransfer.chunking import TransferChunk, direct_plan, direct_slices, parts_of_layers
from kvtransfer.coalesce import BlockIndex, block_index, on_stream, scatter_blocks, staging_shape
from kvtransfer.protocol import TransferConfig
from kvtransfer.staging import StagingLease, StagingPool, numel

logger = logging.getLogger(__name__)

OnData = Callable[[torch.Tensor], object]  # sees landed bytes (sender's staging order)
OnLanded = Callable[[int, bool], object]  # (bytes, VOID) of a chunk landed ahead
OnPosted = Callable[[int], object]  # a chunk was posted: its place among those not landed


class _Ahead(NamedTuple):
    """A chunk posted ahead; its block index stays alive until it landed, since the scatter
    queued on the device reads it."""

    lease: StagingLease
    posted: PostedReceive
    nbytes: int
    ids: BlockIndex


class ChunkLander:
    """Lands chunks into `kv_cache` from `channel`, on the receiver's data thread. Device work
    runs on `stream` (None: the current one, CPU caches)."""

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
        self._held: list[StagingLease] = []  # staging a receive in flight may write

    def settle(self, timeout_s: float, num_reservations: int) -> bool:
        """After the pair failed: wait up to timeout_s until no receive or scatter queued on
        the device can still write, then give back every held lease and return True. Else
        keep them (a leak, logged with the `num_reservations` the caller keeps too) rather
        than hand out memory a late scatter may write, and return False."""
        if not self.channel.settle(timeout_s):
            logger.error(
                "KV receiver: device work of the failed pair did not settle within %s s; "
                "keeping %d reservations and %d staging buffers",
                timeout_s, num_reservations, len(self._held),
            )  # fmt: skip
            return False
        for lease in self._held:
            self._staging.release(lease)
        self._held.clear()
        return True

    def receive_staged(
        self,
        tid: str,
        chunk: TransferChunk,
        shape: tuple[int, ...],
        layer_bytes: int,
        on_data: OnData | None,
    ) -> None:
        """Receive the announced payload into a staging lease and scatter it into the chunk's
        blocks, part by part as the sender split it (its header says how)."""
        lease = self._staging.acquire_within(shape, self.config.stall_timeout_s)
        # the sender's split, as its header announced it (whole layers per part)
        parts = parts_of_layers(shape[0], max(1, self.channel.pending_part_nbytes // layer_bytes))
        views = [lease.tensor[part] for part in parts]

        def drain(index: int) -> None:  # scatter part `index`, ordered after its receive
            start = chunk.layer_start + parts[index].start
            part_layers = slice(start, chunk.layer_start + parts[index].stop)
            scatter_blocks(
                self.kv_cache, ids, views[index], layers=part_layers,
                num_programs=self.config.copy_programs,
            )  # fmt: skip

        self._held.append(lease)
        try:
            with on_stream(self._stream):
                ids = block_index(self.kv_cache, chunk.block_ids, unique=True)  # before posting
                # returns once the scatters are complete: the blocks are written before anyone
                # is told
                self.channel.recv_payload_parts(
                    views, drain=drain, timeout_s=self.config.stall_timeout_s
                )
            if on_data is not None:
                on_data(lease.tensor)
        except ValueError as e:  # the sender split the payload differently: out of step
            raise KVTransferError(f"transfer {tid}: {e}") from e
        self._unhold(lease)  # on failure: held until the channel settles (settle)

    def receive_direct(self, tid: str, chunk: TransferChunk, on_data: OnData | None) -> None:
        """Receive the announced payload, sent as direct slices (coalesce.DirectPlan), straight
        into the chunk's blocks."""
        plan = direct_plan(chunk.block_ids)
        if plan is None:
            raise KVTransferError(f"transfer {tid}: direct slices, but the blocks do not allow it")
        layers = range(chunk.layer_start, chunk.layer_stop)
        pieces = direct_slices(self.kv_cache, plan, layers, in_cache=True)
        try:
            with on_stream(self._stream):  # returns once the data is in the blocks
                self.channel.recv_payload_group(pieces, timeout_s=self.config.stall_timeout_s)
        except ValueError as e:  # the sender planned differently: out of step
            raise KVTransferError(f"transfer {tid}: {e}") from e
        if on_data is not None:
            for piece in pieces:  # the sender's staging order
                on_data(piece)

    def receive_ahead(
        self,
        tid: str,
        tag: int,
        chunks: Sequence[TransferChunk],
        on_posted: OnPosted,
        on_landed: OnLanded,
        on_data: OnData | None,
    ) -> None:
        """Receive `chunks` with up to `receive_ahead` of them posted before their headers
        arrive (kvtransfer.protocol.posts_ahead): each into a staging lease, scattered as it
        lands, its header checked once it is in. A VOID chunk (the sender stopped) was
        scattered into the transfer's own reserved blocks, which are freed when it ends
        aborted; on_landed reports its bytes too, so that the sizes still add up."""
        window: deque[_Ahead] = deque()
        try:
            for chunk in chunks:
                if len(window) == self.config.receive_ahead:
                    self._land(window, on_landed, on_data)
                shape = staging_shape(self.kv_cache, len(chunk.block_ids), chunk.layers)
                lease = self._staging.acquire(shape)
                while lease is None and window:  # the pool is short: land one first
                    self._land(window, on_landed, on_data)
                    lease = self._staging.acquire(shape)
                if lease is None:
                    lease = self._staging.acquire_within(shape, self.config.stall_timeout_s)
                self._held.append(lease)
                with on_stream(self._stream):
                    ids = block_index(self.kv_cache, chunk.block_ids, unique=True)
                    drain = self._scatter_into(chunk, ids, lease.tensor)
                    posted = self.channel.post_recv([lease.tensor], tag=tag, drain=drain)
                nbytes = numel(shape) * self.kv_cache.element_size()
                window.append(_Ahead(lease, posted, nbytes, ids))
                on_posted(len(window) - 1)
            while window:
                self._land(window, on_landed, on_data)
        except ValueError as e:  # sizes the channel refused: out of step with the sender
            raise KVTransferError(f"transfer {tid}: {e}") from e

    def _scatter_into(
        self, chunk: TransferChunk, ids: BlockIndex, staging: torch.Tensor
    ) -> Callable[[int], object]:
        """The drain of a one-part chunk: scatter its staging tensor into its blocks."""

        def drain(index: int) -> None:
            del index  # one part
            scatter_blocks(
                self.kv_cache, ids, staging, layers=chunk.layers,
                num_programs=self.config.copy_programs,
            )  # fmt: skip

        return drain

    def _land(self, window: deque[_Ahead], on_landed: OnLanded, on_data: OnData | None) -> None:
        """Wait for the oldest chunk posted ahead; then its lease is free again. On failure
        the lease stays held until the channel has settled."""
        ahead = window[0]
        void = self.channel.wait_posted(ahead.posted, timeout_s=self.config.stall_timeout_s)
        window.popleft()
        if on_data is not None and not void:
            on_data(ahead.lease.tensor)
        self._unhold(ahead.lease)
        on_landed(ahead.nbytes, void)

    def _unhold(self, lease: StagingLease) -> None:
        """Give back a lease no receive can write any more (by identity: leases hold tensors,
        which do not compare as booleans)."""
        self._held = [held for held in self._held if held is not lease]
        self._staging.release(lease)
