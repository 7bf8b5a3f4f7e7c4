"""The fixed binary frame of control messages (kvtransfer.messages): `encode` and `decode`.

    +------------+---------+--------------------+------------------------+
    | b"TKV1" 4B | type u8 | payload length u32 | payload (length bytes) |
    +------------+---------+--------------------+------------------------+

`decode` is a pure parser over `struct` and strict UTF-8: it never unpickles, evaluates or
imports anything, checks every length against the bytes present, and raises KVTransferError
naming the problem. The encoding is canonical; each message's payload layout: docs/kvtransfer.md.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from contracts.errors import KVTransferError
from kvtransfer.layout import MAX_MODEL_ID_BYTES, KVLayout
from kvtransfer.messages import (
    MAX_BLOCK_IDS,
    MAX_DTYPE_BYTES,
    MAX_PAIR_KEY_BYTES,
    MAX_REASON_BYTES,
    MAX_REQUEST_ID_BYTES,
    MAX_STORE_KEY_BYTES,
    MAX_STORE_VALUE_BYTES,
    MAX_TRANSFER_ID_BYTES,
    NONCE_BYTES,
    PROOF_BYTES,
    Message,
    MessageType,
    PairChallenge,
    PairHello,
    PairProof,
    StoreOp,
    StoreReply,
    StoreRequest,
    TransferAbort,
    TransferAck,
    TransferDone,
    TransferOffer,
    TransferReady,
)

MAGIC = b"TKV1"
_HEADER = struct.Struct("<4sBI")  # magic, message type, payload length
HEADER_BYTES = _HEADER.size
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
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
