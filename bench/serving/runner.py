"""Drives one run: starts each session at its arrival offset, sends its requests one after
another (a multi-turn conversation's next prompt needs the previous answer), keeps at most
`max_concurrency` requests in flight, and returns every request's record. It knows nothing of
gRPC: requests go through a `Send`, so tests drive it with a fake server. Runs on one asyncio
loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bench.serving.metrics import RequestRecord
from bench.serving.workload import Answer, Prompt, Session, next_prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Completion:
    record: RequestRecord
    answer: Answer


# (request index, label, prompt, max_tokens) -> the finished request, failed or not
Send = Callable[[int, str, Prompt, int], Awaitable[Completion]]


@dataclass(frozen=True, slots=True)
class RunResult:
    records: tuple[RequestRecord, ...]  # by request index
    started_s: float  # when the run started, on the records' clock
    duration_s: float  # the run's start to the end of its last request


async def run_sessions(
    sessions: Sequence[Session],
    offsets_s: Sequence[float],
    send: Send,
    max_concurrency: int | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    """Send every session, session i starting `offsets_s[i]` seconds after the call. A failed
    turn ends its conversation (the next prompt would need its answer): the turns after it are
    not sent. `on_done` is called with each record as its request ends."""
    if len(offsets_s) != len(sessions):
        raise ValueError(f"{len(sessions)} sessions but {len(offsets_s)} arrival offsets")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records: list[RequestRecord] = []

    async def run_session(session: Session, first_index: int) -> None:
        prompt, label = session.prompt, session.label
        completion: Completion | None = None
        for turn, question in enumerate((None, *session.follow_ups)):
            if question is not None:
                assert completion is not None, "a follow-up before its first turn"
                prompt, label = next_prompt(prompt, completion.answer, question), f"turn-{turn + 1}"
            async with limit if limit is not None else contextlib.nullcontext():
                completion = await send(first_index + turn, label, prompt, session.max_tokens)
            records.append(completion.record)
            if on_done is not None:
                on_done(completion.record)
            if not completion.record.is_ok:
                break

    first_indices = itertools.accumulate((s.num_requests for s in sessions), initial=0)
    started = time.perf_counter()
    tasks = []
    for session, offset, first_index in zip(sessions, offsets_s, first_indices, strict=False):
        delay = started + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run_session(session, first_index)))
    await asyncio.gather(*tasks)
    end = max((r.end_s for r in records), default=time.perf_counter())
    return RunResult(tuple(sorted(records, key=lambda r: r.index)), started, end - started)
