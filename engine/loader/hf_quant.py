"""Reading the `quantization_config` of a Hugging Face checkpoint: which FP8 (e4m3) scheme it
uses ("fp8", "compressed-tensors", "fbgemm_fp8": one scale per weight tensor or output channel,
static or dynamic per-token activations). Anything else (block-wise FP8, integer or 4-bit
formats, GPTQ, AWQ) raises UnsupportedModel naming the format. Torch-free: it only parses
`config.json`. The table of formats: docs/engine.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contracts.errors import UnsupportedModel

SUPPORTED_FORMATS = (
    "fp8 (per-tensor weight_scale; static or dynamic activations)",
    "compressed-tensors float-quantized 8-bit (tensor or channel weights; "
    "static tensor or dynamic token activations)",
    "fbgemm_fp8 (per-channel weights, dynamic per-token activations)",
)


@dataclass(frozen=True, slots=True)
class Fp8CheckpointScheme:
    """How a checkpoint's FP8 linears are scaled. Per-tensor weight scales are widened to one
    scale per output channel at load; a static input scale is kept per projection."""

    quant_method: str
    weight_strategy: str  # "tensor" | "channel"
    static_activations: bool  # input_scale tensors present (per-tensor, static)


def fp8_scheme_from_hf_config(raw: dict[str, Any]) -> Fp8CheckpointScheme | None:
    """The checkpoint's FP8 scheme, or None for an unquantized checkpoint. Raises
    UnsupportedModel naming any other quantization format."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise UnsupportedModel(f"quantization_config={qc!r} must be an object")
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8(qc)
    if method == "fbgemm_fp8":
        return Fp8CheckpointScheme("fbgemm_fp8", "channel", static_activations=False)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise _unsupported(f"quant_method {method!r}")


def _fp8(qc: dict[str, Any]) -> Fp8CheckpointScheme:
    if qc.get("weight_block_size") is not None:
        raise _unsupported(f"fp8 with block-wise weight scales {qc['weight_block_size']}")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _unsupported(f"fp8 format {qc.get('fmt')!r} (only e4m3)")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise _unsupported(f"fp8 activation_scheme {scheme!r}")
    return Fp8CheckpointScheme("fp8", "tensor", static_activations=scheme == "static")


def _compressed_tensors(qc: dict[str, Any]) -> Fp8CheckpointScheme:
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _unsupported(f"compressed-tensors format {fmt!r}")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _unsupported(f"compressed-tensors with {len(groups)} config groups (one supported)")
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    acts = group.get("input_activations")
    _check_float8("weights", weights)
    w_strategy = weights.get("strategy")
    if w_strategy not in ("tensor", "channel") or weights.get("dynamic"):
        raise _unsupported(f"compressed-tensors weight strategy {w_strategy!r}")
    if acts is None:
        raise _unsupported("compressed-tensors weight-only FP8 (W8A16)")
    _check_float8("input_activations", acts)
    a_strategy, dynamic = acts.get("strategy"), bool(acts.get("dynamic"))
    if (a_strategy, dynamic) not in (("tensor", False), ("token", True)):
        raise _unsupported(
            f"compressed-tensors activation strategy {a_strategy!r} dynamic={dynamic}"
        )
    return Fp8CheckpointScheme("compressed-tensors", w_strategy, static_activations=not dynamic)


def _check_float8(what: str, args: dict[str, Any]) -> None:
    if args.get("num_bits") != 8 or args.get("type") != "float":
        raise _unsupported(
            f"compressed-tensors {what} num_bits={args.get('num_bits')} type={args.get('type')!r}"
        )
    if args.get("symmetric") is False:
        raise _unsupported(f"compressed-tensors asymmetric {what}")


def _unsupported(what: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"unsupported quantization format: {what}; supported: " + "; ".join(SUPPORTED_FORMATS)
    )
