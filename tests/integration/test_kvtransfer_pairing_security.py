"""A decode worker's KV endpoint against hostile or failing peers, in this process with real
sockets and gloo pairs (no Ray): nobody without the cluster secret can reach a pair's
rendezvous; the accept loop survives socket errors; idle unauthenticated connections cannot
keep a real peer from pairing; a closed endpoint stops listening and adopts nothing more."""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

import kvtransfer.pair as pair_module
from contracts.errors import KVTransferError
from kvtransfer.channel import PairChannel
from kvtransfer.control import ControlConnection
from kvtransfer.handshake import ClusterSecret, prove_as_sender
from kvtransfer.network import KVNetworkConfig
from kvtransfer.pair import ReceiverEndpoint, connect_pair
from kvtransfer.transport import TransportConfig
from tests.ports import free_port_range

pytestmark = [pytest.mark.integration]

HOST = "127.0.0.1"
SECRET = ClusterSecret(b"pairing-security-secret-0123")
CONFIG = TransportConfig(backend="gloo", timeout_s=10.0, connect_timeout_s=8.0, gloo_hostname=HOST)


class Adopted:
    """The endpoint's on_pair: keeps every pair formed, closes them at the end."""

    def __init__(self) -> None:
        self.pairs: list[tuple[PairChannel, ControlConnection]] = []
        self.lock = threading.Lock()

    def __call__(self, channel: PairChannel, control: ControlConnection) -> None:
        with self.lock:
            self.pairs.append((channel, control))

    def wait_for(self, count: int, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.pairs) < count:
            assert time.monotonic() < deadline, f"{len(self.pairs)} pairs adopted, not {count}"
            time.sleep(0.01)

    def close(self) -> None:
        for channel, control in self.pairs:
            channel.close()
            control.close()


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port_range(8)


@pytest.fixture
def served(ports: tuple[int, int]) -> Iterator[tuple[ReceiverEndpoint, Adopted]]:
    endpoint = ReceiverEndpoint(HOST, SECRET, KVNetworkConfig(None, *ports))
    adopted = Adopted()
    endpoint.serve(CONFIG, "cpu", adopted)
    try:
        yield endpoint, adopted
    finally:
        endpoint.close()
        adopted.close()


def pair_works(endpoint: ReceiverEndpoint, adopted: Adopted, key: str) -> None:
    """A real sender pairs within the connect timeout and a tensor crosses the pair."""
    before = len(adopted.pairs)
    channel, control = connect_pair(endpoint.address, key, CONFIG, secret=SECRET)
    try:
        adopted.wait_for(before + 1, CONFIG.connect_timeout_s)
        received = torch.zeros(4)
        thread = threading.Thread(target=adopted.pairs[before][0].recv, args=(received,))
        thread.start()
        channel.send(torch.arange(4.0))
        thread.join(10)
        assert received.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        channel.close()
        control.close()


def open_ports(first: int, last: int) -> list[int]:
    ports = []
    for port in range(first, last + 1):
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            ports.append(port)
    return ports


def store_client_attempt(port: int) -> str | None:
    """What an unauthenticated torch.distributed client could do at `port`: the keys it
    listed or the write it made, or None if the port serves no store."""
    try:
        store = dist.TCPStore(
            HOST, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=2)
        )
        store.set("attacker/claim/1", "1")
        return f"port {port}: a store took a write; it holds {store.num_keys()} keys"
    except (RuntimeError, OSError, ValueError):
        return None


def test_no_unauthenticated_client_reaches_the_rendezvous_of_a_formation(
    served: tuple[ReceiverEndpoint, Adopted], ports: tuple[int, int]
) -> None:
    endpoint, adopted = served
    # A peer that proved the secret and stops there: the receiver sits in the rendezvous.
    stalled = ControlConnection.connect(HOST, endpoint.address.control_port, 5)
    try:
        prove_as_sender(stalled, "stalled/1", SECRET, time.monotonic() + 5)
        listening = open_ports(*ports)
        assert endpoint.address.control_port in listening
        reached = [store_client_attempt(port) for port in listening]
        assert [r for r in reached if r is not None] == []
    finally:
        stalled.close()
    pair_works(endpoint, adopted, "after-the-probe/1")


