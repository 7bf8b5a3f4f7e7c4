"""The worker actors' common base and the decode (or colocated) worker.

Created by cluster.service with `ray.remote(num_gpus=..., ...)(EngineWorker)`; the classes do
not import Ray, so they are testable in-process. Methods are async: Ray runs them on the
actor's event loop, many requests at once, while the engine thread batches them.

Colocated: `start_generate` prefills and decodes here. Disaggregated: `open_endpoint` lets
prefill workers pair with this one; `start_continue` decodes a request whose prompt KV arrives
from a prefill worker (kvtransfer), starting from the first token the prefill sampled. The
outputs of both reach the router through its one `outputs` subscription (batched).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from contracts.outputs import RequestOutput
from contracts.sampling_params import SamplingParams
from contracts.workers import KVTransferCounters, WorkerInfo, WorkerKey, WorkerStats, new_epoch
from decode_worker.engine_loop import EngineLoop
from decode_worker.outbox import Batch, Outbox
from engine.config import EngineConfig
from engine.engine import Engine
from kvtransfer.channel import PairChannel
from kvtransfer.control import ControlConnection
from kvtransfer.handshake import ClusterSecret
from kvtransfer.layout import KVLayout
from kvtransfer.network import KVAddress, KVNetworkConfig, resolve_kv_address, use_interface
from kvtransfer.pair import EndpointAddress, ReceiverEndpoint
from kvtransfer.staging import StagingPool
from kvtransfer.transport import TransportConfig
from prefix_cache.index import CacheEventBatch, IndexConfig
from prefix_cache.publisher import CacheEventLog, IndexPublisher
from telemetry.tracing import TracingConfig, end_span, record_span, setup_tracing, start_span

logger = logging.getLogger(__name__)

STAGING_BYTES = 256 << 20  # bound on one worker's KV staging buffers (all its pairs)


def transport_for(engine: Engine, host: str = "127.0.0.1") -> TransportConfig:
    """NCCL between GPU workers, gloo between CPU ones; gloo listens on `host` (the worker's
    KV address)."""
    backend = "nccl" if engine.device.type == "cuda" else "gloo"
    return TransportConfig(backend=backend, gloo_hostname=host if backend == "gloo" else None)


def node_ip() -> str:
    """This node's address as the Ray cluster knows it; 127.0.0.1 outside Ray (the classes
    here run in-process in tests)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return "127.0.0.1"
    return str(ray.util.get_node_ip_address())


