"""The prefill worker actor, `PrefillWorker`.

`prefill(request, ship_to)` runs the prompt `prefill_only` (batched, chunked): the engine
samples the first token and holds the KV (held_kv); no text, no finish decided here. The KV
goes to the KVSender of decode worker `ship_to` under a transfer id minted here, once, and a
`PrefillResult` returns to the router (ship_to None: the KV is released, nothing ships).
Pairs form on demand (`connect`, called by the control plane). No torch at module level.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from contracts.errors import InvalidRequest, RequestAborted, WorkerUnavailable
from contracts.handoff import KVHandle, PrefillResult
from contracts.sampling_params import SamplingParams
from engine.config import EngineConfig
from kvtransfer.network import KVNetworkConfig
from prefill_worker.held_kv import HeldKV
from prefix_cache.index import IndexConfig
from telemetry.tracing import TracingConfig, record_span
from worker.base import WorkerBase, transport_for

if TYPE_CHECKING:
    from engine.engine import Prefilled
    from kvtransfer.pair import EndpointAddress
    from kvtransfer.protocol import TransferMetrics, TransferResult
    from kvtransfer.sender import KVSender


class PrefillWorker(WorkerBase):
    held: HeldKV

    def __init__(
        self,
        config: EngineConfig,
        worker_id: str = "prefill",
        index: IndexConfig | None = None,
        tracing: TracingConfig | None = None,
        kv_network: KVNetworkConfig | None = None,
    ) -> None:
        from kvtransfer.protocol import TransferMetrics

        super().__init__(config, worker_id, index, tracing, kv_network)
        self.senders: dict[str, KVSender] = {}  # by decode worker id
        self.retired_metrics: TransferMetrics = TransferMetrics()  # of senders closed since
        self._shipping: dict[str, tuple[str, str]] = {}  # request id -> (decode id, transfer id)
        self._kv_faults = 0  # transfers still to fail on purpose (inject_kv_faults) ...
        self._kv_fault_kind = "abort"  # ... and how

    def _role(self) -> HeldKV:
        self.held = HeldKV(self.engine.block_manager.release)
        return self.held

    def _transfer_metrics(self) -> list[Any]:
        return [self.retired_metrics, *(s.metrics for s in self.senders.values())]

    def _transfer_holders(self) -> list[str]:
        shipping = [owner for s in self.senders.values() for owner in s.owners()]
        return shipping + super()._transfer_holders()

    async def connect(self, decode_id: str, address: EndpointAddress, pair_key: str) -> None:
        """Form the pair with decode worker `decode_id` (replacing an older one), proving the
        cluster secret; within the transport's connect timeout, or KVTransferError."""
        config = transport_for(self.engine, self.kv_address.host)
        sender = await self._open_sender(address, pair_key, config)
        old = self.senders.get(decode_id)
        self.senders[decode_id] = sender
        if old is not None:
            await asyncio.to_thread(old.close)
            self.retired_metrics.absorb(old.metrics)

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None,
        ship_to: str | None,
        trace_context: dict[str, str] | None = None,
        decode_cached_tokens: int = 0,
        resumed_token_ids: tuple[int, ...] = (),
    ) -> PrefillResult:
        """Prefill a request and ship its KV to decode worker `ship_to` (None: ship nothing):
        all of it, or with `decode_cached_tokens` (a whole number of blocks the decode worker
        holds in its prefix cache) only the blocks after those. The prompt is computed here
        as far as this worker's own prefix cache does not hold it. resumed_token_ids: a replay
        (Engine.add_request): they are prefilled with the prompt, their KV ships with its, and
        the result's first token is the one after them. Raises InvalidRequest for a bad
        `decode_cached_tokens`, WorkerUnavailable if there is no pair with `ship_to`, the
        engine's refusal of the request (a typed error), RequestAborted if aborted.
        Cancelling aborts it."""
        _check_decode_cached(decode_cached_tokens, len(prompt_token_ids), self.block_size)
        stream = self.loop.submit(
            request_id, prompt_token_ids, params, cache_salt, prefill_only=True,
            resumed_token_ids=resumed_token_ids,
        )  # fmt: skip
        outputs = self._stream(request_id, stream)
        try:
            async for _ in self._traced("tandem.prefill", request_id, trace_context, outputs):
                pass
        except BaseException:  # cancelled or failed: its KV, if any is held, is nobody's
            self._release(self.held.take(request_id))
            raise
        done = self.held.take(request_id)
        if done is None:  # aborted as it finished: the abort freed its KV
            raise RequestAborted("aborted")
        kv = None
        if ship_to is not None:
            kv = self._ship(done, ship_to, trace_context, decode_cached_tokens)
        if kv is None:
            self._release(done)
        return PrefillResult(done.first_token_id, done.logprobs, done.usage, kv)

    @property
    def block_size(self) -> int:
        return self.engine.block_manager.block_size

    def _ship(
        self,
        done: Prefilled,
        decode_id: str,
        trace_context: dict[str, str] | None,
        decode_cached_tokens: int = 0,
    ) -> KVHandle:
        """Submit a finished prefill's KV to the pair with `decode_id`, less its first
        `decode_cached_tokens` (the decode worker's); its handle. On any error the KV is
        released before it is raised."""
        sender = self.senders.get(decode_id)
        if sender is None:
            self._release(done)
            raise WorkerUnavailable(f"no KV pair with decode worker {decode_id!r}")
        request_id = done.request_id
        if decode_cached_tokens:
            done = self._suffix_of(done, decode_cached_tokens)
        kept = done.kv
        handle = KVHandle(
            uuid.uuid4().hex, self.worker_id, decode_id, kept.num_tokens,
            start_token=decode_cached_tokens, num_blocks=len(kept.block_ids),
        )  # fmt: skip
        if self._kv_faults > 0 and self._kv_fault_kind == "hold":
            self._kv_faults -= 1  # never offered: the KV stays pinned here until this worker
            return handle  # dies (the fault the test injects next)
        self._shipping[request_id] = (decode_id, handle.transfer_id)
        try:
            sender.submit(
                request_id, kept.owner, kept.transfer_block_ids, kept.num_tokens,
                transfer_id=handle.transfer_id,
                on_done=self._transfer_done(request_id, trace_context),
            )  # fmt: skip
        except ValueError:  # refused: the blocks are still ours
            self._shipping.pop(request_id, None)
            self._release(done)
            raise
        self.prompt_kv.tokens_sent += kept.num_tokens
        self.prompt_kv.blocks_sent += len(kept.block_ids)
        if self._kv_faults > 0:
            self._kv_faults -= 1
            sender.abort(handle.transfer_id, "injected fault")
        return handle

    def _suffix_of(self, done: Prefilled, num_skipped_tokens: int) -> Prefilled:
        """The same prefill holding only the blocks after its first `num_skipped_tokens`
        (the others go back to this worker's cache at once, with their staging blocks)."""
        suffix = self.engine.kept_suffix(done.kv, num_skipped_tokens // self.block_size)
        return dataclasses.replace(done, kv=suffix)

    def inject_kv_faults(self, count: int, kind: str = "abort") -> None:
        """Fault injection for tests (docs/reliability.md, T1): the next `count` KV transfers
        this worker ships fail. kind "abort": aborted just after they are submitted, as a
        failing transfer ends; "hold": never offered, their KV kept pinned, as a worker that
        stalls before shipping (then dies: the test kills it)."""
        if type(count) is not int or count < 0:
            raise ValueError(f"count={count!r} must be an int >= 0")
        if kind not in ("abort", "hold"):
            raise ValueError(f"kind={kind!r} must be 'abort' or 'hold'")
        self._kv_faults, self._kv_fault_kind = count, kind

    def _release(self, done: Prefilled | None) -> None:
        if done is not None:
            self.engine.block_manager.release(done.kv.owner)

    def abort(self, request_id: str) -> None:
        """Abort a request: its prefill (here now or arriving later) and, if its KV is being
        shipped, the transfer (the decode worker frees what it reserved for it)."""
        super().abort(request_id)
        shipping = self._shipping.get(request_id)
        if shipping is not None:
            sender = self.senders.get(shipping[0])
            if sender is not None:
                sender.abort(shipping[1], "request cancelled")

    async def disconnect(self, decode_id: str) -> None:
        """Close the pair with a decode worker that left the pool (its transfers are over)."""
        sender = self.senders.pop(decode_id, None)
        if sender is not None:
            await asyncio.to_thread(sender.close)
            self.retired_metrics.absorb(sender.metrics)

    def _transfer_done(
        self, request_id: str, carrier: dict[str, str] | None
    ) -> Callable[[TransferResult], None]:
        """Forget a finished transfer and record it as a span of the request's trace (on the
        sender's thread)."""
        worker_id = self.worker_id

        def done(result: TransferResult) -> None:
            self._shipping.pop(request_id, None)
            if carrier is None:
                return
            end = time.time()
            record_span(
                "tandem.kv_transfer", end - result.seconds, end, carrier,
                **{"tandem.request_id": result.request_id, "tandem.worker": worker_id,
                   "tandem.kv_bytes": result.num_bytes, "tandem.status": result.status.value},
            )  # fmt: skip

        return done


def _check_decode_cached(num_tokens: object, num_prompt_tokens: int, block_size: int) -> None:
    """A decode worker's cached prefix must be whole blocks leaving >= 1 prompt token."""
    if (
        type(num_tokens) is not int
        or num_tokens % block_size
        or not (0 <= num_tokens < num_prompt_tokens)
    ):
        raise InvalidRequest(
            "decode_cached_tokens",
            f"{num_tokens!r} must be a multiple of the block size {block_size} in "
            f"[0, {num_prompt_tokens}) (the prompt's tokens)",
        )
