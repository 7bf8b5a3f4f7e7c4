"""Scheduler + BlockManager without a model: the step loop is simulated (schedule, then update
with fake sampled tokens). Covers the token budget shared by decodes and prefill chunks
(running sequences first), chunked prefill with exact chunk sizes, the max_num_seqs cap,
max_prefill_chunk_tokens, preemption of the newest running sequence when blocks run out and
its recompute (from 0 or from its prefix-cache hit), num_cached_tokens set on first admission
only, and finish; scheduler integrity is checked after every step."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from contracts.block_hash import root_hash
from contracts.outputs import FinishReason
from contracts.sampling_params import SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from tests.conftest import prompt_ids

BS = 4  # block size
SAMPLED = 7  # the fake token every sampling sequence gets


def make_scheduler(
    num_blocks: int = 64,
    *,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    max_prefill_chunk_tokens: int | None = None,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_prefill_chunk_tokens)
    return Scheduler(config, BlockManager(num_blocks, BS, enable_prefix_caching))


def add(sched: Scheduler, request_id: str, tokens: int | list[int]) -> Sequence:
    """Queue a sequence; an int prompt is that many pseudo-random tokens seeded by the id."""
    if isinstance(tokens, int):
        tokens = prompt_ids(sum(map(ord, request_id)), tokens)
    seq = Sequence(request_id, tokens, SamplingParams(), root_hash("dummy:tiny"))
    sched.add(seq)
    return seq


def step(sched: Scheduler) -> tuple[list[tuple[str, int, bool]], SchedulerOutput]:
    """One simulated engine step; returns (request id, new tokens, samples) per scheduled item."""
    output = sched.schedule()
    plan = [(s.seq.request_id, s.num_new_tokens, s.samples_token) for s in output.scheduled]
    num_samplers = sum(samples for _, _, samples in plan)
    sampled = sched.update(output, [SAMPLED] * num_samplers)
    assert [s.request_id for s in sampled] == [rid for rid, _, samples in plan if samples]
    sched.check_integrity()
    return plan, output


def ids(seqs: Iterable[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


def test_nothing_to_schedule() -> None:
    sched = make_scheduler()
    plan, output = step(sched)
    assert plan == [] and output.preempted == [] and output.num_tokens == 0


def test_budget_goes_to_decodes_first_then_prefill_chunks() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    for rid in "abc":
        add(sched, rid, 4)
    plan, output = step(sched)
    assert plan == [("a", 4, True), ("b", 4, True), ("c", 4, True)]
    assert output.num_tokens == 12
    d = add(sched, "d", 30)
    decodes = [("a", 1, True), ("b", 1, True), ("c", 1, True)]
    assert step(sched)[0] == [*decodes, ("d", 13, False)]
    assert d.num_computed_tokens == 13
    assert step(sched)[0] == [*decodes, ("d", 13, False)]
    assert step(sched)[0] == [*decodes, ("d", 4, True)]
    assert d.num_tokens == 31 and d.output_token_ids == [SAMPLED]
    assert step(sched)[0] == [*decodes, ("d", 1, True)]
    for seq in [*sched.running]:
        assert seq.num_computed_tokens == seq.num_tokens - 1
        assert len(seq.block_ids) == sched.block_manager.num_blocks_for(seq.num_tokens - 1)


def test_waiting_sequence_gets_what_the_budget_leaves() -> None:
    sched = make_scheduler(max_num_batched_tokens=10)
    add(sched, "a", 7)
    add(sched, "b", 7)
    add(sched, "c", 7)
    # c is not admitted with an empty budget; b gets a 3-token chunk.
    assert step(sched)[0] == [("a", 7, True), ("b", 3, False)]
    assert ids(sched.waiting) == ["c"]
    assert step(sched)[0] == [("a", 1, True), ("b", 4, True), ("c", 5, False)]
    assert step(sched)[0] == [("a", 1, True), ("b", 1, True), ("c", 2, True)]


@pytest.mark.parametrize(
    ("budget", "chunk", "prompt_len", "chunks"),
    [
        (8, None, 21, [8, 8, 5]),
        (8, None, 16, [8, 8]),
        (100, 6, 21, [6, 6, 6, 3]),
        (8, 6, 21, [6, 6, 6, 3]),
        (5, 6, 12, [5, 5, 2]),
        (4, None, 4, [4]),
        (3, None, 1, [1]),
    ],
)
def test_chunked_prefill_of_a_long_prompt(
    budget: int, chunk: int | None, prompt_len: int, chunks: list[int]
) -> None:
    sched = make_scheduler(max_num_batched_tokens=budget, max_prefill_chunk_tokens=chunk)
    seq = add(sched, "a", prompt_len)
    num_computed = 0
    for i, num_new in enumerate(chunks):
        is_last = i == len(chunks) - 1
        assert step(sched)[0] == [("a", num_new, is_last)]
        num_computed += num_new
        assert seq.num_computed_tokens == num_computed
        assert len(seq.block_ids) == sched.block_manager.num_blocks_for(num_computed)
        assert seq.num_output_tokens == int(is_last)
    assert num_computed == prompt_len
    for _ in range(3):
        assert step(sched)[0] == [("a", 1, True)]
    assert seq.num_tokens == prompt_len + 4


def test_max_prefill_chunk_tokens_splits_the_budget_between_prompts() -> None:
    sched = make_scheduler(max_num_batched_tokens=10, max_prefill_chunk_tokens=6)
    add(sched, "a", 20)
    add(sched, "b", 20)
    assert step(sched)[0] == [("a", 6, False), ("b", 4, False)]
    assert step(sched)[0] == [("a", 6, False), ("b", 4, False)]
    assert step(sched)[0] == [("a", 6, False), ("b", 4, False)]
    assert step(sched)[0] == [("a", 2, True), ("b", 6, False)]
    assert step(sched)[0] == [("a", 1, True), ("b", 2, True)]


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3])
def test_max_num_seqs_caps_running_sequences(max_num_seqs: int) -> None:
    sched = make_scheduler(max_num_seqs=max_num_seqs)
    seqs = [add(sched, rid, 4) for rid in "abcd"]
    first = ids(seqs[:max_num_seqs])
    plan, _ = step(sched)
    assert [rid for rid, _, _ in plan] == first
    assert ids(sched.waiting) == ids(seqs[max_num_seqs:])
    plan, _ = step(sched)
    assert plan == [(rid, 1, True) for rid in first]
    sched.finish(seqs[0], FinishReason.STOP)
    plan, _ = step(sched)
    next_id = seqs[max_num_seqs].request_id
    assert plan == [*[(rid, 1, True) for rid in first[1:]], (next_id, 4, True)]
    assert len(sched.running) == max_num_seqs


def test_preemption_frees_the_newest_and_recomputes_it_from_zero() -> None:
    sched = make_scheduler(num_blocks=6)
    bm = sched.block_manager
    a, b, c = add(sched, "a", 8), add(sched, "b", 8), add(sched, "c", 7)
    assert step(sched)[0] == [("a", 8, True), ("b", 8, True), ("c", 7, True)]
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1], [2, 3], [4, 5])
    assert c.num_cached_tokens == 0
    d = add(sched, "d", 4)

    # a and b each cross a block boundary; c (newest) gives its blocks, tail first.
    plan, output = step(sched)
    assert plan == [("a", 1, True), ("b", 1, True)]
    assert output.preempted == [c]
    assert (a.block_ids, b.block_ids) == ([0, 1, 5], [2, 3, 4])
    assert c.status is SequenceStatus.WAITING and c.block_ids == [] and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert ids(sched.waiting) == ["c", "d"]
    assert ids(sched.running) == ["a", "b"]
    assert c.num_tokens == 8  # its prompt and the token it had sampled

    # No room for c yet; it stays at the head, d waits behind it.
    assert step(sched)[0] == [("a", 1, True), ("b", 1, True)]
    assert ids(sched.waiting) == ["c", "d"]

    sched.finish(a, FinishReason.LENGTH)
    assert step(sched)[0] == [("b", 1, True), ("c", 8, True), ("d", 4, True)]
    assert c.block_ids == [5, 1] and d.block_ids == [0]
    assert c.num_cached_tokens == 0
    assert c.num_tokens == 9 and c.output_token_ids == [SAMPLED, SAMPLED]
    assert bm.num_free_blocks == 0


def test_preempted_sequence_resumes_from_its_prefix_cache_hit() -> None:
    sched = make_scheduler(num_blocks=7)
    a, b, c = add(sched, "a", 8), add(sched, "b", 6), add(sched, "c", 11)
    assert step(sched)[0] == [("a", 8, True), ("b", 6, True), ("c", 11, True)]
    assert c.block_ids == [4, 5, 6]
    c_head = c.block_hashes[:2]

    plan, output = step(sched)
    assert plan == [("a", 1, True), ("b", 1, True)]
    assert output.preempted == [c]
    assert a.block_ids == [0, 1, 6]  # c's tail block, which held no full block
    assert [sched.block_manager.hash_to_block[h] for h in c_head] == [4, 5]

    sched.finish(a, FinishReason.STOP)
    assert step(sched)[0] == [("b", 1, True), ("c", 4, True)]
    assert c.block_ids == [4, 5, 6]
    assert c.num_computed_tokens == 12
    assert c.num_cached_tokens == 0  # from its first admission, not this one
    assert b.num_preemptions == 0 and c.num_preemptions == 1


def test_preemption_takes_several_victims_newest_first() -> None:
    sched = make_scheduler(num_blocks=4, max_prefill_chunk_tokens=8)
    a, b, c = add(sched, "a", 16), add(sched, "b", 3), add(sched, "c", 3)
    assert step(sched)[0] == [("a", 8, False), ("b", 3, True), ("c", 3, True)]
    plan, output = step(sched)
    assert plan == [("a", 8, True)]
    assert output.preempted == [c, b]
    assert ids(sched.waiting) == ["b", "c"]  # the oldest is readmitted first
    assert a.block_ids == [0, 1, 3, 2]
    assert b.block_ids == c.block_ids == []


def test_a_sequence_that_cannot_grow_preempts_itself_when_newest() -> None:
    sched = make_scheduler(num_blocks=4)
    a, b = add(sched, "a", 6), add(sched, "b", 8)
    assert step(sched)[0] == [("a", 6, True), ("b", 8, True)]
    plan, output = step(sched)
    assert plan == [("a", 1, True)]
    assert output.preempted == [b]
    assert ids(sched.running) == ["a"] and ids(sched.waiting) == ["b"]
    assert a.block_ids == [0, 1] and b.block_ids == []
    assert sched.block_manager.num_free_blocks == 2


def test_a_step_that_preempts_admits_nothing() -> None:
    """The victim heads the queue and would fit a small chunk again at once: it must not."""
    sched = make_scheduler(num_blocks=4, max_prefill_chunk_tokens=4, enable_prefix_caching=False)
    a, v = add(sched, "a", 4), add(sched, "v", 9)
    assert step(sched)[0] == [("a", 4, True), ("v", 4, False)]
    assert step(sched)[0] == [("a", 1, True), ("v", 4, False)]
    plan, output = step(sched)
    assert plan == [("a", 1, True)]
    assert output.preempted == [v]
    assert sched.block_manager.num_free_blocks == 2  # room for a chunk of v, left unused
    assert ids(sched.waiting) == ["v"]
    assert step(sched)[0] == [("a", 1, True), ("v", 4, False)]
    assert a.num_preemptions == 0 and v.num_preemptions == 1


def test_num_cached_tokens_is_set_on_first_admission_only() -> None:
    sched = make_scheduler(num_blocks=4)
    bm = sched.block_manager
    prompt = prompt_ids(40, 9)
    x = add(sched, "x", prompt)
    step(sched)
    sched.finish(x, FinishReason.STOP)
    y = add(sched, "y", 4)
    s = add(sched, "s", prompt)
    assert step(sched)[0] == [("y", 4, True), ("s", 1, True)]
    assert s.num_cached_tokens == 8
    assert s.block_ids == [0, 1, 2]  # x's two cached blocks, then a fresh one

    # y crosses a block boundary and s, the newest, is preempted.
    plan, output = step(sched)
    assert plan == [("y", 1, True)] and output.preempted == [s]
    sched.finish(y, FinishReason.STOP)
    bm.reset_prefix_cache()
    assert step(sched)[0] == [("s", 10, True)]  # recomputed from 0 ...
    assert s.num_cached_tokens == 8  # ... but the usage reports the first admission


def test_finish_is_idempotent_and_frees_blocks() -> None:
    sched = make_scheduler(num_blocks=8, max_num_batched_tokens=8)
    bm = sched.block_manager
    a, b, c = add(sched, "a", 6), add(sched, "b", 12), add(sched, "c", 4)
    assert step(sched)[0] == [("a", 6, True), ("b", 2, False)]
    assert bm.num_free_blocks == 5
    sched.finish(b, FinishReason.ABORT)  # mid-prefill
    assert b.status is SequenceStatus.FINISHED and b.finish_reason is FinishReason.ABORT
    assert b.block_ids == [] and bm.num_free_blocks == 6
    sched.finish(b, FinishReason.STOP)
    assert b.finish_reason is FinishReason.ABORT and bm.num_free_blocks == 6
    sched.finish(c, FinishReason.ABORT)  # never scheduled
    assert ids(sched.waiting) == [] and c.is_finished
    sched.finish(a, FinishReason.LENGTH)
    sched.finish(a, FinishReason.LENGTH)
    assert sched.num_unfinished == 0
    assert bm.num_free_blocks == 8
    sched.check_integrity()
    assert step(sched)[0] == []


def test_update_requires_one_token_per_sampling_sequence() -> None:
    sched = make_scheduler()
    add(sched, "a", 4)
    output = sched.schedule()
    with pytest.raises(AssertionError, match="one sampled token"):
        sched.update(output, [])
    sched.check_integrity()
