"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, and returns
the logits of the sequences that sample this step.

Owns the KV cache tensor and, on CUDA, the decode CUDA graphs. Knows nothing of sampling
parameters or text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from engine.attention import (
    AttentionBackend,
    AttentionMetadata,
    OutputRows,
    PrefillChunk,
    decode_mask,
)
from engine.cuda_graph import DecodeGraphs
from engine.kv_quant import KV_FP8_DTYPE, fp8_row_bytes, fp8_storage
from engine.llama import LlamaModel
from engine.scheduler import ScheduledSequence, SchedulerOutput

logger = logging.getLogger(__name__)

Allocate = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        backend: AttentionBackend,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_dtype: torch.dtype,
        allocate: Allocate | None = None,
        fp8_scales: str = "per_head",
    ) -> None:
        """allocate(shape, dtype, device): the zeroed KV cache (default zeros_on_demand; under
        tensor parallelism on CPU, a view of the cache every rank shares). fp8_scales: the
        scale scheme of an FP8 cache (kv_dtype e4m3; EngineConfig.kv_cache_scales)."""
        config = model.config
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        # [layers, 2, num_blocks, block_size, kv_heads, head_dim] kv_dtype, or for an FP8
        # cache int8 of that shape (per-head scales, held by the model) or [..., head_dim + 4]
        # uint8 (e4m3 values and a scale per row): engine.kv_quant
        row = config.head_dim
        if kv_dtype == KV_FP8_DTYPE:
            row, kv_dtype = fp8_row_bytes(row, fp8_scales), fp8_storage(fp8_scales)
        self.kv_cache = (allocate or zeros_on_demand)(
            (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, row),
            kv_dtype,
            device,
        )
        self.graphs: DecodeGraphs | None = None

    def capture_cuda_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        """Capture decode steps for padded batch sizes up to `max_batch_size` (CUDA only)."""
        self.graphs = DecodeGraphs(
            self.model, self.kv_cache, self.block_size, max_model_len, max_batch_size, self.device
        )
        self.graphs.capture()

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, follows: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns logits [num_sampling_seqs, vocab] fp32, in the order the
        sampling sequences appear in `output.scheduled`. From a decode CUDA graph they are
        the graph's output buffer: valid until the next step overwrites it (copy to keep).

        follows: the step is a decode of each sequence's token after the one a step not yet
        collected samples, whose ids [len(output.scheduled)] (on this device, row for row)
        these are: positions one past the sequences' computed counts, blocks allocated."""
        scheduled = output.scheduled
        if follows is not None:
            return self._execute_following(scheduled, follows)
        if all(s.num_new_tokens == 1 for s in scheduled):  # decodes only: rows in plan order
            decodes, prefills, batch = scheduled, [], scheduled
            sampling_rows = [i for i, s in enumerate(batch) if s.samples_token]
        else:
            decodes = [s for s in scheduled if s.num_new_tokens == 1]
            prefills = [s for s in scheduled if s.num_new_tokens > 1]
            batch = decodes + prefills
            rank = {id(s): n for n, s in enumerate(scheduled)}
            sampling_rows = sorted(
                (i for i, s in enumerate(batch) if s.samples_token),
                key=lambda i: rank[id(batch[i])],
            )
        if not prefills and self.graphs is not None and self.graphs.can_run(decodes):
            logits = self.graphs.run(decodes)  # fp32 already (compute_logits)
            if sampling_rows == list(range(len(decodes))):  # the usual case: no gather
                return logits
            return logits[torch.tensor(sampling_rows, device=self.device)]
        input_ids, positions, meta = self.prepare_inputs(decodes, prefills)
        last_token_index = _last_token_indices(batch)
        selected = self._int64([last_token_index[i] for i in sampling_rows])
        if not prefills:  # every row samples
            hidden = self.model(input_ids, positions, self.kv_cache, meta)
            return self.model.compute_logits(hidden[selected])
        output_rows = OutputRows(selected, self._decode_metadata([batch[i] for i in sampling_rows]))
        hidden = self.model(input_ids, positions, self.kv_cache, meta, output_rows)
        return self.model.compute_logits(hidden)

    def _execute_following(
        self, decodes: list[ScheduledSequence], follows: torch.Tensor
    ) -> torch.Tensor:
        assert all(s.num_new_tokens == 1 for s in decodes) and len(follows) == len(decodes)
        if self.graphs is not None and self.graphs.can_run(decodes):
            return self.graphs.run(decodes, follows)
        positions, slots = [], []
        for item in decodes:
            position = item.seq.num_computed_tokens + 1
            positions.append(position)
            slots += self._slots(item.seq.block_ids, position, position + 1)
        meta = self._decode_metadata(decodes, ahead=1)
        meta = dataclasses.replace(meta, slot_mapping=self._int64(slots))
        hidden = self.model(follows, self._int64(positions), self.kv_cache, meta)
        return self.model.compute_logits(hidden)

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
                block_ids = self._int32(seq.block_ids[: -(-end // self.block_size)])
                chunks.append(PrefillChunk(len(ids), item.num_new_tokens, end, block_ids))
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self._slots(seq.block_ids, start, end)
        decode_meta = self._decode_metadata(decodes)
        meta = AttentionMetadata(
            slot_mapping=self._int64(slots),
            num_decode_tokens=len(decodes),
            decode_block_tables=decode_meta.decode_block_tables,
            decode_context_lens=decode_meta.decode_context_lens,
            prefills=tuple(chunks),
            decode_mask=decode_meta.decode_mask,
            **self._prefill_tensors(prefills),
        )
        return self._int64(ids), self._int64(positions), meta

    def _decode_metadata(self, items: list[ScheduledSequence], ahead: int = 0) -> AttentionMetadata:
        """Single-query rows, one per item, each attending to its whole context after this
        step (no K/V writes: slot_mapping is empty); `ahead` tokens more where the step
        follows one not yet collected."""
        context_lens = self._int32(
            [s.seq.num_computed_tokens + s.num_new_tokens + ahead for s in items]
        )
        tables = self._block_tables([s.seq.block_ids for s in items])
        needs_mask = items and self.backend.uses_decode_mask
        return AttentionMetadata(
            slot_mapping=self._int64([]),
            num_decode_tokens=len(items),
            decode_block_tables=tables,
            decode_context_lens=context_lens,
            prefills=(),
            decode_mask=decode_mask(context_lens, tables.shape[1] * self.block_size)
            if needs_mask
            else None,
        )

    def _prefill_tensors(self, prefills: list[ScheduledSequence]) -> dict:
        """Packed prefill description for kernels that take one launch for all chunks;
        query_start_loc counts from the first prefill row."""
        if not prefills:
            return {}
        query_lens = [p.num_new_tokens for p in prefills]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return dict(
            prefill_block_tables=self._block_tables([p.seq.block_ids for p in prefills]),
            prefill_query_start_loc=self._int32(starts),
            prefill_context_lens=self._int32(
                [p.seq.num_computed_tokens + p.num_new_tokens for p in prefills]
            ),
            max_prefill_query_len=max(query_lens),
        )

    def _block_tables(self, tables: list[list[int]]) -> torch.Tensor:
        """[len(tables), max_len] int32, rows padded with block 0 (never read: past context)."""
        width = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return self._int32(padded).view(len(tables), width)

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """Flat cache slots of positions [start, end): one range per block, not per token."""
        size = self.block_size
        slots: list[int] = []
        for index in range(start // size, -(-end // size)):
            base = block_ids[index] * size
            first, last = max(start, index * size), min(end, (index + 1) * size)
            slots += range(base + first - index * size, base + last - index * size)
        return slots

    def _int64(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def _int32(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(self.device, non_blocking=True)


def _last_token_indices(batch: list[ScheduledSequence]) -> list[int]:
    indices, end = [], 0
    for item in batch:
        end += item.num_new_tokens
        indices.append(end - 1)
    return indices


def zeros_on_demand(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A zero tensor. On the CPU its memory comes from calloc, whose large blocks are fresh
    pages the kernel zeroes when first touched: a KV cache sized for the worst case costs
    resident memory only for the blocks in use (torch.zeros would write every page)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
