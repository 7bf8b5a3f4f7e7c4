"""FP8 (e4m3) W8A8 linear layers: weights with one scale per output channel, activations with one
scale per token (dynamic) or a static input scale:

    y[m, n] = x_scale[m] * weight_scale[n] * sum_k x_fp8[m, k] * weight[n, k]     (fp32 sums)

On CUDA the product is `torch._scaled_mm`, or with `use_gemv` set (EngineConfig.triton_gemv) the
Triton FP8 GEMV for a single row (engine.kernels.fp8_gemv: the same quantized x, the same exact
products, fp32 sums in another order); elsewhere a reference runs the same sums in fp32.
Weights come quantized at load or from an FP8 checkpoint (engine.loader.hf_quant). The LM head,
the embedding and the KV cache are not touched here. Details: docs/engine.md.

An Fp8Linear with dynamic scales also takes `Fp8Rows`, x already quantized per token by the
kernel that produced it (RMSNorm or SiLU-and-mul with the quantization fused in, on CUDA with
EngineConfig.fused_fp8_quant): bitwise the values its own quantization would have made. Or
`Fp8Pending`, x with its amax in parts from the kernel that produced it (SiLU-and-mul, decode
attention), which the FP8 GEMV quantizes as it loads it: bitwise the same again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from contracts.errors import ModelLoadError, UnsupportedModel

if TYPE_CHECKING:
    from engine.kernels.rotary_kv_epilogue import RotaryKvWrite

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
MIN_AMAX = 1e-12  # an all-zero row still gets a positive scale
QUANTIZATIONS = ("fp8",)
FP8_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_KV_CACHE_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale")
_KV_SCALE_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale)$")


@dataclass(frozen=True, slots=True)
class Fp8Rows:
    """Activations already quantized per token, as `quantize_per_token` would quantize rows of
    `dtype` (the dtype the product is returned in)."""

    values: torch.Tensor  # [M, K] e4m3
    scale: torch.Tensor  # [M, 1] fp32
    dtype: torch.dtype  # the unquantized rows' dtype


@dataclass(frozen=True, slots=True)
class Fp8Pending:
    """Activations not yet quantized, with their per-token amax in parts, written by the kernel
    that made them (SiLU-and-mul, decode attention): each row's max over `amax` is max |x|
    over the row of `values` (as stored). An Fp8Linear that runs the FP8 GEMV quantizes them
    inside it (engine.kernels.fp8_gemv.fp8_gemv_quantizing, one launch fewer); otherwise it
    quantizes `values` as it would a plain tensor. Bitwise the same either way."""

    values: torch.Tensor  # [M, K] bf16/fp16/fp32
    amax: torch.Tensor  # [M, P] fp32, contiguous


def quantize_per_token(
    x: torch.Tensor,  # [M, K] any float dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # ([M, K] fp8, [M, 1] fp32)
    """Dynamic per-row (per-token) quantization: each row's amax maps to 448."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_static(
    x: torch.Tensor,  # [M, K]
    scale: torch.Tensor,  # [] fp32, calibrated by the checkpoint's producer
) -> tuple[torch.Tensor, torch.Tensor]:  # ([M, K] fp8, [M, 1] fp32)
    """Quantization with one given scale; values beyond 448 * scale are clamped."""
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()


