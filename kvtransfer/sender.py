"""The prefill side of one pair: offers pinned KV, ships it in layer chunks, keeps the lease.

    submit() --> queue --> transfer thread: Offer, wait Ready, per chunk gather + send, Done
                           control thread:  Ready / Ack / Abort in; lease expiry; late Readys

Transfers of a pair run one at a time in submission order on the transfer thread, so payloads
cross the channel in a single, agreed order; different pairs (different KVSender objects) run
in parallel. See kvtransfer.protocol for the ownership rules this class implements.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from contracts.errors import KVTransferError
from kvtransfer.channel import PairChannel
from kvtransfer.chunking import TransferChunk, direct_plan, split_for_overlap
from kvtransfer.coalesce import staging_shape
from kvtransfer.control import ControlConnection
from kvtransfer.layout import KVLayout
from kvtransfer.messages import (
    Message,
    TransferAbort,
    TransferAck,
    TransferDone,
    TransferOffer,
    TransferReady,
)
from kvtransfer.protocol import (
    BoundedRecord,
    TransferConfig,
    TransferMetrics,
    TransferResult,
    TransferStatus,
    posts_ahead,
    transfer_tag,
)
from kvtransfer.shipper import ChunkShipper, StagedChunk
from kvtransfer.staging import StagingPool, numel

logger = logging.getLogger(__name__)

ReleaseFn = Callable[[str], object]  # unpin the blocks an owner holds (BlockManager.release)


@dataclass(eq=False)
class OutgoingTransfer:
    """A handle on one submitted transfer; `wait` for its result."""

    transfer_id: str
    request_id: str
    owner: str  # holds the pinned source blocks; released exactly once by the sender
    block_ids: tuple[int, ...]
    num_tokens: int
    layers_per_chunk: int
    chunk_ready: Callable[[int], None] | None  # blocks until chunk i's layers are computed
    on_done: Callable[[TransferResult], None] | None
    tag: int = 0
    state: str = "queued"  # queued, offered, sending, awaiting_ack, done
    started: float = 0.0
    lease_deadline: float = 0.0
    num_bytes: int = 0
    ready: TransferReady | None = None
    early_ack: TransferAck | None = None  # an Ack that overtook the last send's completion
    timeline: list[tuple[str, float]] = field(default_factory=list)
    stop_reason: str | None = None  # set by abort(), the peer's Abort, or a timeout
    stop_status: TransferStatus = TransferStatus.FAILED  # ABORTED for abort() or peer's Abort
    stopped_by_peer: bool = False
    replied: threading.Event = field(default_factory=threading.Event)  # Ready or Abort came
    _done: threading.Event = field(default_factory=threading.Event)
    _result: TransferResult | None = None

    def wait(self, timeout_s: float | None = None) -> TransferResult:
        """The result, once the transfer has ended (the blocks are unpinned by then).
        Raises TimeoutError if it has not ended within timeout_s."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"transfer {self.transfer_id} still running after {timeout_s} s")
        assert self._result is not None
        return self._result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def offer(self, layout: KVLayout, lease_s: float) -> TransferOffer:
        """The Offer that announces this transfer (validates every field: ValueError)."""
        return TransferOffer(
            self.transfer_id,
            self.request_id,
            layout,
            self.num_tokens,
            self.block_ids,
            max(1, round(lease_s * 1000)),
            self.layers_per_chunk,
        )

    def conclude(self, status: TransferStatus, reason: str) -> TransferResult:
        """Record the result and wake `wait`; once, by the sender that ends the transfer."""
        now = time.monotonic()
        elapsed = now - self.started if self.started else 0.0
        self._result = TransferResult(
            self.transfer_id,
            self.request_id,
            status,
            reason,
            self.num_bytes,
            elapsed,
            (*self.timeline, ("end", now)),
        )
        self._done.set()
        return self._result


