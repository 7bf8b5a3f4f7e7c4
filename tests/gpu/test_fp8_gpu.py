"""FP8 on a GPU: Fp8Linear's `torch._scaled_mm` path against its fp32 reference, and an engine
with FP8 weights and an FP8 KV cache giving the same greedy tokens with and without CUDA graphs
(the graphs replay the Triton FP8 write and attention kernels), with the FP8 GEMV for single
rows off and on (engine.kernels.fp8_gemv; its kernel tests are tests/unit/kernels), and with
the per-token activation quantization fused into RMSNorm and SiLU-and-mul (fused_fp8_quant)
giving the same greedy tokens as without (with the GEMV on, the GEMV quantizing o_proj's
and down_proj's single rows itself from the amaxes their producers write: Fp8Pending).

Run on the device machine: `pytest tests/gpu`. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.quantization import Fp8Linear, Fp8Pending, quantize_weight
from engine.scheduler import SchedulerConfig
from tests.conftest import greedy, prompt_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_scaled_mm_matches_the_reference_product(num_tokens: int) -> None:
    torch.manual_seed(0)
    layer = Fp8Linear(512, 384, bias=False, device="cuda", dtype=torch.bfloat16)
    wq, ws = quantize_weight(torch.randn(384, 512, device="cuda"))
    with torch.no_grad():
        layer.weight.copy_(wq)
        layer.weight_scale.copy_(ws)
    x = torch.randn(num_tokens, 512, device="cuda", dtype=torch.bfloat16)
    assert layer._can_use_scaled_mm(x)
    got = layer(x).float()
    from engine.quantization import quantize_per_token

    xq, xs = quantize_per_token(x)
    want = layer._reference_product(xq) * xs * ws
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)  # bf16 output rounding


def engine(
    cuda_graphs: bool, triton_gemv: bool = False, fused_fp8_quant: bool | None = False
) -> Engine:
    return Engine(
        EngineConfig(
            model="dummy:tiny", device="cuda", dtype="bfloat16", num_kv_blocks=64,
            block_size=16, quantization="fp8", kv_cache_dtype="fp8", cuda_graphs=cuda_graphs,
            triton_gemv=triton_gemv, fused_fp8_quant=fused_fp8_quant,
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
        )
    )  # fmt: skip


def test_fp8_engine_same_tokens_with_and_without_cuda_graphs() -> None:
    prompts = [prompt_ids(seed, length) for seed, length in ((1, 5), (2, 37), (3, 70))]
    eager = [c.token_ids for c in engine(False).generate(prompts, greedy(24))]
    graphed_engine = engine(True)
    graphed = [c.token_ids for c in graphed_engine.generate(prompts, greedy(24))]
    assert graphed == eager
    graphed_engine.check_integrity()


def test_fp8_gemv_engine_same_tokens_with_and_without_cuda_graphs() -> None:
    """One sequence (every decode step a single row: the FP8 GEMV's path) and then three."""
    for prompts in ([prompt_ids(4, 29)], [prompt_ids(s, n) for s, n in ((1, 5), (2, 37), (3, 9))]):
        eager = [c.token_ids for c in engine(False, True).generate(prompts, greedy(24))]
        graphed_engine = engine(True, True)
        fp8 = [m for m in graphed_engine.model.modules() if isinstance(m, Fp8Linear)]
        assert fp8 and all(m.use_gemv for m in fp8)
        graphed = [c.token_ids for c in graphed_engine.generate(prompts, greedy(24))]
        assert graphed == eager
        graphed_engine.check_integrity()


@pytest.mark.parametrize(
    ("cuda_graphs", "triton_gemv"), [(False, False), (False, True), (True, True)]
)
def test_fused_fp8_quant_engine_gives_the_same_tokens(cuda_graphs: bool, triton_gemv: bool) -> None:
    """The fused kernels make bitwise the e4m3 values and scales of the separate quantization,
    so greedy tokens are identical: one sequence (single rows) and then three. With the FP8
    GEMV, single rows take Fp8Pending into o_proj and down_proj (the GEMV quantizes)."""
    for prompts in ([prompt_ids(4, 29)], [prompt_ids(s, n) for s, n in ((1, 5), (2, 37), (3, 9))]):
        unfused = engine(cuda_graphs, triton_gemv)
        want = [c.token_ids for c in unfused.generate(prompts, greedy(24))]
        del unfused
        fused_engine = engine(cuda_graphs, triton_gemv, fused_fp8_quant=True)
        assert fused_engine.model.fused_fp8_quant
        layer = fused_engine.model.decoder_layers[0]
        assert layer.self_attn.fused_fp8_quant and layer.mlp.fused_fp8_quant
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            assert isinstance(proj, Fp8Linear)
            assert proj.gemv_applies(1, torch.bfloat16, torch.device("cuda")) == triton_gemv
        got = [c.token_ids for c in fused_engine.generate(prompts, greedy(24))]
        assert got == want
        fused_engine.check_integrity()


@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (4096, 14336)])  # o_proj, down_proj
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_fp8_linear_takes_pending_rows_bitwise(num_tokens: int, n: int, k: int) -> None:
    """Llama-3-8B's o_proj and down_proj with the GEMV on: rows with their amaxes from the
    producing kernel (decode attention's per head, SiLU-and-mul's per 1,024 columns) give
    bitwise the output of the rows themselves: at one row the GEMV quantizes them itself, at
    three they take the usual quantization and `torch._scaled_mm`."""
    from engine.kernels.decode_attention import paged_decode_attention
    from engine.kernels.silu_and_mul import amax_parts, silu_and_mul

    torch.manual_seed(num_tokens + n + k)
    layer = Fp8Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    wq, ws = quantize_weight(torch.randn(n, k, device="cuda") / k**0.5)
    with torch.no_grad():
        layer.weight.copy_(wq)
        layer.weight_scale.copy_(ws)
    layer.use_gemv = True
    if k == 14336:
        gate_up = torch.randn(num_tokens, 2 * k, device="cuda", dtype=torch.bfloat16) * 3
        amax = torch.empty(num_tokens, amax_parts(k), device="cuda")
        x = silu_and_mul(gate_up, amax_out=amax)
    else:  # 32 heads of 128 over 8 kv heads, 300 cached tokens of bf16
        q = torch.randn(num_tokens, 32, 128, device="cuda", dtype=torch.bfloat16)
        cache = torch.randn(2, 64, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(64, device="cuda", dtype=torch.int32)[: 19 * num_tokens]
        lens = torch.full((num_tokens,), 300, dtype=torch.int32, device="cuda")
        amax = torch.empty(num_tokens, 32, device="cuda")
        x = paged_decode_attention(
            q, cache[0], cache[1], tables.view(num_tokens, 19), lens, 128**-0.5, amax_out=amax
        ).reshape(num_tokens, k)
    assert layer.gemv_applies(num_tokens, x.dtype, x.device) == (num_tokens == 1)
    assert torch.equal(layer(Fp8Pending(x, amax)), layer(x))


def test_fused_fp8_quant_is_on_by_default_with_fp8_weights() -> None:
    """EngineConfig.fused_fp8_quant=None (the default) turns it on for FP8 weights on CUDA."""
    assert engine(True, fused_fp8_quant=None).model.fused_fp8_quant
    assert not engine(True, fused_fp8_quant=False).model.fused_fp8_quant


def test_gptq_fp8_weights_on_the_gpu_beat_rounding_to_nearest() -> None:
    """engine.fp8_gptq on CUDA (bf16 model, fp32 factorization on the card): every projection FP8,
    the scales round-to-nearest's, and on the calibration tokens the logits closer to the
    bf16 model's than round-to-nearest's."""
    from engine.kv_calibration import calibration_ids
    from tests.unit.test_model_parity import prefill_logits

    def make(**kwargs: object) -> Engine:
        return Engine(
            EngineConfig(
                model="dummy:tiny", device="cuda", dtype="bfloat16", num_kv_blocks=64,
                block_size=16, cuda_graphs=False, **kwargs,  # type: ignore[arg-type]
            )
        )  # fmt: skip

    gptq = make(quantization="fp8", fp8_weight_calibration="gptq")
    rtn, dense = make(quantization="fp8"), make()
    a, b = gptq.model.layers[0].mlp.down_proj, rtn.model.layers[0].mlp.down_proj
    assert isinstance(a, Fp8Linear) and torch.equal(a.weight_scale, b.weight_scale)
    assert not torch.equal(a.weight.float(), b.weight.float())
    config = gptq.model_config
    ids = calibration_ids(None, config.vocab_size, config.max_position_embeddings)[:96]
    want = prefill_logits(dense, ids).float()
    errors = [(prefill_logits(e, ids).float() - want).norm().item() for e in (gptq, rtn)]
    assert errors[0] < errors[1], errors
