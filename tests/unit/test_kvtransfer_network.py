"""Where KV endpoints listen (kvtransfer.network) and who may pair (kvtransfer.handshake):
configuration checks, the bound address is the advertised one and the only one listening, and
the challenge-response over real sockets (no torch process groups)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from contracts.errors import KVTransferError
from kvtransfer.codec import decode, encode
from kvtransfer.control import ControlConnection, ControlListener
from kvtransfer.handshake import (
    ClusterSecret,
    PeerRefused,
    check_sender,
    prove_as_sender,
)
from kvtransfer.messages import (
    Message,
    PairChallenge,
    PairHello,
    PairProof,
    StoreOp,
    StoreRequest,
    TransferAbort,
)
from kvtransfer.network import (
    KVNetworkConfig,
    interface_address,
    interface_of,
    listen_socket,
    resolve_kv_address,
    use_interface,
)
from kvtransfer.pair import ReceiverEndpoint
from tests.ports import free_port_range

SECRET = ClusterSecret(b"s" * 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"interface": ""}, "interface='' must be a network interface name"),
        ({"interface": "x" * 16}, "must be a network interface name"),
        ({"interface": "eth0 "}, "must be a network interface name"),
        ({"port_min": 40000}, "give both ends"),
        ({"port_min": 41000, "port_max": 40000}, "min <= max"),
        ({"port_min": -1, "port_max": 5}, "port_min=-1"),
        ({"port_min": 1, "port_max": 70000}, "port_max=70000"),
    ],
)
def test_network_config_refuses_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KVNetworkConfig(**kwargs)  # type: ignore[arg-type]


def test_network_config_from_flags_then_environment() -> None:
    env = {"TANDEM_KV_INTERFACE": "eth1", "TANDEM_KV_PORTS": "40000-40999"}
    assert KVNetworkConfig.from_environment(environ=env) == KVNetworkConfig("eth1", 40000, 40999)
    flags = KVNetworkConfig.from_environment("lo", "5000-5001", environ=env)
    assert flags == KVNetworkConfig("lo", 5000, 5001)
    assert KVNetworkConfig.from_environment(environ={}) == KVNetworkConfig()
    with pytest.raises(ValueError, match="must look like MIN-MAX"):
        KVNetworkConfig.from_environment(ports="40000", environ={})


def test_addresses_resolve_from_the_interface_or_the_node_ip() -> None:
    assert interface_address("lo") == "127.0.0.1"
    assert interface_of("127.0.0.1") == "lo"
    assert resolve_kv_address(KVNetworkConfig("lo"), "192.0.2.99").host == "127.0.0.1"
    node = resolve_kv_address(KVNetworkConfig(), "127.0.0.1")
    assert (node.host, node.interface) == ("127.0.0.1", "lo")
    with pytest.raises(ValueError, match=r"KV interface 'nosuch0' has no IPv4 address.*lo"):
        interface_address("nosuch0")


def test_a_node_address_no_interface_holds_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NCCL would then choose its interface itself: the worker's log says so."""
    with caplog.at_level("WARNING", logger="kvtransfer.network"):
        address = resolve_kv_address(KVNetworkConfig(), "192.0.2.99")
    assert address.interface is None
    assert "no interface here holds the node address 192.0.2.99" in caplog.text
    assert "--kv-interface" in caplog.text


def test_use_interface_points_gloo_and_nccl_at_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth9")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    use_interface("lo")
    import os

    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"


def test_listen_socket_takes_a_port_of_the_range() -> None:
    first, last = free_port_range(3)
    config = KVNetworkConfig(None, first, last)
    socks = [listen_socket("127.0.0.1", config) for _ in range(3)]
    try:
        assert sorted(s.getsockname()[1] for s in socks) == [first, first + 1, last]
        with pytest.raises(KVTransferError, match=f"no free port in the KV range {first}-{last}"):
            listen_socket("127.0.0.1", config)
    finally:
        for sock in socks:
            sock.close()


def test_endpoint_listens_on_its_address_only() -> None:
    """The listener answers on the bound address and nowhere else (127.0.0.2 reaches this
    host too: a wildcard listener would answer there)."""
    first, last = free_port_range(10)
    endpoint = ReceiverEndpoint("127.0.0.1", SECRET, KVNetworkConfig(None, first, last))
    try:
        address = endpoint.address
        assert address.host == "127.0.0.1"
        for port in (address.control_port,):
            assert first <= port <= last
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.2", port), timeout=5)
    finally:
        endpoint.close()


def test_secret_comes_from_the_variable_or_the_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "kv-secret"
    secret_file.write_bytes(b"from-a-file-0123456789\n")
    env = {"TANDEM_KV_SECRET_FILE": str(secret_file)}
    assert ClusterSecret.from_environment(env).key == b"from-a-file-0123456789"
    env["TANDEM_KV_SECRET"] = "from-the-variable-0123"
    assert ClusterSecret.from_environment(env).key == b"from-the-variable-0123"
    assert "from-the" not in repr(ClusterSecret.from_environment(env))
    with pytest.raises(ValueError, match="no KV cluster secret: set TANDEM_KV_SECRET or"):
        ClusterSecret.from_environment({})
    with pytest.raises(ValueError, match="TANDEM_KV_SECRET_FILE='/nonexistent': cannot read"):
        ClusterSecret.from_environment({"TANDEM_KV_SECRET_FILE": "/nonexistent"})
    with pytest.raises(ValueError, match="TANDEM_KV_SECRET: the KV cluster secret is 5 bytes"):
        ClusterSecret.from_environment({"TANDEM_KV_SECRET": "short"})


