"""Time outside engine steps (`tandem profile`): through the real engine loop, or a service.

Engine loop (`measure_loop_overhead`, always): `worker.engine_loop.EngineLoop` drives the
profile's engine on its own thread, as in a worker, while this thread's asyncio loop submits
requests and reads their outputs. `Engine.step` is timed on the engine thread; the overhead:
- per step: from the end of one step to the start of the next while requests are unfinished
  (the loop's inbox, its role's turn, handing the outputs over);
- per request: from `submit` to its first output at the reader, less the engine steps that
  ran in between (requests one at a time, so no other request's steps are among them).
Requests run one at a time, then `batch` at once (the steps' handoff grows with the batch).
Service (`measure_service_overhead`, `--service-requests`): a real `tandem serve` of one
colocated worker (router, Ray, gRPC), requests from a gRPC client one at a time, then a batch at
once: per request its TTFT less the profile's median step for its prompt, per step each
inter-token gap less the profile's median decode step at that batch (samples below the median
count as 0: the engine's own spread is drawn from the step repeats).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contracts.sampling_params import SamplingParams
from planner.profile import Overhead, Profile

PROMPT_TOKENS = 16  # each request's prompt: one small chunk


class _StepTimer:
    """Wraps `engine.step` (an instance attribute over the method) to record each step's
    (start, end, requests left unfinished after it); `restore` removes the wrapper."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.steps: list[tuple[float, float, bool]] = []
        step = engine.step

        def timed() -> Any:
            started = time.perf_counter()
            outputs = step()
            self.steps.append((started, time.perf_counter(), engine.has_unfinished_requests()))
            return outputs

        engine.step = timed

    def gaps_s(self) -> list[float]:
        """Seconds from each step's end to the next one's start while requests were left."""
        return [
            after[0] - before[1] for before, after in itertools.pairwise(self.steps) if before[2]
        ]

    def restore(self) -> None:
        del self.engine.step


def measure_loop_overhead(
    engine: Any, ids: Callable[[int], list[int]], num_requests: int, batch: int, steps: int
) -> Overhead:
    """Serve `num_requests` requests one at a time, then `batch` at once, each of `steps` + 1
    tokens, through a real EngineLoop over `engine`; the overhead samples (module docstring)."""
    from worker.engine_loop import EngineLoop

    timer = _StepTimer(engine)
    loop = EngineLoop(engine)
    try:
        request_s = asyncio.run(_one_at_a_time(loop, timer, ids, num_requests, steps))
        step_s = timer.gaps_s()
        timer.steps.clear()
        asyncio.run(_at_once(loop, ids, batch, steps))
        step_s += timer.gaps_s()
    finally:
        loop.stop()
        timer.restore()
    if not step_s:
        raise RuntimeError("the engine loop ran no two steps in a row: nothing measured")
    return Overhead(tuple(step_s), tuple(request_s), "engine loop")


async def _one_at_a_time(
    loop: Any, timer: _StepTimer, ids: Callable[[int], list[int]], num_requests: int, steps: int
) -> list[float]:
    request_s = []
    for _ in range(num_requests):
        first = len(timer.steps)
        sent = time.perf_counter()
        times = await _serve(loop, ids, steps)
        engine_s = sum(end - start for start, end, _ in timer.steps[first:] if end <= times[0])
        request_s.append(max(0.0, times[0] - sent - engine_s))
    return request_s


async def _at_once(loop: Any, ids: Callable[[int], list[int]], batch: int, steps: int) -> None:
    await asyncio.gather(*(_serve(loop, ids, steps) for _ in range(batch)))


async def _serve(loop: Any, ids: Callable[[int], list[int]], steps: int) -> list[float]:
    """One request through the loop; when each of its outputs reached this thread."""
    params = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
    stream = loop.submit(uuid.uuid4().hex, ids(PROMPT_TOKENS), params)
    times = []
    while True:
        item = await stream.get()
        if isinstance(item, BaseException):
            raise item
        times.append(time.perf_counter())
        if item.finished:
            return times


def measure_service_overhead(
    profile: Profile,
    serve_args: list[str],
    num_requests: int,
    batch: int,
    steps: int,
    log_path: Path,
    start_timeout_s: float = 900.0,
) -> Overhead:
    """Start `tandem serve --mode colocated --workers 1 SERVE_ARGS` (its log in `log_path`),
    send `num_requests` requests of `steps` + 1 tokens one at a time (after 2 warm-ups), then
    `batch` at once, and return the overhead samples against `profile`'s medians (module
    docstring; the batch's gaps against its decode step at that batch)."""
    from bench.disagg_experiment import tandem_serve

    serve = ["--mode", "colocated", "--workers", "1", *serve_args]
    with tandem_serve(serve, log_path, start_timeout_s, "profile") as port:
        alone, together = asyncio.run(_through_service(port, num_requests + 2, batch, steps))
    prefill_s = profile.prefill.at(PROMPT_TOKENS, 0)
    request_s = [max(0.0, r.chunk_times_s[0] - r.start_s - prefill_s) for r in alone[2:]]
    step_s = _step_samples(profile, alone[2:], 1) + _step_samples(profile, together, batch)
    if not step_s:
        raise RuntimeError("no request through the service streamed one token a chunk")
    return Overhead(tuple(step_s), tuple(request_s), "service")


def _step_samples(profile: Profile, records: list[Any], batch: int) -> list[float]:
    """Each inter-token gap less the profile's median decode step at `batch` (never < 0)."""
    samples = []
    for record in records:
        times = record.chunk_times_s
        if record.error is not None or not times:
            raise RuntimeError(f"a request through the service failed: {record.error}")
        if len(times) != record.output_tokens:  # some chunk carried 2 tokens: gaps unknown
            continue
        for index, (before, after) in enumerate(itertools.pairwise(times)):
            decode_s = profile.decode.at(batch, PROMPT_TOKENS + index + 1)
            samples.append(max(0.0, after - before - decode_s))
    return samples


async def _through_service(
    port: int, num_requests: int, batch: int, steps: int
) -> tuple[list[Any], list[Any]]:
    """Records of `num_requests` requests one at a time, then of `batch` at once."""
    from bench.serving.client import make_sender, server_info
    from bench.serving.connection import open_channel
    from bench.serving.workload import Prompt

    target = f"127.0.0.1:{port}"
    async with open_channel(target, None, aio=True) as channel:
        vocab_size = (await server_info(channel, target, 60.0)).vocab_size
        send = make_sender(channel, uuid.uuid4().hex[:8], 0.0, 600.0)
        rng = random.Random(0)

        def prompt() -> Prompt:
            return Prompt(tuple(rng.randrange(vocab_size) for _ in range(PROMPT_TOKENS)))

        alone = [(await send(i, "alone", prompt(), steps + 1)).record for i in range(num_requests)]
        sends = [send(num_requests + i, "together", prompt(), steps + 1) for i in range(batch)]
        together = [c.record for c in await asyncio.gather(*sends)]
        return alone, together
