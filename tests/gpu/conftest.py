"""Shared helpers of the GPU tests: a small Llama trained on a rule (confident like a trained
LM, so greedy comparisons measure arithmetic rather than near-ties) and engines over it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.engine import Engine

VOCAB = 1000
SUCCESSOR = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0)).tolist()


def rule_sequence(seed: int, length: int) -> list[int]:
    """Tokens following x[t+1] = SUCCESSOR[x[t-1]] (two random tokens to start), so that
    predicting the next token needs attention to the token before the current one."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2,), generator=generator).tolist()
    while len(tokens) < length:
        tokens.append(SUCCESSOR[tokens[-2]])
    return tokens


def train_on_rule(model: torch.nn.Module, steps: int) -> None:
    """A few hundred optimizer steps on rule sequences: enough to make the model confident,
    like a trained LM, so top-1 agreement measures arithmetic rather than near-ties."""
    model.cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        batch = torch.tensor(
            [rule_sequence(1_000_000 + 64 * step + i, 128) for i in range(64)], device="cuda"
        )
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, f"the rule was not learned (loss {loss.item():.2f})"
    model.eval().cpu()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama (GQA 8/2, head_dim 64) trained on rule sequences, saved in bf16 (once per
    session: every GPU test module uses the same one)."""
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
    train_on_rule(model, steps=600)
    # A bf16 checkpoint: both engines then hold the same weights, and the comparison
    # measures the GPU's bf16 arithmetic against fp32 arithmetic on those weights.
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    write_word_tokenizer(directory, VOCAB)
    return directory


def gpu_engine(model_dir: Path, **kwargs: object) -> Engine:
    """An engine of the test model on the GPU (bf16, 512 blocks of 16 tokens), `kwargs` more
    EngineConfig fields; close it (`with`) at tensor_parallel_size > 1."""
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
