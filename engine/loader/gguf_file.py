"""Loading Llama-family models from GGUF files (llama.cpp's format).

Config, tokenizer and chat template come from the file's metadata; tensors are dequantized at
load with the `gguf` package (F32, F16, BF16, Q4_0, Q4_1, Q8_0 and the other types it knows).
GGUF stores the Q and K projections of `llama` models permuted for interleaved rotary
embedding; they are permuted back here so the model can use the "rotate half" form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from contracts.errors import ModelLoadError, UnsupportedModel
from engine.model_config import ModelConfig

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFFile:
    """A GGUF file whose reader (which parses every metadata field: seconds for a large
    vocabulary) is opened on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: Any = None

    @property
    def reader(self) -> Any:
        """The `gguf.GGUFReader`; raises ModelLoadError if the file is unreadable."""
        if self._reader is None:
            self._reader = open_gguf(self.path)
        return self._reader


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` over the file (memory-mapped). Raises ModelLoadError if unreadable."""
    import gguf

    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:  # gguf raises all of these
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key of the file as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def model_config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModel(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{SUPPORTED_GGUF_ARCHITECTURES}"
        )
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModel(
            "GGUF with rope_freqs (Llama-3.1 rope scaling) is not supported; "
            "load the Hugging Face directory instead"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = int(meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0))
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // num_heads),
        max_position_embeddings=int(key("context_length")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=any(n.endswith("attn_q.bias") for n in tensor_names),
    )


def gguf_tensors(reader: Any, config: ModelConfig) -> dict[str, np.ndarray]:
    """Dequantized float32 tensors in Hugging Face naming, Q/K un-permuted for `llama`."""
    from gguf.quants import dequantize

    is_llama = gguf_metadata_value(reader, "general.architecture") == "llama"
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        try:
            array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError as exc:
            raise UnsupportedModel(
                f"tensor {tensor.name} has unsupported type {tensor.tensor_type.name}"
            ) from exc
        if is_llama and name.endswith("q_proj.weight"):
            array = _unpermute_rotary(array, config.num_heads)
        elif is_llama and name.endswith("k_proj.weight"):
            array = _unpermute_rotary(array, config.num_kv_heads)
        weights[name] = array
    return weights


def gguf_metadata_value(reader: Any, name: str) -> Any:
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    raise UnsupportedModel(f"unexpected GGUF tensor {gguf_name!r}")


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of a Q or K projection [num_heads * head_dim, hidden].

    llama.cpp interleaves the two rotary halves of each head: row order per head is
    (x0, x_{d/2}, x1, x_{d/2+1}, ...). Hugging Face keeps the halves contiguous.
    """
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)
