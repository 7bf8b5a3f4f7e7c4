"""Control messages of the KV transfer protocol and their fixed binary wire format.

A pair's control connection opens with a challenge-response (kvtransfer.handshake): PairHello
(sender -> receiver) names the pair key and brings the sender's nonce; PairChallenge (receiver ->
sender) brings the receiver's nonce and its proof of the cluster secret; PairProof (sender ->
receiver) the sender's. Only then do both sides form their PairChannel. One transfer, sender =
prefill side, receiver = decode side:

    sender                                   receiver
      | -- TransferOffer (src blocks, lease) --> |  reserves destination blocks
      | <-- TransferReady (dst blocks) --------- |
      | ==== KV payload (the transport) =======> |
      | -- TransferDone (bytes, checksum) -----> |  verifies, joins the sequence
      | <-- TransferAck (ok, reason) ----------- |  sender unpins its blocks
    TransferAbort (reason) may go either way at any point; both sides then free their blocks.

Frame (all integers little-endian):

    +------------+---------+--------------------+------------------------+
    | b"TKV1" 4B | type u8 | payload length u32 | payload (length bytes) |
    +------------+---------+--------------------+------------------------+

    payload fields, in order:            str = u16 byte length + UTF-8 bytes
      1 TransferOffer  str transfer_id, str request_id,
                       str model_id, str dtype (+ "/" + scale scheme if any),
                       u32 block_size, u32 num_layers,
                       u32 num_kv_heads, u32 head_dim, u32 num_tokens, u32 lease_ms,
                       u32 layers_per_chunk,
                       ids src_block_ids       ids = u32 count + count x u32
      2 TransferReady  str transfer_id, ids dst_block_ids
      3 TransferDone   str transfer_id, u64 num_bytes, u64 checksum
      4 TransferAck    str transfer_id, u8 ok (0 or 1), str reason
      5 TransferAbort  str transfer_id, str reason
      6 PairHello      str pair_key, 32B nonce
      7 PairChallenge  32B nonce, 32B proof
      8 PairProof      32B proof
      9 StoreRequest   u8 op, str key, blob value, blob desired, i64 amount
                                          blob = u32 byte length + bytes
     10 StoreReply     u8 ok, blob value, i64 number, str error

StoreRequest / StoreReply carry the pair's rendezvous (kvtransfer.rendezvous: the sender's
torch.distributed store operations, answered by the receiver) between PairProof and the first
transfer message; nothing else may send them.

Every message validates its fields on construction (ValueError naming the field), so whatever
`encode` produces, `decode` accepts, and `decode(encode(m)) == m`. The encoding is canonical:
a frame `decode` accepts re-encodes to the same bytes.

`decode` is a pure parser over `struct` and strict UTF-8. It never unpickles, evaluates or imports
anything, checks every length and count against the bytes actually present before reading, and
raises KVTransferError naming the problem for any frame it does not accept (a pickle stream, a
truncated or padded frame, an unknown type, over-long strings, too many blocks, invalid UTF-8).
This module must not grow a generic object codec: new fields mean a new explicit layout.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from contracts.errors import KVTransferError
from kvtransfer.layout import MAX_MODEL_ID_BYTES, KVLayout

MAGIC = b"TKV1"
_HEADER = struct.Struct("<4sBI")  # magic, message type, payload length
HEADER_BYTES = _HEADER.size
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

MAX_TRANSFER_ID_BYTES = 64
MAX_REQUEST_ID_BYTES = 128
MAX_REASON_BYTES = 256
MAX_DTYPE_BYTES = 32
MAX_PAIR_KEY_BYTES = 128
NONCE_BYTES = 32  # of PairHello and PairChallenge
PROOF_BYTES = 32  # an HMAC-SHA256 (kvtransfer.handshake)
MAX_STORE_KEY_BYTES = 512  # a rendezvous key (kvtransfer.rendezvous)
MAX_STORE_VALUE_BYTES = 1 << 16  # a rendezvous value: gloo addresses, NCCL's unique id
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
MAX_BLOCK_IDS = 1 << 20  # per message; 16-token blocks make that 16M tokens
# The largest payload any message can have: an offer with every string and list at its limit.
MAX_PAYLOAD_BYTES = (
    2 * 4
    + MAX_TRANSFER_ID_BYTES
    + MAX_REQUEST_ID_BYTES
    + MAX_MODEL_ID_BYTES
    + MAX_DTYPE_BYTES
    + 4 * 7
    + 4
    + 4 * MAX_BLOCK_IDS
)


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


# ---------------------------------------------------------------------------------------------
# Encoding


def encode(msg: Message) -> bytes:
    """The frame of `msg`. Raises TypeError for anything that is not a Message."""
    encoder = _ENCODERS.get(type(msg))
    if encoder is None:
        raise TypeError(f"cannot encode {type(msg).__name__}; not a transfer message")
    msg_type, encode_payload = encoder
    payload = encode_payload(msg)
    assert len(payload) <= MAX_PAYLOAD_BYTES, f"payload of {len(payload)} bytes over the limit"
    return _HEADER.pack(MAGIC, msg_type, len(payload)) + payload


def _str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _ids(ids: tuple[int, ...]) -> bytes:
    return struct.pack(f"<I{len(ids)}I", len(ids), *ids)


def _encode_offer(m: TransferOffer) -> bytes:
    lay = m.layout
    return b"".join(
        (
            _str(m.transfer_id),
            _str(m.request_id),
            _str(lay.model_id),
            _str(lay.wire_dtype),
            struct.pack("<4I", lay.block_size, lay.num_layers, lay.num_kv_heads, lay.head_dim),
            struct.pack("<3I", m.num_tokens, m.lease_ms, m.layers_per_chunk),
            _ids(m.src_block_ids),
        )
    )


def _encode_ready(m: TransferReady) -> bytes:
    return _str(m.transfer_id) + _ids(m.dst_block_ids)


def _encode_done(m: TransferDone) -> bytes:
    return _str(m.transfer_id) + _U64.pack(m.num_bytes) + _U64.pack(m.checksum)


def _encode_ack(m: TransferAck) -> bytes:
    return _str(m.transfer_id) + bytes((int(m.ok),)) + _str(m.reason)


def _encode_hello(m: PairHello) -> bytes:
    return _str(m.pair_key) + m.nonce


def _encode_challenge(m: PairChallenge) -> bytes:
    return m.nonce + m.proof


def _encode_proof(m: PairProof) -> bytes:
    return m.proof


def _encode_abort(m: TransferAbort) -> bytes:
    return _str(m.transfer_id) + _str(m.reason)


def _blob(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


def _encode_store_request(m: StoreRequest) -> bytes:
    fields = (bytes((m.op,)), _str(m.key), _blob(m.value), _blob(m.desired), _I64.pack(m.amount))
    return b"".join(fields)


def _encode_store_reply(m: StoreReply) -> bytes:
    return bytes((int(m.ok),)) + _blob(m.value) + _I64.pack(m.number) + _str(m.error)


_ENCODERS: dict[type, tuple[MessageType, Callable[[Any], bytes]]] = {
    TransferOffer: (MessageType.OFFER, _encode_offer),
    TransferReady: (MessageType.READY, _encode_ready),
    TransferDone: (MessageType.DONE, _encode_done),
    TransferAck: (MessageType.ACK, _encode_ack),
    TransferAbort: (MessageType.ABORT, _encode_abort),
    PairHello: (MessageType.HELLO, _encode_hello),
    PairChallenge: (MessageType.CHALLENGE, _encode_challenge),
    PairProof: (MessageType.PROOF, _encode_proof),
    StoreRequest: (MessageType.STORE_REQUEST, _encode_store_request),
    StoreReply: (MessageType.STORE_REPLY, _encode_store_reply),
}


# ---------------------------------------------------------------------------------------------
# Decoding (KVTransferError for every frame not accepted)


def read_header(header: bytes | bytearray | memoryview) -> tuple[MessageType, int]:
    """Check a frame's first HEADER_BYTES bytes; return its type and payload length.

    Lets a stream reader refuse a bad frame (a pickle, say) after 9 bytes, before reading the
    payload. Raises KVTransferError for a short header, bad magic, unknown type, or a payload
    length over MAX_PAYLOAD_BYTES.
    """
    view = memoryview(header).cast("B")
    if len(view) < HEADER_BYTES:
        raise KVTransferError(f"truncated header: {len(view)} bytes, need {HEADER_BYTES}")
    magic, type_byte, payload_bytes = _HEADER.unpack_from(view)
    if magic != MAGIC:
        hint = "; a pickle stream, refused" if magic[:1] == b"\x80" else ""
        raise KVTransferError(f"bad magic {magic!r}, expected {MAGIC!r}{hint}")
    if type_byte not in _DECODERS:
        known = ", ".join(f"{t.value} {t.name}" for t in MessageType)
        raise KVTransferError(f"unknown message type {type_byte}; known: {known}")
    if payload_bytes > MAX_PAYLOAD_BYTES:
        raise KVTransferError(
            f"payload length {payload_bytes} exceeds the limit of {MAX_PAYLOAD_BYTES} bytes"
        )
    return MessageType(type_byte), payload_bytes


def decode(data: bytes | bytearray | memoryview) -> Message:
    """The message in one whole frame. Raises KVTransferError if `data` is not exactly one
    valid frame; never executes or imports anything, allocates in proportion to len(data)."""
    view = memoryview(data).cast("B")
    msg_type, payload_bytes = read_header(view)
    present_bytes = len(view) - HEADER_BYTES
    if present_bytes < payload_bytes:
        raise KVTransferError(
            f"truncated frame: header declares {payload_bytes} payload bytes, "
            f"{present_bytes} present"
        )
    if present_bytes > payload_bytes:
        raise KVTransferError(
            f"{present_bytes - payload_bytes} trailing bytes after the {payload_bytes}-byte payload"
        )
    cls, decode_fields = _DECODERS[msg_type]
    reader = _Reader(view[HEADER_BYTES:], cls.__name__)
    fields = decode_fields(reader)
    reader.finish()
    try:
        return cls(**fields)
    except ValueError as e:
        raise KVTransferError(f"invalid {cls.__name__}: {e}") from None


class _Reader:
    """Reads fields off a payload, bounds-checked; errors name the message and the field."""

    def __init__(self, payload: memoryview, message_name: str) -> None:
        self.payload = payload
        self.offset = 0
        self.message_name = message_name

    def _take(self, num_bytes: int, field: str) -> memoryview:
        left_bytes = len(self.payload) - self.offset
        if num_bytes > left_bytes:
            raise KVTransferError(
                f"{self.message_name} truncated: {field} needs {num_bytes} bytes at payload "
                f"offset {self.offset}, {left_bytes} left"
            )
        raw = self.payload[self.offset : self.offset + num_bytes]
        self.offset += num_bytes
        return raw

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self._take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(_U64.unpack(self._take(8, field))[0])

    def flag(self, field: str) -> bool:
        value = self.u8(field)
        if value > 1:
            raise KVTransferError(f"{self.message_name}: {field} is {value}, must be 0 or 1")
        return value == 1

    def string(self, field: str, max_bytes: int) -> str:
        (num_bytes,) = _U16.unpack(self._take(2, f"{field} length"))
        if num_bytes > max_bytes:
            raise KVTransferError(
                f"{self.message_name}: {field} is {num_bytes} bytes, limit {max_bytes}"
            )
        raw = bytes(self._take(num_bytes, field))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise KVTransferError(
                f"{self.message_name}: {field} is not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from None

    def i64(self, field: str) -> int:
        return int(_I64.unpack(self._take(8, field))[0])

    def blob(self, field: str) -> bytes:
        num_bytes = self.u32(f"{field} length")
        if num_bytes > MAX_STORE_VALUE_BYTES:
            raise KVTransferError(
                f"{self.message_name}: {field} is {num_bytes} bytes, limit {MAX_STORE_VALUE_BYTES}"
            )
        return bytes(self._take(num_bytes, field))

    def fixed(self, field: str, num_bytes: int) -> bytes:
        return bytes(self._take(num_bytes, field))

    def block_ids(self, field: str) -> tuple[int, ...]:
        count = self.u32(f"{field} count")
        if count > MAX_BLOCK_IDS:
            raise KVTransferError(
                f"{self.message_name}: {field} count {count} exceeds the limit {MAX_BLOCK_IDS}"
            )
        raw = self._take(4 * count, field)  # checked against the bytes present first
        return struct.unpack(f"<{count}I", raw)

    def finish(self) -> None:
        left_bytes = len(self.payload) - self.offset
        if left_bytes:
            raise KVTransferError(
                f"{self.message_name}: {left_bytes} unread payload bytes after the last field"
            )


def _decode_offer(r: _Reader) -> dict[str, Any]:
    transfer_id = r.string("transfer_id", MAX_TRANSFER_ID_BYTES)
    request_id = r.string("request_id", MAX_REQUEST_ID_BYTES)
    model_id = r.string("model_id", MAX_MODEL_ID_BYTES)
    dtype = r.string("dtype", MAX_DTYPE_BYTES)
    dims = {name: r.u32(name) for name in ("block_size", "num_layers", "num_kv_heads", "head_dim")}
    num_tokens = r.u32("num_tokens")
    lease_ms = r.u32("lease_ms")
    layers_per_chunk = r.u32("layers_per_chunk")
    src_block_ids = r.block_ids("src_block_ids")
    try:
        dtype, scale_scheme = KVLayout.split_wire_dtype(dtype)
        layout = KVLayout(model_id=model_id, dtype=dtype, scale_scheme=scale_scheme, **dims)
    except ValueError as e:
        raise KVTransferError(f"invalid TransferOffer layout: {e}") from None
    return {
        "transfer_id": transfer_id,
        "request_id": request_id,
        "layout": layout,
        "num_tokens": num_tokens,
        "src_block_ids": src_block_ids,
        "lease_ms": lease_ms,
        "layers_per_chunk": layers_per_chunk,
    }


def _decode_ready(r: _Reader) -> dict[str, Any]:
    transfer_id = r.string("transfer_id", MAX_TRANSFER_ID_BYTES)
    return {"transfer_id": transfer_id, "dst_block_ids": r.block_ids("dst_block_ids")}


def _decode_done(r: _Reader) -> dict[str, Any]:
    transfer_id = r.string("transfer_id", MAX_TRANSFER_ID_BYTES)
    num_bytes = r.u64("num_bytes")
    return {"transfer_id": transfer_id, "num_bytes": num_bytes, "checksum": r.u64("checksum")}


def _decode_ack(r: _Reader) -> dict[str, Any]:
    transfer_id = r.string("transfer_id", MAX_TRANSFER_ID_BYTES)
    ok = r.flag("ok")
    return {"transfer_id": transfer_id, "ok": ok, "reason": r.string("reason", MAX_REASON_BYTES)}


def _decode_abort(r: _Reader) -> dict[str, Any]:
    transfer_id = r.string("transfer_id", MAX_TRANSFER_ID_BYTES)
    return {"transfer_id": transfer_id, "reason": r.string("reason", MAX_REASON_BYTES)}


def _decode_hello(r: _Reader) -> dict[str, Any]:
    pair_key = r.string("pair_key", MAX_PAIR_KEY_BYTES)
    return {"pair_key": pair_key, "nonce": r.fixed("nonce", NONCE_BYTES)}


def _decode_challenge(r: _Reader) -> dict[str, Any]:
    nonce = r.fixed("nonce", NONCE_BYTES)
    return {"nonce": nonce, "proof": r.fixed("proof", PROOF_BYTES)}


def _decode_proof(r: _Reader) -> dict[str, Any]:
    return {"proof": r.fixed("proof", PROOF_BYTES)}


def _decode_store_request(r: _Reader) -> dict[str, Any]:
    op = r.u8("op")
    if op not in StoreOp._value2member_map_:
        raise KVTransferError(f"StoreRequest: op {op} is not a store operation")
    key = r.string("key", MAX_STORE_KEY_BYTES)
    value, desired = r.blob("value"), r.blob("desired")
    return {"op": StoreOp(op), "key": key, "value": value, "desired": desired,
            "amount": r.i64("amount")}  # fmt: skip


def _decode_store_reply(r: _Reader) -> dict[str, Any]:
    ok = r.flag("ok")
    value = r.blob("value")
    number = r.i64("number")
    error = r.string("error", MAX_REASON_BYTES)
    return {"ok": ok, "value": value, "number": number, "error": error}


_DECODERS: dict[int, tuple[type[Message], Callable[[_Reader], dict[str, Any]]]] = {
    MessageType.OFFER: (TransferOffer, _decode_offer),
    MessageType.READY: (TransferReady, _decode_ready),
    MessageType.DONE: (TransferDone, _decode_done),
    MessageType.ACK: (TransferAck, _decode_ack),
    MessageType.ABORT: (TransferAbort, _decode_abort),
    MessageType.HELLO: (PairHello, _decode_hello),
    MessageType.CHALLENGE: (PairChallenge, _decode_challenge),
    MessageType.PROOF: (PairProof, _decode_proof),
    MessageType.STORE_REQUEST: (StoreRequest, _decode_store_request),
    MessageType.STORE_REPLY: (StoreReply, _decode_store_reply),
}
