"""A discrete-event simulation of one serving configuration, driven by a measured profile.

Each simulated worker is the engine's own `Scheduler` over its own `BlockManager` (not a copy
of their logic): a step is what `Scheduler.schedule()` returns, its duration is read from the
profile (`Profile.step_s`), and `Scheduler.update` advances it. The router's side is the
router's own code: `Placement.pick` chooses workers by the loads `assigned` keeps,
`DisaggPolicy.decide` chooses where a disaggregated request prefills, and the decode workers'
recent ITL comes from `WorkerLoad.observe_itl`. Where the profile measured them, a step's time
varies as its repeats did (a ratio to the median drawn per step), each step adds the engine
loop's measured host time, and each request reaches its worker after a measured overhead; all
drawn from `random.Random`s seeded by `seed`, so a simulation is deterministic. What is modelled
and what is not: docs/operations.md, "Capacity planning". No threads, no I/O, no clock: time is
simulated.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import cast

from bench.serving.metrics import RequestRecord
from contracts.block_hash import root_hash
from contracts.outputs import FinishReason
from contracts.sampling_params import SamplingParams
from contracts.workers import WorkerStats
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence as EngineSequence
from planner.profile import Profile
from router.disagg import LOCAL, DecodeState, DisaggPolicy
from router.placement import Member, Placement, assigned
from router.workers import WorkerClient

SAMPLED_TOKEN_ID = 1  # every simulated step samples this token; ids do not change step times


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of the simulated load: sent at `arrival_s`, asks for `max_tokens`."""

    index: int
    label: str
    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Layout:
    """A configuration to simulate: `num_prefill` 0 is colocated (`num_decode` workers that
    prefill and decode); else a prefill pool and a decode pool with the placement `disagg`."""

    name: str
    num_prefill: int
    num_decode: int
    disagg: DisaggPolicy = field(default_factory=DisaggPolicy)

    def __post_init__(self) -> None:
        if self.num_prefill < 0:
            raise ValueError(f"num_prefill={self.num_prefill} must be >= 0")
        if self.num_decode < 1:
            raise ValueError(f"num_decode={self.num_decode} must be >= 1")


@dataclass(frozen=True, slots=True)
class _Client:
    """What Member needs of a WorkerClient in the simulation: its names."""

    worker_id: str

    @property
    def key(self) -> str:
        return self.worker_id


@dataclass(slots=True)
class _Tracked:
    """One request in flight: its router bookkeeping and what it has streamed."""

    request: SimRequest
    stack: ExitStack  # the router's `assigned` counts on the workers it holds
    decode: Member | None = None  # the decode member whose ITL its gaps feed
    prefill: ExitStack | None = None  # the prefill call's count, until the prefill returns
    token_times_s: list[float] = field(default_factory=list)
    end_s: float | None = None


class SimWorker:
    """One engine: the real scheduler and block manager, steps timed by the profile."""

    def __init__(
        self, worker_id: str, profile: Profile, config: SchedulerConfig, seed: int = 0
    ) -> None:
        self.block_manager = BlockManager(profile.num_kv_blocks, profile.block_size)
        self.scheduler = Scheduler(config, self.block_manager)
        self.member = Member(cast(WorkerClient, _Client(worker_id)))
        self.profile = profile
        self.is_busy = False
        self.prefill_only: set[str] = set()
        self.rng = random.Random(f"{seed}:{worker_id}")  # str seeds are stable across runs

    def step_s(self, output: SchedulerOutput) -> tuple[float, float]:
        """(the engine step's seconds, the loop's host seconds beside it): the profile's
        median for the step times a ratio drawn from its point's repeats, and a draw of the
        measured per-step host time (0 where the profile has no samples of either)."""
        chunks, decodes = [], []
        for item in output.scheduled:
            seq = item.seq
            if item.num_new_tokens == 1 and seq.num_output_tokens > 0:
                decodes.append(seq.num_computed_tokens)
            else:
                chunks.append((item.num_new_tokens, seq.num_computed_tokens))
        median_s, spread = self.profile.step(chunks, decodes)
        engine_s = median_s * self.rng.choice(spread)
        overhead = self.profile.overhead
        return engine_s, self.rng.choice(overhead.step_s) if overhead is not None else 0.0

    def report(self) -> None:
        """What a health check would tell the router (here after every step)."""
        self.member.load.observe(
            WorkerStats(
                num_requests=self.scheduler.num_unfinished,
                num_free_blocks=self.block_manager.num_free_blocks,
                num_blocks=self.profile.num_kv_blocks,
                max_num_seqs=self.scheduler.config.max_num_seqs,
            )
        )


