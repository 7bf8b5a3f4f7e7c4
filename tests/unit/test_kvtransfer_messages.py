"""Transfer control messages (kvtransfer.messages, kvtransfer.codec): every message type
round-trips through its frame, the wire format is pinned byte for byte, every malformed frame
is refused with a KVTransferError that names the problem, a real pickle exploit is refused
without running, and random bytes and random mutations of valid frames never raise anything
else (docs/reliability.md, S2)."""

from __future__ import annotations

import inspect
import os
import pickle
import random
import shlex
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from contracts.errors import KVTransferError
from kvtransfer import codec, messages
from kvtransfer.codec import HEADER_BYTES, MAGIC, MAX_PAYLOAD_BYTES, decode, encode, read_header
from kvtransfer.layout import MAX_MODEL_ID_BYTES, KVLayout
from kvtransfer.messages import (
    MAX_BLOCK_IDS,
    MAX_REASON_BYTES,
    MAX_REQUEST_ID_BYTES,
    MAX_TRANSFER_ID_BYTES,
    U32_MAX,
    U64_MAX,
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
    payload_checksum,
)

LAYOUT = KVLayout("smollm2-135m", "bfloat16", 16, 30, 3, 64)
LONG_LAYOUT = KVLayout("é" * (MAX_MODEL_ID_BYTES // 2), "float32", 1, 1, 1, 1)

MESSAGES: list[Message] = [
    TransferOffer("t-1", "req-1", LAYOUT, 40, (3, 9, 4), 5_000),
    TransferOffer("t-2", "req-2", LAYOUT, 0, (), 1),
    TransferOffer(
        "x" * MAX_TRANSFER_ID_BYTES,
        "日" * 42 + "ab",  # 128 UTF-8 bytes
        LONG_LAYOUT,
        2,
        (0, U32_MAX),
        U32_MAX,
    ),
    TransferReady("t-1", (7, 8, 1)),
    TransferReady("t-2", ()),
    TransferReady("🚀" * 16, (U32_MAX, 0)),  # 64 UTF-8 bytes
    TransferDone("t-1", 368_640, payload_checksum(b"kv payload")),
    TransferDone("t-2", 0, 0),
    TransferDone("t-3", U64_MAX, U64_MAX),
    TransferAck("t-1", True),
    TransferAck("t-2", False, "checksum 12 != 34"),
    TransferAck("t-3", False, "ü" * (MAX_REASON_BYTES // 2)),
    TransferAbort("réq-日本-🚀", ""),
    TransferAbort("t-1", "r" * MAX_REASON_BYTES),
    PairHello("prefill-3/decode-1/7", bytes(range(32))),
    PairHello("p" * 128, b"\xff" * 32),
    PairChallenge(b"\x01" * 32, bytes(range(32, 64))),
    PairProof(bytes(range(32))),
    StoreRequest(StoreOp.SET, "tandem/kv/p/0/0", b"\x00addr" * 20),
    StoreRequest(StoreOp.ADD, "claim/1", amount=-(1 << 63)),
    StoreRequest(StoreOp.COMPARE_SET, "k" * 512, b"", b"v" * 65536, amount=(1 << 63) - 1),
    StoreRequest(StoreOp.DONE),
    StoreReply(True, b"value", 1),
    StoreReply(False, error="no key 'x' within 5 s"),
]


def u16(value: int) -> bytes:
    return struct.pack("<H", value)


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def wire_str(raw: bytes) -> bytes:
    return u16(len(raw)) + raw


def wire_ids(ids: list[int]) -> bytes:
    return u32(len(ids)) + b"".join(u32(i) for i in ids)


def frame(msg_type: int, payload: bytes, magic: bytes = MAGIC) -> bytes:
    return struct.pack("<4sBI", magic, msg_type, len(payload)) + payload


def offer_payload(
    *,
    dtype: bytes = b"bfloat16",
    block_size: int = 16,
    num_tokens: int = 5,
    lease_ms: int = 100,
    layers_per_chunk: int = 30,
    src_block_ids: tuple[int, ...] = (1,),
) -> bytes:
    return (
        wire_str(b"t")
        + wire_str(b"r")
        + wire_str(b"m")
        + wire_str(dtype)
        + struct.pack("<7I", block_size, 30, 3, 64, num_tokens, lease_ms, layers_per_chunk)
        + wire_ids(list(src_block_ids))
    )


def message_id(msg: Message) -> str:
    return type(msg).__name__


# ---------------------------------------------------------------------------------------------
# Round trips and the pinned format


def test_examples_cover_every_message_type() -> None:
    assert {type(m) for m in MESSAGES} == {
        TransferOffer,
        TransferReady,
        TransferDone,
        TransferAck,
        TransferAbort,
        PairHello,
        PairChallenge,
        PairProof,
        StoreRequest,
        StoreReply,
    }


@pytest.mark.parametrize("msg", MESSAGES, ids=message_id)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert decode(data) == msg
    assert decode(bytearray(data)) == msg
    assert decode(memoryview(data)) == msg
    assert read_header(data[:HEADER_BYTES]) == (MessageType(data[4]), len(data) - HEADER_BYTES)


def test_block_lists_at_the_limit_round_trip() -> None:
    msg = TransferReady("t", tuple(range(MAX_BLOCK_IDS)))
    data = encode(msg)
    assert len(data) <= HEADER_BYTES + MAX_PAYLOAD_BYTES
    assert decode(data) == msg


def test_wire_format_is_pinned() -> None:
    payload = b"\x02\x00t1" + b"\x01" + b"\x02\x00no"
    assert encode(TransferAck("t1", True, "no")) == b"TKV1\x04" + u32(len(payload)) + payload
    payload = b"\x01\x00t" + u32(2) + u32(7) + u32(0x01020304)
    assert encode(TransferReady("t", (7, 0x01020304))) == b"TKV1\x02" + u32(15) + payload
    done = encode(TransferDone("t", 1, U64_MAX))
    assert done == b"TKV1\x03" + u32(19) + b"\x01\x00t" + b"\x01" + 7 * b"\0" + 8 * b"\xff"


def test_offer_wire_format_matches_the_documented_field_order() -> None:
    msg = TransferOffer("t", "r", KVLayout("m", "bfloat16", 16, 30, 3, 64), 5, (1,), 100)
    assert encode(msg) == frame(MessageType.OFFER, offer_payload())


def test_block_id_lists_become_tuples() -> None:
    assert TransferReady("t", [1, 2]).dst_block_ids == (1, 2)  # type: ignore[arg-type]


def test_payload_checksum_is_crc32() -> None:
    payload = bytes(range(256)) * 3
    assert payload_checksum(payload) == zlib.crc32(payload)
    flipped = bytearray(payload)
    flipped[100] ^= 1
    assert payload_checksum(flipped) != payload_checksum(payload)


def test_encode_refuses_other_objects() -> None:
    with pytest.raises(TypeError, match="not a transfer message"):
        encode({"transfer_id": "t"})  # type: ignore[arg-type]


@pytest.mark.parametrize("module", [messages, codec])
def test_codec_uses_no_object_deserializer(module: ModuleType) -> None:
    source = inspect.getsource(module)
    for forbidden in ("import pickle", "import json", "marshal", "eval(", "exec(", "__import__"):
        assert forbidden not in source, forbidden


# ---------------------------------------------------------------------------------------------
# Construction checks: a message that exists can always be encoded and decoded


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: TransferAbort("", "r"), "transfer_id is 0 UTF-8 bytes"),
        (lambda: TransferAbort("x" * 65, "r"), "transfer_id is 65 UTF-8 bytes"),
        (lambda: TransferAbort(5, "r"), "transfer_id=5 must be a str"),
        (lambda: TransferAbort("t", "\udc80"), "reason=.* not encodable as UTF-8"),
        (lambda: TransferAbort("t", "r" * 257), "reason is 257 UTF-8 bytes"),
        (lambda: TransferOffer("t", "r" * 129, LAYOUT, 1, (1,), 1), "request_id is 129"),
        (lambda: TransferOffer("t", "r", LAYOUT, -1, (1,), 1), "num_tokens=-1"),
        (lambda: TransferOffer("t", "r", LAYOUT, 17, (1,), 1), "num_tokens=17 exceeds"),
        (lambda: TransferOffer("t", "r", LAYOUT, 1, (1,), 0), "lease_ms=0"),
        (lambda: TransferOffer("t", "r", LAYOUT, 1, (1,), 1 << 32), "lease_ms="),
        (lambda: TransferOffer("t", "r", LAYOUT, 1, (1,), 1, 0), "layers_per_chunk=0"),
        (lambda: TransferOffer("t", "r", LAYOUT, 1, (1,), 1, 99), "layers_per_chunk=99"),
        (lambda: TransferOffer("t", "r", "layout", 1, (1,), 1), "layout='layout'"),
        (lambda: TransferReady("t", (1, -1)), "holds -1"),
        (lambda: TransferReady("t", (1, 1 << 32)), "holds 4294967296"),
        (lambda: TransferReady("t", (1, True)), "holds True"),
        (lambda: TransferReady("t", (1, 2.0)), "holds 2.0"),
        (lambda: TransferReady("t", (4, 7, 4)), "repeats a block id: 4"),
        (lambda: TransferReady("t", "12"), "must be a tuple or list"),
        (lambda: TransferReady("t", {1, 2}), "must be a tuple or list"),
        (lambda: TransferReady("t", range(MAX_BLOCK_IDS + 1)), "must be a tuple or list"),
        (lambda: TransferReady("t", (0,) * (MAX_BLOCK_IDS + 1)), "limit 1048576"),
        (lambda: TransferDone("t", -1, 0), "num_bytes=-1"),
        (lambda: TransferDone("t", 0, 1 << 64), "checksum="),
        (lambda: TransferAck("t", 1), "ok=1 must be a bool"),
        (lambda: PairHello("k", b"n" * 31), "nonce is 31 bytes, must be 32"),
        (lambda: PairHello("k", "n" * 32), "nonce must be bytes, got str"),
        (lambda: PairChallenge(b"n" * 32, b"p" * 33), "proof is 33 bytes"),
        (lambda: PairProof(bytearray(32)), "proof must be bytes, got bytearray"),
    ],
)
def test_invalid_fields_raise_value_error_naming_the_field(
    build: Callable[[], object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------------------------------------
# Malformed frames


def valid_frame() -> bytes:
    return encode(TransferAbort("t-1", "cancelled"))


MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", r"^truncated header: 0 bytes, need 9$"),
    ("short header", b"TKV1\x05\x00", r"^truncated header: 6 bytes, need 9$"),
    ("bad magic", frame(5, b"", magic=b"TKV2"), r"^bad magic b'TKV2', expected b'TKV1'$"),
    ("pickle magic", b"\x80\x05\x95" + bytes(20), r"^bad magic .*a pickle stream, refused$"),
    ("type 0", frame(0, b""), r"^unknown message type 0; known: 1 OFFER, .* 10 STORE_REPLY$"),
    ("type 11", frame(11, b""), r"^unknown message type 11"),
    ("short nonce", frame(MessageType.HELLO, wire_str(b"k") + b"n" * 31), "nonce needs 32 bytes"),
    ("type 255", frame(255, b""), r"^unknown message type 255"),
    (
        "huge declared length",
        struct.pack("<4sBI", MAGIC, 2, MAX_PAYLOAD_BYTES + 1),
        rf"^payload length {MAX_PAYLOAD_BYTES + 1} exceeds the limit",
    ),
    (
        "max u32 declared length",
        struct.pack("<4sBI", MAGIC, 2, U32_MAX) + b"\x01\x00t",
        r"^payload length 4294967295 exceeds the limit",
    ),
    (
        "truncated frame",
        valid_frame()[:-1],
        r"^truncated frame: header declares 16 payload bytes, 15 present$",
    ),
    ("trailing bytes", valid_frame() + b"\x00", r"^1 trailing bytes after the 16-byte payload$"),
    (
        "empty payload",
        frame(MessageType.ABORT, b""),
        r"^TransferAbort truncated: transfer_id length needs 2 bytes at payload offset 0, 0 left$",
    ),
    (
        "string longer than the payload",
        frame(MessageType.ABORT, u16(10) + b"abc"),
        r"^TransferAbort truncated: transfer_id needs 10 bytes at payload offset 2, 3 left$",
    ),
    (
        "missing field",
        frame(MessageType.READY, wire_str(b"t")),
        r"^TransferReady truncated: dst_block_ids count needs 4 bytes",
    ),
    (
        "transfer_id over its limit",
        frame(MessageType.ABORT, wire_str(b"x" * 65) + wire_str(b"")),
        r"^TransferAbort: transfer_id is 65 bytes, limit 64$",
    ),
    (
        "request_id over its limit",
        frame(MessageType.OFFER, wire_str(b"t") + wire_str(b"r" * (MAX_REQUEST_ID_BYTES + 1))),
        r"^TransferOffer: request_id is 129 bytes, limit 128$",
    ),
    (
        "reason over its limit",
        frame(MessageType.ABORT, wire_str(b"t") + wire_str(b"r" * 257)),
        r"^TransferAbort: reason is 257 bytes, limit 256$",
    ),
    (
        "string length at u16 max",
        frame(MessageType.ABORT, u16(0xFFFF)),
        r"^TransferAbort: transfer_id is 65535 bytes, limit 64$",
    ),
    (
        "block count over the limit",
        frame(MessageType.READY, wire_str(b"t") + u32(MAX_BLOCK_IDS + 1)),
        r"^TransferReady: dst_block_ids count 1048577 exceeds the limit 1048576$",
    ),
    (
        "block count at u32 max",
        frame(MessageType.READY, wire_str(b"t") + u32(U32_MAX)),
        r"^TransferReady: dst_block_ids count 4294967295 exceeds the limit",
    ),
    (
        "block count beyond the bytes present",
        frame(MessageType.READY, wire_str(b"t") + u32(1000) + u32(1) + u32(2)),
        r"^TransferReady truncated: dst_block_ids needs 4000 bytes at payload offset 7, 8 left$",
    ),
    (
        "invalid utf-8",
        frame(MessageType.ABORT, wire_str(b"\xff\xfe") + wire_str(b"")),
        r"^TransferAbort: transfer_id is not valid UTF-8 \(invalid start byte at byte 0\)$",
    ),
    (
        "utf-8 encoded surrogate",
        frame(MessageType.ABORT, wire_str(b"t") + wire_str(b"ok \xed\xa0\x80")),
        r"^TransferAbort: reason is not valid UTF-8",
    ),
    (
        "truncated utf-8 sequence",
        frame(MessageType.ABORT, wire_str(b"t") + wire_str("é".encode()[:1])),
        r"^TransferAbort: reason is not valid UTF-8",
    ),
    (
        "bool out of range",
        frame(MessageType.ACK, wire_str(b"t") + b"\x02" + wire_str(b"")),
        r"^TransferAck: ok is 2, must be 0 or 1$",
    ),
    (
        "unread payload bytes",
        frame(MessageType.ABORT, wire_str(b"t") + wire_str(b"") + b"\x00\x00"),
        r"^TransferAbort: 2 unread payload bytes after the last field$",
    ),
    (
        "empty transfer_id",
        frame(MessageType.ABORT, wire_str(b"") + wire_str(b"")),
        r"^invalid TransferAbort: transfer_id is 0 UTF-8 bytes, must be 1\.\.64$",
    ),
    (
        "repeated destination block",
        frame(MessageType.READY, wire_str(b"t") + wire_ids([7, 3, 7])),
        r"^invalid TransferReady: dst_block_ids repeats a block id: 7$",
    ),
    (
        "zero block size",
        frame(MessageType.OFFER, offer_payload(block_size=0)),
        r"^invalid TransferOffer layout: block_size=0 must be an int",
    ),
    (
        "unknown dtype",
        frame(MessageType.OFFER, offer_payload(dtype=b"int8")),
        r"^invalid TransferOffer layout: dtype='int8' must be one of",
    ),
    (
        "more tokens than the blocks hold",
        frame(MessageType.OFFER, offer_payload(num_tokens=17)),
        r"^invalid TransferOffer: num_tokens=17 exceeds the 1 src blocks of 16 tokens",
    ),
    (
        "zero lease",
        frame(MessageType.OFFER, offer_payload(lease_ms=0)),
        r"^invalid TransferOffer: lease_ms=0 must be an int in \[1, ",
    ),
]


@pytest.mark.parametrize(
    ("data", "match"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_frames_are_refused_with_a_precise_message(data: bytes, match: str) -> None:
    with pytest.raises(KVTransferError, match=match):
        decode(data)


def test_read_header_refuses_a_huge_frame_from_its_first_bytes() -> None:
    header = struct.pack("<4sBI", MAGIC, MessageType.READY, MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(KVTransferError, match="exceeds the limit"):
        read_header(header)
    assert read_header(valid_frame()) == (MessageType.ABORT, 16)


# ---------------------------------------------------------------------------------------------
# A pickle on the control port (docs/reliability.md, S2: refused, nothing executed)


class TouchFile:
    """Unpickling this runs `touch path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.path))}",))


def test_the_pickle_exploit_is_live(tmp_path: Path) -> None:
    """Control: the payload used below really runs a command when unpickled."""
    target = tmp_path / "control"
    pickle.loads(pickle.dumps(TouchFile(target)))  # deliberate: our own bytes
    assert target.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickle_is_refused_and_not_executed(tmp_path: Path, protocol: int) -> None:
    target = tmp_path / "pwned"
    exploit = pickle.dumps(TouchFile(target), protocol=protocol)
    assert b"system" in exploit
    with pytest.raises(KVTransferError, match=r"^bad magic") as info:
        decode(exploit)
    if protocol >= 2:
        assert "pickle stream, refused" in str(info.value)
    with pytest.raises(KVTransferError, match=r"^bad magic"):
        read_header(exploit[:HEADER_BYTES])
    assert not target.exists()


@pytest.mark.parametrize("msg_type", list(MessageType))
def test_a_pickle_inside_a_valid_header_is_refused_and_not_executed(
    tmp_path: Path, msg_type: MessageType
) -> None:
    target = tmp_path / "pwned"
    exploit = pickle.dumps(TouchFile(target), protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(KVTransferError):
        decode(frame(msg_type, exploit))
    assert not target.exists()


# ---------------------------------------------------------------------------------------------
# Fuzz: nothing but KVTransferError, and whatever is accepted re-encodes to the same bytes


def decode_or_refuse(data: bytes) -> bool:
    """True if `data` decoded (and then re-encodes identically), False if refused."""
    try:
        msg = decode(data)
    except KVTransferError:
        return False
    assert encode(msg) == data, "accepted frame is not canonical"
    return True


def test_random_bytes_raise_only_kvtransfer_error() -> None:
    rng = random.Random(20240601)
    num_accepted = 0
    for i in range(2_000):
        data = rng.randbytes(rng.randrange(0, 80))
        if i % 2:  # a valid header, so the payload parser sees the noise
            data = frame(rng.randint(1, 5), data)
        num_accepted += decode_or_refuse(data)
    assert num_accepted < 2_000


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random edit of a frame; half the time the length field is fixed up to match."""
    out = bytearray(data)
    kind = rng.randrange(5)
    pos = rng.randrange(len(out) + 1)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del out[pos:]
    elif kind == 2:
        out[pos:pos] = rng.randbytes(rng.randint(1, 8))
    elif kind == 3:
        del out[pos : pos + rng.randint(1, 8)]
    else:
        extreme = rng.choice([0, 1, 0xFFFF, MAX_BLOCK_IDS + 1, U32_MAX, rng.getrandbits(32)])
        out[pos : pos + 4] = u32(extreme)
    if rng.random() < 0.5 and len(out) >= HEADER_BYTES:
        out[5:9] = u32(len(out) - HEADER_BYTES)
    return bytes(out)


def test_mutated_frames_raise_only_kvtransfer_error() -> None:
    rng = random.Random(7)
    frames = [encode(m) for m in MESSAGES]
    num_accepted = 0
    for _ in range(2_000):
        num_accepted += decode_or_refuse(mutate(rng, rng.choice(frames)))
    assert 0 < num_accepted < 2_000  # mutations reach past the header into accepted frames
