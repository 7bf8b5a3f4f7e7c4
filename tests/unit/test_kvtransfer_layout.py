"""KVLayout (kvtransfer.layout): equal layouts are compatible, every differing field is named
with both values, the layout of a real engine cache tensor is read correctly (bytes_per_block
included), and invalid values are refused with a ValueError naming the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from contracts.errors import KVTransferError
from kvtransfer.layout import MAX_MODEL_ID_BYTES, KVLayout


def make_layout(**changes: object) -> KVLayout:
    """SmolLM2-135M's cache geometry with 16-token blocks, with `changes` applied."""
    fields: dict[str, object] = {
        "model_id": "smollm2-135m",
        "dtype": "bfloat16",
        "block_size": 16,
        "num_layers": 30,
        "num_kv_heads": 3,
        "head_dim": 64,
    }
    return KVLayout(**{**fields, **changes})  # type: ignore[arg-type]


def test_equal_layouts_are_compatible() -> None:
    make_layout().check_compatible(make_layout())  # raises KVTransferError if not
    assert make_layout() == make_layout()


@pytest.mark.parametrize(
    ("field", "mine", "theirs"),
    [
        ("model_id", "smollm2-135m", "llama-3-8b"),
        ("dtype", "bfloat16", "float16"),
        ("block_size", 16, 32),
        ("num_layers", 30, 32),
        ("num_kv_heads", 3, 8),
        ("head_dim", 64, 128),
    ],
)
def test_each_mismatching_field_is_named_with_both_values(
    field: str, mine: object, theirs: object
) -> None:
    with pytest.raises(KVTransferError) as info:
        make_layout(**{field: mine}).check_compatible(make_layout(**{field: theirs}))
    assert str(info.value) == f"layouts differ: {field} {mine} != {theirs}"


def test_every_mismatch_is_listed() -> None:
    mine = make_layout(dtype="bfloat16", block_size=16)
    theirs = make_layout(dtype="float16", block_size=32)
    with pytest.raises(KVTransferError) as info:
        mine.check_compatible(theirs)
    assert str(info.value) == "layouts differ: dtype bfloat16 != float16, block_size 16 != 32"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_of_cache_reads_an_engine_cache_tensor(dtype: torch.dtype) -> None:
    num_layers, num_blocks, block_size, num_kv_heads, head_dim = 3, 5, 4, 2, 8
    # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], as ModelRunner allocates
    kv_cache = torch.zeros(
        num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype
    )
    layout = KVLayout.of_cache(kv_cache, "dummy:tiny")
    assert layout == KVLayout(
        model_id="dummy:tiny",
        dtype=str(dtype).removeprefix("torch."),
        block_size=block_size,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )
    one_block = kv_cache[:, :, 0]  # [num_layers, 2, block_size, num_kv_heads, head_dim]
    assert layout.bytes_per_block == one_block.numel() * one_block.element_size()


def test_bytes_per_block_of_smollm2() -> None:
    assert make_layout().bytes_per_block == 2 * 30 * 16 * 3 * 64 * 2  # 368,640 bytes


@pytest.mark.parametrize(
    "shape",
    [(3, 2, 5, 4, 2), (3, 2, 5, 4, 2, 8, 1), (3, 1, 5, 4, 2, 8), (3, 3, 5, 4, 2, 8)],
)
def test_of_cache_rejects_other_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="kv_cache shape"):
        KVLayout.of_cache(torch.zeros(shape), "m")


@pytest.mark.parametrize("dtype", [torch.int16, torch.float64])
def test_of_cache_rejects_an_unsupported_dtype(dtype: torch.dtype) -> None:
    # (int8 is the per-head FP8 cache and uint8 the packed one: tests/unit/test_fp8_kv_per_head.py)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=f"dtype='{name}'"):
        KVLayout.of_cache(torch.zeros(1, 2, 1, 4, 1, 8, dtype=dtype), "m")


@pytest.mark.parametrize("field", ["block_size", "num_layers", "num_kv_heads", "head_dim"])
@pytest.mark.parametrize("value", [0, -1, 1 << 32, True, 16.0, "16", None])
def test_bad_counts_raise_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}="):
        make_layout(**{field: value})


@pytest.mark.parametrize("value", ["", "torch.bfloat16", "int8", "float64", None])
def test_bad_dtypes_raise_value_error(value: object) -> None:
    with pytest.raises(ValueError, match=r"^dtype="):
        make_layout(dtype=value)


