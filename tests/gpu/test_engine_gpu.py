"""The engine on a GPU (bf16, Triton kernels, CUDA graphs) against the CPU fp32 reference.

Run on the device machine: `pytest tests/gpu`. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.engine import Engine
from tests.conftest import make_engine
from tests.gpu.conftest import gpu_engine, rule_sequence
from tests.unit.test_model_parity import decode_logits, prefill_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize(
    ("cuda_graphs", "triton_gemv"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_teacher_forced_logits_match_cpu_fp32(
    model_dir: Path, cuda_graphs: bool, triton_gemv: bool
) -> None:
    cpu = make_engine(str(model_dir), num_kv_blocks=256, block_size=16)
    gpu = gpu_engine(model_dir, cuda_graphs=cuda_graphs, triton_gemv=triton_gemv)
    token_ids = rule_sequence(seed=5, length=301)
    reference = prefill_logits(cpu, token_ids)
    for logits in (
        prefill_logits(gpu, token_ids).cpu(),
        decode_logits(gpu, token_ids, num_prefix=150).cpu(),
    ):
        rows = reference[-logits.shape[0] :]
        agreement = (logits.argmax(-1) == rows.argmax(-1)).float().mean().item()
        assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"
        scale = rows.abs().max().item()
        torch.testing.assert_close(logits, rows, atol=0.03 * scale, rtol=0.05)
    gpu.check_integrity()


def test_greedy_alone_equals_in_batch(model_dir: Path) -> None:
    """cuBLAS gives a row the same bits at batch 1 and in a batch. Not so with the Triton GEMV
    on (`triton_gemv`: batch 1 through the GEMV, larger batches through cuBLAS, each summing
    in its own order): on an H100 one of these 9 sequences took another token at its 6th step
    (issue 19, docs/benchmarks.md), so that switch gives up this promise; its arithmetic is
    checked by the teacher-forced test."""
    from contracts.sampling_params import SamplingParams

    engine = gpu_engine(model_dir)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    prompts = [rule_sequence(seed=s, length=20 + 37 * s) for s in range(9)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    together = [c.token_ids for c in engine.generate(prompts, params)]
    assert together == alone
    engine.check_integrity()


def test_gpu_greedy_matches_cpu_reference(model_dir: Path) -> None:
    from contracts.sampling_params import SamplingParams

    cpu = make_engine(str(model_dir), num_kv_blocks=256, block_size=16)
    gpu = gpu_engine(model_dir)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [rule_sequence(seed=s, length=33 + 11 * s) for s in range(4)]
    expected = [c.token_ids for c in cpu.generate(prompts, params)]
    got = [c.token_ids for c in gpu.generate(prompts, params)]
    assert got == expected


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_decode_graphs_in_pieces_equal_one_graph(
    model_dir: Path, quantization: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """engine.cuda_graph.GRAPH_PIECES: a decode step replayed as several graphs (1, 2, 4, ...
    layers, the rest with the LM head) gives the logits of one graph bit for bit, so the same
    greedy tokens; bf16 and FP8 (the fused activation quantization and the GEMV's single-row
    paths inside the pieces)."""
    from contracts.sampling_params import SamplingParams
    from engine import cuda_graph

    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [rule_sequence(seed=300 + s, length=25 + 31 * s) for s in range(5)]
    outputs = []
    for pieces in (1, 4):
        monkeypatch.setattr(cuda_graph, "GRAPH_PIECES", pieces)
        engine = gpu_engine(model_dir, quantization=quantization, triton_gemv=True)
        graphs = engine.runner.graphs
        assert graphs is not None
        expected = cuda_graph.layer_pieces(engine.model_config.num_layers, pieces)
        assert len(expected) == min(pieces, 3)  # the test model's 4 layers: 1 + 2 + 1
        assert {len(g) for g in graphs.graphs.values()} == {len(expected)}
        alone = engine.generate(prompts[:1], params)[0].token_ids  # batch 1: the GEMV path
        outputs.append((alone, [c.token_ids for c in engine.generate(prompts, params)]))
        engine.check_integrity()
    assert outputs[0] == outputs[1]


def compiled_variants(kernel: object) -> int:
    """How many binaries Triton has compiled for `kernel` on the current device."""
    caches = kernel.device_caches  # type: ignore[attr-defined]
    return sum(len(cache[0]) for cache in caches.values())


def test_mixed_batches_compile_each_kernel_once() -> None:
    """A serving engine sees every batch width, split count and slice offset: none of them may
    cost a new kernel compile (a stall of a second or more mid-serving, seen as multi-second
    TTFT outliers in colocated serving). Random prompt lengths arriving while others decode
    give eager mixed prefill + decode batches of many shapes."""
    from contracts.sampling_params import SamplingParams
    from engine.config import EngineConfig
    from engine.kernels import decode_attention, prefill_attention
    from engine.scheduler import SchedulerConfig

    engine = Engine(
        EngineConfig(
            model="dummy:smollm2-135m", device="cuda", dtype="bfloat16", num_kv_blocks=4096,
            scheduler=SchedulerConfig(max_num_seqs=48, max_num_batched_tokens=512),
        )
    )  # fmt: skip
    split = decode_attention._decode_split_kernel
    reduce = decode_attention._decode_reduce_kernel
    prefill = prefill_attention._prefill_attention_kernel
    before = {kernel: compiled_variants(kernel) for kernel in (split, reduce, prefill)}
    generator = torch.Generator().manual_seed(5)
    for round_ in range(40):
        for i in range(int(torch.randint(1, 4, (1,), generator=generator))):
            length = int(torch.randint(1, 700, (1,), generator=generator))
            prompt = torch.randint(10, 40000, (length,), generator=generator).tolist()
            params = SamplingParams(max_tokens=int(torch.randint(1, 60, (1,), generator=generator)))
            engine.add_request(f"r{round_}-{i}", None, params, prompt_token_ids=prompt)
        for _ in range(int(torch.randint(1, 6, (1,), generator=generator))):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    # one prefill binary; the split kernel with and without a single split; the reduce
    # kernel once per power-of-two split count (at most log2(32) = 5)
    new = {kernel: compiled_variants(kernel) - before[kernel] for kernel in before}
    assert new[prefill] <= 1
    assert new[split] <= 2
    assert new[reduce] <= 5


@pytest.mark.parametrize("pinned_inputs", [False, True])
def test_preempted_sequences_decode_alike_with_and_without_graphs(
    model_dir: Path, pinned_inputs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few KV blocks: sequences are preempted and recomputed with new block lists between
    decode-graph steps (whose inputs, block tables included, are refilled every step; with
    pinned inputs, the host block table is updated only where a row's list changed). Greedy
    outputs must match the eager path's, and no block may leak."""
    from contracts.sampling_params import SamplingParams
    from engine import cuda_graph
    from engine.config import EngineConfig
    from engine.scheduler import SchedulerConfig

    monkeypatch.setattr(cuda_graph, "PINNED_INPUTS", pinned_inputs)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = [rule_sequence(seed=100 + s, length=60 + 29 * s) for s in range(9)]
    outputs = []
    for cuda_graphs in (True, False):
        engine = Engine(
            EngineConfig(
                model=str(model_dir), device="cuda", dtype="bfloat16", num_kv_blocks=64,
                block_size=16, cuda_graphs=cuda_graphs,
                scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512),
            )
        )  # fmt: skip
        outputs.append([c.token_ids for c in engine.generate(prompts, params)])
        assert engine.scheduler.num_preemptions > 0, "the workload must preempt"
        engine.check_integrity()
        assert engine.block_manager.num_free_blocks == 64
    assert outputs[0] == outputs[1]


