"""How a Llama-family model splits across tensor-parallel ranks, and cutting its weights so.

Megatron-style: q/k/v and gate/up column-parallel, o and down row-parallel (an all-reduce
after), embedding and LM head vocabulary-parallel, norms replicated; KV heads replicated when
there are fewer than ranks. A rank's model is an ordinary LlamaModel of its local shape, so its
KV cache holds only its KV heads. Shapes that do not divide are refused before anything loads.
The layout table: docs/engine.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from contracts.errors import TensorParallelShapeError
from engine.model_config import ModelConfig

if TYPE_CHECKING:
    import torch

_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_PARALLEL = ("o_proj", "down_proj")
_VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """The slice of each split dimension one rank holds (starts and counts, in units of heads,
    MLP channels and vocabulary rows)."""

    rank: int
    tp_size: int
    head_dim: int
    head_start: int
    num_heads: int
    kv_head_start: int
    num_kv_heads: int
    intermediate_start: int
    intermediate_size: int
    vocab_start: int
    vocab_shard_size: int  # rows held, padding included (equal on every rank)
    vocab_size: int  # of the whole model

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shape of this rank's model: its heads, KV heads, MLP width and vocabulary rows."""
        return config.replace(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_shard_size,
        )


def check_divisible(config: ModelConfig, tp_size: int) -> None:
    """Raise TensorParallelShapeError naming every size that does not split `tp_size` ways."""
    problems = []
    if config.num_heads % tp_size:
        problems.append(f"num_heads={config.num_heads} is not a multiple of it")
    kv = config.num_kv_heads
    if kv >= tp_size and kv % tp_size:
        problems.append(f"num_kv_heads={kv} is not a multiple of it")
    if kv < tp_size and tp_size % kv:
        problems.append(f"num_kv_heads={kv} is fewer and does not divide it (no even replication)")
    if config.intermediate_size % tp_size:
        problems.append(f"intermediate_size={config.intermediate_size} is not a multiple of it")
    if problems:
        raise TensorParallelShapeError(
            f"tensor_parallel_size={tp_size} does not divide the model: " + "; ".join(problems)
        )


def shard_layout(config: ModelConfig, tp_size: int, rank: int) -> ShardLayout:
    """The layout of `rank` of `tp_size`. Raises TensorParallelShapeError (check_divisible)."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank={rank} must be in [0, {tp_size})")
    check_divisible(config, tp_size)
    heads = config.num_heads // tp_size
    if config.num_kv_heads >= tp_size:
        kv_heads = config.num_kv_heads // tp_size
        kv_start = rank * kv_heads
    else:
        kv_heads, kv_start = 1, rank // (tp_size // config.num_kv_heads)
    mlp = config.intermediate_size // tp_size
    vocab = -(-config.vocab_size // tp_size)
    return ShardLayout(
        rank=rank,
        tp_size=tp_size,
        head_dim=config.head_dim,
        head_start=rank * heads,
        num_heads=heads,
        kv_head_start=kv_start,
        num_kv_heads=kv_heads,
        intermediate_start=rank * mlp,
        intermediate_size=mlp,
        vocab_start=rank * vocab,
        vocab_shard_size=vocab,
        vocab_size=config.vocab_size,
    )


def shard_weights(weights: dict[str, torch.Tensor], layout: ShardLayout) -> dict[str, torch.Tensor]:
    """Hugging Face-named whole-model tensors -> this rank's slices, same names. Consumes
    `weights` (each whole tensor is dropped once cut)."""
    out: dict[str, torch.Tensor] = {}
    while weights:
        name, tensor = weights.popitem()
        out[name] = _shard(name, tensor, layout)
    return out


def _shard(name: str, tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    if name in _VOCAB_PARALLEL:
        return _vocab_rows(tensor, layout)
    module, _, kind = name.rpartition(".")
    projection = module.rpartition(".")[2]
    if projection in _COLUMN_PARALLEL and kind in ("weight", "bias", "weight_scale"):
        start, count = _output_range(projection, layout)
        if kind == "weight_scale" and tensor.numel() == 1:
            return tensor  # one scale for the whole tensor
        return tensor.narrow(0, start, count).clone()
    if projection in _ROW_PARALLEL and kind == "weight":
        start, count = _input_range(projection, layout)
        return tensor.narrow(1, start, count).contiguous()
    return tensor  # norms, input scales, row-parallel output-channel scales: whole


def _output_range(projection: str, layout: ShardLayout) -> tuple[int, int]:
    """(first row, rows) of a column-parallel projection's output this rank holds."""
    d = layout.head_dim
    if projection == "q_proj":
        return layout.head_start * d, layout.num_heads * d
    if projection in ("k_proj", "v_proj"):
        return layout.kv_head_start * d, layout.num_kv_heads * d
    return layout.intermediate_start, layout.intermediate_size


def _input_range(projection: str, layout: ShardLayout) -> tuple[int, int]:
    if projection == "o_proj":
        return layout.head_start * layout.head_dim, layout.num_heads * layout.head_dim
    return layout.intermediate_start, layout.intermediate_size


def _vocab_rows(tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """[vocab_shard_size, hidden]: this rank's vocabulary rows, zero rows past the vocabulary."""
    start = min(layout.vocab_start, tensor.shape[0])
    rows = tensor[start : start + layout.vocab_shard_size]
    if rows.shape[0] == layout.vocab_shard_size:
        return rows.clone()
    padded = tensor.new_zeros((layout.vocab_shard_size, *tensor.shape[1:]))
    padded[: rows.shape[0]] = rows
    return padded
