"""The decode graphs' input building, on the CPU: the pinned path (two copies a step, the host
block table refilled only where a row changed) fills the graph's buffers with what the pageable
path fills, step after step, while sequences grow, gain blocks, are preempted (new block lists)
and leave or change rows. The graphs themselves (CUDA) are stood in for; tests/gpu runs them."""

from __future__ import annotations

import itertools
import random
import types

import torch

from contracts.block_hash import root_hash
from contracts.sampling_params import SamplingParams
from engine.cuda_graph import DecodeGraphs, graph_batch_sizes
from engine.scheduler import ScheduledSequence
from engine.sequence import Sequence

BLOCK_SIZE = 4
MAX_BLOCKS = 24  # a sequence reaches at most 2 + 60 / 4 blocks
MAX_BATCH = 8


def graphs_on_cpu(pinned: bool) -> DecodeGraphs:
    """A DecodeGraphs with its buffers on the CPU and no-op graphs and events."""
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.block_size = BLOCK_SIZE
    graphs.max_blocks = MAX_BLOCKS
    graphs.batch_sizes = graph_batch_sizes(MAX_BATCH)
    graphs.pinned = pinned
    graphs.vectors = torch.zeros(4, MAX_BATCH, dtype=torch.long)
    graphs.vectors[2].fill_(-1)
    graphs.input_ids, graphs.positions, graphs.slot_mapping = graphs.vectors[:3]
    graphs.block_tables = torch.zeros(MAX_BATCH, MAX_BLOCKS, dtype=torch.int32)
    graphs.context_lens = torch.zeros(MAX_BATCH, dtype=torch.int32)
    graphs.host_vectors = torch.zeros(4, MAX_BATCH, dtype=torch.long)
    graphs.host_tables = torch.zeros(MAX_BATCH, MAX_BLOCKS, dtype=torch.int32)
    graphs.host_vectors_np = graphs.host_vectors.numpy()
    graphs.host_tables_np = graphs.host_tables.numpy()
    graphs.host_rows = [(None, 0)] * MAX_BATCH
    graphs.copied = types.SimpleNamespace(synchronize=lambda: None, record=lambda: None)
    noop = types.SimpleNamespace(replay=lambda: None)
    graphs.graphs = {b: [noop, noop] for b in graphs.batch_sizes}  # type: ignore[misc]
    graphs.logits = {b: torch.zeros(b, 3) for b in graphs.batch_sizes}
    return graphs


def new_sequence(rng: random.Random, name: str) -> Sequence:
    prompt = [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
    seq = Sequence(name, prompt, SamplingParams(), root_hash("m", None))
    seq.num_computed_tokens = len(prompt) - 1  # its next step decodes the last prompt token
    seq.block_ids = [rng.randrange(500) for _ in range(-(-len(prompt) // BLOCK_SIZE))]
    return seq


def advance(rng: random.Random, seq: Sequence) -> None:
    """One decoded token: computed, a new one sampled, a block added when the next needs it;
    now and then preempted and recomputed (a new block list)."""
    seq.num_computed_tokens += 1
    seq.token_ids.append(rng.randrange(1000))
    if rng.random() < 0.1:
        seq.block_ids = [rng.randrange(500) for _ in seq.block_ids]
    if seq.num_computed_tokens + 1 > len(seq.block_ids) * BLOCK_SIZE:
        seq.block_ids.append(rng.randrange(500))


def test_pinned_inputs_fill_what_pageable_ones_fill() -> None:
    rng = random.Random(0)
    pinned, pageable = graphs_on_cpu(True), graphs_on_cpu(False)
    running = [new_sequence(rng, f"s{i}") for i in range(5)]
    for step in range(60):
        if step % 7 == 3 and len(running) > 1:
            running.pop(rng.randrange(len(running)))  # finished: the rows below shift
        if step % 5 == 0 and len(running) < MAX_BATCH:
            running.append(new_sequence(rng, f"n{step}"))
        decodes = [ScheduledSequence(seq, 1) for seq in running]
        pinned.run(decodes)
        pageable.run(decodes)
        n = len(decodes)
        batch = next(b for b in pinned.batch_sizes if b >= n)
        assert torch.equal(pinned.vectors[:3, :batch], pageable.vectors[:3, :batch]), step
        lens = pinned.vectors[3, :batch].to(torch.int32)  # the graph copies them, int32
        assert torch.equal(lens, pageable.context_lens[:batch]), step
        for row, seq in enumerate(running):
            width = len(seq.block_ids)
            assert pinned.block_tables[row, :width].tolist() == seq.block_ids, (step, row)
            assert torch.equal(pinned.block_tables[row, :width], pageable.block_tables[row, :width])
        for seq in running:
            advance(rng, seq)


def test_layer_pieces_double_and_cover_the_layers() -> None:
    from engine.cuda_graph import layer_pieces

    assert layer_pieces(32, 1) == [range(0, 32)]
    assert layer_pieces(32, 4) == [range(0, 1), range(1, 3), range(3, 7), range(7, 32)]
    assert layer_pieces(30, 5) == [range(0, 1), range(1, 3), range(3, 7), range(7, 15),
                                   range(15, 30)]  # fmt: skip
    assert layer_pieces(3, 8) == [range(0, 1), range(1, 3)]  # fewer when the layers run out
    assert layer_pieces(1, 4) == [range(0, 1)]
    for layers in range(1, 40):
        for pieces in range(1, 7):
            got = layer_pieces(layers, pieces)
            assert len(got) <= pieces and got[0].start == 0 and got[-1].stop == layers
            assert all(a.stop == b.start for a, b in itertools.pairwise(got))
