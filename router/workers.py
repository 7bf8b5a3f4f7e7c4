"""The router's view of one worker: the calls it makes, and nothing of how they travel.

`WorkerClient` is implemented over a Ray actor by the control plane (cluster.workers) and
by plain objects in the router's unit tests. Every call raises the worker's own typed errors
(contracts.errors) as themselves and `WorkerLost` when the worker died or cannot be reached;
cancelling a call's task cancels the call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from contracts.handoff import PrefillResult
from contracts.outputs import RequestOutput
from contracts.sampling_params import SamplingParams

# One batch of a worker's output stream: (attempt id, its next output or the error that ended it)
OutputBatch = Sequence[tuple[str, "RequestOutput | BaseException"]]


class WorkerClient(Protocol):
    """What the router calls on a worker. `key` names this incarnation (a replacement has a
    new one); `worker_id` is the pool position it holds, kept across replacements."""

    @property
    def key(self) -> str: ...

    @property
    def worker_id(self) -> str: ...

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
        """Prefill and decode here; the outputs arrive on `subscriber`'s stream.
        resumed_token_ids: a replay after a lost worker (router.failover): the output tokens
        already streamed; generation goes on after them."""
        ...

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
        """Take over a request prefilled elsewhere: its outputs from the first token's on
        arrive on `subscriber`'s stream (the KV named by `prefill.kv` joins when it lands)."""
        ...

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
        """Prefill a request, its KV shipped to decode worker `ship_to` (None: nowhere), less
        its first `decode_cached_tokens` (whole blocks that worker holds in its prefix
        cache); resumed_token_ids: prefilled after the prompt (a replay)."""
        ...

    async def move_out(self, moves: Sequence[tuple[str, str]]) -> list[str]:
        """A draining decode worker: move each (request id, decode worker id) there with its
        KV (issue 22.3); the ids moved, whose streams here end with WorkerMoved after their
        last output. The others are left running here (the router replays them)."""
        ...

    def abort(self, request_id: str) -> None:
        """Tell the worker to abort a request (fire and forget; a lost worker is ignored)."""
        ...

    def outputs(self, subscriber: str) -> AsyncIterator[OutputBatch]:
        """The outputs of every request started for `subscriber`, batched, until the stream
        ends (the worker stopped) or fails (WorkerLost)."""
        ...
