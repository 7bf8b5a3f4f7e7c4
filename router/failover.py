"""Failover by replay: a stream whose decode worker is lost resumes on another (issue 22.1).

The router remembers the token ids it has sent the client. When the worker streaming a request
is lost (`WorkerLost`: dead, or unreachable), the request is placed again by the usual rules
(router.placement, router.disagg) with those tokens as `resumed_token_ids`: the prompt and
they are prefilled again (on the prefill pool, KV shipped, or on the decode worker itself) and
decoding goes on from the next token. The engine counts resumed tokens as output (max_tokens,
penalties, usage), rebuilds the detokenizer and stop-string state from them without sending
their text again, and draws a seeded request's token at output position p from (seed, p)
alone (engine.sampler.draw_seed), so the client sees one stream: greedy output equal to the
run without the fault, seeded sampling continuing the same random stream.

A request moves at most `max_migrations` times; one more loss ends it with UNAVAILABLE naming
the cap. When no decode worker is placeable (the pool's only one died), it waits up to
`replacement_wait_s` for the control plane's replacement; so does a new request arriving
while every decode worker is down (the chaos run's: both killed at once), before its first
attempt. Each move is counted in
`tandem_request_migrations_total{reason}` and noted on the request's span.

Live migration on drain (issue 22.3) takes the same path: a decode worker leaving the pool is
made unplaceable and each of its streams moves to another decode worker; such a move does not
count against `max_migrations`. With `move_kv_on_drain`, the draining worker first ships each
running request's KV to another decode worker over the KV-transfer layer and ends its stream
with `WorkerMoved` after its last output; the next attempt continues it there from that KV
(`RequestCore.migrate_off`, the attempt given the `MovedKV`), nothing recomputed. A request
that cannot move so (not running with its KV computed, no pair, the move refused), or every
request without `move_kv_on_drain`, is cut at a token boundary instead (`WorkerDraining` put
in its output queue behind the outputs already received, the attempt aborted on the worker,
later outputs dropped) and resumes on another decode worker by replay: its prompt and sent
tokens are prefilled again there. A moved KV that does not arrive is recomputed by the
receiving worker (decode_worker.kv_arrivals), its output unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from contracts.errors import WorkerDraining, WorkerLost, WorkerMoved, WorkerUnavailable
from contracts.handoff import MovedKV
from router.placement import PoolView
from telemetry.tracing import record_span

logger = logging.getLogger(__name__)

REASONS = ("worker_lost", "unreachable", "drain")  # the metric's label values
_POLL_S = 0.05  # how often a request waiting for a replacement looks at the pool


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    """max_migrations: how many times one request may move to another decode worker after
    losing its own (0: never; a lost worker ends its streams with UNAVAILABLE);
    replacement_wait_s: how long a request whose pool has no placeable decode worker left
    waits for one (a replacement) before it ends with UNAVAILABLE; migrate_on_drain: a decode
    worker drained out of its pool has its streams moved to the others at once (else they run
    to their end there first); move_kv_on_drain: those streams' KV moves with them over the
    KV-transfer layer (else they are replayed: recomputed where they go)."""

    max_migrations: int = 3
    replacement_wait_s: float = 60.0
    migrate_on_drain: bool = True
    move_kv_on_drain: bool = True

    def __post_init__(self) -> None:
        if type(self.max_migrations) is not int or self.max_migrations < 0:
            raise ValueError(f"max_migrations={self.max_migrations!r} must be an int >= 0")
        wait = self.replacement_wait_s
        if not (isinstance(wait, (int, float)) and 0 <= wait < float("inf")):
            raise ValueError(f"replacement_wait_s={wait!r} must be seconds >= 0")
        if type(self.migrate_on_drain) is not bool:
            raise ValueError(f"migrate_on_drain={self.migrate_on_drain!r} must be a bool")
        if type(self.move_kv_on_drain) is not bool:
            raise ValueError(f"move_kv_on_drain={self.move_kv_on_drain!r} must be a bool")


# (the token ids sent so far, the KV the stream moved with off a draining worker, if it did)
Attempt = Callable[[tuple[int, ...], MovedKV | None], AsyncGenerator[Any, None]]


async def with_failover(
    attempt: Attempt,
    config: FailoverConfig,
    decode: PoolView,
    span: Any,
    on_migration: Callable[[str], None] | None = None,
) -> AsyncGenerator[Any, None]:
    """The replies of `attempt(resumed_token_ids, None)` (router.core.Reply), run again with
    the token ids sent so far each time it raises WorkerLost, at most `config.max_migrations`
    times (moves off a draining worker, WorkerDraining, are not capped; after WorkerMoved the
    attempt is given its MovedKV). Only the first reply of the whole stream carries the time
    to first token."""
    sent: list[int] = []
    moved: MovedKV | None = None
    migrations = 0  # moves of any kind
    losses = 0  # moves after a lost worker: capped
    await _placeable(decode, config.replacement_wait_s, "place")
    while True:
        try:
            async with aclosing(attempt(tuple(sent), moved)) as replies:
                async for reply in replies:
                    if sent:  # the first token was sent already, by an earlier attempt
                        reply = dataclasses.replace(reply, queue_s=None, ttft_s=None)
                    sent.extend(reply.output.new_token_ids)
                    yield reply
            return
        except WorkerLost as e:
            drained = isinstance(e, WorkerDraining)
            moved = e.moved if isinstance(e, WorkerMoved) else None
            if drained:
                reason = "drain"
                logger.info("decode worker draining after %d tokens; resuming elsewhere (%s)",
                            len(sent), "KV moved" if moved else "replay")  # fmt: skip
            else:
                reason = "unreachable" if e.unreachable else "worker_lost"
                if losses >= config.max_migrations:
                    raise WorkerUnavailable(
                        f"the request's decode worker was lost ({e}) after {len(sent)} tokens; "
                        f"it has moved {losses} times already, the most --max-migrations "
                        f"({config.max_migrations}) allows"
                    ) from e
                losses += 1
                logger.warning("decode worker lost after %d tokens (%s); resuming elsewhere "
                               "(move %d of at most %d)", len(sent), e, losses,
                               config.max_migrations)  # fmt: skip
            migrations += 1
            started = time.time()
            await _placeable(decode, config.replacement_wait_s, "resume")
            span.set_attributes({"tandem.migrations": migrations,
                                 "tandem.migration_reason": reason})  # fmt: skip
            record_span("migrate", started, time.time(), span,
                        **{"tandem.migration_reason": reason,
                           "tandem.resumed_tokens": len(sent)})  # fmt: skip
            if on_migration is not None:
                on_migration(reason)


async def _placeable(pool: PoolView, wait_s: float, verb: str) -> None:
    """Return once `pool` has a placeable member, or raise WorkerUnavailable after `wait_s`
    ("no live decode worker to `verb` the request on")."""
    deadline = time.monotonic() + wait_s
    while not any(member.placeable for member in pool.members()):
        if time.monotonic() >= deadline:
            raise WorkerUnavailable(
                f"no live {pool.name} worker to {verb} the request on within {wait_s:g} s"
            )
        await asyncio.sleep(_POLL_S)
