"""Continuous batching: which sequences run this step, and how many tokens each.

One token budget per step is shared by decodes and prefill chunks; running sequences go first,
oldest first, so a long prompt never starves decodes. When blocks run out the newest running
sequence is preempted by recompute. With `target_step_s`, a step that decodes is also capped so
its estimated time (`StepTimeModel`, fitted to measured steps) stays under the target.
Pure Python; knows nothing of tensors or text. The policy in full: docs/engine.md.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from contracts.outputs import FinishReason
from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # cap on running sequences
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_prefill_chunk_tokens: int | None = None  # per-sequence chunk cap; None: the budget
    # A step with decodes in it stays under this many seconds (its tokens capped by the
    # measured step time); None: the fixed token budget only
    target_step_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")
        chunk = self.max_prefill_chunk_tokens
        if chunk is not None and chunk < 1:
            raise ValueError(f"max_prefill_chunk_tokens={chunk} must be >= 1")
        target = self.target_step_s
        if target is not None and not (isinstance(target, (int, float)) and target > 0):
            raise ValueError(f"target_step_s={target!r} must be > 0 seconds or None")


MIN_CHUNK_TOKENS = 16  # a prefill chunk beside decodes is never capped below this: it progresses


class StepTimeModel:
    """Step seconds as a line in its tokens, `fixed_s + per_token_s * tokens`, fitted by
    exponentially weighted least squares to the steps the engine measured (`observe`)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self._sums = [0.0] * 5  # weight, n, t, n*n, n*t
        self.num_observed = 0

    def observe(self, num_tokens: int, seconds: float) -> None:
        self.num_observed += 1
        n, t = float(num_tokens), seconds
        d = self.decay
        self._sums = [d * a + b for a, b in zip(self._sums, (1.0, n, t, n * n, n * t), strict=True)]

    def line(self) -> tuple[float, float] | None:
        """(fixed_s, per_token_s), or None until steps of different sizes were seen."""
        w, n, t, nn, nt = self._sums
        spread = w * nn - n * n
        if w == 0 or spread <= 1e-9 * max(w * nn, 1.0):
            return None
        per_token = (w * nt - n * t) / spread
        if per_token <= 0:
            return None
        return max(0.0, (t - per_token * n) / w), per_token

    def max_tokens(self, target_s: float) -> int | None:
        """The most tokens a step can hold and stay under `target_s` by the line; None if
        it is not known yet."""
        line = self.line()
        if line is None:
            return None
        fixed, per_token = line
        return max(0, int((target_s - fixed) / per_token))


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples_token(self) -> bool:
        """True when this step reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.step_time = StepTimeModel()

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence whose KV is already in its blocks (computed elsewhere) straight to
        the running batch: its next step is a decode. It may take the running count past
        max_num_seqs for a while: its blocks are already spent, so running it is their best use.
        """
        assert seq.block_ids and seq.num_computed_tokens > 0, "add_running needs computed KV"
        seq.status = SequenceStatus.RUNNING
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = 0
        self.running.append(seq)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A step of `num_tokens` took `seconds` (the engine measures): for target_step_s."""
        self.step_time.observe(num_tokens, seconds)

    def step_budget(self) -> int:
        """This step's token budget: the fixed one, or with target_step_s and decodes running,
        what keeps the step under the target (see the module docstring)."""
        budget = self.config.max_num_batched_tokens
        target = self.config.target_step_s
        if target is None:
            return budget
        num_decodes = sum(
            1 for s in self.running
            if s.status is SequenceStatus.RUNNING and s.num_tokens - s.num_computed_tokens == 1
        )  # fmt: skip
        if num_decodes == 0:
            return budget
        fits = self.step_time.max_tokens(target)
        if fits is None:
            return budget
        return min(budget, max(fits, num_decodes + MIN_CHUNK_TOKENS))

    def may_preempt(self) -> bool:
        """Whether the next schedule() could preempt: the running sequences' uncomputed tokens
        need more fresh blocks than are free (an upper bound: a step may take fewer)."""
        num_free = self.block_manager.num_free_blocks
        block_size = self.block_manager.block_size
        num_needed = 0
        for seq in self.running:
            num_needed += max(0, -(-len(seq.token_ids) // block_size) - len(seq.block_ids))
            if num_needed > num_free:
                return True
        return False

    def schedule(self) -> SchedulerOutput:
        budget = self.step_budget()
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                break
            num_new = self._num_new_tokens(seq, seq.num_computed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_new, preempted):
                break
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        if not preempted:
            scheduled += self._admit_waiting(budget)
        return SchedulerOutput(scheduled, preempted)

    def _num_new_tokens(self, seq: Sequence, num_computed: int, budget: int) -> int:
        num_new = min(seq.num_tokens - num_computed, budget)
        if self.config.max_prefill_chunk_tokens is not None:
            num_new = min(num_new, self.config.max_prefill_chunk_tokens)
        return num_new

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, preempted: list[Sequence]) -> bool:
        """Allocate, preempting the newest running sequences until it fits; False if `seq`
        itself had to go."""
        if seq.num_computed_tokens + num_new <= len(seq.block_ids) * self.block_manager.block_size:
            return True  # its blocks have room (allocate_slots would change nothing)
        while not self.block_manager.allocate_slots(seq, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_waiting(self, budget: int) -> list[ScheduledSequence]:
        admitted: list[ScheduledSequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            computed = self.block_manager.get_computed_blocks(seq)
            num_computed = len(computed) * self.block_manager.block_size
            num_new = self._num_new_tokens(seq, num_computed, budget)
            if not self.block_manager.allocate_slots(seq, num_new, computed):
                break
            if seq.num_cached_tokens < 0:  # its first schedule
                seq.num_cached_tokens = num_computed
                seq.queue_seconds = time.monotonic() - seq.arrival_time
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return admitted

    def update(self, output: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Advance computed counts and append sampled tokens (one per sampling sequence, in
        order). Finishes sequences on EOS, stop ids, max_tokens or the context end. Returns the
        sequences that got a new token."""
        samplers: list[Sequence] = []
        block_size = self.block_manager.block_size
        for item in output.scheduled:
            seq = item.seq
            if seq.num_computed_tokens + item.num_new_tokens == len(seq.token_ids):
                samplers.append(seq)  # item.samples_token, before the count advances
            seq.num_computed_tokens += item.num_new_tokens
            if seq.num_computed_tokens // block_size > seq.num_registered_blocks:
                self.block_manager.cache_computed_blocks(seq)  # a block filled up
        assert len(samplers) == len(sampled_token_ids), "one sampled token per sampling sequence"
        for seq, token_id in zip(samplers, sampled_token_ids, strict=True):
            seq.append_token(token_id)
        return samplers

    def finish(self, seq: Sequence, reason: FinishReason | None) -> None:
        """End a sequence (any state) and free its blocks. Idempotent. reason None: it leaves
        without reaching a finish (prefill done, its KV pinned for a transfer elsewhere)."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)  # AWAITING_KV sequences are in neither queue
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def check_integrity(self, holders: Collection[str] = ()) -> None:
        self.block_manager.check_integrity(self.running, holders)
        for seq in self.waiting:
            assert not seq.block_ids, f"waiting {seq} holds blocks"
