"""Per-head FP8 KV scales, calibrated once at start-up (EngineConfig.kv_cache_scales="per_head").

The model runs one forward pass over a fixed text (CALIBRATION_TEXT, below, written for this
purpose and shipped with the code, so every worker of a fleet calibrates on the same tokens),
with an attention backend that attends densely over the pass's own keys and values in the
model dtype, writes no cache, and records the largest |K| and |V| of every (layer, kv head).
The scales are those maxima with headroom, rounded up to a power of two
(engine.kv_quant.calibrated_scales). Under tensor parallelism every rank runs the same pass (its
collectives included) at the same point of start-up, each for its own heads, and the table is
gathered so that rank 0 can name the whole model's scales (the digest KV transfer compares).
Why per-head scales and why calibrated: docs/engine.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from contracts.errors import UnsupportedModel
from engine.attention import AttentionBackend, AttentionMetadata, causal_self_attention
from engine.sharding import shard_layout

if TYPE_CHECKING:
    from engine.llama import LlamaModel
    from engine.model_config import ModelConfig
    from engine.parallel import TensorParallelGroup
    from engine.tokenizer import Tokenizer

MAX_CALIBRATION_TOKENS = 512
SCALES_FORMAT = "tandem-kv-scales/1"  # the "format" of a saved scale table

# Prose, a dialogue, code, numbers and a table: what a served model reads, in one short text.
CALIBRATION_TEXT = """\
The river town wakes early. Before the bakery opens, the ferry has already crossed twice, and
the fishermen argue about the weather in three languages. Nobody agrees on whether the fog will
lift by noon; everyone agrees that the coffee at the harbour kiosk is better than it has any
right to be. In the afternoon the library fills with students who pretend to read and old men
who actually do, and at six o'clock the bells of the cathedral drown out every conversation.

User: Can you explain what a hash table is, in two sentences?
Assistant: A hash table stores key-value pairs in an array, using a hash function to turn each
key into the index where its value lives. Lookups, inserts and deletes take constant time on
average, as long as the table is not too full and the hash spreads keys evenly.
User: And when is a balanced tree the better choice?
Assistant: When you need the keys in order, range queries, or a strict worst-case bound.

def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    \"\"\"Merge overlapping closed intervals; the result is sorted by start.\"\"\"
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged

SELECT region, COUNT(*) AS orders, ROUND(AVG(total), 2) AS mean_total
FROM orders WHERE created_at >= '2024-01-01' GROUP BY region ORDER BY orders DESC;

| quarter | revenue (M EUR) | growth |
|---------|-----------------|--------|
| Q1      | 12.4            | +3.1%  |
| Q2      | 13.9            | +12.1% |
| Q3      | 13.2            | -5.0%  |

The probability that at least two of 23 people share a birthday is about 50.7 percent; with
70 people it exceeds 99.9 percent. Light travels roughly 299,792 kilometres per second, so a
signal from the Moon, 384,400 km away, arrives in about 1.28 seconds. In 1969 the guidance
computer of the lunar module had 2,048 words of erasable memory and ran at 0.043 MHz.

Les pommes de terre sont cuites quand la lame du couteau y entre sans resistance. Der Zug nach
Berlin fahrt um 14:32 von Gleis 7 ab. El mercado abre los sabados a las ocho de la manana.
"""


class DenseSelfAttention(AttentionBackend):
    """A calibration pass's attention: causal SDPA over the pass's own q, k, v (one sequence,
    no cache); writes nothing."""

    def write_kv(self, kv_cache_layer, k, v, slot_mapping, kv_scales=None):  # type: ignore[no-untyped-def]
        pass

    def forward(self, q, kv_cache_layer, meta, scale, k=None, v=None, kv_scales=None):  # type: ignore[no-untyped-def]
        assert k is not None and v is not None, "calibration attends over the pass's own K/V"
        return causal_self_attention(q, k, v, scale)


class _Observer(DenseSelfAttention):
    """Records max |K| and |V| per (layer, kv head) as the layers write."""

    def __init__(self, num_layers: int, num_kv_heads: int, device: torch.device) -> None:
        self.amax = torch.zeros(num_layers, 2, num_kv_heads, device=device)
        self.num_writes = 0

    def write_kv(self, kv_cache_layer, k, v, slot_mapping, kv_scales=None):  # type: ignore[no-untyped-def]
        layer = self.num_writes
        self.num_writes += 1
        self.amax[layer, 0] = k.float().abs().amax(dim=(0, 2))  # [num_kv_heads]
        self.amax[layer, 1] = v.float().abs().amax(dim=(0, 2))


def calibration_ids(tokenizer: Tokenizer | None, vocab_size: int, max_positions: int) -> list[int]:
    """The calibration tokens: CALIBRATION_TEXT's, at most MAX_CALIBRATION_TOKENS and the
    model's `max_positions`; for a model without a tokenizer (dummy weights), a fixed spread of
    ids over its vocabulary."""
    limit = min(MAX_CALIBRATION_TOKENS, max_positions)
    if tokenizer is not None:
        ids = tokenizer.encode(CALIBRATION_TEXT)[:limit]
        if len(ids) >= 2:
            return ids
    return [(7919 * i + 13) % vocab_size for i in range(limit)]


@torch.inference_mode()
def calibrate_kv_amax(
    model: LlamaModel, token_ids: list[int], device: torch.device
) -> torch.Tensor:  # [layers, 2, num_kv_heads] fp32 on `device`: this rank's heads
    """Run `token_ids` through `model` as one causal sequence and return the largest |K| and
    |V| of every (layer, kv head): what kv_quant.calibrated_scales turns into scales.
    Collective under tensor parallelism (every rank calls it)."""
    config = model.config
    observer = _Observer(config.num_layers, config.num_kv_heads, device)
    dense_pass(model, token_ids, device, observer)
    assert observer.num_writes == config.num_layers, "every layer wrote its K/V once"
    return observer.amax


def dense_pass(
    model: LlamaModel, token_ids: list[int], device: torch.device, backend: DenseSelfAttention
) -> torch.Tensor:  # the final hidden states [len, hidden]
    """Run `token_ids` through `model` as one causal sequence with `backend` attending (no KV
    cache is read or written), the model's own backends restored after."""
    config = model.config
    attention = [layer.self_attn for layer in model.decoder_layers]
    backends = [a.backend for a in attention]
    for a in attention:
        a.backend = backend
    try:
        n = len(token_ids)
        empty = torch.empty(0, dtype=torch.int32, device=device)
        meta = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
            num_decode_tokens=0,
            decode_block_tables=empty.view(0, 0),
            decode_context_lens=empty,
            prefills=(),
        )
        no_cache = torch.empty(config.num_layers, device=device)  # indexed per layer, unread
        return model(
            torch.tensor(token_ids, dtype=torch.int64, device=device),
            torch.arange(n, device=device),
            no_cache,
            meta,
        )
    finally:
        for a, saved in zip(attention, backends, strict=True):
            a.backend = saved


