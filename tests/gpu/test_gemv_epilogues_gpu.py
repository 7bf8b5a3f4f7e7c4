"""The single-row GEMVs' epilogues in the engine: the QKV GEMV's rotary + KV write
(engine.llama.GEMV_ROTARY_KV) and the gate_up GEMV's SiLU-and-mul (GEMV_SILU_MUL, with FP8 the
amax down_proj's GEMV quantizes from). Single decode rows with the GEMV on give the same greedy
tokens as with the separate launches, eager and in CUDA graphs, bf16 and FP8 weights, float and
FP8 caches (per-head scales: the rotary epilogue writes them; per-token scales: it stands
aside). The kernels' bitwise tests are tests/unit/kernels/test_rotary_kv_epilogue.py and
test_silu_mul_epilogue.py.

Run on the device machine: `pytest tests/gpu`. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from engine import llama
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from tests.conftest import greedy, prompt_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = ([prompt_ids(4, 29)], [prompt_ids(s, n) for s, n in ((1, 5), (2, 37), (3, 9))])


def engine(cuda_graphs: bool, quantization: str | None, kv: str, scales: str) -> Engine:
    return Engine(
        EngineConfig(
            model="dummy:tiny", device="cuda", dtype="bfloat16", num_kv_blocks=64,
            block_size=16, quantization=quantization, kv_cache_dtype=kv,
            kv_cache_scales=scales, cuda_graphs=cuda_graphs, triton_gemv=True,
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
        )
    )  # fmt: skip


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize(
    ("quantization", "kv", "scales", "rotary_applies"),
    [
        (None, "auto", "per_head", True),
        ("fp8", "fp8", "per_head", True),
        ("fp8", "auto", "per_head", True),
        ("fp8", "fp8", "per_token", False),
    ],
)
def test_epilogues_give_the_tokens_of_the_separate_launches(
    monkeypatch: pytest.MonkeyPatch,
    cuda_graphs: bool,
    quantization: str | None,
    kv: str,
    scales: str,
    rotary_applies: bool,
) -> None:
    # imported here, not at collection: a kernel module imported before tests/unit/kernels'
    # conftest turns the interpreter on stays compiled, and the CPU suite's kernel tests fail
    from engine.kernels import silu_mul_epilogue
    from engine.kernels.rotary_kv_epilogue import RotaryKvWrite

    rotary, silu = [], []
    kernel_args, silu_args = RotaryKvWrite.kernel_args, silu_mul_epilogue.launch_args
    monkeypatch.setattr(
        RotaryKvWrite, "kernel_args", lambda self: rotary.append(1) or kernel_args(self)
    )
    monkeypatch.setattr(
        silu_mul_epilogue, "launch_args", lambda amax: silu.append(amax) or silu_args(amax)
    )
    for prompts in PROMPTS:
        monkeypatch.setattr(llama, "GEMV_ROTARY_KV", False)
        monkeypatch.setattr(llama, "GEMV_SILU_MUL", False)
        separate = engine(cuda_graphs, quantization, kv, scales)
        want = [c.token_ids for c in separate.generate(prompts, greedy(24))]
        del separate
        assert not rotary and not silu
        monkeypatch.setattr(llama, "GEMV_ROTARY_KV", True)
        monkeypatch.setattr(llama, "GEMV_SILU_MUL", True)
        fused = engine(cuda_graphs, quantization, kv, scales)
        got = [c.token_ids for c in fused.generate(prompts, greedy(24))]
        assert got == want
        # one sequence decodes single rows (eager: its steps; graphs: the batch-1 capture);
        # three prompts prefill together and decode in rows of three (eager: no single row)
        if len(prompts) == 1 or cuda_graphs:
            assert bool(rotary) == rotary_applies, "single decode rows took the rotary epilogue"
            assert silu, "single decode rows took the SiLU-and-mul epilogue"
            with_amax = quantization == "fp8"  # fused FP8 quantization: on where it applies
            assert any(amax is not None for amax in silu) == with_amax, "down_proj's amax"
        fused.check_integrity()
        rotary.clear()
        silu.clear()
