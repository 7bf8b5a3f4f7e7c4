"""The control messages of the KV transfer protocol as frozen dataclasses: the handshake
(PairHello, PairChallenge, PairProof), the rendezvous (StoreRequest, StoreReply) and one
transfer (TransferOffer, TransferReady, TransferDone, TransferAck, TransferAbort). Every message
validates its fields on construction (ValueError naming the field), so whatever exists can be
encoded and decoded (kvtransfer.codec). The message sequence and each payload's layout:
docs/kvtransfer.md.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import IntEnum

from kvtransfer.layout import KVLayout

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

MAX_TRANSFER_ID_BYTES = 64
MAX_REQUEST_ID_BYTES = 128
MAX_REASON_BYTES = 256
MAX_DTYPE_BYTES = 64  # "float8_e4m3fn/per_head_fp32:<16 hex>" is 44
MAX_PAIR_KEY_BYTES = 128
NONCE_BYTES = 32  # of PairHello and PairChallenge
PROOF_BYTES = 32  # an HMAC-SHA256 (kvtransfer.handshake)
MAX_STORE_KEY_BYTES = 512  # a rendezvous key (kvtransfer.rendezvous)
MAX_STORE_VALUE_BYTES = 1 << 16  # a rendezvous value: gloo addresses, NCCL's unique id
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
MAX_BLOCK_IDS = 1 << 20  # per message; 16-token blocks make that 16M tokens


class MessageType(IntEnum):
    """The type byte of a frame."""

    OFFER = 1
    READY = 2
    DONE = 3
    ACK = 4
    ABORT = 5
    HELLO = 6
    CHALLENGE = 7
    PROOF = 8
    STORE_REQUEST = 9
    STORE_REPLY = 10


class StoreOp(IntEnum):
    """The operation of a StoreRequest (torch.distributed.Store's, one key each)."""

    SET = 1
    GET = 2  # waits for the key
    ADD = 3
    CHECK = 4
    WAIT = 5
    COMPARE_SET = 6
    DELETE = 7
    NUM_KEYS = 8
    DONE = 9  # the sender's formation is over: the receiver stops serving the rendezvous


@dataclass(frozen=True, slots=True)
class TransferOffer:
    """Sender -> receiver: KV of `num_tokens` tokens sits in `src_block_ids`, pinned for
    `lease_ms` unless acknowledged. The blocks hold the tokens in order; the last may be part
    full, so num_tokens <= len(src_block_ids) * layout.block_size."""

    transfer_id: str  # 1..64 UTF-8 bytes, unique per transfer
    request_id: str  # 1..128 UTF-8 bytes
    layout: KVLayout
    num_tokens: int  # u32
    src_block_ids: tuple[int, ...]  # u32 each, distinct, at most MAX_BLOCK_IDS
    lease_ms: int  # u32, >= 1
    # The payload comes as chunks of this many layers (all blocks each), in layer order, so
    # the sender can ship while prefill computes later layers; None: all layers at once.
    layers_per_chunk: int | None = None  # u32 in [1, layout.num_layers] once constructed

    def __post_init__(self) -> None:
        _check_str("transfer_id", self.transfer_id, MAX_TRANSFER_ID_BYTES, min_bytes=1)
        _check_str("request_id", self.request_id, MAX_REQUEST_ID_BYTES, min_bytes=1)
        if not isinstance(self.layout, KVLayout):
            raise ValueError(f"layout={self.layout!r} must be a KVLayout")
        object.__setattr__(self, "src_block_ids", _block_ids("src_block_ids", self.src_block_ids))
        _check_uint("num_tokens", self.num_tokens, U32_MAX)
        capacity_tokens = len(self.src_block_ids) * self.layout.block_size
        if self.num_tokens > capacity_tokens:
            raise ValueError(
                f"num_tokens={self.num_tokens} exceeds the {len(self.src_block_ids)} src blocks "
                f"of {self.layout.block_size} tokens ({capacity_tokens})"
            )
        _check_uint("lease_ms", self.lease_ms, U32_MAX, minimum=1)
        if self.layers_per_chunk is None:
            object.__setattr__(self, "layers_per_chunk", self.layout.num_layers)
        _check_uint("layers_per_chunk", self.layers_per_chunk, self.layout.num_layers, minimum=1)

    @property
    def num_chunks(self) -> int:
        """Payload messages of this transfer (one per layer group)."""
        assert self.layers_per_chunk is not None
        return -(-self.layout.num_layers // self.layers_per_chunk)


@dataclass(frozen=True, slots=True)
class TransferReady:
    """Receiver -> sender: destination blocks reserved, one per offered block, in order."""

    transfer_id: str
    dst_block_ids: tuple[int, ...]  # u32 each, distinct, at most MAX_BLOCK_IDS

    def __post_init__(self) -> None:
        _check_str("transfer_id", self.transfer_id, MAX_TRANSFER_ID_BYTES, min_bytes=1)
        object.__setattr__(self, "dst_block_ids", _block_ids("dst_block_ids", self.dst_block_ids))


@dataclass(frozen=True, slots=True)
class TransferDone:
    """Sender -> receiver, after the payload: how many bytes were sent and their checksum.

    checksum is `payload_checksum` of the payload bytes in the order they were sent: zlib CRC-32,
    zero-extended into the u64 field (the width leaves room for a stronger checksum later).
    """

    transfer_id: str
    num_bytes: int  # u64
    checksum: int  # u64

    def __post_init__(self) -> None:
        _check_str("transfer_id", self.transfer_id, MAX_TRANSFER_ID_BYTES, min_bytes=1)
        _check_uint("num_bytes", self.num_bytes, U64_MAX)
        _check_uint("checksum", self.checksum, U64_MAX)


@dataclass(frozen=True, slots=True)
class TransferAck:
    """Receiver -> sender: the payload arrived intact (ok) or not (reason says why)."""

    transfer_id: str
    ok: bool
    reason: str = ""  # at most 256 UTF-8 bytes

    def __post_init__(self) -> None:
        _check_str("transfer_id", self.transfer_id, MAX_TRANSFER_ID_BYTES, min_bytes=1)
        if type(self.ok) is not bool:
            raise ValueError(f"ok={self.ok!r} must be a bool")
        _check_str("reason", self.reason, MAX_REASON_BYTES)


@dataclass(frozen=True, slots=True)
class TransferAbort:
    """Either way: the transfer is over without success; both sides free its blocks."""

    transfer_id: str
    reason: str  # at most 256 UTF-8 bytes

    def __post_init__(self) -> None:
        _check_str("transfer_id", self.transfer_id, MAX_TRANSFER_ID_BYTES, min_bytes=1)
        _check_str("reason", self.reason, MAX_REASON_BYTES)


@dataclass(frozen=True, slots=True)
class PairHello:
    """Sender -> receiver, first on a control connection: the pair key of the channel and the
    sender's challenge to the receiver."""

    pair_key: str  # 1..128 UTF-8 bytes
    nonce: bytes  # NONCE_BYTES random bytes, new for every formation

    def __post_init__(self) -> None:
        _check_str("pair_key", self.pair_key, MAX_PAIR_KEY_BYTES, min_bytes=1)
        _check_fixed_bytes("nonce", self.nonce, NONCE_BYTES)


@dataclass(frozen=True, slots=True)
class PairChallenge:
    """Receiver -> sender, after PairHello: the receiver's nonce and its proof of the secret."""

    nonce: bytes  # NONCE_BYTES random bytes
    proof: bytes  # PROOF_BYTES

    def __post_init__(self) -> None:
        _check_fixed_bytes("nonce", self.nonce, NONCE_BYTES)
        _check_fixed_bytes("proof", self.proof, PROOF_BYTES)


@dataclass(frozen=True, slots=True)
class PairProof:
    """Sender -> receiver, after PairChallenge: the sender's proof of the secret."""

    proof: bytes  # PROOF_BYTES

    def __post_init__(self) -> None:
        _check_fixed_bytes("proof", self.proof, PROOF_BYTES)


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """Sender -> receiver, during formation: one rendezvous store operation."""

    op: StoreOp
    key: str = ""  # 0..MAX_STORE_KEY_BYTES UTF-8 bytes
    value: bytes = b""  # SET's value, COMPARE_SET's expected; at most MAX_STORE_VALUE_BYTES
    desired: bytes = b""  # COMPARE_SET's desired value
    amount: int = 0  # ADD's, an i64; WAIT's and GET's time limit in ms

    def __post_init__(self) -> None:
        if type(self.op) is not StoreOp:
            try:
                object.__setattr__(self, "op", StoreOp(self.op))
            except ValueError:
                raise ValueError(f"op={self.op!r} must be a StoreOp") from None
        _check_str("key", self.key, MAX_STORE_KEY_BYTES)
        _check_blob("value", self.value)
        _check_blob("desired", self.desired)
        _check_int("amount", self.amount, I64_MIN, I64_MAX)


@dataclass(frozen=True, slots=True)
class StoreReply:
    """Receiver -> sender: the outcome of the last StoreRequest."""

    ok: bool
    value: bytes = b""  # GET's value, COMPARE_SET's result
    number: int = 0  # ADD's new value, CHECK's and DELETE's 0 or 1, NUM_KEYS's count
    error: str = ""  # when not ok; at most MAX_REASON_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.ok, bool):
            raise ValueError(f"ok={self.ok!r} must be a bool")
        _check_blob("value", self.value)
        _check_int("number", self.number, I64_MIN, I64_MAX)
        _check_str("error", self.error, MAX_REASON_BYTES)


Message = (
    TransferOffer
    | TransferReady
    | TransferDone
    | TransferAck
    | TransferAbort
    | PairHello
    | PairChallenge
    | PairProof
    | StoreRequest
    | StoreReply
)


def payload_checksum(payload: bytes | bytearray | memoryview) -> int:
    """The TransferDone checksum of payload bytes: zlib CRC-32, as an unsigned int."""
    return zlib.crc32(payload) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Field validation (construction; ValueError names the field)


def _check_str(name: str, value: object, max_bytes: int, min_bytes: int = 0) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r} must be a str")
    try:
        num_bytes = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}={value!r} is not encodable as UTF-8: {e.reason}") from None
    if not min_bytes <= num_bytes <= max_bytes:
        raise ValueError(f"{name} is {num_bytes} UTF-8 bytes, must be {min_bytes}..{max_bytes}")


