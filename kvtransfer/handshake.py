"""Who may form a KV pair: a challenge-response over the control connection that proves both
ends know the per-cluster secret (TANDEM_KV_SECRET or TANDEM_KV_SECRET_FILE) without sending it:
PairHello(nonce_s) -> PairChallenge(nonce_r, proof_r) -> PairProof(proof_s), each proof an
HMAC-SHA256 over its role, the pair key and both fresh nonces. The secret is never sent, logged
or pickled. It authenticates who opened the connection, not later frames or the KV data path;
what it protects and what it does not: docs/kvtransfer.md.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from contracts.errors import KVTransferError
from kvtransfer.control import ControlConnection
from kvtransfer.messages import (
    MAX_PAIR_KEY_BYTES,
    NONCE_BYTES,
    PROOF_BYTES,
    MessageType,
    PairChallenge,
    PairHello,
    PairProof,
)

SECRET_ENV = "TANDEM_KV_SECRET"
SECRET_FILE_ENV = "TANDEM_KV_SECRET_FILE"
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
_SENDER, _RECEIVER, _STORE = b"sender", b"receiver", b"store"
M = TypeVar("M", PairHello, PairChallenge, PairProof)
# The largest handshake payload (a PairHello with the longest pair key): all an unproven peer
# may send before the other end knows who it is.
MAX_HANDSHAKE_PAYLOAD_BYTES = 2 + MAX_PAIR_KEY_BYTES + NONCE_BYTES


class PeerRefused(KVTransferError):
    """A peer did not prove the cluster secret (or did not finish proving it in time)."""


@dataclass(frozen=True, slots=True)
class ClusterSecret:
    """The per-cluster secret of KV pairing (at least MIN_SECRET_BYTES; never printed)."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if type(self.key) is not bytes:
            raise ValueError(f"key must be bytes, got {type(self.key).__name__}")
        if not MIN_SECRET_BYTES <= len(self.key) <= MAX_SECRET_BYTES:
            raise ValueError(
                f"the KV cluster secret is {len(self.key)} bytes, must be "
                f"{MIN_SECRET_BYTES}..{MAX_SECRET_BYTES}"
            )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ClusterSecret:
        """The secret named by TANDEM_KV_SECRET, else read from TANDEM_KV_SECRET_FILE
        (surrounding whitespace stripped). Raises ValueError naming the variable when neither
        is set, the file cannot be read, or the secret is too short."""
        env = os.environ if environ is None else environ
        value = env.get(SECRET_ENV)
        if value:
            key, source = value.encode().strip(), SECRET_ENV
        else:
            path = env.get(SECRET_FILE_ENV)
            if not path:
                raise ValueError(
                    f"no KV cluster secret: set {SECRET_ENV} or {SECRET_FILE_ENV} in the "
                    "environment of every worker (on a Ray cluster joined by address: of every "
                    "node's raylet, e.g. the Helm chart's mounted Secret); all need the same one"
                )
            try:
                with open(path, "rb") as file:
                    key = file.read(MAX_SECRET_BYTES + 1).strip()
            except OSError as e:
                raise ValueError(f"{SECRET_FILE_ENV}={path!r}: cannot read it: {e}") from None
            source = f"{SECRET_FILE_ENV}={path!r}"
        try:
            return cls(key)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def mac(self, label: bytes, pair_key: str, sender_nonce: bytes, receiver_nonce: bytes) -> bytes:
        data = b"tandem-kv/" + label + b"\0" + pair_key.encode() + b"\0"
        return hmac.new(self.key, data + sender_nonce + receiver_nonce, hashlib.sha256).digest()

    def scope(self, pair_key: str, sender_nonce: bytes, receiver_nonce: bytes) -> str:
        """The rendezvous scope of one formation (hex), known only to the two ends."""
        return self.mac(_STORE, pair_key, sender_nonce, receiver_nonce).hex()[:32]


def prove_as_sender(
    control: ControlConnection, pair_key: str, secret: ClusterSecret, deadline: float
) -> str:
    """The sender's half (see docs/kvtransfer.md); returns the rendezvous scope. Raises
    PeerRefused if the receiver does not prove the secret, KVTransferError if the connection
    fails or `deadline` (time.monotonic) passes first."""
    sender_nonce = secrets.token_bytes(NONCE_BYTES)
    control.restrict({MessageType.CHALLENGE}, NONCE_BYTES + PROOF_BYTES)  # until it proves
    control.send(PairHello(pair_key, sender_nonce), _left_s(deadline, control))
    challenge = _receive(control, PairChallenge, deadline)
    expected = secret.mac(_RECEIVER, pair_key, sender_nonce, challenge.nonce)
    if not hmac.compare_digest(challenge.proof, expected):
        raise PeerRefused(
            f"the receiver at {control.peer} did not prove the KV cluster secret (do both ends "
            "have the same one?)"
        )
    proof = secret.mac(_SENDER, pair_key, sender_nonce, challenge.nonce)
    control.restrict(None)
    control.send(PairProof(proof), _left_s(deadline, control))
    return secret.scope(pair_key, sender_nonce, challenge.nonce)


def check_sender(
    control: ControlConnection, secret: ClusterSecret, deadline: float
) -> tuple[str, str]:
    """The receiver's half: (pair key, rendezvous scope) of a sender that proved the secret.
    Raises PeerRefused for anything else: a first message that is not PairHello, a wrong
    proof, a connection that closes or stays silent until `deadline` (time.monotonic)."""
    control.restrict({MessageType.HELLO, MessageType.PROOF}, MAX_HANDSHAKE_PAYLOAD_BYTES)
    try:
        hello = _receive(control, PairHello, deadline)
        receiver_nonce = secrets.token_bytes(NONCE_BYTES)
        proof = secret.mac(_RECEIVER, hello.pair_key, hello.nonce, receiver_nonce)
        control.send(PairChallenge(receiver_nonce, proof), _left_s(deadline, control))
        answer = _receive(control, PairProof, deadline)
    except PeerRefused:
        raise
    except KVTransferError as e:
        raise PeerRefused(f"{control.peer}: {e}") from None
    expected = secret.mac(_SENDER, hello.pair_key, hello.nonce, receiver_nonce)
    if not hmac.compare_digest(answer.proof, expected):
        raise PeerRefused(f"{control.peer} did not prove the KV cluster secret")
    control.restrict(None)
    return hello.pair_key, secret.scope(hello.pair_key, hello.nonce, receiver_nonce)


def _receive(control: ControlConnection, kind: type[M], deadline: float) -> M:
    message = control.recv(_left_s(deadline, control))
    if message is None:
        raise PeerRefused(f"{control.peer}: no {kind.__name__} in time")
    if not isinstance(message, kind):
        raise PeerRefused(f"{control.peer}: expected {kind.__name__}, got {type(message).__name__}")
    return message


def _left_s(deadline: float, control: ControlConnection) -> float:
    left_s = deadline - time.monotonic()
    if left_s <= 0:
        raise PeerRefused(f"{control.peer}: pairing handshake timed out")
    return left_s
