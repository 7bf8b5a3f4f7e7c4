"""The router's worker client over a Ray actor (router.workers.WorkerClient).

Turns Ray's outcomes into Tandem's: a worker's typed error arrives as itself, a dead actor as
`WorkerLost`, an unreachable one as `WorkerLost(unreachable=True)`, anything else as a plain
TandemError (INTERNAL); cancelling a call's task cancels the Ray call and aborts the request
on the worker. The control plane reaches the actor's other methods through `actor`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from contracts.errors import TandemError, WorkerLost
from contracts.handoff import PrefillResult
from contracts.sampling_params import SamplingParams
from router.placement import Member
from router.workers import OutputBatch

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RayWorkerClient:
    """One worker actor (decode_worker.actor.EngineWorker or prefill_worker.actor.
    PrefillWorker) as the router calls it."""

    def __init__(self, actor: Any, worker_id: str) -> None:
        self.actor = actor
        self._worker_id = worker_id
        self._key = actor._actor_id.hex()

    @property
    def key(self) -> str:
        return self._key

    @property
    def worker_id(self) -> str:
        return self._worker_id

    def __repr__(self) -> str:
        return f"RayWorkerClient({self._worker_id}, actor {self._key[:8]})"

    async def start_generate(
        self,
        subscriber: str,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None,
        trace_context: dict[str, str] | None,
        resumed_token_ids: tuple[int, ...] = (),
    ) -> None:
        await self._call(
            self.actor.start_generate.remote(
                subscriber, request_id, prompt_token_ids, params, cache_salt,
                trace_context, resumed_token_ids,
            )
        )  # fmt: skip

    async def start_continue(
        self,
        subscriber: str,
        request_id: str,
        prompt_token_ids: list[int],
        prefill: PrefillResult,
        params: SamplingParams,
        cache_salt: str | None,
        trace_context: dict[str, str] | None,
        resumed_token_ids: tuple[int, ...] = (),
    ) -> None:
        await self._call(
            self.actor.start_continue.remote(
                subscriber, request_id, prompt_token_ids, prefill, params,
                cache_salt, trace_context, resumed_token_ids,
            )
        )  # fmt: skip

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None,
        ship_to: str | None,
        trace_context: dict[str, str] | None,
        decode_cached_tokens: int = 0,
        resumed_token_ids: tuple[int, ...] = (),
    ) -> PrefillResult:
        call = self.actor.prefill.remote(
            request_id, prompt_token_ids, params, cache_salt, ship_to,
            trace_context, decode_cached_tokens, resumed_token_ids,
        )  # fmt: skip
        try:
            result: PrefillResult = await self._call(call)
        except asyncio.CancelledError:
            self._cancel(call, request_id)
            raise
        return result

    async def move_out(self, moves: Sequence[tuple[str, str]]) -> list[str]:
        moved: list[str] = await self._call(self.actor.move_out.remote(list(moves)))
        return moved

    def abort(self, request_id: str) -> None:
        try:
            self.actor.abort.remote(request_id)
        except Exception:  # the worker is gone: nothing left to stop
            logger.debug("abort on a lost worker", exc_info=True)

    async def outputs(self, subscriber: str) -> AsyncIterator[OutputBatch]:
        stream = self.actor.outputs.options(num_returns="streaming").remote(subscriber)
        try:
            async for ref in stream:
                yield await self._call(ref)
        except TandemError:
            raise
        except Exception as e:  # the stream itself failed: the worker is gone
            raise translate(e) from e

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise translate(e) from e

    def _cancel(self, call: Any, request_id: str) -> None:
        """Cancel a call in flight and abort its request (which also covers a call that has
        not reached the worker yet)."""
        import ray

        try:
            ray.cancel(call)
        except Exception:  # already finished: the abort below still frees what it left
            logger.debug("cancel of a finished call", exc_info=True)
        self.abort(request_id)


def translate(error: BaseException) -> TandemError:
    """A worker's typed error as itself, a dead or unreachable worker as WorkerLost, anything
    else as a plain TandemError (INTERNAL)."""
    import ray  # here, not at import: importing the control plane stays cheap

    if isinstance(error, TandemError):
        return error
    if isinstance(error, ray.exceptions.ActorUnavailableError):
        return WorkerLost(f"worker unreachable: {type(error).__name__}", unreachable=True)
    if isinstance(error, ray.exceptions.ActorDiedError):
        return WorkerLost(f"worker lost: {type(error).__name__}")
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause if isinstance(error.cause, BaseException) else None
        if isinstance(cause, TandemError):
            return cause
    logger.error("unexpected error from a worker", exc_info=error)
    return TandemError(f"internal error: {type(error).__name__}")


def actor_of(member: Member) -> Any:
    """The Ray actor behind a pool member (the control plane calls its other methods)."""
    client = member.client
    assert isinstance(client, RayWorkerClient), client
    return client.actor
