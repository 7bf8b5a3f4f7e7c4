"""The decode side of one pair (KVReceiver): reserves blocks for offers, receives KV into them,
verifies, and hands completed transfers to the engine through `poll()`, which never blocks.

    control thread: Offer -> reserve + Ready (or Abort); Done -> verify -> Ack; Abort; deadlines
    data thread:    header -> route by tag -> land the chunk (kvtransfer.lander)

An offer that finds no room may wait for some (`wait_for_room`: an engine whose transfers go
through a bounded staging region, freed as landed KV is attached): it is retried on every turn
of the control thread, oldest first (a later offer waits behind it), and refused ("no free KV
blocks") once half the Ready timeout has passed. The sender simply sees a later Ready; the
messages are unchanged. An offer stays in `_deferred` until it is answered, also while the
control thread answers it: an abort() meanwhile takes it out, and the answer is not sent.

A transfer's state: kvtransfer.incoming; the ownership rules: docs/kvtransfer.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from contracts.errors import KVTransferError
from kvtransfer.channel import PairChannel
from kvtransfer.coalesce import on_stream, staging_shape
from kvtransfer.control import ControlConnection
from kvtransfer.header import MARKER
from kvtransfer.incoming import FinalAnswer, IncomingTransfer, ReceivedKV
from kvtransfer.lander import ChunkLander
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
from kvtransfer.staging import StagingPool, numel

logger = logging.getLogger(__name__)

_SETTLE_S = 10.0  # how long a failed pair's device work may take to stop before freeing

ReserveFn = Callable[[str, int], list[int] | None]  # BlockManager.reserve
ReleaseFn = Callable[[str], object]  # BlockManager.release
WaitForRoomFn = Callable[[int], bool]  # may an offer of this many blocks wait for room?


class KVReceiver:
    """Receives KV into `kv_cache`, reserving destination blocks with `reserve`/`release`
    (a BlockManager's). If the pair fails, every transfer on it fails and its reservation is
    freed once no data can land in it any more."""

    def __init__(
        self,
        channel: PairChannel,
        control: ControlConnection,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        reserve: ReserveFn,
        release: ReleaseFn,
        staging: StagingPool,
        config: TransferConfig | None = None,
        metrics: TransferMetrics | None = None,
        wait_for_room: WaitForRoomFn | None = None,
    ) -> None:
        layout.check_cache(kv_cache)
        self.channel = channel
        self.control = control
        self.kv_cache = kv_cache
        self.layout = layout
        self.config = config or TransferConfig()
        self.metrics = metrics or TransferMetrics()
        self._reserve = reserve
        self._release = release
        self._wait_for_room = wait_for_room
        # offers not answered yet, oldest first (waiting for room, or being answered): transfer
        # id -> its offer; abort() takes one out, and its answer is not sent
        self._deferred: dict[str, _Unanswered] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the data thread waits for expected data
        self._live: dict[str, IncomingTransfer] = {}
        self._by_tag: dict[int, IncomingTransfer] = {}
        self._num_expected = 0  # live transfers whose data is still to come
        self._finished: BoundedRecord[str, FinalAnswer] = BoundedRecord(self.config.max_finished)
        self._completed: deque[ReceivedKV] = deque()
        self._failure: str | None = None
        # held from a transfer's verdict to its Ack being sent, and by close(): a transfer
        # this side reports COMPLETED has had its Ack sent (else the sender would fail it)
        self._verdict = threading.RLock()
        stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self._lander = ChunkLander(channel, kv_cache, staging, self.config, stream)
        self._stream = stream
        # Done brings nothing to check unless this side compares CRCs (CPU, checksum on): then
        # the last chunk's arrival completes a transfer (each chunk's size was checked).
        self._checks_crc = stream is None and self.config.checksum
        self._threads = [
            threading.Thread(target=self._data_loop, name="kv-recv", daemon=True),
            threading.Thread(target=self._control_loop, name="kv-recv-control", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- public ---------------------------------------------------------------------------------

    def poll(self) -> list[ReceivedKV]:
        """Transfers completed since the last poll; never blocks. Each is the caller's now."""
        with self._lock:
            completed = list(self._completed)
            self._completed.clear()
        return completed

    def result(self, transfer_id: str) -> TransferResult | None:
        """How a transfer ended (None while it runs, or if unknown or long forgotten)."""
        with self._lock:
            final = self._finished.get(transfer_id)
        return None if final is None else final.result

    def knows(self, transfer_id: str) -> bool:
        """Whether the transfer was offered here (running, or ended and still remembered)."""
        with self._lock:
            if transfer_id in self._live or transfer_id in self._deferred:
                return True
            return self._finished.get(transfer_id) is not None

    def owners(self) -> list[str]:
        """Block-manager owners this receiver holds now: live transfers and completed ones
        not yet polled (for integrity checks that must not count them as leaks)."""
        with self._lock:
            return [t.owner for t in self._live.values()] + [kv.owner for kv in self._completed]

    @property
    def num_live(self) -> int:
        with self._lock:
            return len(self._live)

    @property
    def failure(self) -> str | None:
        """Why the pair failed, once it has."""
        return self._failure

    def abort(self, transfer_id: str, reason: str = "aborted by the receiver") -> bool:
        """Give up a transfer (e.g. its request was cancelled): the sender is told; the
        reservation is freed once no more of its data can arrive. A completed transfer not yet
        taken by `poll` is released too. False if unknown or already over."""
        if self._abort_deferred(transfer_id, reason):
            return True
        with self._lock:
            incoming = self._live.get(transfer_id)
            if incoming is None:
                taken = [kv for kv in self._completed if kv.transfer_id == transfer_id]
                for kv in taken:
                    self._completed.remove(kv)
            elif incoming.local_abort is None:
                incoming.local_abort = reason
        if incoming is None:
            for kv in taken:
                self._release(kv.owner)
            return bool(taken)
        self._send(TransferAbort(transfer_id, reason[:256]))
        if incoming.state == "data_done":
            self._finish(incoming, TransferStatus.ABORTED, reason, reply=None)
        return True

    def _abort_deferred(self, transfer_id: str, reason: str) -> bool:
        """Give up an offer waiting for room (nothing reserved, no data to come): the sender is
        told. False if it is not waiting."""
        with self._lock:
            deferred = self._deferred.pop(transfer_id, None)
            if deferred is None:
                return False
            result = TransferResult(
                transfer_id, deferred.offer.request_id, TransferStatus.ABORTED, reason
            )
            abort = TransferAbort(transfer_id, reason[:256])
            self._finished.add(transfer_id, FinalAnswer(result, abort))
        self.metrics.count(result)
        self._send(abort)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Fail the pair (reservations are freed as the data thread stops) and release the
        completed transfers nobody polled. An Ack already decided goes out first."""
        with self._verdict:
            self._fail_pair("receiver closed")
        for thread in self._threads:
            thread.join(timeout_s)
        for kv in self.poll():
            self._release(kv.owner)

    # -- control thread -------------------------------------------------------------------------

    def _control_loop(self) -> None:
        while not self.control.closed:
            try:
                message = self.control.recv(self.config.poll_interval_s)
                if message is not None:
                    self._on_message(message)
                if self._deferred:
                    self._retry_deferred()
            except KVTransferError as e:
                self._fail_pair(str(e))
                return
            self._check_done_deadlines()

    def _on_message(self, message: Message) -> None:
        if isinstance(message, TransferOffer):
            self._on_offer(message)
            return
        transfer_id = getattr(message, "transfer_id", None)
        if isinstance(message, TransferAbort) and self._sender_gave_up_waiting(message):
            return
        with self._lock:
            incoming = self._live.get(transfer_id) if transfer_id else None
            final = self._finished.get(transfer_id) if transfer_id else None
        if incoming is None:
            if isinstance(message, TransferDone) and final is not None and final.acked_before_done:
                self._record(message.transfer_id, replace(final, acked_before_done=False))
            elif isinstance(message, TransferDone) and final is not None and final.reply:
                self._send(final.reply)  # a duplicate Done: the same answer again
            elif isinstance(message, TransferAbort) and final is None:
                # aborted before its offer came (or without one): recorded, so the decode
                # side waiting for this KV learns now that it will not come, and an offer
                # that still arrives is answered with nothing (the sender gave it up)
                reason = f"sender aborted before offering: {message.reason}"
                result = TransferResult(message.transfer_id, "", TransferStatus.ABORTED, reason)
                self._record(message.transfer_id, FinalAnswer(result, None))
            elif not isinstance(message, (TransferDone, TransferAbort)):
                logger.warning("receiver: unexpected %s", type(message).__name__)
            return
        if isinstance(message, TransferDone):
            with self._lock:
                if incoming.done is None:
                    incoming.done = message
                ready_to_finish = incoming.state == "data_done"
            if ready_to_finish:
                self._verify(incoming)
        elif isinstance(message, TransferAbort):
            with self._lock:
                if incoming.peer_abort is None:
                    incoming.peer_abort = message.reason
                data_done = incoming.state == "data_done"
            if data_done:  # else its marker or VOID chunks are on the way; the data thread
                # finishes it
                reason = f"sender aborted: {message.reason}"
                self._finish(incoming, TransferStatus.ABORTED, reason, reply=None)
        else:
            logger.warning("receiver: unexpected %s", type(message).__name__)

    def _sender_gave_up_waiting(self, abort: TransferAbort) -> bool:
        """The sender aborted an offer waiting for room (nothing reserved, no data to come):
        recorded under its request id. False if no offer of it waits."""
        with self._lock:
            waiting = self._deferred.pop(abort.transfer_id, None)
            if waiting is None:
                return False
            reason = f"sender aborted: {abort.reason}"
            result = TransferResult(
                abort.transfer_id, waiting.offer.request_id, TransferStatus.ABORTED, reason
            )
            self._finished.add(abort.transfer_id, FinalAnswer(result, None))
        self.metrics.count(result)
        return True

    def _on_offer(self, offer: TransferOffer) -> None:
        with self._lock:
            incoming = self._live.get(offer.transfer_id)
            final = self._finished.get(offer.transfer_id)
        if incoming is not None:  # duplicate: the same Ready again
            self._send(TransferReady(offer.transfer_id, incoming.dst_block_ids))
            return
        if final is not None:
            if final.reply is not None:
                self._send(final.reply)
            return
        entry = _Unanswered(offer, time.monotonic() + self.config.ready_timeout_s / 2)
        with self._lock:
            if offer.transfer_id in self._deferred:
                return  # a duplicate of an offer still waiting for room
            self._deferred[offer.transfer_id] = entry  # unanswered: abort() can find it
        self._answer_offer(entry)

    def _retry_deferred(self) -> None:
        """Answer the offers waiting for room, oldest first, while there is room."""
        with self._lock:
            waiting = list(self._deferred.values())
        for entry in waiting:
            if not self._answer_offer(entry):
                return  # still no room: later offers wait behind it, it keeps its place

    def _answer_offer(self, entry: _Unanswered) -> bool:
        """Reserve and answer Ready, or refuse, the offer of `entry` (in `_deferred`): it
        leaves `_deferred` as it is answered; or, with no room, `wait_for_room` and
        `refuse_after` not passed, it stays there (its place kept): False. An offer abort()
        took out meanwhile is not answered (its reservation freed)."""
        offer = entry.offer
        transfer_id = offer.transfer_id
        with self._lock:
            if self._deferred.get(transfer_id) is not entry:
                return True  # aborted meanwhile
        refusal = self._refusal(offer)
        dst = None
        owner = f"kv-in:{transfer_id}"
        num_blocks = len(offer.src_block_ids)
        if refusal is None:
            dst = self._reserve(owner, num_blocks)
            if dst is None:
                if (
                    self._wait_for_room is not None
                    and time.monotonic() < entry.refuse_after
                    and self._wait_for_room(num_blocks)
                ):
                    if not entry.waited:
                        entry.waited = True
                        self.metrics.add_back_pressure(deferred=1)
                    return False
                refusal = f"no free KV blocks for {num_blocks} blocks"
                if entry.waited:
                    self.metrics.add_back_pressure(refused_for_room=1)
        if refusal is not None or dst is None:
            with self._lock:
                if self._deferred.pop(transfer_id, None) is not entry:
                    return True  # aborted meanwhile: its Abort went out
            abort = TransferAbort(transfer_id, (refusal or "")[:256])
            result = TransferResult(
                transfer_id, offer.request_id, TransferStatus.FAILED, refusal or ""
            )
            self._send(abort)  # first: once the result is visible, the receiver may close
            self._record(transfer_id, FinalAnswer(result, abort))
            self.metrics.count(result)
            return True
        incoming = IncomingTransfer.start(offer, owner, dst, self.layout.num_layers)
        with self._lock:
            answered = self._deferred.pop(transfer_id, None) is entry
            if answered:
                self._live[transfer_id] = incoming
                self._by_tag[incoming.tag] = incoming
                self._num_expected += 1
                self._wake.notify()
        if not answered:  # aborted while its room was reserved: its Abort went out
            self._release(owner)
            return True
        self._send(TransferReady(transfer_id, incoming.dst_block_ids))
        return True

    def _refusal(self, offer: TransferOffer) -> str | None:
        if self._failure is not None:
            return f"pair failed: {self._failure}"
        try:
            self.layout.check_compatible(offer.layout)
        except KVTransferError as e:
            return str(e)
        with self._lock:
            if transfer_tag(offer.transfer_id) in self._by_tag:
                return "transfer id collides with a live transfer's tag"
        return None

    def _check_done_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [
                t
                for t in self._live.values()
                if t.state == "data_done" and t.done is None and t.done_deadline <= now
            ]
        for incoming in late:
            reason = f"no Done within {self.config.done_timeout_s} s of the last payload"
            self._send(TransferAbort(incoming.offer.transfer_id, reason))
            self._finish(incoming, TransferStatus.FAILED, reason, reply=None)

    # -- data thread ----------------------------------------------------------------------------

    def _data_loop(self) -> None:
        if self.kv_cache.is_cuda:  # the CUDA device is per thread
            torch.cuda.set_device(self.kv_cache.device)
        try:
            while True:
                with self._wake:
                    while self._num_expected == 0 and self._failure is None:
                        self._wake.wait(self.config.poll_interval_s)
                    if self._failure is not None:
                        break
                self._receive_one()
        except KVTransferError as e:
            self._fail_pair(str(e))
        except Exception as e:  # a bug: fail loudly, but free what is held
            logger.exception("KV receiver data thread failed")
            self._fail_pair(f"internal error: {e!r}")
        finally:
            self._free_stranded()

    def _free_stranded(self) -> None:
        """After the pair failed (its channel closed): once no receive or scatter queued on the
        device can still write, free every reservation still receiving and the staging held
        for it. If the device work does not settle, keep them (a leak, logged) rather than
        hand out memory a late scatter may write."""
        with self._lock:
            stranded = [t for t in self._live.values() if t.state == "receiving"]
        if not self._lander.settle(_SETTLE_S, len(stranded)):
            return  # logged
        for incoming in stranded:
            reason = f"pair failed: {self._failure}"
            self._finish(incoming, TransferStatus.FAILED, reason, reply=None)

    def _receive_one(self) -> None:
        with on_stream(self._stream):  # not the default stream, where the engine decodes
            tag, nbytes = self.channel.recv_header(timeout_s=self.config.stall_timeout_s)
        with self._lock:
            incoming = self._by_tag.get(tag)
        if incoming is None or incoming.state != "receiving":
            raise KVTransferError(f"payload with tag {tag} for no transfer expecting one")
        if nbytes == MARKER:  # the sender stopped this transfer
            self._data_over(incoming)
            reason = f"sender aborted: {incoming.peer_abort or 'stopped before its payload'}"
            if incoming.local_abort is not None:
                reason = incoming.local_abort
            self._finish(incoming, TransferStatus.ABORTED, reason, reply=None)
            return
        if incoming.next_chunk == 0:
            incoming.timeline.append(("first_header", time.monotonic()))
        elif len(incoming.chunks) > 1:
            incoming.timeline.append((f"header{incoming.next_chunk}", time.monotonic()))
        chunk = incoming.chunks[incoming.next_chunk]
        shape = staging_shape(self.kv_cache, len(chunk.block_ids), chunk.layers)
        layer_bytes = numel(shape[1:]) * self.kv_cache.element_size()
        expected = shape[0] * layer_bytes
        if nbytes != expected:
            raise KVTransferError(
                f"transfer {incoming.offer.transfer_id}: chunk {incoming.next_chunk} is "
                f"{nbytes} bytes, expected {expected}"
            )
        part_nbytes = self.channel.pending_part_nbytes
        tid, on_data = incoming.offer.transfer_id, self._checksummer(incoming)
        if part_nbytes < 0:  # a group: slices straight into the blocks
            self._lander.receive_direct(tid, chunk, on_data)
        else:
            self._lander.receive_staged(tid, chunk, shape, layer_bytes, on_data)
        self._chunk_in(incoming, nbytes)
        parts = 1 if part_nbytes == nbytes else 2  # 2: several (the count does not matter)
        if incoming.next_chunk == 1 and posts_ahead(len(incoming.chunks), parts, part_nbytes < 0):
            self._receive_ahead(incoming)  # every later chunk of this transfer
        if incoming.next_chunk == len(incoming.chunks):
            self._data_over(incoming)
            incoming.timeline.append(("data", time.monotonic()))
            if incoming.local_abort is not None or incoming.peer_abort is not None:
                reason = incoming.local_abort or f"sender aborted: {incoming.peer_abort}"
                self._finish(incoming, TransferStatus.ABORTED, reason, reply=None)
            elif incoming.void:
                reason = "sender aborted: stopped mid-transfer"
                self._finish(incoming, TransferStatus.ABORTED, reason, reply=None)
            elif incoming.done is not None or not self._checks_crc:
                self._verify(incoming)  # without waiting for Done when it adds nothing

    def _chunk_in(self, incoming: IncomingTransfer, nbytes: int, void: bool = False) -> None:
        incoming.chunk_in(nbytes, void)
        self.metrics.add_bytes(received=nbytes)

    def _receive_ahead(self, incoming: IncomingTransfer) -> None:
        """Every chunk after the first, posted ahead of its header (see ChunkLander)."""

        self._lander.receive_ahead(
            incoming.offer.transfer_id, incoming.tag, incoming.chunks[incoming.next_chunk :],
            incoming.posted_ahead, lambda nbytes, void: self._chunk_in(incoming, nbytes, void),
            self._checksummer(incoming),
        )  # fmt: skip

    def _checksummer(self, incoming: IncomingTransfer) -> Callable[[torch.Tensor], None] | None:
        """What folds landed bytes into the transfer's CRC, where this side compares CRCs."""
        return incoming.fold_crc if self._checks_crc else None

    def _data_over(self, incoming: IncomingTransfer) -> None:
        with self._lock:
            incoming.state = "data_done"
            incoming.done_deadline = time.monotonic() + self.config.done_timeout_s
            self._num_expected -= 1
            self._by_tag.pop(incoming.tag, None)

    # -- endings --------------------------------------------------------------------------------

    def _verify(self, incoming: IncomingTransfer) -> None:
        """Data and Done are both in (or only the data, when there is no CRC to compare): Ack
        and hand the KV over, or fail."""
        done = incoming.done
        assert done is not None or not self._checks_crc, "a CRC to compare waits for Done"
        problem = incoming.mismatch(self._checks_crc)
        tid = incoming.offer.transfer_id
        if problem is not None:
            ack = TransferAck(tid, ok=False, reason=problem[:256])
            with self._verdict:  # the sender learns why, even if this side closes now
                self._finish(incoming, TransferStatus.FAILED, problem, reply=ack)
                self._send(ack)
            return
        ack = TransferAck(tid, ok=True)
        with self._verdict:  # close() waits: the result is visible before the Ack is out
            if self._finish(incoming, TransferStatus.COMPLETED, "", reply=ack, early=done is None):
                final = self._finished.get(tid)
                if final is not None and final.result.ok:
                    self._send(ack)

    def _finish(
        self,
        incoming: IncomingTransfer,
        status: TransferStatus,
        reason: str,
        reply: Message | None,
        early: bool = False,
    ) -> bool:
        """End a transfer once: keep (completed) or free its blocks, record, count."""
        tid = incoming.offer.transfer_id
        with self._lock:
            if self._live.pop(tid, None) is None:
                return False
            if status is TransferStatus.COMPLETED and incoming.local_abort is not None:
                status, reason = TransferStatus.ABORTED, incoming.local_abort  # abort() won
            if incoming.state == "receiving":
                self._num_expected -= 1
                self._by_tag.pop(incoming.tag, None)
            incoming.state = "ended"
            result = incoming.result(status, reason)
            self._finished.add(tid, FinalAnswer(result, reply, early and incoming.done is None))
            if status is TransferStatus.COMPLETED:
                self._completed.append(incoming.received())
        if status is not TransferStatus.COMPLETED:
            self._release(incoming.owner)
            logger.info("transfer %s %s: %s", tid, status.value, reason)
        self.metrics.count(result)
        return True

    def _record(self, transfer_id: str, final: FinalAnswer) -> None:
        with self._lock:
            self._finished.add(transfer_id, final)

    def _fail_pair(self, reason: str) -> None:
        with self._wake:
            if self._failure is None:
                self._failure = reason
            self._wake.notify_all()
            finished_data = [t for t in self._live.values() if t.state == "data_done"]
            deferred, self._deferred = list(self._deferred.values()), {}  # none is answered
            for offer in (entry.offer for entry in deferred):  # nothing reserved: they fail now
                failed = f"pair failed: {reason}"
                result = TransferResult(
                    offer.transfer_id, offer.request_id, TransferStatus.FAILED, failed
                )
                self._finished.add(offer.transfer_id, FinalAnswer(result, None))
        for incoming in finished_data:  # no data can come for these: free now
            self._finish(incoming, TransferStatus.FAILED, f"pair failed: {reason}", reply=None)
        self.control.close()
        self.channel.close()

    def _send(self, message: Message) -> None:
        try:
            self.control.send(message)
        except KVTransferError as e:
            self._fail_pair(str(e))


@dataclass(slots=True, eq=False)
class _Unanswered:
    """An offer not answered yet (control thread): waiting for room, or being answered."""

    offer: TransferOffer
    refuse_after: float  # monotonic: refused for no room from then on
    waited: bool = False  # deferred at least once (found no room)