def test_the_accept_loop_survives_socket_errors(ports: tuple[int, int]) -> None:
    """accept() failing (out of file descriptors, a connection aborted before it was taken)
    does not end the accepting thread: pairs form afterwards."""
    endpoint = ReceiverEndpoint(HOST, SECRET, KVNetworkConfig(None, *ports))
    adopted = Adopted()
    failures = [OSError(errno.EMFILE, "Too many open files"), ConnectionAbortedError()]
    accept = endpoint.listener.accept

    def flaky_accept(timeout_s: float | None) -> ControlConnection | None:
        if failures:
            raise failures.pop(0)
        return accept(timeout_s)

    endpoint.listener.accept = flaky_accept  # type: ignore[method-assign]
    endpoint.serve(CONFIG, "cpu", adopted)
    try:
        pair_works(endpoint, adopted, "after-emfile/1")
        assert failures == []
        assert endpoint.num_accept_errors == 2
    finally:
        endpoint.close()
        adopted.close()


def test_idle_unauthenticated_sockets_do_not_keep_a_real_peer_out(
    served: tuple[ReceiverEndpoint, Adopted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_FORMING + 1 idle connections (from another address of this host) take no slot a
    peer that proves the secret needs, and are closed once the handshake deadline passes."""
    endpoint, adopted = served
    port = endpoint.address.control_port
    idle = [
        socket.create_connection((HOST, port), timeout=5, source_address=("127.0.0.2", 0))
        for _ in range(pair_module.MAX_FORMING + 1)
    ]
    try:
        deadline = time.monotonic() + 10
        while endpoint.num_refused < 1:  # the last ones were turned away: all were accepted
            assert time.monotonic() < deadline, "the idle connections were never taken"
            time.sleep(0.01)
        pair_works(endpoint, adopted, "among-idle/1")
        deadline = time.monotonic() + CONFIG.connect_timeout_s - 1
        for sock in idle:  # closed by the endpoint after HANDSHAKE_TIMEOUT_S, not after 8 s
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            assert sock.recv(1) == b"", "an idle connection outlived the handshake deadline"
        refused = endpoint.refused_by_reason
        assert refused["over_limit"] == len(idle) - pair_module.MAX_UNAUTHENTICATED_PER_SOURCE
        deadline = time.monotonic() + 5
        while endpoint.refused_by_reason["unproven"] < pair_module.MAX_UNAUTHENTICATED_PER_SOURCE:
            assert time.monotonic() < deadline, endpoint.refused_by_reason
            time.sleep(0.01)
    finally:
        for sock in idle:
            sock.close()


def test_a_formation_that_completes_after_close_is_not_adopted(
    ports: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() stops listening, ends the formations under way, and a formation that gets
    through anyway is closed instead of handed to on_pair (a channel adopted into a worker
    that stopped)."""
    formed, go_on = threading.Event(), threading.Event()
    open_channel = pair_module.open_channel

    def held_open_channel(*args: Any, **kwargs: Any) -> PairChannel:
        channel = open_channel(*args, **kwargs)
        if channel.address.rank == 1:  # the receiver's side: hold it until close() ran
            formed.set()
            go_on.wait(10)
        return channel

    monkeypatch.setattr(pair_module, "open_channel", held_open_channel)
    endpoint = ReceiverEndpoint(HOST, SECRET, KVNetworkConfig(None, *ports))
    adopted = Adopted()
    endpoint.serve(CONFIG, "cpu", adopted)
    sender: list[Any] = []
    thread = threading.Thread(
        target=lambda: sender.append(
            connect_pair(endpoint.address, "late/1", CONFIG, secret=SECRET)
        )
    )
    thread.start()
    try:
        assert formed.wait(10), "the formation never reached the receiver's channel"
        endpoint.close()
        go_on.set()
        thread.join(10)
        ((channel, control),) = sender
        with pytest.raises(KVTransferError):  # the receiver closed its end
            control.recv(5)
        channel.close()
        assert adopted.pairs == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, endpoint.address.control_port), timeout=5)
    finally:
        go_on.set()
        endpoint.close()
        adopted.close()
