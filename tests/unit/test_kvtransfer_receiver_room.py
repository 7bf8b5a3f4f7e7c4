"""A KVReceiver's offers that wait for room (issue 24: a bounded staging region), driven from
the sender's end of a real control socket pair, the receiver's destination a reservation
function the test controls (the data channel is never used: no offer here gets data). A
waiting offer keeps its place (oldest first: a later one waits behind it), an abort while the
control thread answers it wins (no Ready goes out, the reservation is freed), and the
back-pressure counters count what waited and what was refused after waiting."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from contracts.errors import KVTransferError
from kvtransfer.control import ControlConnection
from kvtransfer.layout import KVLayout
from kvtransfer.messages import Message, TransferAbort, TransferOffer, TransferReady
from kvtransfer.protocol import TransferConfig, TransferStatus
from kvtransfer.receiver import KVReceiver
from kvtransfer.staging import StagingPool

CACHE = torch.zeros(2, 2, 8, 4, 1, 8)  # [layers, 2, blocks, block_size, kv_heads, head_dim]
LAYOUT = KVLayout.of_cache(CACHE, "test-model")
CONFIG = TransferConfig(poll_interval_s=0.01, ready_timeout_s=60.0)
DEADLINE_S = 30.0


class IdleChannel:
    """The data channel of a pair whose transfers never send data: a receive waits until the
    channel is closed."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    def recv_header(self, timeout_s: float) -> tuple[int, int]:
        self._closed.wait(timeout_s)
        raise KVTransferError("channel closed")

    def settle(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        self._closed.set()


class Room:
    """A receiver's destination blocks: `free` of them; every call logged."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.calls: list[str] = []  # owners, in call order
        self.released: list[str] = []
        self._held: dict[str, int] = {}
        self.lock = threading.Lock()

    def reserve(self, owner: str, num_blocks: int) -> list[int] | None:
        with self.lock:
            self.calls.append(owner)
            if num_blocks > self.free:
                return None
            self.free -= num_blocks
            self._held[owner] = num_blocks
            return list(range(num_blocks))

    def release(self, owner: str) -> bool:
        with self.lock:
            self.released.append(owner)
            self.free += self._held.pop(owner, 0)
            return True


@contextmanager
def receiver_of(
    room: Room, reserve: Callable[[str, int], list[int] | None] | None = None
) -> Iterator[tuple[KVReceiver, ControlConnection]]:
    ours, theirs = socket.socketpair()
    receiver = KVReceiver(
        IdleChannel(), ControlConnection(ours, "sender"), CACHE, LAYOUT,  # type: ignore[arg-type]
        reserve or room.reserve, room.release, StagingPool(1 << 16, "cpu", CACHE.dtype), CONFIG,
        wait_for_room=lambda num_blocks: True,
    )  # fmt: skip
    sender = ControlConnection(theirs, "receiver")
    try:
        yield receiver, sender
    finally:
        receiver.close()
        sender.close()


def offer(transfer_id: str, num_blocks: int) -> TransferOffer:
    return TransferOffer(
        transfer_id, f"request-{transfer_id}", LAYOUT, num_blocks * 4, tuple(range(num_blocks)),
        lease_ms=60_000,
    )  # fmt: skip


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def answer(sender: ControlConnection) -> Message:
    message = sender.recv(DEADLINE_S)
    assert message is not None, "no answer"
    return message


def test_a_waiting_offer_keeps_its_place_and_a_later_one_waits_behind_it() -> None:
    """Oldest first: with room for the later, smaller offer only, it still waits behind the
    older one (the older one went to the back of the queue at each retry, so the later one
    was answered first on the next turn)."""
    room = Room(free=0)
    with receiver_of(room) as (receiver, sender):
        sender.send(offer("older", 3))
        sender.send(offer("later", 1))
        poll(lambda: {"kv-in:older", "kv-in:later"} <= set(room.calls), "both to wait")
        with room.lock:
            room.free, tried = 1, len(room.calls)  # room for the later one only
        poll(lambda: room.calls[tried:].count("kv-in:older") >= 5, "retries of the older one")
        with room.lock:
            assert "kv-in:later" not in room.calls[tried:], "the later offer went first"
            room.free = 4  # room for both, the older first
        first, second = answer(sender), answer(sender)
        assert isinstance(first, TransferReady) and first.transfer_id == "older"
        assert isinstance(second, TransferReady) and second.transfer_id == "later"
        assert receiver.metrics.offers_deferred == 2
        assert receiver.metrics.offers_refused_for_room == 0


def test_an_abort_while_the_control_thread_answers_a_waiting_offer_wins() -> None:
    """The retry took the offer out of the waiting ones before answering it: an abort then
    found it nowhere (False), and its Ready went out anyway."""
    room = Room(free=0)
    entered, proceed = threading.Event(), threading.Event()

    def reserve(owner: str, num_blocks: int) -> list[int] | None:
        if len(room.calls) >= 2:  # a retry: block in it until the test has aborted
            entered.set()
            assert proceed.wait(DEADLINE_S)
            room.free = num_blocks
        return room.reserve(owner, num_blocks)

    with receiver_of(room, reserve) as (receiver, sender):
        sender.send(offer("t", 2))
        assert entered.wait(DEADLINE_S), "the offer was not retried"
        assert receiver.abort("t", "client cancelled"), "abort found no such transfer"
        proceed.set()
        message = answer(sender)
        assert isinstance(message, TransferAbort) and message.transfer_id == "t"
        assert message.reason == "client cancelled"
        poll(lambda: "kv-in:t" in room.released, "its reservation to be freed")
        result = receiver.result("t")
        assert result is not None and result.status is TransferStatus.ABORTED
        assert result.request_id == "request-t"
        assert receiver.num_live == 0 and room.free == 2
        assert sender.recv(0.2) is None, "nothing after the Abort (no Ready)"


def test_an_offer_refused_after_waiting_and_one_its_sender_gave_up_are_counted_and_named() -> None:
    room = Room(free=0)
    with receiver_of(room) as (receiver, sender):
        receiver.config = TransferConfig(poll_interval_s=0.01, ready_timeout_s=0.2)
        sender.send(offer("refused", 2))
        message = answer(sender)  # after half the Ready timeout
        assert isinstance(message, TransferAbort)
        assert message.reason == "no free KV blocks for 2 blocks"
        sender.send(offer("given-up", 2))
        poll(lambda: "kv-in:given-up" in room.calls, "the offer to wait")
        sender.send(TransferAbort("given-up", "request cancelled"))
        poll(lambda: receiver.result("given-up") is not None, "the sender's abort")
        result = receiver.result("given-up")
        assert result is not None and result.status is TransferStatus.ABORTED
        assert result.request_id == "request-given-up", "the waiting offer's request"
        assert result.reason == "sender aborted: request cancelled"
        assert receiver.metrics.offers_deferred == 2
        assert receiver.metrics.offers_refused_for_room == 1


def test_a_waiting_offer_that_finds_room_gets_ready() -> None:
    num_blocks = 1
    room = Room(free=0)
    with receiver_of(room) as (_, sender):
        sender.send(offer("t", num_blocks))
        poll(lambda: "kv-in:t" in room.calls, "the offer to wait")
        with room.lock:
            room.free = num_blocks
        message = answer(sender)
        assert isinstance(message, TransferReady) and message.transfer_id == "t"