def test_dense_fresh_prefill_matches_the_paged_kernel(model_dir: Path) -> None:
    """Fresh prompts through torch's fused attention give the paged Triton kernel's logits."""
    from engine import triton_attention

    engine = gpu_engine(model_dir)
    token_ids = rule_sequence(seed=9, length=700)
    default = triton_attention.DENSE_FRESH_PREFILL
    try:
        triton_attention.DENSE_FRESH_PREFILL = True
        dense = prefill_logits(engine, token_ids)
        triton_attention.DENSE_FRESH_PREFILL = False
        paged = prefill_logits(engine, token_ids)
    finally:
        triton_attention.DENSE_FRESH_PREFILL = default
    assert (dense.argmax(-1) == paged.argmax(-1)).float().mean().item() >= 0.99
    scale = paged.abs().max().item()
    torch.testing.assert_close(dense, paged, atol=0.02 * scale, rtol=0.05)
    engine.check_integrity()


def step_logits(engine: Engine, prompts: list[list[int]], cached: int = 0) -> torch.Tensor:
    """Logits [sum of lengths - cached, vocab] of one prefill step over all `prompts`: the
    first `cached` tokens of the first prompt computed in an earlier step (a chunk that
    continues its sequence), every other prompt fresh."""
    from contracts.block_hash import root_hash
    from contracts.sampling_params import SamplingParams
    from engine import triton_attention
    from engine.scheduler import ScheduledSequence
    from engine.sequence import Sequence

    seqs = [
        Sequence(f"s{i}", p, SamplingParams(), root_hash(f"s{i}")) for i, p in enumerate(prompts)
    ]
    with torch.inference_mode():
        if cached:  # through SDPA whatever DENSE_VARLEN says: the same cache for both paths
            saved, triton_attention.DENSE_VARLEN = triton_attention.DENSE_VARLEN, False
            assert engine.block_manager.allocate_slots(seqs[0], cached)
            ids, pos, meta = engine.runner.prepare_inputs([], [ScheduledSequence(seqs[0], cached)])
            engine.model(ids, pos, engine.runner.kv_cache, meta)
            triton_attention.DENSE_VARLEN = saved
            seqs[0].num_computed_tokens = cached
        items = []
        for seq in seqs:
            new = len(seq.token_ids) - seq.num_computed_tokens
            assert engine.block_manager.allocate_slots(seq, new)
            items.append(ScheduledSequence(seq, new))
        ids, pos, meta = engine.runner.prepare_inputs([], items)
        logits = engine.model.compute_logits(engine.model(ids, pos, engine.runner.kv_cache, meta))
    for seq in seqs:
        engine.block_manager.free(seq)
    return logits


