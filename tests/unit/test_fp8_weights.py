"""FP8 (e4m3) W8A8 weights on CPU: the quantizers, Fp8Linear's reference product, quantizing a
model at load, and loading Hugging Face FP8 checkpoints the tests write themselves.

A checkpoint in each supported format is made from a tiny random transformers Llama: its
projection weights quantized (per tensor or per channel) and saved as float8_e4m3fn with
`weight_scale` (and `input_scale` where static) beside them, as the producers of such
checkpoints lay them out. Per-channel dynamic checkpoints must load to exactly the model that
quantizing the bf16 original at load gives; per-tensor ones must match an fp32 model built from
their dequantized weights up to activation rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contracts.errors import UnsupportedModel
from engine.loader.hf_quant import fp8_scheme_from_hf_config
from engine.quantization import (
    FP8_DTYPE,
    Fp8Linear,
    dequantize,
    quantize_per_token,
    quantize_weight,
)
from tests.conftest import greedy, make_engine, prompt_ids
from tests.unit.test_model_parity import build_hf_model, prefill_logits

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_per_token_quantization_keeps_each_row_within_e4m3_precision() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 48) * torch.logspace(-3, 3, 7)[:, None]  # rows of very different size
    q, scale = quantize_per_token(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (7, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((7,), 448.0))  # amax -> 448
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal values
    err = (dequantize(q, scale) - x).abs()
    assert (err <= x.abs() * 2**-4 + scale * 2**-9).all()


def test_fp8_linear_reference_equals_the_scaled_sum_and_tracks_fp32() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48, bias=True)
    layer = Fp8Linear(64, 48, bias=True)
    wq, ws = quantize_weight(dense.weight.detach())
    with torch.no_grad():
        layer.weight.copy_(wq)
        layer.weight_scale.copy_(ws)
        layer.bias.copy_(dense.bias)  # type: ignore[union-attr]
    x = torch.randn(5, 64)
    xq, xs = quantize_per_token(x)
    expected = (xq.double() @ wq.double().T) * xs.double() * ws.double() + dense.bias.double()
    out = layer(x)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        exact = dense(x)
    rel = (out - exact).norm() / exact.norm()
    assert rel < 0.05, f"fp8 linear relative error {rel:.4f}"


def test_quantize_at_load_replaces_every_projection_and_keeps_the_head(tmp_path: Path) -> None:
    build_hf_model(tmp_path, "gqa")
    engine = make_engine(str(tmp_path), quantization="fp8")
    fp8 = [n for n, m in engine.model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == 4 * engine.model_config.num_layers
    assert engine.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8_DTYPE
    assert engine.model.lm_head.weight.dtype == torch.float32
    dense = make_engine(str(tmp_path))
    ids = prompt_ids(seed=1, length=21, vocab_size=300)
    got, want = prefill_logits(engine, ids), prefill_logits(dense, ids)
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < 0.05, f"relative logit error {rel:.4f}"


def _quantize_tensorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax().clamp(min=1e-12) / 448.0
    return (w / scale).clamp(-448, 448).to(FP8_DTYPE), scale.reshape(())


def write_fp8_checkpoint(directory: Path, fmt: str, quantization_config: dict) -> None:
    """Rewrite the saved tiny model's projections as an FP8 checkpoint of format `fmt`:
    "tensor-static" (per-tensor weight and input scales) or "channel-dynamic"."""
    from safetensors.torch import load_file, save_file

    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    for name in [n for n in tensors if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS]:
        w = tensors[name].float()
        if fmt == "tensor-static":
            q, scale = _quantize_tensorwise(w)
            stem = name.removesuffix(".weight")
            # a calibrated per-tensor input scale (the producer's; any positive value loads)
            tensors[f"{stem}.input_scale"] = torch.tensor([0.02], dtype=torch.float32)
            tensors[f"{stem}.weight_scale"] = scale.reshape(1)
        else:
            q, scale = quantize_weight(w)
            tensors[f"{name}_scale"] = scale.reshape(-1, 1)  # [out, 1] fp32
        tensors[name] = q
    save_file(tensors, str(file))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))


CHANNEL_DYNAMIC_CONFIGS = {
    "compressed-tensors": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                            "dynamic": False, "symmetric": True},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                      "dynamic": True, "symmetric": True},
            }
        },
        "ignore": ["lm_head"],
    },
    "fbgemm_fp8": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(CHANNEL_DYNAMIC_CONFIGS))
def test_channel_dynamic_checkpoint_loads_to_the_model_quantized_at_load(
    tmp_path: Path, method: str
) -> None:
    original, fp8_dir = tmp_path / "bf16", tmp_path / "fp8"
    build_hf_model(original, "gqa")
    build_hf_model(fp8_dir, "gqa")  # same seed: the same weights
    write_fp8_checkpoint(fp8_dir, "channel-dynamic", CHANNEL_DYNAMIC_CONFIGS[method])
    from_checkpoint = make_engine(str(fp8_dir))  # FP8 because the checkpoint says so
    at_load = make_engine(str(original), quantization="fp8")
    assert from_checkpoint.info.fp8_scheme is not None
    ids = prompt_ids(seed=2, length=19, vocab_size=300)
    torch.testing.assert_close(
        prefill_logits(from_checkpoint, ids), prefill_logits(at_load, ids), atol=1e-4, rtol=1e-4
    )


def test_tensor_static_checkpoint_matches_its_dequantized_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    fp8_dir, dequant_dir = tmp_path / "fp8", tmp_path / "dequant"
    build_hf_model(fp8_dir, "gqa")
    build_hf_model(dequant_dir, "gqa")
    config = {"quant_method": "fp8", "activation_scheme": "static"}
    write_fp8_checkpoint(fp8_dir, "tensor-static", config)
    # the reference: the same fp8 weights, dequantized to fp32, no quantization at all
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    dense = {
        n: (t.float() * tensors[f"{n}_scale"] if t.dtype == FP8_DTYPE else t)
        for n, t in tensors.items()
        if not n.endswith("_scale")
    }
    save_file(dense, str(dequant_dir / "model.safetensors"))

    engine = make_engine(str(fp8_dir))
    qkv = engine.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) and qkv.input_scale is not None
    # per-tensor q, k and v scales widened to one per output channel, in q|k|v order
    q_scale = tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    assert torch.equal(qkv.weight_scale[:64], q_scale.expand(64))
    reference = make_engine(str(dequant_dir))
    ids = prompt_ids(seed=3, length=17, vocab_size=300)
    got, want = prefill_logits(engine, ids), prefill_logits(reference, ids)
    rel = (got - want).norm() / want.norm()
    assert rel < 0.05, f"relative logit error {rel:.4f}"


@pytest.mark.parametrize(
    ("quantization_config", "named"),
    [
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
        ({"quant_method": "awq"}, "awq"),
        (
            {"quant_method": "compressed-tensors", "format": "int-quantized",
             "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}}},
            "int-quantized",
        ),
        (
            {"quant_method": "compressed-tensors", "format": "float-quantized",
             "config_groups": {"g": {
                 "weights": {"num_bits": 8, "type": "float", "strategy": "group"},
                 "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                       "dynamic": True}}}},
            "'group'",
        ),
    ],
)  # fmt: skip
def test_unsupported_formats_are_refused_naming_format_and_supported(
    quantization_config: dict, named: str
) -> None:
    with pytest.raises(UnsupportedModel) as info:
        fp8_scheme_from_hf_config({"quantization_config": quantization_config})
    message = str(info.value)
    assert named in message and "supported:" in message and "fbgemm_fp8" in message


def test_unsupported_checkpoint_is_refused_at_load(tmp_path: Path) -> None:
    build_hf_model(tmp_path, "gqa")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="bitsandbytes"):
        make_engine(str(tmp_path))


TENSOR_STATIC_CONFIG = {"quant_method": "fp8", "activation_scheme": "static"}


def _add_kv_cache_scales(directory: Path, scales: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file, save_file

    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    tensors.update(scales)
    save_file(tensors, str(file))


def _layer_scales(num_layers: int, combined: bool) -> dict[str, torch.Tensor]:
    """k_scale and v_scale per layer (or one kv_scale), distinct values: 2^-(4 + i) for K."""
    out = {}
    for i in range(num_layers):
        stem = f"model.layers.{i}.self_attn"
        if combined:
            out[f"{stem}.kv_scale"] = torch.tensor(2.0 ** -(4 + i))
        else:
            out[f"{stem}.k_scale"] = torch.tensor(2.0 ** -(4 + i))
            out[f"{stem}.v_scale"] = torch.tensor([0.03 * (i + 1)])
    return out


@pytest.mark.parametrize("combined", [False, True])
def test_a_checkpoints_kv_cache_scales_become_the_per_head_scales(
    tmp_path: Path, combined: bool
) -> None:
    """An FP8 checkpoint that ships KV-cache scales (k_scale/v_scale, or one kv_scale) gives a
    per-head FP8 cache those scales, repeated over each layer's heads, instead of calibrating;
    a per-token cache, or a bf16 one, ignores them (they were dropped before)."""
    build_hf_model(tmp_path, "gqa")
    write_fp8_checkpoint(tmp_path, "tensor-static", TENSOR_STATIC_CONFIG)
    engine = make_engine(str(tmp_path), kv_cache_dtype="fp8")
    layers, heads = engine.model_config.num_layers, engine.model_config.num_kv_heads
    _add_kv_cache_scales(tmp_path, _layer_scales(layers, combined))
    shipped = make_engine(str(tmp_path), kv_cache_dtype="fp8")
    scales = shipped.model.kv_scales
    assert scales is not None and scales.shape == (layers, 2, heads)
    for i in range(layers):
        assert (scales[i, 0] == 2.0 ** -(4 + i)).all()
        want_v = 2.0 ** -(4 + i) if combined else torch.tensor(0.03 * (i + 1)).item()
        assert torch.allclose(scales[i, 1], torch.tensor(want_v))
    assert shipped.kv_scales_digest != engine.kv_scales_digest  # not what calibration gives
    assert len(shipped.generate([prompt_ids(3, 11, vocab_size=300)], greedy(4))[0].token_ids) == 4
    for kwargs in ({"kv_cache_scales": "per_token"}, {"kv_cache_dtype": "auto"}):
        options = {"kv_cache_dtype": "fp8", **kwargs}
        assert make_engine(str(tmp_path), **options).kv_scales_digest is None  # type: ignore[arg-type]


def test_kv_cache_scales_missing_for_a_layer_are_refused(tmp_path: Path) -> None:
    from contracts.errors import ModelLoadError

    build_hf_model(tmp_path, "gqa")
    write_fp8_checkpoint(tmp_path, "tensor-static", TENSOR_STATIC_CONFIG)
    scales = _layer_scales(2, combined=False)
    del scales["model.layers.1.self_attn.v_scale"]
    _add_kv_cache_scales(tmp_path, scales)
    with pytest.raises(ModelLoadError, match=r"every layer's K and V.*missing \['1\.v'\]"):
        make_engine(str(tmp_path), kv_cache_dtype="fp8")