class Simulation:
    """Serve `requests` in `layout` and return one RequestRecord per request (the benchmark's
    own record type, so bench.serving.metrics computes goodput and percentiles the same way).
    A request the simulation could not finish (`horizon_s`) is recorded as failed."""

    def __init__(
        self,
        profile: Profile,
        layout: Layout,
        target_itl_s: float | None = None,
        horizon_s: float = 3600.0,
        seed: int = 0,
    ) -> None:
        self.profile = profile
        self.layout = layout
        self.horizon_s = horizon_s
        self.rng = random.Random(f"{seed}:requests")
        base = SchedulerConfig(profile.max_num_seqs, profile.max_num_batched_tokens)
        # decode workers that may prefill protect their streams' ITL, as `tandem serve` does
        decode_config = base
        if layout.num_prefill and target_itl_s is not None:
            decode_config = SchedulerConfig(base.max_num_seqs, base.max_num_batched_tokens,
                                            target_step_s=target_itl_s)  # fmt: skip
        self.decode = [SimWorker(f"decode-{i}", profile, decode_config, seed)
                       for i in range(layout.num_decode)]  # fmt: skip
        self.prefill = [SimWorker(f"prefill-{i}", profile, base, seed)
                        for i in range(layout.num_prefill)]  # fmt: skip
        self.decode_placement = Placement(prefill=False)
        self.prefill_placement = Placement(prefill=True)
        self.root = root_hash("planner")
        self.now_s = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._tracked: dict[str, _Tracked] = {}
        self._links: dict[tuple[str, str], float] = {}  # (prefill, decode) -> link free at

    def run(self, requests: Sequence[SimRequest]) -> list[RequestRecord]:
        for request in requests:
            self._at(request.arrival_s, lambda r=request: self._arrive(r))  # type: ignore[misc]
        while self._events and self._events[0][0] <= self.horizon_s:
            self.now_s, _, action = heapq.heappop(self._events)
            action()
        return [self._record(self._tracked[str(r.index)]) for r in requests]

    def _at(self, time_s: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (time_s, next(self._order), action))

    # the router

    def _arrive(self, request: SimRequest) -> None:
        decode = self._pick(self.decode, self.decode_placement, "decode")
        tracked = _Tracked(request, ExitStack(), decode.member)
        self._tracked[str(request.index)] = tracked
        num_prompt = len(request.prompt_token_ids)
        is_local = not self.prefill or self._decide(request, decode) == LOCAL  # as the router:
        tracked.stack.enter_context(assigned(decode.member, num_prompt))  # decide, then count
        worker = decode
        if not is_local:
            worker = self._pick(self.prefill, self.prefill_placement, "prefill")
            tracked.prefill = ExitStack()
            tracked.prefill.enter_context(assigned(worker.member, num_prompt))
        delay_s = self._request_overhead_s()
        if delay_s:  # the way to the worker and the first output's back, taken on the way in
            self._at(self.now_s + delay_s, lambda: self._start(worker, request, not is_local))
        else:
            self._start(worker, request, prefill_only=not is_local)

    def _request_overhead_s(self) -> float:
        overhead = self.profile.overhead
        return self.rng.choice(overhead.request_s) if overhead is not None else 0.0

    def _pick(self, pool: list[SimWorker], placement: Placement, name: str) -> SimWorker:
        return pool[placement.pick(name, [w.member for w in pool])]

    def _decide(self, request: SimRequest, decode: SimWorker) -> str:
        load = decode.member.load
        queues = [w.member.load.queued_tokens for w in self.prefill if w.member.placeable]
        path, _ = self.layout.disagg.decide(
            len(request.prompt_token_ids),
            min(queues) if queues else None,
            DecodeState(load.decode_load, load.in_flight, load.recent_itl_s),
        )
        return path

    # the workers

    def _sequence(self, request: SimRequest, token_ids: Sequence[int]) -> EngineSequence:
        params = SamplingParams(max_tokens=request.max_tokens, ignore_eos=True)
        return EngineSequence(str(request.index), list(token_ids), params, self.root)

    def _start(self, worker: SimWorker, request: SimRequest, prefill_only: bool) -> None:
        if prefill_only:
            worker.prefill_only.add(str(request.index))
        worker.scheduler.add(self._sequence(request, request.prompt_token_ids))
        self._kick(worker)

    def _kick(self, worker: SimWorker) -> None:
        if worker.is_busy or not worker.scheduler.num_unfinished:
            return
        output = worker.scheduler.schedule()
        if not output.scheduled:
            return  # nothing fits now: a finish or an arrival kicks it again
        worker.is_busy = True
        engine_s, host_s = worker.step_s(output)
        self._at(self.now_s + engine_s + host_s,
                 lambda: self._step_done(worker, output, engine_s))  # fmt: skip

    def _step_done(self, worker: SimWorker, output: SchedulerOutput, engine_s: float) -> None:
        scheduler = worker.scheduler
        scheduler.observe_step(output.num_tokens, engine_s)  # the engine times its step only
        samplers = [item.seq for item in output.scheduled if item.samples_token]
        scheduler.update(output, [SAMPLED_TOKEN_ID] * len(samplers))
        for seq in samplers:
            if seq.request_id in worker.prefill_only:
                self._prefilled(worker, seq)
            else:
                self._token(worker, seq)
        worker.report()
        worker.is_busy = False
        self._kick(worker)

    def _token(self, worker: SimWorker, seq: EngineSequence) -> None:
        tracked = self._tracked[seq.request_id]
        self._stream(tracked)
        if seq.num_output_tokens >= tracked.request.max_tokens:
            worker.scheduler.finish(seq, FinishReason.LENGTH)
            self._end(tracked)

    def _stream(self, tracked: _Tracked) -> None:
        """One output reaches the client; the router feeds the gap to the decode worker."""
        times = tracked.token_times_s
        if times and tracked.decode is not None:
            tracked.decode.load.observe_itl(self.now_s - times[-1])
        times.append(self.now_s)

    def _end(self, tracked: _Tracked) -> None:
        tracked.end_s = self.now_s
        tracked.stack.close()

    def _prefilled(self, worker: SimWorker, seq: EngineSequence) -> None:
        """A prefill-only request's prompt is done: the first token streams from the decode
        worker at once (it owns the text); the KV follows over the pair's link."""
        worker.prefill_only.discard(seq.request_id)
        worker.scheduler.finish(seq, None)
        tracked = self._tracked[seq.request_id]
        assert tracked.prefill is not None, "a prefill-only request holds its prefill's count"
        tracked.prefill.close()
        self._stream(tracked)
        if tracked.request.max_tokens == 1:
            self._end(tracked)
            return
        decode = next(w for w in self.decode if w.member is tracked.decode)
        link = (worker.member.worker_id, decode.member.worker_id)
        start_s = max(self.now_s, self._links.get(link, 0.0))
        done_s = start_s + self.profile.transfer_s(seq.num_prompt_tokens)
        self._links[link] = done_s
        first_token_id = seq.output_token_ids[0]
        self._at(done_s, lambda: self._kv_arrived(decode, tracked, first_token_id))

    def _kv_arrived(self, decode: SimWorker, tracked: _Tracked, first_token_id: int) -> None:
        """The decode worker joins the request to its batch (or recomputes the prompt when
        no blocks are free for its KV, as the engine does)."""
        seq = self._sequence(tracked.request, tracked.request.prompt_token_ids)
        seq.append_token(first_token_id)
        num_prompt = len(tracked.request.prompt_token_ids)
        if decode.block_manager.allocate_slots(seq, num_prompt):
            seq.num_computed_tokens = num_prompt
            decode.scheduler.add_running(seq)
        else:
            decode.scheduler.add(seq)
        self._kick(decode)

    def _record(self, tracked: _Tracked) -> RequestRecord:
        request = tracked.request
        done = tracked.end_s is not None
        return RequestRecord(
            index=request.index,
            label=request.label,
            start_s=request.arrival_s,
            chunk_times_s=tuple(tracked.token_times_s) if done else (),
            end_s=tracked.end_s if done else self.now_s,  # type: ignore[arg-type]
            input_tokens=len(request.prompt_token_ids),
            output_tokens=len(tracked.token_times_s),
            error=None if done else "NOT_FINISHED",
        )
