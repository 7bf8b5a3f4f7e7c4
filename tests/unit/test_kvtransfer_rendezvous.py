"""The rendezvous over a control connection (kvtransfer.rendezvous): every store operation a
process group uses answers as torch's own stores do, over a real socket pair; a receiver
stops serving at DONE (later bytes stay for the next reader), and a key that never comes
fails within the deadline instead of hanging."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch.distributed as dist

from contracts.errors import KVTransferError
from kvtransfer.control import ControlConnection
from kvtransfer.messages import PairProof, StoreOp, StoreReply, StoreRequest
from kvtransfer.rendezvous import ControlStore, serve_rendezvous


@pytest.fixture
def ends() -> Iterator[tuple[ControlConnection, ControlConnection]]:
    a, b = socket.socketpair()
    sender, receiver = ControlConnection(a, "receiver"), ControlConnection(b, "sender")
    yield sender, receiver
    sender.close()
    receiver.close()


def serving(receiver: ControlConnection, store: object, deadline: float) -> list[object]:
    outcome: list[object] = []

    def run() -> None:
        try:
            serve_rendezvous(receiver, store, deadline)
            outcome.append("done")
        except KVTransferError as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome.append(thread)
    return outcome


def test_store_operations_reach_the_receivers_store(
    ends: tuple[ControlConnection, ControlConnection],
) -> None:
    sender, receiver = ends
    local = dist.HashStore()
    outcome = serving(receiver, local, time.monotonic() + 10)
    store = ControlStore(sender, time.monotonic() + 10)
    prefixed = dist.PrefixStore("tandem/kv/p", store)  # as a process group sees it
    prefixed.set("a", b"\x00\x01")
    assert local.get("tandem/kv/p/a") == b"\x00\x01"
    local.set("tandem/kv/p/b", b"from rank 1")
    assert prefixed.get("b") == b"from rank 1"
    assert store.add("n", 2) == 2 and store.add("n", -5) == -3
    assert store.check(["tandem/kv/p/a", "n"]) and not store.check(["missing"])
    assert store.compare_set("c", b"", b"first") == b"first"
    assert store.compare_set("c", b"other", b"second") == b"first"
    assert store.num_keys() == local.num_keys() == 4
    assert store.delete_key("c") and not store.delete_key("c")
    threading.Timer(0.2, lambda: local.set("late", b"1")).start()
    store.wait(["late"])  # blocks on the receiver until rank 1 sets it
    with pytest.raises(RuntimeError, match="rendezvous WAIT 'never': Wait timeout"):
        store.wait(["never"], timedelta(seconds=0.2))
    store.finish()
    sender.send(PairProof(b"p" * 32))  # right behind DONE: stays for the next reader
    outcome[0].join(5)
    assert outcome[1:] == ["done"]
    assert receiver.recv(5) == PairProof(b"p" * 32)
    store.set("after", b"local")  # after finish: local only
    assert store.get("after") == b"local" and not local.check(["after"])


def test_a_key_that_never_comes_fails_by_the_deadline(
    ends: tuple[ControlConnection, ControlConnection],
) -> None:
    sender, receiver = ends
    serving(receiver, dist.HashStore(), time.monotonic() + 10)
    store = ControlStore(sender, time.monotonic() + 0.5)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="rendezvous"):
        store.get("never")
    assert time.monotonic() - started < 5


def test_the_receiver_refuses_anything_but_store_requests(
    ends: tuple[ControlConnection, ControlConnection],
) -> None:
    sender, receiver = ends
    outcome = serving(receiver, dist.HashStore(), time.monotonic() + 10)
    sender.send(StoreReply(True))
    outcome[0].join(5)
    assert isinstance(outcome[1], KVTransferError)
    assert "STORE_REPLY frame where only STORE_REQUEST may come" in str(outcome[1])
    assert StoreRequest(StoreOp.DONE).op is StoreOp.DONE
