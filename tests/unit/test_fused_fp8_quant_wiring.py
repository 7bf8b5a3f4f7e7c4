"""The plumbing of EngineConfig.fused_fp8_quant on CPU: Fp8Linear takes rows already quantized
per token (Fp8Rows), or rows with their amaxes (Fp8Pending), and gives bitwise what it gives
for the rows themselves; RMSNorm's
quantizing forward matches forward-then-quantize; the switch is refused where the projections
are not FP8 with dynamic scales. The fused kernels: tests/unit/kernels/test_fused_fp8_quant.py;
an FP8 engine with the fusion on a GPU: tests/gpu/test_fp8_gpu.py."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llama import RMSNorm
from engine.quantization import (
    Fp8Linear,
    Fp8Pending,
    Fp8Rows,
    quantize_per_token,
    quantize_weight,
)
from tests.conftest import make_engine


def fp8_layer(static_input_scale: bool = False, dtype: torch.dtype = torch.float32) -> Fp8Linear:
    torch.manual_seed(0)
    layer = Fp8Linear(40, 24, bias=True, static_input_scale=static_input_scale, dtype=dtype)
    wq, ws = quantize_weight(torch.randn(24, 40))
    with torch.no_grad():
        layer.weight.copy_(wq)
        layer.weight_scale.copy_(ws)
        assert layer.bias is not None
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_takes_rows_quantized_per_token(num_tokens: int, dtype: torch.dtype) -> None:
    layer = fp8_layer(dtype=dtype)
    x = torch.randn(num_tokens, 40).to(dtype)
    q, scale = quantize_per_token(x)
    got = layer(Fp8Rows(q, scale, dtype))
    assert got.dtype == dtype and got.shape == (num_tokens, 24)
    assert torch.equal(got, layer(x))


@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_takes_rows_with_their_amaxes(num_tokens: int, dtype: torch.dtype) -> None:
    """Fp8Pending where the FP8 GEMV does not run (here: CPU, also with use_gemv set): the
    values quantized as a plain tensor's, bitwise the same output. (The GEMV's quantizing mode:
    tests/unit/kernels/test_fp8_gemv.py.)"""
    layer = fp8_layer(dtype=dtype)
    layer.use_gemv = True
    x = torch.randn(num_tokens, 40).to(dtype)
    amax = torch.stack([x[:, :16].float().abs().amax(1), x[:, 16:].float().abs().amax(1)], 1)
    assert not layer.gemv_applies(num_tokens, dtype, x.device)
    got = layer(Fp8Pending(x, amax))
    assert got.dtype == dtype and got.shape == (num_tokens, 24)
    assert torch.equal(got, layer(x))


def test_fp8_linear_refuses_pending_rows_it_cannot_take() -> None:
    x = torch.randn(2, 40)
    amax = x.abs().amax(dim=1, keepdim=True)
    with pytest.raises(ValueError, match="static input scale"):
        fp8_layer(static_input_scale=True)(Fp8Pending(x, amax))
    with pytest.raises(ValueError, match=r"values must be \[M, 40\]"):
        fp8_layer()(Fp8Pending(x[:, :32], amax))
    with pytest.raises(ValueError, match=r"amax must be \[M = 2, parts\]"):
        fp8_layer()(Fp8Pending(x, amax[:1]))
    with pytest.raises(ValueError, match=r"amax must be \[M = 2, parts\]"):
        fp8_layer()(Fp8Pending(x, amax.reshape(-1)))
    with pytest.raises(ValueError, match="amax must be fp32"):
        fp8_layer()(Fp8Pending(x, amax.double()))


def test_fp8_linear_refuses_rows_it_cannot_take() -> None:
    q, scale = quantize_per_token(torch.randn(2, 40))
    with pytest.raises(ValueError, match="static input scale"):
        fp8_layer(static_input_scale=True)(Fp8Rows(q, scale, torch.float32))
    with pytest.raises(ValueError, match=r"\[M, 40\]"):
        fp8_layer()(Fp8Rows(q[:, :32], scale, torch.float32))


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_forward_fp8_is_forward_then_quantize(with_residual: bool) -> None:
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = torch.randn(3, 48)
    residual = torch.randn(3, 48) if with_residual else None
    rows, h = norm.forward_fp8(x, residual)
    out, want_h = norm(x, residual)
    want_q, want_scale = quantize_per_token(out)
    assert torch.equal(rows.values.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(rows.scale, want_scale) and rows.dtype == x.dtype
    assert torch.equal(h, want_h)


def test_the_switch_needs_fp8_weights() -> None:
    with pytest.raises(ValueError, match="fused_fp8_quant=True needs quantization='fp8'"):
        EngineConfig(fused_fp8_quant=True)
    with pytest.raises(ValueError, match="fused_fp8_quant needs FP8 decoder projections"):
        make_engine().model.use_fused_fp8_quant()
    model = make_engine(quantization="fp8").model
    model.use_fused_fp8_quant()
    assert model.fused_fp8_quant and all(
        layer.mlp.fused_fp8_quant and layer.self_attn.fused_fp8_quant for layer in model.layers
    )
    model.use_fused_fp8_quant(False)
    assert not model.fused_fp8_quant and not any(
        layer.mlp.fused_fp8_quant or layer.self_attn.fused_fp8_quant for layer in model.layers
    )


def test_the_default_turns_it_on_where_it_applies() -> None:
    """EngineConfig.fused_fp8_quant=None (the default) means on for an engine whose decoder
    projections all quantize their activations per token (checked here on the models; the
    engine on CUDA only: on CPU the fused kernels are never used)."""
    assert EngineConfig().fused_fp8_quant is None
    assert EngineConfig(fused_fp8_quant=False, quantization=None).fused_fp8_quant is False
    assert not make_engine().model.fused_fp8_quant_applies()
    fp8 = make_engine(quantization="fp8")
    assert fp8.model.fused_fp8_quant_applies()
    assert not fp8.model.fused_fp8_quant  # CPU: left off
    fp8.model.decoder_layers[0].self_attn.o_proj.input_scale = torch.ones(())
    assert not fp8.model.fused_fp8_quant_applies()  # a static input scale somewhere: off
