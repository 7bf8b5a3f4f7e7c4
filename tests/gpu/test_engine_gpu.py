"""The engine on a GPU (bf16, Triton kernels, CUDA graphs) against the CPU fp32 reference.

Run on the device machine: `pytest tests/gpu`. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.engine import Engine
from tests.conftest import make_engine, prompt_ids
from tests.unit.test_model_parity import decode_logits, prefill_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB = 1000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama (GQA 8/2, head_dim 64), saved to disk in bf16."""
    transformers = pytest.importorskip("transformers")
    from tests.unit.test_model_parity import write_word_tokenizer

    directory = tmp_path_factory.mktemp("gpu-model")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    # A bf16 checkpoint: both engines then hold the same weights, and the comparison
    # measures the GPU's bf16 arithmetic against fp32 arithmetic on those weights.
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    write_word_tokenizer(directory, VOCAB)
    return directory


def gpu_engine(model_dir: Path, **kwargs: object):
    from engine.config import EngineConfig
    from engine.scheduler import SchedulerConfig

    return Engine(
        EngineConfig(
            model=str(model_dir),
            device="cuda",
            dtype="bfloat16",
            num_kv_blocks=512,
            block_size=16,
            scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=1024),
            **kwargs,
        )
    )


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_teacher_forced_logits_match_cpu_fp32(model_dir: Path, cuda_graphs: bool) -> None:
    cpu = make_engine(str(model_dir), num_kv_blocks=256, block_size=16)
    gpu = gpu_engine(model_dir, cuda_graphs=cuda_graphs)
    token_ids = prompt_ids(seed=5, length=301, vocab_size=VOCAB)
    reference = prefill_logits(cpu, token_ids)
    for logits in (
        prefill_logits(gpu, token_ids).cpu(),
        decode_logits(gpu, token_ids, num_prefix=150).cpu(),
    ):
        rows = reference[-logits.shape[0] :]
        agreement = (logits.argmax(-1) == rows.argmax(-1)).float().mean().item()
        assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"
        scale = rows.abs().max().item()
        torch.testing.assert_close(logits, rows, atol=0.03 * scale, rtol=0.05)
    gpu.check_integrity()


def test_greedy_alone_equals_in_batch(model_dir: Path) -> None:
    from engine.sampling_params import SamplingParams

    engine = gpu_engine(model_dir)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    prompts = [prompt_ids(seed=s, length=20 + 37 * s, vocab_size=VOCAB) for s in range(9)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    together = [c.token_ids for c in engine.generate(prompts, params)]
    assert together == alone
    engine.check_integrity()


def test_gpu_greedy_matches_cpu_reference(model_dir: Path) -> None:
    from engine.sampling_params import SamplingParams

    cpu = make_engine(str(model_dir), num_kv_blocks=256, block_size=16)
    gpu = gpu_engine(model_dir)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [prompt_ids(seed=s, length=33 + 11 * s, vocab_size=VOCAB) for s in range(4)]
    expected = [c.token_ids for c in cpu.generate(prompts, params)]
    got = [c.token_ids for c in gpu.generate(prompts, params)]
    matching = sum(
        a == b for e, g in zip(expected, got, strict=True) for a, b in zip(e, g, strict=True)
    )
    assert matching / sum(len(e) for e in expected) >= 0.95
