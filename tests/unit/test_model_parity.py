"""The engine's logits match Hugging Face transformers in fp32 on CPU.

Tiny random Llama-family models are built with transformers, saved with `save_pretrained`,
loaded by Tandem from that directory, and compared position by position: once through the
prefill path (one chunk over the whole prompt) and once through the decode path (a prefix
chunk, then one token per step), so both attention paths are checked against the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contracts.block_hash import root_hash
from contracts.sampling_params import SamplingParams
from engine.engine import Engine
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.sequence import Sequence
from tests.conftest import make_engine, prompt_ids

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
RTOL = 1e-4

CASES = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A minimal word-level tokenizer.json + tokenizer_config.json (no network, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))


def build_hf_model(directory: Path, case: str, architecture: str = "llama") -> torch.nn.Module:
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    common.update(CASES.get(case, {}))
    torch.manual_seed(0)
    if architecture == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():  # make norms non-trivial so they are checked too
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    write_word_tokenizer(directory, common["vocab_size"])
    return model.eval()


def prefill_logits(engine: Engine, token_ids: list[int]) -> torch.Tensor:
    """Logits [len, vocab] at every position, one prefill chunk."""
    seq = Sequence("parity", token_ids, SamplingParams(), root_hash("parity"))
    assert engine.block_manager.allocate_slots(seq, len(token_ids))
    item = ScheduledSequence(seq, len(token_ids))
    with torch.inference_mode():
        input_ids, positions, meta = engine.runner.prepare_inputs([], [item])
        hidden = engine.model(input_ids, positions, engine.runner.kv_cache, meta)
        logits = engine.model.compute_logits(hidden)
    engine.block_manager.free(seq)
    return logits


def decode_logits(engine: Engine, token_ids: list[int], num_prefix: int) -> torch.Tensor:
    """Logits [len - num_prefix + 1, vocab] at positions num_prefix-1 .. len-1: a prefix
    chunk, then one token per step through the runner's decode path."""
    seq = Sequence("parity", token_ids[:num_prefix], SamplingParams(), root_hash("parity"))
    rows = []
    num_new = num_prefix
    for next_token in [*token_ids[num_prefix:], None]:
        assert engine.block_manager.allocate_slots(seq, num_new)
        output = SchedulerOutput([ScheduledSequence(seq, num_new)], [])
        # a copy: with CUDA graphs the runner returns the graph's own output buffer, which the
        # next step overwrites (stacking those views gave every row the last step's logits)
        rows.append(engine.runner.execute(output)[0].clone())
        seq.num_computed_tokens += num_new
        if next_token is not None:
            seq.append_token(next_token)
        num_new = 1
    engine.block_manager.free(seq)
    return torch.stack(rows)


def hf_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path: Path, case: str) -> None:
    reference = build_hf_model(tmp_path, case)
    engine = make_engine(str(tmp_path), num_kv_blocks=64, block_size=4)
    token_ids = prompt_ids(seed=1, length=29, vocab_size=300)  # not a multiple of the block
    expected = hf_logits(reference, token_ids)

    torch.testing.assert_close(prefill_logits(engine, token_ids), expected, atol=ATOL, rtol=RTOL)
    decoded = decode_logits(engine, token_ids, num_prefix=11)
    torch.testing.assert_close(decoded, expected[10:], atol=ATOL, rtol=RTOL)
    engine.check_integrity()


def test_qwen2_with_qkv_bias_matches_transformers(tmp_path: Path) -> None:
    reference = build_hf_model(tmp_path, "gqa", architecture="qwen2")
    engine = make_engine(str(tmp_path), num_kv_blocks=64, block_size=4)
    assert engine.model_config.attention_bias
    token_ids = prompt_ids(seed=2, length=17, vocab_size=300)
    torch.testing.assert_close(
        prefill_logits(engine, token_ids), hf_logits(reference, token_ids), atol=ATOL, rtol=RTOL
    )


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    reference = build_hf_model(tmp_path, "gqa")
    engine = make_engine(str(tmp_path), num_kv_blocks=64, block_size=4)
    token_ids = prompt_ids(seed=3, length=9, vocab_size=300)
    with torch.no_grad():
        hf_out = reference.generate(
            torch.tensor([token_ids]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(token_ids) :].tolist()
    ours = engine.generate([token_ids], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert ours.token_ids == hf_out