def _check_blob(name: str, value: object) -> None:
    if type(value) is not bytes:
        raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) > MAX_STORE_VALUE_BYTES:
        raise ValueError(f"{name} is {len(value)} bytes, limit {MAX_STORE_VALUE_BYTES}")


def _check_int(name: str, value: object, minimum: int, maximum: int) -> None:
    if type(value) is not int or not minimum <= value <= maximum:
        raise ValueError(f"{name}={value!r} must be an int in [{minimum}, {maximum}]")


def _check_fixed_bytes(name: str, value: object, num_bytes: int) -> None:
    if type(value) is not bytes:
        raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) != num_bytes:
        raise ValueError(f"{name} is {len(value)} bytes, must be {num_bytes}")


def _check_uint(name: str, value: object, maximum: int, minimum: int = 0) -> None:
    if type(value) is not int or not minimum <= value <= maximum:
        raise ValueError(f"{name}={value!r} must be an int in [{minimum}, {maximum}]")


def _block_ids(name: str, ids: object) -> tuple[int, ...]:
    """`ids` as a tuple, checked: u32 ints, distinct, at most MAX_BLOCK_IDS."""
    if not isinstance(ids, (tuple, list)):
        raise ValueError(f"{name}={ids!r} must be a tuple or list of ints")
    block_ids = tuple(ids)
    if len(block_ids) > MAX_BLOCK_IDS:
        raise ValueError(f"{name} has {len(block_ids)} ids, limit {MAX_BLOCK_IDS}")
    for block_id in block_ids:
        if type(block_id) is not int or not 0 <= block_id <= U32_MAX:
            raise ValueError(f"{name} holds {block_id!r}; block ids are ints in [0, {U32_MAX}]")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError(f"{name} repeats a block id: {_first_repeat(block_ids)}")
    return block_ids


def _first_repeat(ids: tuple[int, ...]) -> int:
    seen: set[int] = set()
    for block_id in ids:
        if block_id in seen:
            return block_id
        seen.add(block_id)
    raise AssertionError("no repeated id")