@pytest.mark.parametrize(
    "value", ["", None, 7, "m" * (MAX_MODEL_ID_BYTES + 1), "é" * 129, "bad\udc80surrogate"]
)
def test_bad_model_ids_raise_value_error(value: object) -> None:
    with pytest.raises(ValueError, match=r"^model_id"):
        make_layout(model_id=value)


def test_model_id_at_its_byte_limit_is_accepted() -> None:
    assert make_layout(model_id="é" * (MAX_MODEL_ID_BYTES // 2)).model_id.startswith("é")


def test_layout_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_layout().block_size = 32  # type: ignore[misc]


def test_of_cache_reads_a_packed_fp8_cache() -> None:
    # engine.kv_quant: uint8 rows of head_dim e4m3 bytes, then an fp32 scale
    cache = torch.zeros(30, 2, 4, 16, 3, 64 + 4, dtype=torch.uint8)
    layout = KVLayout.of_cache(cache, "smollm2-135m")
    assert layout == make_layout(dtype="float8_e4m3fn", scale_scheme="block_tail_fp32")
    assert layout.bytes_per_block == 2 * 30 * 16 * 3 * 68
    layout.check_cache(cache)
    with pytest.raises(KVTransferError, match="scale_scheme block_tail_fp32 != none"):
        layout.check_compatible(make_layout())


@pytest.mark.parametrize(
    ("dtype", "scheme"),
    [
        ("float8_e4m3fn", "none"),
        ("bfloat16", "block_tail_fp32"),
        ("float8_e4m3fn", "per_block"),
        ("bfloat16", "per_head_fp32:0123456789abcdef"),
        ("float8_e4m3fn", "per_head_fp32"),  # without its digest
        ("float8_e4m3fn", "per_head_fp32:"),
        ("float8_e4m3fn", "per_head_fp32:0123456789abcde"),  # 15 digits
        ("float8_e4m3fn", "per_head_fp32:0123456789abcdef0"),  # 17
        ("float8_e4m3fn", "per_head_fp32:0123456789ABCDEF"),  # not canonical
        ("float8_e4m3fn", "per_head_fp32:0123456789abcdeg"),
        ("float8_e4m3fn", "block_tail_fp32:0123456789abcdef"),
    ],
)
def test_a_scale_scheme_must_fit_the_dtype(dtype: str, scheme: str) -> None:
    with pytest.raises(ValueError, match="scale_scheme="):
        make_layout(dtype=dtype, scale_scheme=scheme)


def test_layouts_round_trip_through_the_wire_form() -> None:
    fp8 = make_layout(dtype="float8_e4m3fn", scale_scheme="block_tail_fp32")
    per_head = make_layout(dtype="float8_e4m3fn", scale_scheme="per_head_fp32:00ff00ff00ff00ff")
    tp = make_layout(tensor_parallel_size=3)
    for layout in (make_layout(), fp8, per_head, make_layout(model_id='ünïcode/model "q"'), tp):
        assert KVLayout.from_wire(layout.to_wire()) == layout


def test_layouts_of_different_tensor_parallel_sizes_are_compatible() -> None:
    """A transfer carries every KV head whatever the ends' sizes (issue 24): TP 1 <-> 3."""
    make_layout(tensor_parallel_size=1).check_compatible(make_layout(tensor_parallel_size=3))
    with pytest.raises(KVTransferError) as info:  # and a real mismatch names only itself
        make_layout(tensor_parallel_size=3).check_compatible(make_layout(head_dim=128))
    assert str(info.value) == "layouts differ: head_dim 64 != 128"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xff", "utf-8"),
        (b"not json", "Expecting value"),
        (b'{"dtype": "bfloat16"}', "expected a list of 8 fields"),
        (b'["m", "bfloat16", 16, 30, 3]', "expected a list of 8 fields"),
        (b'["m", "int4", 16, 30, 3, 64, "none", 1]', "dtype='int4'"),
        (b'["m", "bfloat16", 0, 30, 3, 64, "none", 1]', "block_size=0"),
        (b'["m", "bfloat16", 16.0, 30, 3, 64, "none", 1]', "block_size=16.0"),
        (b'["m", "bfloat16", 16, 30, 3, 64, "none", 0]', "tensor_parallel_size=0"),
    ],
)
def test_a_malformed_wire_layout_is_refused_with_the_problem_named(
    data: bytes, problem: str
) -> None:
    with pytest.raises(KVTransferError, match="malformed KV layout") as info:
        KVLayout.from_wire(data)
    assert problem in str(info.value)
