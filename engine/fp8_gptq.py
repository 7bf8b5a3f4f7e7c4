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
  forward passes over the KV calibration text (engine.kv_calibration), each covering as many
  consecutive layers as HESSIAN_BUDGET_BYTES of Hessians allow and stopping after the last.

Measured on the default model (docs/benchmarks.md, "FP8 fidelity"): perplexity +1.9-2.2% against
round-to-nearest's +3.58%. At load it costs calibration passes and four sweeps a layer (the
default model on a 2-core CPU 18 s; Llama-3-8B's shape on an H100 75 s); tensor-parallel size
1 only (EngineConfig refuses other sizes: each rank would see only its shard's inputs).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
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
# Hessians held at once (fp32): layers are calibrated in groups that fit, one pass a group
# (the default model: all 30 layers in one pass, 0.4 GB; Llama-3-8B: ~1 GB a layer, so 2)
HESSIAN_BUDGET_BYTES = 2 << 30


def gptq_fp8(
    weight: torch.Tensor,  # [N, K] any float dtype
    hessian: torch.Tensor,  # [K, K]: sum of x x^T over the calibration inputs
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
    if not torch.isfinite(hessian).all():
        raise ValueError("the calibration inputs are not finite (inf or nan in the Hessian)")
    _, scale = quantize_weight(weight)
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diagonal(h), descending=True)
    h = h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    # upper Cholesky factor of H^-1: row j holds what rounding column j does to columns > j
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # the weight transposed, [K, N] in column order: each input column one contiguous row
    wt = weight.float().t()[order].contiguous()
    wt[dead[order]] = 0.0
    codes = torch.empty(k, n, dtype=FP8_DTYPE, device=weight.device)
    errors = torch.empty(block, n, device=weight.device)
    for start in range(0, k, block):
        end = min(start + block, k)
        with _one_cpu_thread(weight.device):
            _round_block(wt[start:end], u[start:end, start:end], errors, codes[start:end], scale)
        wt[end:].addmm_(u[start:end, end:].t(), errors[: end - start], alpha=-1)
    return codes[torch.argsort(order)].t().contiguous(), scale


def _round_block(
    rows: torch.Tensor,  # [width, N] fp32: the block's columns of W^T, updated in place
    u1: torch.Tensor,  # [width, width]: the block's part of the inverse Hessian's factor
    errors: torch.Tensor,  # [>= width, N]: each column's scaled rounding error, written
    codes: torch.Tensor,  # [width, N] e4m3, written
    scale: torch.Tensor,  # [N] fp32
) -> None:
    """Round one block's columns in order, each error spread over the block's later columns."""
    for j in range(rows.shape[0]):
        column = rows[j]
        c = (column / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        codes[j] = c
        error = errors[j]
        torch.sub(column, c.float() * scale, out=error).div_(u1[j, j])
        rows[j + 1 :].addr_(u1[j, j + 1 :], error, alpha=-1)  # rank 1, in place


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On CPU, torch on one thread for a block's column loop: its many small updates run
    several times faster so than on a thread pool, which on a shared machine waits for cores
    (2-core CPU, default model: 0.64 against 3.2 s for one down_proj)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _LayersDone(Exception):
    """Raised once the last layer being calibrated has run: the pass needs nothing after."""


@torch.inference_mode()
def layer_hessians(
    model: LlamaModel, layers: range, token_ids: list[int], device: torch.device
) -> dict[tuple[int, str], torch.Tensor]:  # (layer, projection) -> [K, K] fp32
    """H = sum x x^T of the inputs of the four projections of each of `layers` over
    `token_ids`, from the unquantized model: one dense pass, stopped after the last of them."""
    hessians: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def record(key: tuple[int, str], last: bool):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[key] = x.T @ x
            if last:
                raise _LayersDone

        return hook

    for index in layers:
        for name in FP8_PROJECTIONS:
            module = model.decoder_layers[index].get_submodule(name)
            last = index == layers[-1] and name == FP8_PROJECTIONS[-1]
            handles.append(module.register_forward_pre_hook(record((index, name), last)))
    try:
        dense_pass(model, token_ids, device, DenseSelfAttention())
        raise AssertionError(f"layer {layers[-1]}'s {FP8_PROJECTIONS[-1]} never ran")
    except _LayersDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def pass_groups(model: LlamaModel) -> list[range]:
    """Consecutive layers whose Hessians (fp32) fit HESSIAN_BUDGET_BYTES together, at least one
    layer a group: one calibration pass each."""
    per_layer = 0
    for name in FP8_PROJECTIONS:
        module = model.decoder_layers[0].get_submodule(name)
        assert isinstance(module, nn.Linear), f"{name} is {type(module).__name__}"
        per_layer += 4 * module.in_features**2
    size = max(1, HESSIAN_BUDGET_BYTES // per_layer)
    count = len(model.decoder_layers)
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def quantize_model_gptq(
    model: LlamaModel, token_ids: list[int], device: torch.device, damp: float = DAMP
) -> dict[str, torch.Tensor]:
    """Every decoder projection of the unquantized `model`, GPTQ-rounded to e4m3: module-named
    `weight` (e4m3) and `weight_scale` tensors, as prepare_fp8_weights makes them (and `bias`
    where there is one). The model is left as it was: every layer's Hessians come from
    full-precision inputs."""
    started = time.perf_counter()
    weights: dict[str, torch.Tensor] = {}
    groups = pass_groups(model)
    passes_s = 0.0
    for layers in groups:
        began = time.perf_counter()
        hessians = layer_hessians(model, layers, token_ids, device)
        passes_s += time.perf_counter() - began
        for (index, name), hessian in hessians.items():
            module = model.decoder_layers[index].get_submodule(name)
            assert isinstance(module, nn.Linear), f"{name} is {type(module).__name__}"
            try:
                codes, scale = gptq_fp8(module.weight.detach(), hessian, damp)
            except ValueError as e:
                raise ValueError(f"GPTQ of layers.{index}.{name}: {e}") from e
            weights[f"layers.{index}.{name}.weight"] = codes
            weights[f"layers.{index}.{name}.weight_scale"] = scale
            if module.bias is not None:
                weights[f"layers.{index}.{name}.bias"] = module.bias.detach()
        del hessians
    total_s = time.perf_counter() - started
    logger.info(
        "GPTQ FP8 weights: %d layers on %d calibration tokens in %.1fs (%d passes %.1fs, "
        "rounding %.1fs)",
        len(model.decoder_layers),
        len(token_ids),
        total_s,
        len(groups),
        passes_s,
        total_s - passes_s,
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
