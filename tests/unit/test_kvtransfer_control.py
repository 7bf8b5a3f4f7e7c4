"""The control connection's framing over a real socket pair: frames split anywhere arrive
whole, a timeout keeps a partial frame, garbage closes the connection, and the protocol's
small helpers (tags, finished-transfer record, config checks)."""

from __future__ import annotations

import pickle
import socket
import threading

import pytest

from contracts.errors import KVTransferError
from kvtransfer.codec import encode
from kvtransfer.control import ControlConnection, ControlListener
from kvtransfer.messages import PairHello, TransferAbort, TransferAck
from kvtransfer.protocol import BoundedRecord, TransferConfig, transfer_tag


def connected_pair() -> tuple[ControlConnection, socket.socket]:
    ours, theirs = socket.socketpair()
    return ControlConnection(ours, "peer"), theirs


def test_frames_split_at_every_byte_arrive_whole() -> None:
    connection, raw = connected_pair()
    messages = [
        TransferAck("t-1", ok=True),
        TransferAbort("t-2", "why"),
        PairHello("a/b", b"n" * 32),
    ]
    data = b"".join(encode(m) for m in messages)
    for i in range(len(data)):  # one byte at a time, each followed by a recv attempt
        raw.sendall(data[i : i + 1])
        got = connection.recv(timeout_s=0.001)
        if got is not None:
            assert got == messages.pop(0)
    assert messages == []
    assert connection.recv(timeout_s=0.01) is None, "a timeout is not an error"


def test_a_pickle_closes_the_connection_without_being_loaded() -> None:
    connection, raw = connected_pair()
    raw.sendall(pickle.dumps({"transfer_id": "t"}))
    with pytest.raises(KVTransferError, match="pickle stream, refused"):
        connection.recv(timeout_s=1)
    assert connection.closed
    with pytest.raises(KVTransferError, match="closed"):
        connection.send(TransferAck("t", ok=True))


def test_peer_hang_up_is_an_error_naming_the_peer() -> None:
    connection, raw = connected_pair()
    raw.close()
    with pytest.raises(KVTransferError, match="closed by peer"):
        connection.recv(timeout_s=1)


def test_listener_accepts_and_both_directions_work() -> None:
    listener = ControlListener("127.0.0.1")
    accepted: list[ControlConnection | None] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept(5)))
    thread.start()
    client = ControlConnection.connect("127.0.0.1", listener.port, 5)
    thread.join()
    server = accepted[0]
    assert server is not None
    client.send(PairHello("k", b"k" * 32))
    assert server.recv(5) == PairHello("k", b"k" * 32)
    server.send(TransferAck("t", ok=False, reason="no"))
    assert client.recv(5) == TransferAck("t", ok=False, reason="no")
    assert listener.accept(0.01) is None
    client.close(), server.close(), listener.close()


def test_connect_to_nobody_fails_clearly() -> None:
    listener = ControlListener("127.0.0.1")
    port = listener.port
    listener.close()
    with pytest.raises(KVTransferError, match=f"control connection to 127.0.0.1:{port}"):
        ControlConnection.connect("127.0.0.1", port, 2)


def test_transfer_tags_are_stable_63_bit_and_distinct() -> None:
    tags = {transfer_tag(f"t-{i}") for i in range(10_000)}
    assert len(tags) == 10_000
    assert all(0 <= t < 2**63 for t in tags)
    assert transfer_tag("abc") == transfer_tag("abc")


def test_bounded_record_forgets_the_oldest() -> None:
    record: BoundedRecord[str, int] = BoundedRecord(2)
    record.add("a", 1)
    record.add("b", 2)
    record.add("a", 3)  # refreshed: now the newest
    record.add("c", 4)
    assert (record.get("a"), record.get("b"), record.get("c")) == (3, None, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lease_s": 0}, "lease_s=0"),
        ({"stall_timeout_s": float("inf")}, "stall_timeout_s=inf"),
        ({"poll_interval_s": 2}, "poll_interval_s=2"),
        ({"max_finished": 0}, "max_finished=0"),
        ({"part_bytes": 0}, "part_bytes=0"),
    ],
)
def test_transfer_config_refuses_nonsense(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TransferConfig(**kwargs)