def whole_model_table(
    table: torch.Tensor,  # [layers, 2, this rank's kv heads]
    full_config: ModelConfig,
    tp: TensorParallelGroup | None,
) -> torch.Tensor:  # [layers, 2, every kv head] fp32, on the CPU
    """A per-head table of every KV head of the model: this rank's own at TP=1, else gathered
    from every rank (collective) and placed at each rank's heads (a replicated head from the
    lowest rank holding it, as KV transfer gathers it)."""
    if tp is None:
        return table.float().cpu()
    layers, _, local_heads = table.shape
    gathered = tp.all_gather(table.float().reshape(layers * 2, local_heads).contiguous()).cpu()
    whole = torch.zeros(layers * 2, full_config.num_kv_heads)
    for rank in reversed(range(tp.world_size)):  # lower ranks written last: they win
        layout = shard_layout(full_config, tp.world_size, rank)
        start, count = layout.kv_head_start, layout.num_kv_heads
        whole[:, start : start + count] = gathered[:, rank * local_heads : (rank + 1) * local_heads]
    return whole.view(layers, 2, full_config.num_kv_heads)


def save_kv_scales(path: str | Path, table: torch.Tensor, model_id: str) -> None:
    """Write a whole-model scale table [layers, 2, num_kv_heads] as JSON ("scales"[layer][0 = K
    | 1 = V][kv head]), with the model it was calibrated for (informative)."""
    layers, _, heads = table.shape
    data = {
        "format": SCALES_FORMAT,
        "model_id": model_id,
        "num_layers": layers,
        "num_kv_heads": heads,
        "scales": table.float().tolist(),
    }
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_kv_scales(path: str | Path, config: ModelConfig) -> torch.Tensor:
    """A saved scale table for a model of shape `config`: [layers, 2, num_kv_heads] fp32 on the
    CPU. ValueError naming the file and the problem when it cannot be read, is not a Tandem
    scale table, or does not fit the model (layers, KV heads, positive finite values)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"kv_cache_scales_path {str(path)!r}: cannot read it: {e}") from None
    if not isinstance(data, dict) or data.get("format") != SCALES_FORMAT:
        raise ValueError(
            f"kv_cache_scales_path {str(path)!r}: not a {SCALES_FORMAT} file "
            "(write one with `tandem calibrate-kv`)"
        )
    want = (config.num_layers, 2, config.num_kv_heads)
    try:
        table = torch.tensor(data["scales"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"kv_cache_scales_path {str(path)!r}: bad scales: {e}") from None
    if tuple(table.shape) != want:
        raise ValueError(
            f"kv_cache_scales_path {str(path)!r}: scales of shape {tuple(table.shape)} "
            f"(model {data.get('model_id')!r}) do not fit this model's [layers, 2, kv heads] "
            f"{want}"
        )
    check_scale_values(table, f"kv_cache_scales_path {str(path)!r}")
    return table


def check_scale_values(table: torch.Tensor, where: str) -> None:
    """ValueError naming `where` unless every scale of `table` is finite and > 0."""
    if not all(math.isfinite(x) and x > 0 for x in table.reshape(-1).tolist()):
        raise ValueError(f"{where}: every scale must be finite and > 0")


def checkpoint_table(
    scales: torch.Tensor,  # [layers, 2, 1 or num_kv_heads]: quantization.take_kv_cache_scales
    full_config: ModelConfig,
) -> torch.Tensor:  # [layers, 2, every kv head] fp32 on the CPU
    """A checkpoint's KV-cache scales as a whole-model per-head table: a per-tensor scale
    repeated over the layer's heads. UnsupportedModel for another size, ValueError for a value
    that is not finite and > 0."""
    layers, _, size = scales.shape
    heads = full_config.num_kv_heads
    if size not in (1, heads):
        raise UnsupportedModel(
            f"checkpoint KV-cache scales of {size} values a layer; supported: one per tensor "
            f"or one per KV head ({heads})"
        )
    table = scales.float().cpu().expand(layers, 2, heads).contiguous()
    check_scale_values(table, "the checkpoint's KV-cache scales")
    return table