def quantize_weight(
    weight: torch.Tensor,  # [N, K]
) -> tuple[torch.Tensor, torch.Tensor]:  # ([N, K] fp8, [N] fp32)
    """Per-output-channel quantization of a weight matrix."""
    q, scale = quantize_per_token(weight)
    return q, scale.reshape(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of a quantized tensor; `scale` broadcasts against `q`."""
    return q.float() * scale


class Fp8Linear(nn.Module):
    """y = x @ W^T (+ bias) with W in e4m3 and x quantized per token (or with a static scale)
    on the fly. Output in x's dtype. Parameters load like nn.Linear's, plus the scales."""

    # Run single-row CUDA inputs through the Triton FP8 GEMV (engine.kernels.fp8_gemv) instead
    # of torch._scaled_mm; set by LlamaModel.use_triton_gemv (EngineConfig.triton_gemv).
    use_gemv: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        static_input_scale: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
            requires_grad=False,
        )
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False
        )
        self.input_scale: nn.Parameter | None = None
        if static_input_scale:
            self.input_scale = nn.Parameter(
                torch.ones((), dtype=torch.float32, device=device), requires_grad=False
            )
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        self._weight_values: torch.Tensor | None = None  # CPU: fp32 copy of the fp8 values

    def forward(
        self,
        x: torch.Tensor | Fp8Rows | Fp8Pending,
        rotary_kv: RotaryKvWrite | None = None,
        silu_mul: bool = False,
        silu_amax: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [..., K] (or Fp8Rows [M, K] quantized per token, or Fp8Pending [M, K] with its
        amaxes) -> [..., N] in x's dtype. Where `gemv_applies` (one row), two epilogues of
        the FP8 GEMV: with `rotary_kv` (a QKV projection) it also rotates q and k and writes
        the KV cache (engine.kernels.rotary_kv_epilogue); with `silu_mul` (a gate_up
        projection, no bias) it returns silu(gate) * up instead, and folds its amax into
        `silu_amax` if given (engine.kernels.silu_mul_epilogue)."""
        if (rotary_kv is not None or silu_mul) and (
            isinstance(x, Fp8Pending)
            or not self._gemv_takes(values_of(x), x.dtype)
            or self.bias is not None
        ):
            raise ValueError(
                "rotary_kv and silu_mul need the FP8 GEMV: one bf16/fp16 CUDA row (plain or "
                "Fp8Rows), use_gemv on, dynamic activation scales, no bias"
            )
        if isinstance(x, Fp8Pending):
            self._check_pending(x)
            if not self.gemv_applies(x.values.shape[0], x.values.dtype, x.values.device):
                return self.forward(x.values)  # quantized here, as a plain tensor would be
            from engine.kernels.fp8_gemv import fp8_gemv_quantizing

            out = fp8_gemv_quantizing(
                x.values, x.amax, self.weight, self.weight_scale, out_dtype=x.values.dtype
            )
            return out if self.bias is None else out + self.bias
        if isinstance(x, Fp8Rows):
            if self.input_scale is not None:
                raise ValueError(
                    "this Fp8Linear has a static input scale; it cannot take rows quantized "
                    "per token (Fp8Rows)"
                )
            if x.values.dim() != 2 or x.values.shape[1] != self.in_features:
                raise ValueError(
                    f"Fp8Rows must be [M, {self.in_features}], got {tuple(x.values.shape)}"
                )
            xq, x_scale, dtype, lead = x.values, x.scale, x.dtype, x.values.shape[:-1]
        else:
            dtype, lead = x.dtype, x.shape[:-1]
            x2 = x.reshape(-1, self.in_features)  # [M, K]
            if self.input_scale is None and x2.is_cuda:  # one Triton launch instead of eight
                from engine.kernels.fp8_quant import quantize_per_token_fused

                xq, x_scale = quantize_per_token_fused(x2)
            elif self.input_scale is None:
                xq, x_scale = quantize_per_token(x2)
            else:
                xq, x_scale = quantize_static(x2, self.input_scale)
        scaled_mm = self._scaled_mm_fits(xq.is_cuda, dtype)
        if scaled_mm and self._gemv_rows(xq.shape[0]):
            from engine.kernels.fp8_gemv import fp8_gemv

            out = fp8_gemv(
                xq, x_scale, self.weight, self.weight_scale, out_dtype=dtype,
                rotary_kv=rotary_kv, silu_mul=silu_mul, silu_amax=silu_amax,
            )  # fmt: skip
        elif scaled_mm:
            out = torch._scaled_mm(
                xq,
                self.weight.t(),  # [K, N], column-major as _scaled_mm wants
                scale_a=x_scale,  # [M, 1]
                scale_b=self.weight_scale.view(1, -1),  # [1, N]
                out_dtype=dtype,
            )
        else:
            out = (self._reference_product(xq) * x_scale * self.weight_scale).to(dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, out.shape[-1])  # out_features, or half with silu_mul

    def gemv_applies(self, num_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this layer runs `num_rows` rows of `dtype` on `device` (not yet quantized)
        through the FP8 GEMV with per-token scales: then an Fp8Pending of them saves the
        quantization's launch."""
        return (
            self.input_scale is None
            and self._scaled_mm_fits(device.type == "cuda", dtype)
            and self._gemv_rows(num_rows)
        )

    def _gemv_takes(self, values: torch.Tensor, dtype: torch.dtype) -> bool:
        """gemv_applies to the rows of `values` ([..., K]; quantized or not) of `dtype`."""
        rows = values.numel() // max(values.shape[-1], 1)
        return self.gemv_applies(rows, dtype, values.device)

    def _gemv_rows(self, num_rows: int) -> bool:
        # The GEMV takes up to fp8_gemv.MAX_ROWS rows, but beyond one row `torch._scaled_mm`
        # is as fast (engine.llama.Linear.gemv_applies says the same of bf16)
        return self.use_gemv and num_rows == 1

    def _check_pending(self, x: Fp8Pending) -> None:
        if self.input_scale is not None:
            raise ValueError(
                "this Fp8Linear has a static input scale; it cannot take rows with per-token "
                "amaxes (Fp8Pending)"
            )
        values, amax = x.values, x.amax
        if values.dim() != 2 or values.shape[1] != self.in_features:
            raise ValueError(
                f"Fp8Pending values must be [M, {self.in_features}], got {tuple(values.shape)}"
            )
        if amax.dim() != 2 or amax.shape[0] != values.shape[0] or amax.shape[1] < 1:
            raise ValueError(
                f"Fp8Pending amax must be [M = {values.shape[0]}, parts], got {tuple(amax.shape)}"
            )
        if amax.dtype != torch.float32 or amax.device != values.device:
            raise ValueError(
                f"Fp8Pending amax must be fp32 on {values.device}, got {amax.dtype} on "
                f"{amax.device}"
            )

    def _can_use_scaled_mm(self, x: torch.Tensor) -> bool:
        return self._scaled_mm_fits(x.is_cuda, x.dtype)

    def _scaled_mm_fits(self, is_cuda: bool, dtype: torch.dtype) -> bool:
        return (
            is_cuda
            and dtype in (torch.bfloat16, torch.float16)
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
        )

    def _reference_product(self, xq: torch.Tensor) -> torch.Tensor:
        """sum_k xq[m, k] * w[n, k] in fp32 ([M, N]); the fp8 values are exact in fp32."""
        if self._weight_values is None or self._weight_values.device != xq.device:
            self._weight_values = self.weight.float()  # made once, after load
        return F.linear(xq.float(), self._weight_values)

    def extra_repr(self) -> str:
        static = self.input_scale is not None
        return f"in={self.in_features}, out={self.out_features}, fp8, static_input={static}"


def values_of(x: torch.Tensor | Fp8Rows) -> torch.Tensor:
    """The rows themselves: x, or the e4m3 values of rows already quantized."""
    return x.values if isinstance(x, Fp8Rows) else x


def use_fp8_linears(model: nn.Module, static_input_scale: bool = False) -> None:
    """Replace every decoder layer's four projections with empty Fp8Linear of the same shape,
    on the same device (call before load_weights, after any dtype cast of the model)."""
    for name, module in list(model.named_modules()):
        if not any(name.endswith(p) for p in FP8_PROJECTIONS):
            continue
        assert isinstance(module, nn.Linear), f"{name} is {type(module).__name__}, not Linear"
        parent_name, _, attr = name.rpartition(".")
        replacement = Fp8Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            static_input_scale=static_input_scale,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        setattr(model.get_submodule(parent_name), attr, replacement)


def widen_checkpoint_scales(weights: dict[str, torch.Tensor]) -> None:
    """In place, before q/k/v and gate/up are fused: every `*.weight_scale` becomes [out] fp32
    (a per-tensor scale repeated per channel), every `*.input_scale` [1] fp32. (KV-cache scales
    are taken out before: take_kv_cache_scales.)"""
    for name in [n for n in weights if n.endswith(".weight_scale")]:
        weight = weights.get(name.removesuffix("_scale"))
        if weight is None:
            raise ModelLoadError(f"{name} has no weight {name.removesuffix('_scale')}")
        scale = weights[name].float().reshape(-1)
        rows = weight.shape[0]
        if scale.numel() == 1:
            scale = scale.expand(rows).contiguous()
        if scale.shape != (rows,):
            raise UnsupportedModel(
                f"{name} has {scale.numel()} scales for {rows} output channels; supported: "
                "one per tensor or one per output channel"
            )
        weights[name] = scale
    for name in [n for n in weights if n.endswith(".input_scale")]:
        scale = weights[name].float().reshape(-1)
        if scale.numel() != 1:
            raise UnsupportedModel(f"{name} has {scale.numel()} values; supported: per-tensor")
        weights[name] = scale


def take_kv_cache_scales(
    weights: dict[str, torch.Tensor], num_layers: int
) -> torch.Tensor | None:  # [layers, 2 = K | V, n] fp32, n = 1 (per tensor) or kv heads
    """Take a checkpoint's KV-cache scales out of `weights` (`layers.{i}.self_attn.k_scale`
    and `v_scale`, or one `kv_scale` for both, as FP8 checkpoints with a KV-cache scheme ship
    them: x ~= e4m3 * scale), or None when it has none. Raises ModelLoadError when some layers
    lack them or their sizes differ."""
    names = [n for n in weights if n.endswith(_KV_CACHE_SCALE_SUFFIXES)]
    if not names:
        return None
    found: dict[tuple[int, int], torch.Tensor] = {}
    for name in names:
        match = _KV_SCALE_NAME.search(name)
        value = weights.pop(name).float().reshape(-1)
        if match is None or int(match[1]) >= num_layers:
            raise ModelLoadError(f"KV-cache scale {name} names no layer of this model")
        layer, kind = int(match[1]), match[2]
        for part in (0, 1) if kind == "kv_scale" else (0,) if kind == "k_scale" else (1,):
            found[(layer, part)] = value
    missing = sorted(
        f"{i}.{'kv'[part]}" for i in range(num_layers) for part in (0, 1) if (i, part) not in found
    )
    sizes = {t.numel() for t in found.values()}
    if missing or len(sizes) != 1:
        raise ModelLoadError(
            f"checkpoint KV-cache scales must cover every layer's K and V with one size: "
            f"missing {missing[:6]}, sizes {sorted(sizes)}"
        )
    return torch.stack([torch.stack([found[(i, 0)], found[(i, 1)]]) for i in range(num_layers)])


def collapse_fused_input_scales(weights: dict[str, torch.Tensor]) -> None:
    """After fusing: a fused projection's input scales ([parts]) become their max ([]), the
    scale that keeps every part's calibrated range (the input is the same tensor)."""
    for name in [n for n in weights if n.endswith(".input_scale")]:
        weights[name] = weights[name].max()


def prepare_fp8_weights(
    model: nn.Module, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Module-named (fused) weights -> the same with every Fp8Linear's weight in fp8 and its
    scales present: bf16/fp32 weights are quantized here. Raises UnsupportedModel for an FP8
    tensor that belongs to a module that is not quantized (say an FP8 LM head)."""
    fp8_names = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    for name in fp8_names:
        weight = weights.get(f"{name}.weight")
        if weight is None:
            continue  # load_weights reports it missing
        if weight.dtype != FP8_DTYPE:
            if f"{name}.weight_scale" in weights:
                raise ModelLoadError(f"{name}.weight is {weight.dtype} but has a weight_scale")
            weights[f"{name}.weight"], weights[f"{name}.weight_scale"] = quantize_weight(weight)
    _check_no_stray_fp8(weights, fp8_names)
    return weights


def _check_no_stray_fp8(weights: dict[str, torch.Tensor], fp8_names: Iterable[str]) -> None:
    allowed = {f"{n}.weight" for n in fp8_names}
    stray = sorted(n for n, t in weights.items() if t.dtype == FP8_DTYPE and n not in allowed)
    if stray:
        raise UnsupportedModel(
            f"FP8 tensors {stray[:3]} belong to layers Tandem keeps unquantized; supported: "
            f"FP8 in the decoder projections {FP8_PROJECTIONS} only"
        )
