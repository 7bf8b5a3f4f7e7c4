"""CUDA graphs of the decode step, captured once for a ladder of padded batch sizes.

A decode step of a small model is a few hundred tiny kernels; launching them one by one from
Python costs more than running them. Replaying a captured graph launches them all at once.

Static buffers (one set, shared by every captured size; a batch of n runs the graph of the
smallest captured size >= n, rows past n are padding):

    vectors       [4, max_batch]            int64   rows: input_ids (padding: token 0),
                                                    positions (0), slot_mapping (-1: the KV
                                                    write skips it), context_lens (0: attention
                                                    writes zeros)
    block_tables  [max_batch, max_blocks]   int32   padding: anything (never read)
    context_lens  [max_batch]               int32   converted from `vectors` inside the graph

Each step fills pinned host copies of these and moves them in two copies (issue 19: building
and copying five small tensors per step, the block table row by row, cost ~2.8 ms of host
time per step at batch 256, with the GPU idle). The host block table is updated
incrementally: a row is rewritten only when its sequence or its block count changed (a
sequence's block list only grows; the block manager replaces the list when it frees one).

Needs an attention backend whose kernels never synchronize with the host (the Triton one).
"""

from __future__ import annotations

import logging
import time

import torch

from engine.attention import AttentionMetadata
from engine.llama import LlamaModel
from engine.scheduler import ScheduledSequence

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch_size (and max_batch_size)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes) | {max_batch_size})


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        block_size: int,
        max_model_len: int,
        max_batch_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        n = max_batch_size
        self.vectors = torch.zeros(4, n, dtype=torch.long, device=device)
        self.input_ids, self.positions = self.vectors[0], self.vectors[1]
        self.slot_mapping = self.vectors[2]
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.host_vectors = torch.zeros(4, n, dtype=torch.long).pin_memory()
        self.host_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32).pin_memory()
        # per row of host_tables: the block list written there and how many of its blocks
        self.host_rows: list[tuple[list[int] | None, int]] = [(None, 0)] * n
        self.copied = torch.cuda.Event()  # recorded after each step's copies from them
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [batch, vocab], the graphs' outputs

    def can_run(self, decodes: list[ScheduledSequence]) -> bool:
        return 0 < len(decodes) <= self.batch_sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = None
        for batch in reversed(self.batch_sizes):  # largest first: later ones reuse its pool
            self._forward(batch)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch] = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch <= %d) in %.1fs",
            len(self.graphs),
            self.batch_sizes[-1],
            time.perf_counter() - started,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        self.context_lens[:batch].copy_(self.vectors[3, :batch])  # int64 -> int32, in the graph
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            num_decode_tokens=batch,
            decode_block_tables=self.block_tables[:batch],
            decode_context_lens=self.context_lens[:batch],
            prefills=(),
        )
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    def run(self, decodes: list[ScheduledSequence]) -> torch.Tensor:
        """Logits [len(decodes), vocab] for one decode step of these sequences."""
        n = len(decodes)
        batch = next(b for b in self.batch_sizes if b >= n)
        size = self.block_size
        self.copied.synchronize()  # the last step's copies have left the pinned buffers
        ids, positions, slots, lens = [], [], [], []
        for row, item in enumerate(decodes):
            seq, position = item.seq, item.seq.num_computed_tokens
            ids.append(seq.token_ids[position])
            positions.append(position)
            slots.append(seq.block_ids[position // size] * size + position % size)
            lens.append(position + 1)
            self._update_table_row(row, seq.block_ids)
        pad = batch - n
        self.host_vectors[:, :batch] = torch.tensor(
            (ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad, lens + [0] * pad)
        )
        self.vectors.copy_(self.host_vectors, non_blocking=True)  # one contiguous 8n bytes
        self.block_tables[:n].copy_(self.host_tables[:n], non_blocking=True)
        self.copied.record()
        self.graphs[batch].replay()
        return self.logits[batch][:n]

    def _update_table_row(self, row: int, block_ids: list[int]) -> None:
        written_list, num_written = self.host_rows[row]
        if written_list is block_ids and num_written == len(block_ids):
            return  # the usual case: nothing new since the last step
        start = num_written if written_list is block_ids else 0
        self.host_tables[row, start : len(block_ids)] = torch.tensor(
            block_ids[start:], dtype=torch.int32
        )
        self.host_rows[row] = (block_ids, len(block_ids))
