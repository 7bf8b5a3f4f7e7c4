"""The decode (or colocated) worker actor, `EngineWorker`.

Colocated: `start_generate` prefills and decodes here. Disaggregated: `open_endpoint` lets
prefill workers pair with this one, and `start_continue` takes over a request prefilled
elsewhere from its `PrefillResult`: this worker turns every token into text, the first
included, and joins the request to its batch once its KV has arrived (kv_arrivals). Outputs
reach the router through its one batched `outputs` subscription. A drain moves its running
requests' KV to other decode workers (`connect` forms the pair, `move_out` ships, issue 22.3):
the same handoff, this worker as the sender. Imports neither Ray nor torch at module level;
docs/architecture.md has the handoff.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from contracts.errors import WorkerDraining, WorkerMoved
from contracts.handoff import KVHandle, MovedKV, PrefillResult
from contracts.sampling_params import SamplingParams
from worker.base import WorkerBase, transport_for
from worker.outbox import Batch, Outbox

if TYPE_CHECKING:
    from decode_worker.kv_arrivals import KVArrivals
    from engine.engine import Engine, KeptKV
    from kvtransfer.control import ControlConnection
    from kvtransfer.pair import EndpointAddress, ReceiverEndpoint
    from kvtransfer.sender import KVSender
    from kvtransfer.transport import PairChannel

logger = logging.getLogger(__name__)

_MOVE_POLL_S = 0.02  # how often finish_moves looks at the transfers still running


class EngineWorker(WorkerBase):
    """A decode worker; in colocated mode it prefills too.

    A router subscribes once (`outputs`, a long-lived streaming call) and then starts requests
    with plain calls (`start_generate`, `start_continue`); every request's outputs come back
    through the subscription, batched (see worker.outbox)."""

    _endpoint: ReceiverEndpoint | None = None  # once prefill workers may pair with it
    arrivals: KVArrivals

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from kvtransfer.protocol import TransferMetrics

        super().__init__(*args, **kwargs)
        self._outboxes: dict[str, Outbox] = {}  # subscriber (router) -> its pending outputs
        self._forwarders: set[asyncio.Task[None]] = set()
        self.senders: dict[str, KVSender] = {}  # by decode worker id: where a drain moves KV
        self.retired_send_metrics = TransferMetrics()  # of senders closed since
        self._move_faults = 0  # moves still to fail on purpose (inject_move_faults) ...
        self._move_fault_kind = "abort"  # ... and how
        self._held_moves: list[str] = []  # owners of KV a "hold" fault never shipped

    async def outputs(self, subscriber: str) -> AsyncIterator[Batch]:
        """The outputs of `subscriber`'s requests, in batches of (request id, RequestOutput
        or the exception that ended the request); a request's last item is a finished
        output or an exception. Runs until the subscriber goes away: its requests are then
        aborted (nobody would read them)."""
        outbox = self._outbox(subscriber)
        try:
            while True:
                yield await outbox.take()
        finally:
            outbox.closed = True
            if self._outboxes.get(subscriber) is outbox:
                del self._outboxes[subscriber]
            for request_id in list(outbox.requests):
                self.loop.abort(request_id)

    async def start_generate(
        self,
        subscriber: str,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        trace_context: dict[str, str] | None = None,
        resumed_token_ids: tuple[int, ...] = (),
    ) -> None:
        """Prefill and decode here (colocated); the outputs go to `subscriber`. Raises
        WorkerUnavailable if the engine has stopped; the engine's refusal of the request
        (a typed error) arrives as its one item. resumed_token_ids: a replay of a request
        whose worker was lost: the output tokens it streamed there (Engine.add_request)."""
        stream = self.loop.submit(
            request_id, prompt_token_ids, params, cache_salt, resumed_token_ids=resumed_token_ids
        )
        outputs = self._traced(
            "tandem.generate", request_id, trace_context, self._stream(request_id, stream)
        )
        self._forward(subscriber, request_id, outputs)

    async def start_continue(
        self,
        subscriber: str,
        request_id: str,
        prompt_token_ids: list[int],
        prefill: PrefillResult,
        params: SamplingParams,
        cache_salt: str | None = None,
        trace_context: dict[str, str] | None = None,
        resumed_token_ids: tuple[int, ...] = (),
    ) -> None:
        """Take over a request prefilled elsewhere (disaggregated); its outputs, from the
        first token's (sent at once, without waiting for the KV) to the last, go to
        `subscriber`. A request whose KV fails or does not arrive in time is prefilled again
        here (kv_arrivals); KV sent for a request the first token ended is freed here.
        resumed_token_ids: as start_generate's; the prefill covered them."""
        stream = self.arrivals.submit(
            self.loop, request_id, prompt_token_ids, prefill, params, cache_salt,
            resumed_token_ids=resumed_token_ids,
        )  # fmt: skip
        outputs = self._traced(
            "tandem.decode", request_id, trace_context, self._stream(request_id, stream),
            prefilled_here=False,
        )  # fmt: skip
        self._forward(subscriber, request_id, outputs)

    def _role(self) -> KVArrivals:
        from decode_worker.kv_arrivals import KVArrivals

        self.arrivals = KVArrivals(self.engine.block_manager.release, self.prompt_kv)
        return self.arrivals

    def _transfer_metrics(self) -> list[Any]:
        receivers = [r.metrics for r in self.arrivals.receivers]
        senders = [s.metrics for s in self.senders.values()]
        return [self.arrivals.retired_metrics, self.retired_send_metrics, *receivers, *senders]

    def _transfer_holders(self) -> list[str]:
        moving = [owner for s in list(self.senders.values()) for owner in s.owners()]
        return moving + self._held_moves + super()._transfer_holders()

    async def connect(self, peer_id: str, address: EndpointAddress, pair_key: str) -> None:
        """Form the pair through which a drain of this worker moves its running requests' KV
        to decode worker `peer_id` (replacing an older one), proving the cluster secret;
        within the transport's connect timeout, or KVTransferError."""
        config = transport_for(self.engine, self.kv_address.host)
        sender = await self._open_sender(address, pair_key, config)
        old = self.senders.get(peer_id)
        self.senders[peer_id] = sender
        if old is not None:
            await self._close_sender(old)

    async def disconnect(self, peer_id: str) -> None:
        """Close the pair with decode worker `peer_id` (it left the pool)."""
        sender = self.senders.pop(peer_id, None)
        if sender is not None:
            await self._close_sender(sender)

    async def _close_sender(self, sender: KVSender) -> None:
        await asyncio.to_thread(sender.close)
        self.retired_send_metrics.absorb(sender.metrics)

    async def move_out(self, moves: Sequence[tuple[str, str]]) -> list[str]:
        """Move running requests off this (draining) worker, each (request id, decode worker
        id) to that worker's pair: at a step boundary the request leaves the engine with its
        KV pinned (Engine.export_request), the KV is submitted to the pair's KVSender under a
        new transfer id, and the request's stream here ends with WorkerMoved (its MovedKV)
        after its last output. Returns the ids moved; the others are left running here (not
        running with their KV computed, no pair with that worker: the router replays them).
        A submit refused after the request left the engine ends its stream with
        WorkerDraining (replayed too)."""
        export = functools.partial(self._export, list(moves))
        moved: list[str] = await asyncio.to_thread(self.loop.call, export)
        return moved

    def _export(self, moves: list[tuple[str, str]], engine: Engine) -> list[str]:
        """move_out's work, on the engine thread."""
        moved = []
        for request_id, peer_id in moves:
            sender = self.senders.get(peer_id)
            if sender is None or not self.loop.has_stream(request_id):
                continue
            done = engine.export_request(request_id)
            if done is None:
                continue
            kept = done.kv
            handle = KVHandle(
                uuid.uuid4().hex, self.worker_id, peer_id, kept.num_tokens,
                num_blocks=len(kept.block_ids),
            )  # fmt: skip
            try:
                self._ship(request_id, sender, kept, handle)
            except ValueError as e:  # refused: the blocks are still ours; replay it
                engine.block_manager.release(kept.owner)
                logger.warning("request %s: its KV move was refused (%s); replaying it",
                               request_id, e)  # fmt: skip
                self.loop.deliver(request_id, WorkerDraining(f"KV move refused: {e}"), True)
                continue
            result = PrefillResult(done.first_token_id, None, done.usage, handle)
            moved_kv = MovedKV(request_id, done.usage.completion_tokens, result)
            error = WorkerMoved(f"KV moved to decode worker {peer_id}", moved_kv)
            self.loop.deliver(request_id, error, done=True)
            moved.append(request_id)
        return moved

    def _ship(self, request_id: str, sender: KVSender, kept: KeptKV, handle: KVHandle) -> None:
        """Submit a moved request's pinned KV to `sender` under `handle` (engine thread),
        failing it on purpose if a fault is injected. Raises ValueError if refused."""
        if self._move_faults > 0 and self._move_fault_kind == "hold":
            self._move_faults -= 1  # never offered: pinned here until this worker stops
            self._held_moves.append(kept.owner)
            return
        sender.submit(
            request_id, kept.owner, kept.transfer_block_ids, kept.num_tokens,
            transfer_id=handle.transfer_id,
        )  # fmt: skip
        self.prompt_kv.tokens_sent += kept.num_tokens
        self.prompt_kv.blocks_sent += len(kept.block_ids)
        if self._move_faults > 0:
            self._move_faults -= 1
            sender.abort(handle.transfer_id, "injected fault")

    async def finish_moves(self, timeout_s: float) -> bool:
        """Wait until every KV move this worker submitted is over (acknowledged by its
        receiver, failed, or past its lease): before it stops. False if some still ran
        after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while any(s.owners() for s in list(self.senders.values())):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_MOVE_POLL_S)
        return True

    def inject_move_faults(self, count: int, kind: str = "abort") -> None:
        """Fault injection for tests: the next `count` KV moves (move_out) fail. kind
        "abort": aborted by this worker's sender just after they are submitted, as a failing
        transfer ends; "hold": never offered, their KV kept pinned here, as a worker that
        stalls before shipping (the drain then stops it: its pairs fail). Either way the
        receiving worker recomputes those requests (kv_arrivals)."""
        if type(count) is not int or count < 0:
            raise ValueError(f"count={count!r} must be an int >= 0")
        if kind not in ("abort", "hold"):
            raise ValueError(f"kind={kind!r} must be 'abort' or 'hold'")
        self._move_faults, self._move_fault_kind = count, kind

    def _prompts_recomputed(self) -> dict[str, int]:
        return dict(self.arrivals.num_recomputed)

    def _outbox(self, subscriber: str) -> Outbox:
        outbox = self._outboxes.get(subscriber)
        if outbox is None:
            outbox = self._outboxes[subscriber] = Outbox()
        return outbox

    def _forward(self, subscriber: str, request_id: str, outputs: AsyncIterator[Any]) -> None:
        task = self._outbox(subscriber).forward(request_id, outputs)
        self._forwarders.add(task)
        task.add_done_callback(self._forwarders.discard)

    def open_endpoint(self, host: str | None = None) -> EndpointAddress:
        """Start accepting pairs from prefill workers (who must prove the cluster secret);
        the address they connect to. Its listeners bind `host` only (default: this worker's
        KV address). Raises ValueError if no cluster secret is configured."""
        if self._endpoint is None:
            from kvtransfer.handshake import ClusterSecret
            from kvtransfer.pair import ReceiverEndpoint

            host = host or self.kv_address.host
            endpoint = ReceiverEndpoint(
                host, ClusterSecret.from_environment(), self.kv_network, self.layout
            )  # senders check the layout
            config = transport_for(self.engine, host)
            endpoint.serve(config, self.engine.runner.kv_cache.device, self._adopt_pair)
            self._endpoint = endpoint
        return self._endpoint.address

    def shutdown(self) -> None:
        """Stop taking pairs and close this worker's own (drain moves), then stop as every
        worker does."""
        if self._endpoint is not None:
            self._endpoint.close()
        for sender in self.senders.values():
            sender.close()
        super().shutdown()

    def _pairs_refused(self) -> dict[str, int]:
        return {} if self._endpoint is None else self._endpoint.refused_by_reason

    def _adopt_pair(self, channel: PairChannel, control: ControlConnection) -> None:
        """A pair formed (on its forming thread): receive its transfers from now on."""
        from kvtransfer.receiver import KVReceiver

        cache = self.transfer_cache()
        engine = self.engine
        receiver = KVReceiver(
            channel, control, cache, self.layout, engine.reserve_transfer,
            engine.block_manager.release, self.staging, wait_for_room=engine.may_wait_for_room,
        )  # fmt: skip
        self.arrivals.receivers.append(receiver)
        self.loop.wake()
