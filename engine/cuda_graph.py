"""CUDA graphs of the decode step, captured once for a ladder of padded batch sizes: a batch of n
replays the graph of the smallest captured size >= n, from one set of static buffers whose
padding rows write nothing (slot -1) and attend to nothing (context length 0). Launching a
small model's few hundred kernels one by one costs more than running them. Needs an attention
backend whose kernels never synchronize with the host (the Triton one). Buffers: docs/engine.md.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.attention import AttentionMetadata
from engine.llama import LlamaModel
from engine.scheduler import ScheduledSequence

logger = logging.getLogger(__name__)

# Decode-graph inputs from pinned buffers, two copies a step, the block table refilled only
# where a row changed; read when a DecodeGraphs is built. On: +4.6% decode tok/s at batch 64,
# neutral at batch 1 (H100, bench.engine_ab, interleaved; docs/benchmarks.md, issue 19).
PINNED_INPUTS = True
# Each batch size's decode step is captured as this many graphs, replayed one after another
# (1: one graph). Launching a graph costs the host ~1-1.7 us a node (H100: 360-560 us for the
# ~330 kernels of a Llama-3-8B step), and the device starts only once the launch returns; in
# pieces it starts once the first, one-layer piece is launched, and runs it while the host
# launches the next (pieces of 1, 2, 4, ... layers; the last also holds the final norm and
# the LM head). Read when a DecodeGraphs is built.
GRAPH_PIECES = DEFAULT_GRAPH_PIECES = 4


def layer_pieces(num_layers: int, pieces: int) -> list[range]:
    """Consecutive layer ranges covering num_layers: 1, 2, 4, ... layers, the last taking the
    rest; fewer pieces when the layers run out. pieces >= 1."""
    ranges: list[range] = []
    start, size = 0, 1
    while start < num_layers:
        stop = num_layers if len(ranges) == pieces - 1 else min(num_layers, start + size)
        ranges.append(range(start, stop))
        start, size = stop, size * 2
    return ranges


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
        self.pinned = PINNED_INPUTS
        # rows: input_ids, positions, slot_mapping, context_lens (int64; the graph reads the
        # int32 copy below, which it makes itself when the inputs are pinned)
        self.vectors = torch.zeros(4, n, dtype=torch.long, device=device)
        self.vectors[2].fill_(-1)
        self.input_ids, self.positions, self.slot_mapping = self.vectors[:3]
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        if self.pinned:
            self.host_vectors = torch.zeros(4, n, dtype=torch.long).pin_memory()
            self.host_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32).pin_memory()
            self.host_vectors_np = self.host_vectors.numpy()
            self.host_tables_np = self.host_tables.numpy()
            # per row of host_tables: the block list written there and how many of its blocks
            self.host_rows: list[tuple[list[int] | None, int]] = [(None, 0)] * n
            self.copied = torch.cuda.Event()  # recorded after each step's copies from them
        # a step's graphs, replayed in order (GRAPH_PIECES), and their stage outputs kept
        self.pieces = layer_pieces(len(model.layers), max(1, GRAPH_PIECES))
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [batch, vocab], the graphs' outputs
        self._stages: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def can_run(self, decodes: list[ScheduledSequence]) -> bool:
        return 0 < len(decodes) <= self.batch_sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = None
        for batch in reversed(self.batch_sizes):  # largest first: later ones reuse its pool
            self._forward(batch)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graphs: list[torch.cuda.CUDAGraph] = []
            stages: list[tuple[torch.Tensor, torch.Tensor | None]] = []
            for piece in self.pieces:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    stages.append(self._forward_piece(batch, piece, stages[-1] if stages else None))
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[batch] = graphs
            self._stages[batch] = stages[:-1]  # the inputs of the pieces after the first
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch <= %d, %d pieces each) in %.1fs",
            len(self.graphs),
            self.batch_sizes[-1],
            len(self.pieces),
            time.perf_counter() - started,
        )

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            num_decode_tokens=batch,
            decode_block_tables=self.block_tables[:batch],
            decode_context_lens=self.context_lens[:batch],
            prefills=(),
        )

    def _forward(self, batch: int) -> torch.Tensor:
        """The whole step eagerly: logits [batch, vocab]."""
        if self.pinned:  # int64 -> int32, inside the graph
            self.context_lens[:batch].copy_(self.vectors[3, :batch])
        hidden = self.model(
            self.input_ids[:batch], self.positions[:batch], self.kv_cache, self._meta(batch)
        )
        return self.model.compute_logits(hidden)

    def _forward_piece(
        self, batch: int, layers: range, previous: tuple[torch.Tensor, torch.Tensor | None] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One piece of _forward: the first embeds the tokens, each runs its layers from the
        last piece's (x, residual), the last ends with the logits (returned as x)."""
        model = self.model
        if previous is None:
            if self.pinned:  # int64 -> int32, inside the graph
                self.context_lens[:batch].copy_(self.vectors[3, :batch])
            x, residual = model.embed(self.input_ids[:batch]), None
        else:
            x, residual = previous
        rope = model.rotary(self.positions[:batch])
        x, residual = model.run_layers(x, residual, rope, self.kv_cache, self._meta(batch), layers)
        if layers.stop < len(model.layers):
            return x, residual
        assert residual is not None  # a decode step: every row samples
        hidden, _ = model.norm(x, residual)
        self.logits[batch] = model.compute_logits(hidden)
        return self.logits[batch], None

    def run(
        self, decodes: list[ScheduledSequence], follows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [len(decodes), vocab] for one decode step of these sequences: a view of the
        graph's output buffer, overwritten by the next replay of the same graph. follows: the
        step decodes the token after the one a step in flight samples, these ids on the device
        (ModelRunner.execute): positions one further, the ids copied in on the device."""
        n = len(decodes)
        batch = next(b for b in self.batch_sizes if b >= n)
        if self.pinned:
            return self._run_pinned(decodes, n, batch, follows)
        ahead = 0 if follows is None else 1
        ids, positions, slots, lens = [], [], [], []
        table = torch.zeros(n, self.max_blocks, dtype=torch.int32)
        for row, item in enumerate(decodes):
            seq = item.seq
            position = seq.num_computed_tokens + ahead
            ids.append(seq.token_ids[position] if follows is None else 0)
            positions.append(position)
            block = seq.block_ids[position // self.block_size]
            slots.append(block * self.block_size + position % self.block_size)
            lens.append(position + 1)
            table[row, : len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)
        self._fill(self.input_ids, ids, batch, 0)
        self._fill(self.positions, positions, batch, 0)
        self._fill(self.slot_mapping, slots, batch, -1)
        self._fill(self.context_lens, lens, batch, 0)
        self.block_tables[:n].copy_(table, non_blocking=True)
        if follows is not None:
            self.input_ids[:n].copy_(follows)
        self._replay(batch)
        return self.logits[batch][:n]

    @staticmethod
    def _fill(buffer: torch.Tensor, values: list[int], batch: int, pad: int) -> None:
        padded = values + [pad] * (batch - len(values))
        buffer[:batch].copy_(torch.tensor(padded, dtype=buffer.dtype), non_blocking=True)

    def _run_pinned(
        self,
        decodes: list[ScheduledSequence],
        n: int,
        batch: int,
        follows: torch.Tensor | None,
    ) -> torch.Tensor:
        size = self.block_size
        ahead = 0 if follows is None else 1
        ids, positions, slots = [], [], []
        host_rows = self.host_rows
        self.copied.synchronize()  # the last step's copies have left the pinned buffers
        for row, item in enumerate(decodes):
            seq = item.seq
            position, block_ids = seq.num_computed_tokens + ahead, seq.block_ids
            ids.append(seq.token_ids[position] if follows is None else 0)
            positions.append(position)
            slots.append(block_ids[position // size] * size + position % size)
            written_list, num_written = host_rows[row]
            if written_list is not block_ids or num_written != len(block_ids):
                self._update_table_row(row, block_ids)  # else: unchanged since the last step
        lens = [position + 1 for position in positions]
        pad = batch - n
        vectors = self.host_vectors_np
        vectors[:, :n] = (ids, positions, slots, lens)
        if pad:
            vectors[:, n:batch] = ((0,), (0,), (-1,), (0,))
        self.vectors.copy_(self.host_vectors, non_blocking=True)  # one contiguous 32n bytes
        self.block_tables[:n].copy_(self.host_tables[:n], non_blocking=True)
        self.copied.record()
        if follows is not None:  # behind the copy of the placeholder ids, on the device
            self.input_ids[:n].copy_(follows)
        self._replay(batch)
        return self.logits[batch][:n]

    def _replay(self, batch: int) -> None:
        for graph in self.graphs[batch]:
            graph.replay()

    def _update_table_row(self, row: int, block_ids: list[int]) -> None:
        written_list, num_written = self.host_rows[row]
        if written_list is block_ids and num_written == len(block_ids):
            return  # the usual case: nothing new since the last step
        start = num_written if written_list is block_ids and num_written < len(block_ids) else 0
        self.host_tables_np[row, start : len(block_ids)] = block_ids[start:]
        self.host_rows[row] = (block_ids, len(block_ids))