class KVSender:
    """Sends KV from `kv_cache` to the receiver at the other end of `channel` and `control`.

    The caller pins the blocks first (Engine keep_kv, or BlockManager.hold) under an owner
    name and passes it to `submit`; this object calls `release(owner)` exactly once when the
    transfer ends, whatever the ending. If the pair fails (timeout, dead peer, bad frame), every
    transfer on it fails and is released, and later submits fail at once.
    """

    def __init__(
        self,
        channel: PairChannel,
        control: ControlConnection,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        release: ReleaseFn,
        staging: StagingPool,
        config: TransferConfig | None = None,
        metrics: TransferMetrics | None = None,
    ) -> None:
        layout.check_cache(kv_cache)
        self.channel = channel
        self.control = control
        self.kv_cache = kv_cache
        self.layout = layout
        self._config = config or TransferConfig()
        self.metrics = metrics or TransferMetrics()
        self._release = release
        self._staging = staging
        self._lock = threading.Lock()
        self._live: dict[str, OutgoingTransfer] = {}
        self._finished: BoundedRecord[str, OutgoingTransfer] = BoundedRecord(
            self.config.max_finished
        )
        self._jobs: queue.Queue[OutgoingTransfer | int | None] = queue.Queue()  # int: marker tag
        self._failure: str | None = None
        stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self._shipper = ChunkShipper(channel, kv_cache, staging, self._config, stream)
        self._threads = [
            threading.Thread(target=self._transfer_loop, name="kv-send", daemon=True),
            threading.Thread(target=self._control_loop, name="kv-send-control", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- public ---------------------------------------------------------------------------------

    @property
    def config(self) -> TransferConfig:
        return self._config

    @config.setter
    def config(self, config: TransferConfig) -> None:
        """Takes effect from the next transfer the transfer thread starts (benchmarks)."""
        self._config = self._shipper.config = config

    def submit(
        self,
        request_id: str,
        owner: str,
        block_ids: Sequence[int],
        num_tokens: int,
        *,
        layers_per_chunk: int | None = None,
        chunk_ready: Callable[[int], None] | None = None,
        on_done: Callable[[TransferResult], None] | None = None,
        transfer_id: str | None = None,
    ) -> OutgoingTransfer:
        """Queue the transfer of `num_tokens` tokens of KV in `block_ids` (pinned by `owner`).

        layers_per_chunk: ship in chunks of this many layers (default: all at once);
        chunk_ready(i), if given, is called on the transfer thread before chunk i is gathered
        and must return once those layers are computed (overlap with a running prefill).
        Raises ValueError for bad arguments (the blocks stay pinned then: the caller's).
        """
        transfer = OutgoingTransfer(
            transfer_id=transfer_id or uuid.uuid4().hex,
            request_id=request_id,
            owner=owner,
            block_ids=tuple(int(b) for b in block_ids),
            num_tokens=num_tokens,
            layers_per_chunk=layers_per_chunk or self.layout.num_layers,
            chunk_ready=chunk_ready,
            on_done=on_done,
        )
        offer = self._offer(transfer)  # validates every field
        chunk_layers = slice(0, offer.layers_per_chunk)
        chunk_shape = staging_shape(self.kv_cache, len(transfer.block_ids), chunk_layers)
        chunk_bytes = self.kv_cache.element_size() * numel(chunk_shape)
        if chunk_bytes > self._staging.capacity_bytes:
            raise ValueError(
                f"a chunk of {offer.layers_per_chunk} layers x {len(transfer.block_ids)} blocks "
                f"is {chunk_bytes} bytes, over the staging capacity "
                f"{self._staging.capacity_bytes}: use fewer layers_per_chunk"
            )
        transfer.tag = transfer_tag(transfer.transfer_id)
        with self._lock:
            if transfer.transfer_id in self._live or self._finished.get(transfer.transfer_id):
                raise ValueError(f"transfer_id {transfer.transfer_id!r} already used")
            self._live[transfer.transfer_id] = transfer
            failure = self._failure
        if failure is not None:
            self._end(transfer, TransferStatus.FAILED, failure)
        else:
            self._jobs.put(transfer)
        return transfer

    def owners(self) -> list[str]:
        """Block-manager owners pinned by transfers still running (for integrity checks)."""
        with self._lock:
            return [t.owner for t in self._live.values()]

    def abort(self, transfer_id: str, reason: str = "aborted by the sender") -> bool:
        """Stop a transfer: before its payload, nothing is sent; during it, the remaining
        chunks are replaced by a marker (or by VOID filler where the receiver posted them
        ahead); after it, the pin is released now. False if unknown or already over."""
        with self._lock:
            transfer = self._live.get(transfer_id)
            if transfer is None or transfer.stop_reason is not None:
                return False
            transfer.stop_reason = reason
            transfer.stop_status = TransferStatus.ABORTED
            state = transfer.state
        transfer.replied.set()
        if state in ("queued", "awaiting_ack"):
            self._send_control(TransferAbort(transfer_id, reason[:256]))
            self._end(transfer, TransferStatus.ABORTED, reason)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Fail what is still running (releasing every pin) and stop the threads."""
        self._fail_pair("sender closed")
        self._jobs.put(None)
        self.control.close()
        self.channel.close()
        for thread in self._threads:
            thread.join(timeout_s)

    # -- transfer thread ------------------------------------------------------------------------

    def _transfer_loop(self) -> None:
        if self.kv_cache.is_cuda:  # the CUDA device is per thread
            torch.cuda.set_device(self.kv_cache.device)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if isinstance(job, int):
                    self._shipper.send_marker(job)
                else:
                    self._run(job)
            except KVTransferError as e:  # the channel or the control connection broke
                self._fail_pair(str(e))
            except Exception as e:  # a bug: fail loudly, but never leak the pins
                logger.exception("KV sender transfer thread failed")
                self._fail_pair(f"internal error: {e!r}")

    def _run(self, transfer: OutgoingTransfer) -> None:
        with self._lock:
            if transfer.state != "queued" or transfer.stop_reason is not None:
                return  # aborted while queued: ended by abort(), nothing was sent
            transfer.state = "offered"
        transfer.started = time.monotonic()
        transfer.timeline.append(("offer", transfer.started))
        self._send_control(self._offer(transfer))
        chunks = split_for_overlap(
            transfer.block_ids, self.layout.num_layers, transfer.layers_per_chunk
        )
        first = None  # direct: the staging order depends on the Ready's destination blocks
        if not self.config.direct_receive:
            first = self._stage_first(transfer, chunks[0])  # during the round trip
            transfer.timeline.append(("staged", time.monotonic()))
        try:
            self._send_when_ready(transfer, chunks, first)
        finally:
            if first is not None:
                self._shipper.unstage(first)  # if the transfer ended before its first chunk went

    def _stage_first(self, transfer: OutgoingTransfer, chunk: TransferChunk) -> StagedChunk:
        """Stage chunk 0 and, once chunk_ready(0) returned, queue the gather of its first part,
        so that the gather overlaps the Offer -> Ready round trip."""
        staged = self._shipper.stage(chunk)
        try:
            if transfer.chunk_ready is not None:
                transfer.chunk_ready(0)
            if transfer.stop_reason is None:
                self._shipper.gather_first(staged)
        except BaseException:
            self._shipper.unstage(staged)
            raise
        return staged

    def _send_when_ready(
        self,
        transfer: OutgoingTransfer,
        chunks: tuple[TransferChunk, ...],
        first: StagedChunk | None,
    ) -> None:
        ready_deadline = transfer.started + self.config.ready_timeout_s  # from the Offer
        transfer.replied.wait(max(0.0, ready_deadline - time.monotonic()))
        with self._lock:
            ready, reason = transfer.ready, transfer.stop_reason
            if ready is None and reason is None:
                reason = f"no Ready within {self.config.ready_timeout_s} s"
                transfer.stop_reason = reason
            if ready is not None:
                transfer.state = "sending"  # from here on the receiver expects the tag
                transfer.timeline.append(("ready", time.monotonic()))
        if ready is None:  # refused, aborted or timed out before any payload
            if not transfer.stopped_by_peer:
                self._send_control(TransferAbort(transfer.transfer_id, (reason or "")[:256]))
            self._end(transfer, transfer.stop_status, reason or "")
            return
        if reason is not None:  # stopped after Ready: the receiver expects the tag
            self._stop_mid_transfer(transfer)
            return
        if len(ready.dst_block_ids) != len(transfer.block_ids):
            transfer.stop_reason = (
                f"Ready names {len(ready.dst_block_ids)} blocks for {len(transfer.block_ids)}"
            )
            self._stop_mid_transfer(transfer)
            return
        checksum = 0
        plan = direct_plan(ready.dst_block_ids) if self.config.direct_receive else None
        if plan is not None:
            transfer.timeline.append(("direct", time.monotonic()))
        committed = False  # the receiver posts the later chunks ahead: all of them must go
        for index, chunk in enumerate(chunks):
            prestaged = first if index == 0 else None  # chunk_ready(0) was awaited for it
            if prestaged is None and transfer.chunk_ready is not None:
                transfer.chunk_ready(index)
                transfer.timeline.append((f"ready{index}", time.monotonic()))
            if transfer.stop_reason is not None:
                self._stop_mid_transfer(transfer, chunks[index:] if committed else ())
                return
            staged = prestaged or self._shipper.stage(chunk, plan)
            if index == 0:
                committed = posts_ahead(len(chunks), len(staged.parts), plan is not None)
            nbytes, checksum = self._shipper.send(staged, transfer.tag, checksum)
            transfer.num_bytes += nbytes
            self.metrics.add_bytes(sent=nbytes)
            if len(chunks) > 1:  # per-chunk steps, for overlap analysis
                transfer.timeline.append((f"sent{index}", time.monotonic()))
        with self._lock:  # before Done goes out: its Ack may come back at once
            if transfer.state != "sending":
                return  # ended meanwhile (pair failure)
            aborted_by_peer = transfer.stopped_by_peer and transfer.early_ack is None
            transfer.state = "awaiting_ack"
            transfer.timeline.append(("sent", time.monotonic()))
            transfer.lease_deadline = time.monotonic() + self.config.lease_s
            early_ack = transfer.early_ack
        if aborted_by_peer:  # during the last chunk: no Ack will come, unpin now
            self._end(transfer, transfer.stop_status, transfer.stop_reason or "")
            return
        self._send_control(TransferDone(transfer.transfer_id, transfer.num_bytes, checksum))
        if early_ack is not None:  # the receiver had every chunk before our send returned
            self._on_ack(transfer, early_ack)

    def _stop_mid_transfer(
        self, transfer: OutgoingTransfer, void_chunks: Sequence[TransferChunk] = ()
    ) -> None:
        """The receiver holds a reservation and expects this tag: end it with a marker, or
        with `void_chunks`, the chunks it has posted ahead (kvtransfer.protocol.posts_ahead),
        sent as zeroed VOID payloads of their sizes."""
        if void_chunks:
            for chunk in void_chunks:
                self._shipper.send_void(chunk, transfer.tag)
        else:
            self._shipper.send_marker(transfer.tag)
        reason = transfer.stop_reason or "stopped"
        if not transfer.stopped_by_peer:
            self._send_control(TransferAbort(transfer.transfer_id, reason[:256]))
        self._end(transfer, transfer.stop_status, reason)

    # -- control thread -------------------------------------------------------------------------

    def _control_loop(self) -> None:
        while not self.control.closed:
            try:
                message = self.control.recv(self.config.poll_interval_s)
            except KVTransferError as e:
                self._fail_pair(str(e))
                return
            if message is not None:
                self._on_message(message)
            self._expire_leases()

    def _on_message(self, message: Message) -> None:
        transfer_id = getattr(message, "transfer_id", None)
        with self._lock:
            transfer = self._live.get(transfer_id) if transfer_id else None
            finished = self._finished.get(transfer_id) if transfer_id else None
        if transfer is None:
            if isinstance(message, TransferReady) and finished is not None:
                if finished.state == "offered_then_gave_up":
                    finished.state = "done"
                    self._jobs.put(finished.tag)  # the receiver now expects this tag
            elif not isinstance(message, (TransferAck, TransferAbort)):
                logger.warning("sender: unexpected %s", type(message).__name__)
            return  # late or duplicate Ack/Abort of a finished transfer: nothing to do
        if isinstance(message, TransferReady):
            with self._lock:
                if transfer.ready is None:
                    transfer.ready = message
            transfer.replied.set()
        elif isinstance(message, TransferAbort):
            with self._lock:
                if transfer.stop_reason is None:  # before Ready: a refusal, not an abort
                    refused = transfer.ready is None
                    verb = "refused" if refused else "aborted"
                    transfer.stop_reason = f"receiver {verb}: {message.reason}"
                    transfer.stop_status = (
                        TransferStatus.FAILED if refused else TransferStatus.ABORTED
                    )
                    transfer.stopped_by_peer = True
                state = transfer.state
            transfer.replied.set()
            if state == "awaiting_ack":
                self._end(transfer, TransferStatus.ABORTED, transfer.stop_reason or "")
        elif isinstance(message, TransferAck):
            with self._lock:
                state = transfer.state
                if state == "sending" and transfer.early_ack is None:
                    # A CUDA receiver acks once the last chunk is in, which may be before this
                    # side's send has returned: the transfer thread ends it after Done.
                    transfer.early_ack = message
                    return
            if state != "awaiting_ack":
                logger.warning("sender: Ack for %s in state %s", transfer_id, state)
                return
            self._on_ack(transfer, message)
        else:
            logger.warning("sender: unexpected %s", type(message).__name__)

    def _on_ack(self, transfer: OutgoingTransfer, ack: TransferAck) -> None:
        status = TransferStatus.COMPLETED if ack.ok else TransferStatus.FAILED
        self._end(transfer, status, ack.reason)

    def _expire_leases(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [
                t
                for t in self._live.values()
                if t.state == "awaiting_ack" and t.lease_deadline <= now
            ]
        for transfer in expired:
            self._end(
                transfer,
                TransferStatus.LEASE_EXPIRED,
                f"no Ack within the {self.config.lease_s} s lease",
            )

    # -- endings --------------------------------------------------------------------------------

    def _end(self, transfer: OutgoingTransfer, status: TransferStatus, reason: str) -> None:
        """Finish a transfer once: unpin, record, report. Later calls do nothing."""
        with self._lock:
            if self._live.pop(transfer.transfer_id, None) is None:
                return
            # Offered, never sent: a Ready that came (or comes late) needs its marker.
            owes_marker = transfer.state == "offered" and transfer.ready is not None
            may_get_late_ready = transfer.state == "offered" and transfer.ready is None
            transfer.state = "offered_then_gave_up" if may_get_late_ready else "done"
            self._finished.add(transfer.transfer_id, transfer)
        if owes_marker:
            self._jobs.put(transfer.tag)
        self._release(transfer.owner)
        result = transfer.conclude(status, reason)
        self.metrics.count(result)
        if status is not TransferStatus.COMPLETED:
            logger.info("transfer %s %s: %s", transfer.transfer_id, status.value, reason)
        if transfer.on_done is not None:
            try:
                transfer.on_done(result)
            except Exception:
                logger.exception("on_done callback of transfer %s failed", transfer.transfer_id)

    def _fail_pair(self, reason: str) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = reason
            live = list(self._live.values())
        on_transfer_thread = threading.current_thread() is self._threads[0]
        for transfer in live:
            if transfer.early_ack is not None:  # the receiver confirmed every chunk already
                if transfer.state == "sending" and not on_transfer_thread:
                    continue  # its thread, past its last send, ends it once its bytes count
                self._on_ack(transfer, transfer.early_ack)
            elif transfer.stopped_by_peer:  # its refusal or abort came first (the receiver
                # may close right after it): that is how it ended, not the hang-up
                self._end(transfer, transfer.stop_status, transfer.stop_reason or reason)
            else:
                self._end(transfer, TransferStatus.FAILED, reason)
        self.control.close()  # first: the peer learns at once, whatever the channel does
        self.channel.close()

    def _send_control(self, message: Message) -> None:
        self.control.send(message)  # KVTransferError: the pair is failing

    def _offer(self, transfer: OutgoingTransfer) -> TransferOffer:
        return transfer.offer(self.layout, self.config.lease_s)
