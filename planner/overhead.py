"""Time outside engine steps, measured through the real engine loop (`tandem profile`).

`worker.engine_loop.EngineLoop` drives the profile's engine on its own thread, as in a worker,
while this thread's asyncio loop submits requests and reads their outputs, as a worker's does.
`Engine.step` is timed on the engine thread; what the loop spends beside it is the overhead:
- per step: from the end of one step to the start of the next while requests are unfinished
  (the loop's inbox, its role's turn, handing the outputs over);
- per request: from `submit` to its first output at the reader, less the engine steps that
  ran in between (requests one at a time, so no other request's steps are among them).
Requests run one at a time, then `batch` at once (the steps' handoff grows with the batch).
Not measured here: what a service adds around the loop (router, Ray, gRPC).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from contracts.sampling_params import SamplingParams
from planner.profile import Overhead

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
            after[0] - before[1]
            for before, after in zip(self.steps, self.steps[1:], strict=False)
            if before[2]
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
