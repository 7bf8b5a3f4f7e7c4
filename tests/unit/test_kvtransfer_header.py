"""The pair channel's payload header (kvtransfer.header) without a channel: part sizes, markers,
VOID payloads posted ahead, and the errors that name each field that differs."""

from __future__ import annotations

import pytest

from contracts.errors import KVTransferError
from kvtransfer.header import (
    MARKER,
    VOID,
    check_exact,
    check_group,
    check_next,
    check_parts,
    check_posted,
    header_values,
    parts_ok,
)


@pytest.mark.parametrize(
    ("sizes", "expected"), [([8], (8, 8)), ([8, 8, 3], (19, 8)), ([0], (0, 0))]
)
def test_parts_give_total_and_part_size(sizes: list[int], expected: tuple[int, int]) -> None:
    assert check_parts(7, sizes) == expected


@pytest.mark.parametrize(
    ("tag", "sizes", "match"),
    [
        (0, [], "at least one part"),
        (0, [8, 9], "all but the last must be equal"),
        (0, [8, 0, 8], "all but the last must be equal"),
        (0, [0, 0], "an empty part is only allowed alone"),
        (-1, [8], "tag=-1"),
        (1 << 63, [8], "tag="),
    ],
)
def test_bad_parts_are_refused(tag: int, sizes: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_parts(tag, sizes)


def test_a_group_needs_non_empty_tensors() -> None:
    check_group(3, [4, 1])
    with pytest.raises(ValueError, match="non-empty"):
        check_group(3, [4, 0])


def test_parts_ok_reads_groups_payloads_and_empty_payloads() -> None:
    assert parts_ok(header_values(0, 0, 6, -3))  # a group of 3, 6 bytes
    assert not parts_ok(header_values(0, 0, 2, -3))  # 3 tensors cannot be 2 bytes
    assert parts_ok(header_values(0, 0, 0, 0))
    assert not parts_ok(header_values(0, 0, 8, 9))  # a part larger than the payload


def test_next_header_tells_a_marker_from_a_payload() -> None:
    assert check_next(header_values(4, 9, MARKER, 0), expected_seq=4)
    assert not check_next(header_values(4, 9, 16, 8), expected_seq=4)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (header_values(5, 9, 16, 8), r"seq 5 \(expected 4\)"),
        (header_values(4, 9, 16, 8, VOID), "flags 0x1"),  # VOID only where posted ahead
        (header_values(4, 9, 16, 32), "part_nbytes 32"),
        ([0, 4, 9, 16, 8, 0], "magic 0x0"),
    ],
)
def test_next_header_out_of_step_is_refused(header: list[int], match: str) -> None:
    with pytest.raises(KVTransferError, match=match):
        check_next(header, expected_seq=4)


def test_posted_header_reports_void_and_names_what_differs() -> None:
    assert check_posted(header_values(2, 7, 16, 16, VOID), 2, (7, 16, 16))
    assert not check_posted(header_values(2, 7, 16, 16), 2, (7, 16, 16))
    with pytest.raises(KVTransferError, match="tag 8 != 7, nbytes 32 != 16"):
        check_posted(header_values(2, 8, 32, 16), 2, (7, 16, 16))
    with pytest.raises(KVTransferError, match="nbytes -1 != 16"):  # a marker cannot stand in
        check_posted(header_values(2, 7, MARKER, 0), 2, (7, 16, 16))
    with pytest.raises(KVTransferError, match=r"seq 3 \(expected 2\)"):
        check_posted(header_values(3, 7, 16, 16), 2, (7, 16, 16))


def test_exact_header_names_every_field_that_differs() -> None:
    with pytest.raises(KVTransferError, match="seq 0 != -1, nbytes 4 != 0"):
        check_exact(header_values(0, 0, 4, 0), header_values(-1, 0, 0, 0))
    check_exact(header_values(-1, 0, 0, 0), header_values(-1, 0, 0, 0))
