"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, and returns
the logits of the sequences that sample this step.

Owns the KV cache tensor. Knows nothing of sampling parameters or text.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, PrefillChunk, decode_mask
from engine.llama import LlamaModel
from engine.scheduler import ScheduledSequence, SchedulerOutput


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_dtype: torch.dtype,
    ) -> None:
        config = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self.kv_cache = torch.zeros(
            config.num_layers,
            2,
            num_blocks,
            block_size,
            config.num_kv_heads,
            config.head_dim,
            dtype=kv_dtype,
            device=device,
        )

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> torch.Tensor:
        """Run one step; returns logits [num_sampling_seqs, vocab] fp32, in the order the
        sampling sequences appear in `output.scheduled`."""
        decodes = [s for s in output.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in output.scheduled if s.num_new_tokens > 1]
        batch = decodes + prefills
        input_ids, positions, meta = self.prepare_inputs(decodes, prefills)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        last_token_index = torch.tensor(
            _last_token_indices(batch), dtype=torch.long, device=self.device
        )
        sampling_rows = [i for i, s in enumerate(batch) if s.samples_token]
        # Put sampling rows back in scheduled order.
        rank = {id(s): n for n, s in enumerate(output.scheduled)}
        sampling_rows.sort(key=lambda i: rank[id(batch[i])])
        selected = last_token_index[
            torch.tensor(sampling_rows, dtype=torch.long, device=self.device)
        ]
        return self.model.compute_logits(hidden[selected])

    def prepare_inputs(
        self, decodes: list[ScheduledSequence], prefills: list[ScheduledSequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten decodes then prefill chunks into (input_ids [T], positions [T], metadata).
        Blocks for the new tokens must already be allocated."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        chunks: list[PrefillChunk] = []
        for item in decodes + prefills:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            if item.num_new_tokens > 1:
                block_ids = torch.tensor(seq.block_ids[: -(-end // self.block_size)])
                chunks.append(
                    PrefillChunk(len(ids), item.num_new_tokens, end, block_ids.to(self.device))
                )
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [self._slot(seq.block_ids, p) for p in range(start, end)]
        max_blocks = max((len(d.seq.block_ids) for d in decodes), default=0)
        tables = [d.seq.block_ids + [0] * (max_blocks - len(d.seq.block_ids)) for d in decodes]
        context_lens = self._tensor([d.seq.num_computed_tokens + 1 for d in decodes])
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decode_tokens=len(decodes),
            decode_block_tables=self._tensor(tables).view(len(decodes), max_blocks),
            decode_context_lens=context_lens,
            prefills=tuple(chunks),
            decode_mask=decode_mask(context_lens, max_blocks * self.block_size)
            if decodes
            else None,
        )
        return self._tensor(ids), self._tensor(positions), meta

    def _slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def _last_token_indices(batch: list[ScheduledSequence]) -> list[int]:
    indices, end = [], 0
    for item in batch:
        end += item.num_new_tokens
        indices.append(end - 1)
    return indices
