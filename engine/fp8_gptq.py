"""GPTQ for the FP8 projections (EngineConfig.fp8_weight_calibration="gptq").

Round-to-nearest makes each weight's e4m3 error on its own. GPTQ (Frantar et al., 2022) rounds
a weight matrix one input column at a time and pushes each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian of the layer's inputs,
H = sum over calibration tokens of x x^T, so the layer's outputs on inputs like the
calibration text move less than the weights alone would say. Here:

- the grid is e4m3 with one scale per output channel, fixed first as round-to-nearest sets it
  (row amax / 448): the result is an ordinary FP8 weight that every FP8 path (torch._scaled_mm,
  the FP8 GEMV, the CPU reference) runs unchanged, with the same per-token activation
  quantization;
- columns go in decreasing order of H's diagonal (the most active inputs first), with the
  errors applied lazily in blocks of 128 columns; H is damped by DAMP x its mean diagonal;
  inputs that never fire (zero diagonal) get their weights zeroed;
- the inputs are the unquantized model's (every layer sees full-precision activations), from
  one forward pass over the KV calibration text per layer (engine.kv_calibration), which stops
  after that layer: one layer's Hessians are held at a time.

Measured on the default model (docs/benchmarks.md, "FP8 fidelity"): perplexity +3.58% with
round-to-nearest, much less with GPTQ. It costs a forward pass and four GPTQ sweeps per layer
at load; one engine at tensor-parallel size 1 (EngineConfig refuses other sizes).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.kv_calibration import DenseSelfAttention, dense_pass
from engine.quantization import (
    FP8_DTYPE,
    FP8_MAX,
    FP8_PROJECTIONS,
    Fp8Linear,
    quantize_weight,
    use_fp8_linears,
)

if TYPE_CHECKING:
    from engine.llama import LlamaModel

logger = logging.getLogger(__name__)

DAMP = 0.1  # H + DAMP * mean(diag(H)) * I: fewer calibration tokens than inputs need it
BLOCK = 128  # columns whose error updates the rest of the matrix at once


def gptq_fp8(
    weight: torch.Tensor,  # [N, K] any float dtype
    hessian: torch.Tensor,  # [K, K] fp32: sum of x x^T over the calibration inputs
    damp: float = DAMP,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([N, K] e4m3, [N] fp32): as quantize_weight's
    """The e4m3 weight and per-output-channel scales of `weight`, rounded by GPTQ under
    `hessian`. The scales are quantize_weight's (row amax / 448), so each row's largest value
    is representable; the values are then chosen to keep x @ W^T close for inputs with this
    second moment, not W itself."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian is {tuple(hessian.shape)}, the weight {n} x {k} needs {k} x {k}")
    _, scale = quantize_weight(weight)
    w = weight.float().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    # upper Cholesky factor of H^-1: row j holds what rounding column j does to columns > j
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    u = u.float()
    s = scale[:, None]
    codes = torch.empty(n, k, dtype=FP8_DTYPE, device=weight.device)
    for start in range(0, k, block):
        end = min(start + block, k)
        w1, u1 = w[:, start:end].clone(), u[start:end, start:end]
        errors = torch.empty_like(w1)
        for j in range(end - start):
            column = w1[:, j : j + 1]
            c = (column / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            codes[:, start + j] = c[:, 0]
            error = (column - c.float() * s) / u1[j, j]
            w1[:, j:] -= error * u1[j : j + 1, j:]
            errors[:, j : j + 1] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return codes[:, torch.argsort(order)].contiguous(), scale


class _LayerDone(Exception):
    """Raised once the layer being calibrated has run: the pass needs nothing after it."""


@torch.inference_mode()
def layer_hessians(
    model: LlamaModel, index: int, token_ids: list[int], device: torch.device
) -> dict[str, torch.Tensor]:  # projection name in the layer -> [K, K] fp32
    """H = sum x x^T of the inputs of layer `index`'s four projections over `token_ids`, from
    the unquantized model (one dense pass, stopped after that layer)."""
    layer = model.decoder_layers[index]
    hessians: dict[str, torch.Tensor] = {}
    handles = []

    def record(name: str, last: bool):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[name] = x.T @ x
            if last:
                raise _LayerDone

        return hook

    for name in FP8_PROJECTIONS:
        module = layer.get_submodule(name)
        last = name == FP8_PROJECTIONS[-1]
        handles.append(module.register_forward_pre_hook(record(name, last)))
    try:
        dense_pass(model, token_ids, device, DenseSelfAttention())
        raise AssertionError(f"layer {index}'s {FP8_PROJECTIONS[-1]} never ran")
    except _LayerDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def quantize_model_gptq(
    model: LlamaModel, token_ids: list[int], device: torch.device, damp: float = DAMP
) -> dict[str, torch.Tensor]:
    """Every decoder projection of the unquantized `model`, GPTQ-rounded to e4m3: module-named
    `weight` (e4m3) and `weight_scale` tensors, as prepare_fp8_weights makes them (and `bias`
    where there is one). The model is left as it was: every layer's Hessians come from
    full-precision inputs."""
    started = time.perf_counter()
    weights: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(model.decoder_layers):
        hessians = layer_hessians(model, index, token_ids, device)
        for name in FP8_PROJECTIONS:
            module = layer.get_submodule(name)
            assert isinstance(module, nn.Linear), f"{name} is {type(module).__name__}"
            codes, scale = gptq_fp8(module.weight.detach(), hessians[name], damp)
            weights[f"layers.{index}.{name}.weight"] = codes
            weights[f"layers.{index}.{name}.weight_scale"] = scale
            if module.bias is not None:
                weights[f"layers.{index}.{name}.bias"] = module.bias.detach()
        del hessians
    logger.info(
        "GPTQ FP8 weights: %d layers on %d calibration tokens in %.1fs",
        len(model.decoder_layers),
        len(token_ids),
        time.perf_counter() - started,
    )
    return weights


def use_gptq_fp8_linears(model: LlamaModel, token_ids: list[int], device: torch.device) -> None:
    """Replace the loaded, unquantized `model`'s decoder projections with Fp8Linear holding
    their GPTQ-rounded weights (calibrated on `token_ids`)."""
    weights = quantize_model_gptq(model, token_ids, device)
    use_fp8_linears(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Fp8Linear):
                module.weight.copy_(weights.pop(f"{name}.weight"))
                module.weight_scale.copy_(weights.pop(f"{name}.weight_scale"))
                if module.bias is not None:
                    module.bias.copy_(weights.pop(f"{name}.bias"))
    assert not weights, f"GPTQ weights of no FP8 module: {sorted(weights)[:3]}"
