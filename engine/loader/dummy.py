"""Random weights for a model config (a named shape such as dummy:llama-3-8b), for benchmarks
and tests that need a model's shape but not its values. Deterministic for a seed; nothing is
read from disk.
"""

from __future__ import annotations

import torch

from engine.model_config import ModelConfig


def dummy_weights(
    config: ModelConfig, dtype: torch.dtype, seed: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors: normal(0, 0.02) matrices, unit norm weights, made on
    `device` (an 8B shape is generated on the GPU in seconds, on a CPU in minutes)."""
    generator = torch.Generator(device).manual_seed(seed)
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator, device=device) * 0.02).to(dtype)

    weights = {
        "model.embed_tokens.weight": matrix(config.vocab_size, h),
        "model.norm.weight": torch.ones(h, dtype=dtype, device=device),
    }
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = matrix(config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
            p + "self_attn.q_proj.weight": matrix(q, h),
            p + "self_attn.k_proj.weight": matrix(kv, h),
            p + "self_attn.v_proj.weight": matrix(kv, h),
            p + "self_attn.o_proj.weight": matrix(h, q),
            p + "mlp.gate_proj.weight": matrix(f, h),
            p + "mlp.up_proj.weight": matrix(f, h),
            p + "mlp.down_proj.weight": matrix(h, f),
        }
        if config.attention_bias:
            for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                weights[p + f"self_attn.{name}.bias"] = torch.zeros(
                    size, dtype=dtype, device=device
                )
    return weights
