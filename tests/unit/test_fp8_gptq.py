"""GPTQ-rounded FP8 weights (engine.fp8_gptq, EngineConfig.fp8_weight_calibration="gptq"): the
rounding itself on synthetic layers, and an engine that loads with it. Its effect on the real
default model's perplexity: tests/integration/test_fp8_fidelity.py and docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contracts.errors import ModelLoadError
from engine.config import EngineConfig
from engine.engine import Engine
from engine.fp8_gptq import gptq_fp8
from engine.kv_calibration import calibration_ids
from engine.quantization import FP8_DTYPE, FP8_MAX, Fp8Linear, quantize_weight
from tests.conftest import make_engine
from tests.unit.test_fp8_weights import CHANNEL_DYNAMIC_CONFIGS, write_fp8_checkpoint
from tests.unit.test_model_parity import build_hf_model, prefill_logits


def correlated_inputs(n: int, k: int, seed: int, draw: int = 0) -> torch.Tensor:
    """[n, k] inputs whose features share a few directions and differ in size, as a layer's
    inputs do (independent features would leave GPTQ nothing to exploit); `seed` fixes the
    distribution, `draw` the sample."""
    gen = torch.Generator().manual_seed(seed)
    basis, sizes = torch.randn(8, k, generator=gen), torch.logspace(-1, 1, k)
    sizes = sizes[torch.randperm(k, generator=gen)]
    gen.manual_seed(1000 * seed + draw + 1)
    x = torch.randn(n, 8, generator=gen) @ basis + 0.3 * torch.randn(n, k, generator=gen)
    return x * sizes


def output_error(
    x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor
) -> float:
    exact = x @ w.T
    return ((x @ (codes.float() * scale[:, None]).T - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_keeps_a_layers_outputs_closer_than_rounding_each_weight(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(48, 160, generator=gen)
    x = correlated_inputs(1024, 160, seed)
    codes, scale = gptq_fp8(w, x.T @ x)
    rtn_codes, rtn_scale = quantize_weight(w)
    assert codes.dtype == FP8_DTYPE and codes.shape == w.shape
    assert torch.equal(scale, rtn_scale)  # the same per-channel scales: row amax / 448
    assert codes.float().abs().max() <= FP8_MAX
    gptq_error, rtn_error = output_error(x, w, codes, scale), output_error(x, w, rtn_codes, scale)
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)
    # on inputs it was not calibrated on, drawn alike, it still wins
    fresh = correlated_inputs(1024, 160, seed, draw=1)
    assert not torch.equal(fresh, x)
    assert output_error(fresh, w, codes, scale) < 0.7 * output_error(fresh, w, rtn_codes, scale)


def test_inputs_that_never_fire_get_zero_weights_and_the_rest_stays_finite() -> None:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(16, 64, generator=gen)
    x = correlated_inputs(256, 64, 7)
    x[:, 5] = 0.0  # a dead input: its Hessian row and column are zero
    codes, scale = gptq_fp8(w, x.T @ x)
    assert torch.all(codes[:, 5].float() == 0)
    assert torch.isfinite(codes.float()).all() and torch.isfinite(scale).all()


def test_a_hessian_of_the_wrong_size_or_not_finite_is_refused() -> None:
    with pytest.raises(ValueError, match=r"hessian is \(8, 8\), the weight 4 x 16 needs 16 x 16"):
        gptq_fp8(torch.randn(4, 16), torch.eye(8))
    hessian = torch.eye(16)
    hessian[3, 3] = float("inf")  # an activation that overflowed
    with pytest.raises(ValueError, match="calibration inputs are not finite"):
        gptq_fp8(torch.randn(4, 16), hessian)


def test_an_engine_with_gptq_weights_is_closer_to_the_unquantized_model(tmp_path: Path) -> None:
    """Every projection FP8 as with round-to-nearest, with other values; on the calibration
    tokens (what the Hessians saw) the logits move less from the fp32 model's."""
    build_hf_model(tmp_path, "gqa")
    gptq = make_engine(str(tmp_path), quantization="fp8", fp8_weight_calibration="gptq")
    rtn = make_engine(str(tmp_path), quantization="fp8")
    dense = make_engine(str(tmp_path))
    fp8 = [n for n, m in gptq.model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == 4 * gptq.model_config.num_layers
    a, b = gptq.model.layers[0].mlp.down_proj, rtn.model.layers[0].mlp.down_proj
    assert a.weight.dtype == FP8_DTYPE and torch.equal(a.weight_scale, b.weight_scale)
    assert not torch.equal(a.weight.float(), b.weight.float()), "GPTQ chose other values"
    config = gptq.model_config
    ids = calibration_ids(gptq.tokenizer, config.vocab_size, config.max_position_embeddings)[:96]
    want = prefill_logits(dense, ids)
    error = {
        n: (prefill_logits(e, ids) - want).norm().item() for n, e in (("gptq", gptq), ("rtn", rtn))
    }
    assert error["gptq"] < error["rtn"], error
    gptq.check_integrity()


def test_layers_calibrated_in_several_passes_get_the_same_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Hessian budget only decides how many layers one calibration pass covers: one pass
    for all layers and one pass per layer give the same GPTQ weights, bit for bit."""
    from engine import fp8_gptq

    # bf16: fp32 CPU projections are packed for oneDNN after load (GPTQ runs before that)
    dense = Engine(
        EngineConfig(model="dummy:tiny", device="cpu", dtype="bfloat16", num_kv_blocks=8)
    )
    model, config = dense.model, dense.model_config
    ids = calibration_ids(None, config.vocab_size, config.max_position_embeddings)[:64]
    assert len(fp8_gptq.pass_groups(model)) == 1
    together = fp8_gptq.quantize_model_gptq(model, ids, torch.device("cpu"))
    monkeypatch.setattr(fp8_gptq, "HESSIAN_BUDGET_BYTES", 1)
    assert [list(g) for g in fp8_gptq.pass_groups(model)] == [[i] for i in range(config.num_layers)]
    apart = fp8_gptq.quantize_model_gptq(model, ids, torch.device("cpu"))
    assert together.keys() == apart.keys()
    for name, tensor in together.items():
        assert torch.equal(tensor.float(), apart[name].float()), name


def test_gptq_needs_fp8_weights_and_one_rank() -> None:
    with pytest.raises(ValueError, match="must be one of"):
        EngineConfig(quantization="fp8", fp8_weight_calibration="awq")
    with pytest.raises(ValueError, match="needs quantization='fp8'"):
        EngineConfig(fp8_weight_calibration="gptq")
    with pytest.raises(ValueError, match="tensor_parallel_size=1 only, got 2"):
        EngineConfig(quantization="fp8", fp8_weight_calibration="gptq", tensor_parallel_size=2)


def test_an_fp8_checkpoint_is_not_rounded_again(tmp_path: Path) -> None:
    build_hf_model(tmp_path, "gqa")
    write_fp8_checkpoint(tmp_path, "channel-dynamic", CHANNEL_DYNAMIC_CONFIGS["fbgemm_fp8"])
    with pytest.raises(ModelLoadError, match="weights are FP8 already"):
        make_engine(str(tmp_path), quantization="fp8", fp8_weight_calibration="gptq")