class WorkerBase:
    """An engine driven by an EngineLoop, with the inspection methods every worker has."""

    def __init__(
        self,
        config: EngineConfig,
        worker_id: str = "worker",
        index: IndexConfig | None = None,
        tracing: TracingConfig | None = None,
        kv_network: KVNetworkConfig | None = None,
    ) -> None:
        """worker_id: stable across replacements (the pool position); index: publish this
        worker's prefix cache to the Redis index of this configuration (None: not to Redis;
        the router may still drain `drain_cache_events`); tracing: export spans there;
        kv_network: where KV pairs connect (default: this node's address, any free port)."""
        self.worker_id = worker_id
        setup_tracing(tracing, worker_id)
        self.kv_network = kv_network or KVNetworkConfig()
        # KV endpoints bind (and advertise) this address; gloo and NCCL use its interface
        self.kv_address: KVAddress = resolve_kv_address(self.kv_network, node_ip())
        use_interface(self.kv_address.interface)
        if config.device in ("cuda", "auto") and torch.cuda.is_available():
            from kvtransfer.nccl import configure_nccl_environment

            configure_nccl_environment()  # before any NCCL pair forms
        self.engine = Engine(config)
        # Each start is a new incarnation: the index never trusts an earlier one's entries.
        self.cache_events = CacheEventLog(WorkerKey(worker_id, new_epoch()))
        self.engine.block_manager.set_cache_listener(self.cache_events.on_cache_event)
        self.publisher: IndexPublisher | None = None
        if index is not None and index.redis_url is not None:
            self.publisher = IndexPublisher(self.cache_events, index)
            self.publisher.start()
        self.loop = EngineLoop(self.engine)
        cache = self.engine.runner.kv_cache
        self.layout = KVLayout.of_cache(cache, self.engine.model_id)
        self.staging = StagingPool(STAGING_BYTES, cache.device, cache.dtype)

    def model_info(self) -> WorkerInfo:
        """What the router needs to validate and place requests for this worker."""
        return WorkerInfo(
            model_id=self.engine.model_id,
            model_spec=self.engine.config.model,
            vocab_size=self.engine.model_config.vocab_size,
            max_model_len=self.engine.max_model_len,
            block_size=self.engine.block_manager.block_size,
            index_key=self.cache_events.worker,
        )

    def drain_cache_events(self, after_seq: int | None) -> CacheEventBatch:
        """This worker's prefix-cache changes since batch `after_seq` (or all of it), for a
        router keeping the index in its own process (no Redis)."""
        return self.cache_events.drain(after_seq)

    async def stats(self) -> WorkerStats:
        """Load figures for placement and metrics (requests in flight, the engine's running
        and waiting sequences, free KV blocks, the sequence cap, preemptions, KV-transfer
        counters) and health (`failure`: why the engine stopped, None while it runs)."""
        if self.loop.failure is not None:
            return WorkerStats(num_requests=self.loop.num_requests, failure=self.loop.failure)

        def read(engine: Engine) -> WorkerStats:
            scheduler = engine.scheduler
            return WorkerStats(
                num_requests=self.loop.num_requests,
                num_running=len(scheduler.running),
                num_waiting=len(scheduler.waiting),
                num_preemptions=scheduler.num_preemptions,
                num_free_blocks=engine.block_manager.num_free_blocks,
                num_blocks=engine.block_manager.num_blocks,
                max_num_seqs=engine.scheduler.config.max_num_seqs,
            )

        stats = await asyncio.to_thread(self.loop.call, read)
        transfers = self._transfer_metrics()
        kv = KVTransferCounters(
            pairs=len(transfers) - 1,  # less the retired pairs' counters
            pairs_refused_by_reason=self._pairs_refused(),
            transfers_completed=sum(m.transfers_completed for m in transfers),
            transfers_failed=sum(m.transfers_failed for m in transfers),
            leases_expired=sum(m.leases_expired for m in transfers),
            bytes_sent=sum(m.bytes_sent for m in transfers),
            bytes_received=sum(m.bytes_received for m in transfers),
            transfer_seconds=sum(m.transfer_seconds_total for m in transfers),
        )
        return dataclasses.replace(stats, kv=kv)

    def shutdown(self) -> None:
        """Stop the engine and take this worker's entries out of the prefix index."""
        self.loop.stop()
        if self.publisher is not None:
            self.publisher.stop(remove_entries=True)

    def abort(self, request_id: str) -> None:
        """Abort a request, here now or arriving later (a cancel can overtake its request)."""
        self.loop.abort(request_id)

    async def check_integrity(self) -> None:
        """Assert the engine's KV bookkeeping is consistent (tests call it after each case);
        KV that transfers hold legitimately right now is not counted as leaked."""

        def check(engine: Engine) -> None:
            engine.check_integrity(holders=self._transfer_holders())

        await asyncio.to_thread(self.loop.call, check)

    def _transfer_metrics(self) -> list[Any]:
        return [self.loop.retired_metrics, *(r.metrics for r in self.loop.receivers)]

    def _pairs_refused(self) -> dict[str, int]:
        return {}

    def _transfer_holders(self) -> list[str]:
        return self.loop.transfer_holders()

    async def _traced(
        self,
        name: str,
        request_id: str,
        carrier: dict[str, str] | None,
        outputs: AsyncIterator[RequestOutput],
        prefilled_here: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Pass a request's outputs through, recording its span on this worker (a child of
        the router's, from `carrier`): "queue" and "compute" up to the first output (when the
        prompt is prefilled here; else "queue" is the wait for the KV and a decode slot),
        then "stream" to the last."""
        start = time.time()
        span = start_span(name, carrier, **{"tandem.request_id": request_id,
                                            "tandem.worker": self.worker_id})  # fmt: skip
        first_at: float | None = None
        last: RequestOutput | None = None
        error: BaseException | None = None
        count = 0
        try:
            async for output in outputs:
                if first_at is None:
                    first_at = time.time()
                    if prefilled_here:
                        queued = min(start + output.usage.queue_seconds, first_at)
                        record_span("queue", start, queued, span)
                        record_span("compute", queued, first_at, span)
                    else:
                        record_span("queue", start, first_at, span)
                last = output
                count += 1
                yield output
        except BaseException as e:  # failed, or abandoned (cancelled) mid-stream
            error = e
            raise
        finally:
            if first_at is not None and (count > 1 or not prefilled_here):
                record_span("stream", first_at, time.time(), span)
            usage = {} if last is None else {
                "tandem.prompt_tokens": last.usage.prompt_tokens,
                "tandem.cached_tokens": last.usage.cached_tokens,
                "tandem.completion_tokens": last.usage.completion_tokens,
            }  # fmt: skip
            end_span(span, error, **usage)

    async def _stream(self, request_id: str, stream: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        """Yield a request's outputs until the finished one; abort it if abandoned."""
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # cancelled or abandoned mid-stream
                self.loop.abort(request_id)


class EngineWorker(WorkerBase):
    """A decode worker; in colocated mode it prefills too.

    A router subscribes once (`outputs`, a long-lived streaming call) and then starts requests
    with plain calls (`start_generate`, `start_continue`); every request's outputs come back
    through the subscription, batched (see decode_worker.outbox)."""

    _endpoint: ReceiverEndpoint | None = None  # once prefill workers may pair with it

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
        params: dict[str, Any],
        cache_salt: str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> None:
        """Prefill and decode here (colocated); the outputs go to `subscriber`. Raises
        WorkerUnavailable if the engine has stopped; the engine's refusal of the request
        (a typed error) arrives as its one item."""
        sampling = SamplingParams(**params)
        stream = self.loop.submit(request_id, prompt_token_ids, sampling, cache_salt)
        outputs = self._traced(
            "tandem.generate", request_id, trace_context, self._stream(request_id, stream)
        )
        self._forward(subscriber, request_id, outputs)

    async def start_continue(
        self,
        subscriber: str,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        params: dict[str, Any],
        cache_salt: str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> None:
        """Decode a request prefilled elsewhere, once its KV has arrived (disaggregated); the
        outputs after the first token go to `subscriber`. A request whose KV does not arrive
        in time ends with WorkerUnavailable."""
        sampling = SamplingParams(**params)
        stream = self.loop.submit(
            request_id, prompt_token_ids, sampling, cache_salt, first_token_id=first_token_id
        )
        outputs = self._traced(
            "tandem.decode", request_id, trace_context, self._stream(request_id, stream),
            prefilled_here=False,
        )  # fmt: skip
        self._forward(subscriber, request_id, outputs)

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

        cache = self.engine.runner.kv_cache
        manager = self.engine.block_manager
        receiver = KVReceiver(
            channel, control, cache, self.layout, manager.reserve, manager.release, self.staging
        )
        self.loop.receivers.append(receiver)
        self.loop.wake()
