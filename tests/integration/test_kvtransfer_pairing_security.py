"""A decode worker's KV endpoint against hostile or failing peers, in this process with real
sockets and gloo pairs (no Ray): nobody without the cluster secret can reach a pair's
rendezvous; the accept loop survives socket errors; idle unauthenticated connections cannot
keep a real peer from pairing; a closed endpoint stops listening and adopts nothing more."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from kvtransfer.control import ControlConnection
from kvtransfer.handshake import ClusterSecret, prove_as_sender
from kvtransfer.network import KVNetworkConfig
from kvtransfer.pair import ReceiverEndpoint, connect_pair
from kvtransfer.transport import PairChannel, TransportConfig
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