def test_the_variable_and_the_file_give_the_same_secret(tmp_path: Path) -> None:
    """Surrounding whitespace (a trailing newline of `kubectl create secret --from-file`, or
    of `export X=$(cat file)`) is stripped from both, so both ends derive the same key."""
    secret_file = tmp_path / "kv-secret"
    secret_file.write_bytes(b"  same-secret-0123456789\n")
    from_file = ClusterSecret.from_environment({"TANDEM_KV_SECRET_FILE": str(secret_file)})
    from_variable = ClusterSecret.from_environment({"TANDEM_KV_SECRET": "same-secret-0123456789\n"})
    assert from_file == from_variable
    with pytest.raises(ValueError, match=r"TANDEM_KV_SECRET_FILE=.*: the KV cluster secret is 0"):
        secret_file.write_bytes(b" \n")
        ClusterSecret.from_environment({"TANDEM_KV_SECRET_FILE": str(secret_file)})


def handshake(
    sender_secret: ClusterSecret, receiver_secret: ClusterSecret
) -> tuple[object, object, bytes]:
    """Run both halves over a real connection; (sender outcome, receiver outcome, every byte
    the sender put on the wire)."""
    listener = ControlListener("127.0.0.1")
    outcomes: dict[str, object] = {}

    def receive() -> None:
        control = listener.accept(5)
        assert control is not None
        try:
            outcomes["receiver"] = check_sender(control, receiver_secret, time.monotonic() + 5)
        except KVTransferError as e:
            outcomes["receiver"] = e
        control.close()

    thread = threading.Thread(target=receive)
    thread.start()
    control = ControlConnection.connect("127.0.0.1", listener.port, 5)
    sent = bytearray()
    original = control.send

    def record(message: Message, timeout_s: float = 10.0) -> None:
        sent.extend(encode(message))
        original(message, timeout_s)

    control.send = record  # type: ignore[method-assign,assignment]
    try:
        outcomes["sender"] = prove_as_sender(control, "p/d/1", sender_secret, time.monotonic() + 5)
    except KVTransferError as e:
        outcomes["sender"] = e
    control.close()
    thread.join(10)
    listener.close()
    return outcomes["sender"], outcomes["receiver"], bytes(sent)


def test_handshake_agrees_on_a_scope_without_sending_the_secret() -> None:
    sender, receiver, sent = handshake(SECRET, SECRET)
    assert isinstance(sender, str) and len(sender) == 32
    assert receiver == ("p/d/1", sender)
    assert SECRET.key not in sent
    again, _, _ = handshake(SECRET, SECRET)
    assert again != sender, "fresh nonces make every formation's scope new"


def test_handshake_with_another_secret_is_refused_on_both_sides() -> None:
    sender, receiver, _ = handshake(ClusterSecret(b"o" * 32), SECRET)
    assert isinstance(sender, PeerRefused) and "did not prove" in str(sender)
    assert isinstance(receiver, PeerRefused)


def against_receiver(attack: Callable[[ControlConnection], None]) -> object:
    """Run `attack` (a peer without the secret) against check_sender; the receiver's outcome."""
    listener = ControlListener("127.0.0.1")
    outcome: list[object] = []

    def receive() -> None:
        control = listener.accept(5)
        assert control is not None
        try:
            outcome.append(check_sender(control, SECRET, time.monotonic() + 5))
        except KVTransferError as e:
            outcome.append(e)
        control.close()

    thread = threading.Thread(target=receive)
    thread.start()
    attacker = ControlConnection.connect("127.0.0.1", listener.port, 5)
    try:
        attack(attacker)
    finally:
        thread.join(10)
        attacker.close()
        listener.close()
    (result,) = outcome
    return result


def test_a_receivers_own_proof_reflected_back_is_refused() -> None:
    def reflect(control: ControlConnection) -> None:
        control.send(PairHello("p/d/1", b"n" * 32))
        challenge = control.recv(5)
        assert isinstance(challenge, PairChallenge)
        control.send(PairProof(challenge.proof))  # the receiver's proof as the sender's

    outcome = against_receiver(reflect)
    assert isinstance(outcome, PeerRefused) and "did not prove" in str(outcome)


def test_a_recorded_proof_replayed_is_refused() -> None:
    """A PairProof recorded off a real formation, replayed with the same hello: the receiver's
    fresh nonce makes it worthless."""
    _, _, sent = handshake(SECRET, SECRET)
    hello_bytes = len(encode(PairHello("p/d/1", b"n" * 32)))
    hello, proof = decode(sent[:hello_bytes]), decode(sent[hello_bytes:])
    assert isinstance(hello, PairHello) and isinstance(proof, PairProof)

    def replay(control: ControlConnection) -> None:
        control.send(hello)
        assert isinstance(control.recv(5), PairChallenge)
        control.send(proof)

    outcome = against_receiver(replay)
    assert isinstance(outcome, PeerRefused) and "did not prove" in str(outcome)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (encode(TransferAbort("t", "x")), "ABORT frame where only HELLO, PROOF may come"),
        (encode(StoreRequest(StoreOp.SET, "k", b"v")), "STORE_REQUEST frame where only"),
        # a huge payload is refused on its header, before any of it is read
        (encode(PairHello("p", b"n" * 32))[:5] + (1 << 20).to_bytes(4, "little"), "at most 162"),
    ],
)
def test_an_unproven_peer_may_send_only_small_handshake_frames(frame: bytes, match: str) -> None:
    outcome = against_receiver(lambda control: control._sock.sendall(frame))
    assert isinstance(outcome, PeerRefused) and re.search(match, str(outcome)), outcome
