"""The 48-byte header in front of every payload on a pair channel, and its checks.

    header  int64[6] = [MAGIC, seq, tag, nbytes, part_nbytes, flags]   then   payload (nbytes)

Both ends count payloads (seq); the receiver checks every field and raises KVTransferError on
any difference, so a desynchronised pair fails loudly instead of writing one request's KV into
another's blocks. docs/kvtransfer.md gives the wire rules (parts, groups, markers, VOID, posting
ahead). Plain integers only: the channels (kvtransfer.channel) move the tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

from contracts.errors import KVTransferError

MAGIC = 0x54414E44454D4B56  # "TANDEMKV"
HEADER_NUMEL = 6  # [MAGIC, seq, tag, nbytes, part_nbytes, flags] int64
FIELD_NAMES = ("magic", "seq", "tag", "nbytes", "part_nbytes", "flags")
MARKER = -1  # nbytes of a header sent instead of a payload (send_marker)
VOID = 1  # header flag: the payload's bytes are not data (a stopped transfer's filler)
WIRE_VERSION = 2  # of the header format and message rules; 2: the flags field, VOID
HEADER_TAG = 1  # gloo slot of headers (NCCL ignores tags)
PAYLOAD_TAG = 2  # gloo slot of payloads
_MAX_TAG = (1 << 63) - 1


def header_values(seq: int, tag: int, nbytes: int, part_nbytes: int, flags: int = 0) -> list[int]:
    """The six int64 values of a header."""
    return [MAGIC, seq, tag, nbytes, part_nbytes, flags]


def check_tag(tag: int) -> None:
    if type(tag) is not int or not 0 <= tag <= _MAX_TAG:
        raise ValueError(f"tag={tag!r} must be an int in [0, 2**63)")


def check_parts(tag: int, sizes: list[int]) -> tuple[int, int]:
    """(nbytes, part_nbytes) of a payload in parts of these sizes, after checking the tag and
    that every part but the last has the first one's size and the last is not larger."""
    check_tag(tag)
    if not sizes:
        raise ValueError("a payload needs at least one part")
    nbytes, part_nbytes = sum(sizes), sizes[0]
    if any(size != part_nbytes for size in sizes[:-1]) or sizes[-1] > part_nbytes:
        raise ValueError(f"parts of {sizes} bytes: all but the last must be equal, the last <=")
    if (nbytes == 0 and len(sizes) > 1) or (nbytes > 0 and 0 in sizes):
        raise ValueError(f"parts of {sizes} bytes: an empty part is only allowed alone")
    return nbytes, part_nbytes


def check_group(tag: int, sizes: list[int]) -> None:
    """ValueError unless `tag` is valid and a group of tensors of these sizes can be sent."""
    check_tag(tag)
    if not sizes or 0 in sizes:
        raise ValueError(f"a group needs one or more non-empty tensors, got sizes {sizes}")


def parts_ok(header: list[int]) -> bool:
    """Whether a payload header's sizes describe parts that can be received: nbytes > 0 in
    parts of part_nbytes > 0, or an empty payload (nbytes = part_nbytes = 0, one part)."""
    nbytes, part_nbytes = header[3], header[4]
    if part_nbytes < 0:  # a group of -part_nbytes tensors, each of one byte or more
        return nbytes >= -part_nbytes
    if nbytes == 0:
        return part_nbytes == 0
    return 0 < part_nbytes <= nbytes


def check_next(header: list[int], expected_seq: int) -> bool:
    """Check a header read in sequence (not posted ahead): magic, seq, no flags, and sizes that
    describe a payload or a marker. True for a marker. Raises KVTransferError."""
    magic, seq, _, nbytes, part_nbytes, flags = header
    is_marker = nbytes == MARKER and part_nbytes == 0
    ok = magic == MAGIC and seq == expected_seq and flags == 0  # VOID: posted only
    if not ok or not (is_marker or parts_ok(header)):
        raise KVTransferError(
            f"bad header: magic {magic:#x}, seq {seq} (expected {expected_seq}), "
            f"nbytes {nbytes}, part_nbytes {part_nbytes}, flags {flags:#x}"
        )
    return is_marker


def check_posted(header: list[int], expected_seq: int, expected: tuple[int, int, int]) -> bool:
    """Check the header of a receive posted ahead against its (tag, nbytes, part_nbytes): True
    if the payload is VOID. Raises KVTransferError (a marker fails here too)."""
    magic, seq, tag, nbytes, part_nbytes, flags = header
    if magic != MAGIC or seq != expected_seq or flags & ~VOID:
        raise KVTransferError(
            f"bad header: magic {magic:#x}, seq {seq} (expected {expected_seq}), flags {flags:#x}"
        )
    check_fields((tag, nbytes, part_nbytes), expected)
    return bool(flags & VOID)


def check_fields(got: tuple[int, int, int], want: tuple[int, int, int]) -> None:
    """KVTransferError naming each of (tag, nbytes, part_nbytes) received != expected."""
    _check_equal(FIELD_NAMES[2:5], got, want)


def check_exact(got: list[int], want: list[int]) -> None:
    """KVTransferError naming each of the six fields received != expected."""
    _check_equal(FIELD_NAMES, got, want)


def _check_equal(names: tuple[str, ...], got: Sequence[int], want: Sequence[int]) -> None:
    if list(got) != list(want):
        diffs = [f"{n} {g} != {w}" for n, g, w in zip(names, got, want, strict=True) if g != w]
        raise KVTransferError("header does not match (received != expected): " + ", ".join(diffs))
