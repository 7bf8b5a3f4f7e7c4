"""The decode (or colocated) worker actor, `EngineWorker`.

Colocated: `start_generate` prefills and decodes here. Disaggregated: `open_endpoint` lets
prefill workers pair with this one, and `start_continue` takes over a request prefilled
elsewhere from its `PrefillResult`: this worker turns every token into text, the first
included, and joins the request to its batch once its KV has arrived (kv_arrivals). Outputs
reach the router through its one batched `outputs` subscription. Imports neither Ray nor
torch at module level; docs/architecture.md has the handoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from contracts.handoff import PrefillResult
from contracts.sampling_params import SamplingParams
from worker.base import WorkerBase, transport_for
from worker.outbox import Batch, Outbox

if TYPE_CHECKING:
    from decode_worker.kv_arrivals import KVArrivals
    from kvtransfer.control import ControlConnection
    from kvtransfer.pair import EndpointAddress, ReceiverEndpoint
    from kvtransfer.transport import PairChannel


class EngineWorker(WorkerBase):
    """A decode worker; in colocated mode it prefills too.

    A router subscribes once (`outputs`, a long-lived streaming call) and then starts requests
    with plain calls (`start_generate`, `start_continue`); every request's outputs come back
    through the subscription, batched (see worker.outbox)."""

    _endpoint: ReceiverEndpoint | None = None  # once prefill workers may pair with it
    arrivals: KVArrivals

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outboxes: dict[str, Outbox] = {}  # subscriber (router) -> its pending outputs
        self._forwarders: set[asyncio.Task[None]] = set()

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
        return [self.arrivals.retired_metrics, *(r.metrics for r in self.arrivals.receivers)]

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
        """Stop taking pairs, then stop as every worker does."""
        if self._endpoint is not None:
            self._endpoint.close()
        super().shutdown()

    def _pairs_refused(self) -> dict[str, int]:
        return {} if self._endpoint is None else self._endpoint.refused_by_reason

    def _adopt_pair(self, channel: PairChannel, control: ControlConnection) -> None:
        """A pair formed (on its forming thread): receive its transfers from now on."""
        from kvtransfer.receiver import KVReceiver

        cache = self.transfer_cache()
        manager = self.engine.block_manager
        receiver = KVReceiver(
            channel, control, cache, self.layout, manager.reserve, manager.release, self.staging
        )
        self.arrivals.receivers.append(receiver)
        self.loop.wake()
