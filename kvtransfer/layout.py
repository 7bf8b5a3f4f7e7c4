"""KVLayout: the model id and KV block geometry (dtype and scale scheme included) both ends of a
transfer must share; `check_compatible` refuses a pair whose caches differ. One block:

    kv_cache[layer, 0 = K | 1 = V, block_id, slot_in_block, kv_head, head_dim]

Torch-free at import (control-plane code decodes layouts without torch); it describes cache
memory and never touches it. The FP8 layout: docs/kvtransfer.md.
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING

from contracts.errors import KVTransferError

if TYPE_CHECKING:
    import torch

# KV cache element types the engine allocates, with their sizes in bytes.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
# How KV values are scaled, with the bytes each (token, kv head) row carries for it: none; one
# fp32 scale per row at its block's tail; one fp32 scale per (layer, K|V, kv head) outside the
# blocks, named by the digest of the scale table after a ":" ("per_head_fp32:0123456789abcdef";
# engine.kv_quant.scales_digest), so that only ends holding the same scales pair.
SCALE_BYTES: dict[str, int] = {"none": 0, "block_tail_fp32": 4, "per_head_fp32": 0}
_FP8_DTYPE, _FP8_SCALES, _PER_HEAD_SCALES = "float8_e4m3fn", "block_tail_fp32", "per_head_fp32"
_DIGEST_CHARS = 16
MAX_MODEL_ID_BYTES = 256  # utf-8 bytes; the id travels in every TransferOffer
MAX_DIM = (1 << 32) - 1  # every count travels as a u32
_COUNT_FIELDS = ("block_size", "num_layers", "num_kv_heads", "head_dim", "tensor_parallel_size")
_DESCRIPTIVE_FIELDS = ("tensor_parallel_size",)  # named in a mismatch, never one


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Model identity and KV cache geometry; equal layouts can exchange blocks byte for byte."""

    model_id: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int
    head_dim: int
    scale_scheme: str = "none"  # FP8: "block_tail_fp32" or "per_head_fp32:<digest>"
    # How many ranks the worker splits these KV heads over. It describes the worker, not the
    # blocks: a transfer always carries every KV head (each end's ranks share one cache), so
    # check_compatible names it but never refuses a pair for it.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check_model_id(self.model_id)
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {tuple(DTYPE_BYTES)}")
        _check_scale_scheme(self.dtype, self.scale_scheme)
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= MAX_DIM:
                raise ValueError(f"{name}={value!r} must be an int in [1, {MAX_DIM}]")

    @classmethod
    def of_cache(
        cls,
        kv_cache: torch.Tensor,
        model_id: str,
        tensor_parallel_size: int = 1,
        scales_digest: str | None = None,
    ) -> KVLayout:
        """The layout of an engine cache tensor (under tensor parallelism, the one its ranks
        share: engine.Engine.transfer_kv_cache).

        kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; an FP8
        cache is uint8 (per-token scales inside its blocks, head_dim + 4 bytes a row) or int8
        (e4m3 values only; its per-head scales named by `scales_digest`, required then).
        Raises ValueError when the tensor does not have that shape or an unsupported dtype.
        """
        shape = tuple(kv_cache.shape)
        if len(shape) != 6 or shape[1] != 2:
            raise ValueError(
                f"kv_cache shape {shape} is not "
                "[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]"
            )
        num_layers, _, _, block_size, num_kv_heads, head_dim = shape
        dtype, scale_scheme = str(kv_cache.dtype).removeprefix("torch."), "none"
        if dtype == "uint8":  # the packed FP8 cache: e4m3 values, then an fp32 scale
            dtype, scale_scheme = _FP8_DTYPE, _FP8_SCALES
            head_dim -= SCALE_BYTES[_FP8_SCALES]
        elif dtype == "int8":  # e4m3 values; their scales are per (layer, K|V, head)
            if scales_digest is None:
                raise ValueError("a per-head FP8 cache's layout needs its scales' digest")
            dtype, scale_scheme = _FP8_DTYPE, f"{_PER_HEAD_SCALES}:{scales_digest}"
        return cls(
            model_id=model_id,
            dtype=dtype,
            block_size=block_size,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            scale_scheme=scale_scheme,
            tensor_parallel_size=tensor_parallel_size,
        )

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """ValueError unless `kv_cache` is an engine cache of this layout."""
        digest = self.scale_scheme.partition(":")[2] or None
        if KVLayout.of_cache(kv_cache, self.model_id, self.tensor_parallel_size, digest) != self:
            raise ValueError(f"kv_cache {tuple(kv_cache.shape)} does not have layout {self}")

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V together."""
        scheme = self.scale_scheme.partition(":")[0]
        row_bytes = self.head_dim * DTYPE_BYTES[self.dtype] + SCALE_BYTES[scheme]
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * row_bytes

    @property
    def wire_dtype(self) -> str:
        """The dtype as a TransferOffer carries it: "float8_e4m3fn/block_tail_fp32" when
        values are scaled, else the dtype alone."""
        return self.dtype if self.scale_scheme == "none" else f"{self.dtype}/{self.scale_scheme}"

    @staticmethod
    def split_wire_dtype(wire_dtype: str) -> tuple[str, str]:
        """(dtype, scale_scheme) of a wire dtype; ValueError for a non-canonical one
        ("float32/none", "float32/")."""
        dtype, slash, scheme = wire_dtype.partition("/")
        if slash and scheme in ("", "none"):
            raise ValueError(f"dtype={wire_dtype!r}: an unscaled dtype travels without '/'")
        return dtype, scheme or "none"

    def to_wire(self) -> bytes:
        """The layout as the pair's rendezvous carries it (kvtransfer.pair): a JSON list of
        the fields in declaration order."""
        return json.dumps(astuple(self), separators=(",", ":")).encode()

    @classmethod
    def from_wire(cls, data: bytes) -> KVLayout:
        """Inverse of to_wire; KVTransferError naming the problem for anything else."""
        try:
            values = json.loads(data.decode("utf-8"))
            if not isinstance(values, list) or len(values) != len(fields(cls)):
                raise ValueError(f"expected a list of {len(fields(cls))} fields")
            return cls(*values)
        except (UnicodeDecodeError, ValueError, TypeError) as e:
            raise KVTransferError(f"malformed KV layout {data[:80]!r}: {e}") from None

    def check_compatible(self, other: KVLayout) -> None:
        """Return if blocks of `self` and `other` are interchangeable (their tensor-parallel
        sizes may differ); raise KVTransferError naming every differing field, this layout's
        value first: "layouts differ: dtype bfloat16 != float16, block_size 16 != 32"; an FP8
        layout against a bf16 one also names the scale scheme, and two per-head FP8 layouts
        whose scales differ say so."""
        mismatches = [
            f"{f.name} {getattr(self, f.name)} != {getattr(other, f.name)}"
            for f in fields(self)
            if f.name not in _DESCRIPTIVE_FIELDS and getattr(self, f.name) != getattr(other, f.name)
        ]
        ours, theirs = self.scale_scheme.partition(":"), other.scale_scheme.partition(":")
        if ours[0] == theirs[0] == _PER_HEAD_SCALES and ours[2] != theirs[2]:
            mismatches.append(
                "the per-head FP8 KV scales differ (each worker calibrates them at start-up: "
                "another model, weights, code or calibration)"
            )
        if mismatches:
            raise KVTransferError("layouts differ: " + ", ".join(mismatches))


def _check_scale_scheme(dtype: str, scheme: str) -> None:
    if dtype != _FP8_DTYPE:
        if scheme != "none":
            raise ValueError(f"scale_scheme={scheme!r} with dtype {dtype}: must be 'none'")
        return
    base, colon, digest = scheme.partition(":")
    if base == _FP8_SCALES and not colon:
        return
    is_hex = all(c in "0123456789abcdef" for c in digest)
    if base == _PER_HEAD_SCALES and colon and len(digest) == _DIGEST_CHARS and is_hex:
        return
    raise ValueError(
        f"scale_scheme={scheme!r} with dtype {dtype}: must be {_FP8_SCALES!r} or "
        f"'{_PER_HEAD_SCALES}:' and {_DIGEST_CHARS} lowercase hex digits"
    )


def _check_model_id(model_id: object) -> None:
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id={model_id!r} must be a non-empty str")
    try:
        num_bytes = len(model_id.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"model_id={model_id!r} is not encodable as UTF-8: {e}") from None
    if num_bytes > MAX_MODEL_ID_BYTES:
        raise ValueError(f"model_id is {num_bytes} UTF-8 bytes, limit {MAX_MODEL_ID_BYTES}")