@pytest.mark.parametrize("cached", [0, 160])
def test_one_varlen_flash_call_matches_sdpa_chunk_by_chunk(model_dir: Path, cached: int) -> None:
    """DENSE_VARLEN: a step of fresh chunks attends in one variable-length FlashAttention-2
    call, with the per-chunk SDPA path's logits. Where one chunk continues its sequence
    (cached > 0), the call also covers its rows, which the paged kernel then writes over: its
    logits are the per-chunk path's bit for bit."""
    from engine import triton_attention

    engine = gpu_engine(model_dir)
    prompts = [rule_sequence(seed=20 + i, length=n) for i, n in enumerate((300, 130, 257, 512))]
    saved = triton_attention.DENSE_FRESH_PREFILL, triton_attention.DENSE_VARLEN
    try:
        triton_attention.DENSE_FRESH_PREFILL = True
        triton_attention.DENSE_VARLEN = True
        varlen = step_logits(engine, prompts, cached)
        triton_attention.DENSE_VARLEN = False
        per_chunk = step_logits(engine, prompts, cached)
    finally:
        triton_attention.DENSE_FRESH_PREFILL, triton_attention.DENSE_VARLEN = saved
    assert varlen.shape[0] == sum(map(len, prompts)) - cached
    if cached:  # the paged kernel's rows both times
        assert torch.equal(varlen[: 300 - cached], per_chunk[: 300 - cached])
    assert (varlen.argmax(-1) == per_chunk.argmax(-1)).float().mean().item() >= 0.99
    scale = per_chunk.abs().max().item()
    torch.testing.assert_close(varlen, per_chunk, atol=0.02 * scale, rtol=0.05)
    engine.check_integrity()


@pytest.mark.parametrize("kv_cache_scales", ["per_head", "per_token"])
def test_fp8_cache_fresh_prefill_is_dense_by_default(model_dir: Path, kv_cache_scales: str) -> None:
    """With an FP8 cache, fresh prompts attend through torch's fused attention over the step's
    own keys and values by default (the paged kernel's e4m3 conversion made it the slower one):
    their logits are a bf16 cache's (dense too), bit for bit; the paged kernel, which reads the
    quantized cache, stays within FP8's distance (H100: argmax agreement 0.93 over 700 positions
    of the test model, which this test first wrongly required >= 0.97; relative distance of the
    logits 0.107 per head, once over a first bound of 0.1 chosen before any measurement)."""
    from engine import triton_attention

    assert triton_attention.DENSE_FRESH_PREFILL is None, "the default: FP8 caches only"
    token_ids = rule_sequence(seed=9, length=700)
    engine = gpu_engine(model_dir, kv_cache_dtype="fp8", kv_cache_scales=kv_cache_scales)
    dense = prefill_logits(engine, token_ids)
    try:
        triton_attention.DENSE_FRESH_PREFILL = False
        paged = prefill_logits(engine, token_ids)
        triton_attention.DENSE_FRESH_PREFILL = True
        bf16 = prefill_logits(gpu_engine(model_dir), token_ids)
    finally:
        triton_attention.DENSE_FRESH_PREFILL = None
    assert torch.equal(dense, bf16)
    assert not torch.equal(dense, paged), "the paged kernel reads the quantized cache"
    assert (dense.argmax(-1) == paged.argmax(-1)).float().mean().item() >= 0.9
    assert ((dense - paged).norm() / dense.norm()).item() < 0.2
    engine.check_integrity()
