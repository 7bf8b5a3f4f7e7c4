"""The actor base every worker role builds on: an engine driven by an EngineLoop, with the
inspection methods every worker has (model info, stats, integrity, prefix-cache events), and
the helpers both roles need to form KV pairs (`transport_for`, `node_ip`).

The classes here and in the roles' actor modules do not import Ray, so they are testable
in-process; nor torch at import: cluster.service imports the actor modules where it creates
the Ray actors (the router's process), and the engine loads only when an actor is constructed
in its own process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from contracts.errors import InvalidRequest, KVTransferError
from contracts.outputs import RequestOutput
from contracts.workers import KVTransferCounters, WorkerInfo, WorkerKey, WorkerStats, new_epoch
from kvtransfer.network import KVAddress, KVNetworkConfig, resolve_kv_address, use_interface
from prefix_cache.index import CacheEventBatch, IndexConfig
from prefix_cache.publisher import CacheEventLog, IndexPublisher
from telemetry.tracing import TracingConfig, end_span, record_span, setup_tracing, start_span
from worker.engine_loop import EngineLoop, LoopRole

if TYPE_CHECKING:
    import torch

    from engine.config import EngineConfig
    from engine.engine import Engine
    from kvtransfer.layout import KVLayout
    from kvtransfer.sender import KVSender
    from kvtransfer.transport import TransportConfig

logger = logging.getLogger(__name__)

STAGING_BYTES = 256 << 20  # bound on one worker's KV staging buffers (all its pairs)


@dataclass(slots=True)
class PromptKVCounts:
    """Prompt KV a worker shipped, attached or reused, in tokens and blocks (since it started;
    the KV-transfer counters of its WorkerStats). Written by one thread, read by any."""

    tokens_sent: int = 0  # prefill side: submitted to a pair
    blocks_sent: int = 0
    tokens_received: int = 0  # decode side: arrived and attached to its request
    blocks_received: int = 0
    tokens_reused: int = 0  # decode side: taken from its own prefix cache instead of shipped


def transport_for(engine: Engine, host: str = "127.0.0.1") -> TransportConfig:
    """NCCL between GPU workers, gloo between CPU ones; gloo listens on `host` (the worker's
    KV address)."""
    from kvtransfer.transport import TransportConfig

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
        import torch  # here, in the actor's own process: never where actors are created

        from engine.engine import Engine
        from kvtransfer.layout import KVLayout
        from kvtransfer.staging import StagingPool

        if config.device in ("cuda", "auto") and torch.cuda.is_available():
            from kvtransfer.nccl import configure_nccl_environment

            configure_nccl_environment()  # before any NCCL pair forms
        self.engine = Engine(config)
        # Each start is a new incarnation: the index never trusts an earlier one's entries.
        self.cache_events = CacheEventLog(WorkerKey(worker_id, new_epoch()))
        self.engine.block_manager.set_cache_listener(self.cache_events.on_cache_event)
        self.prompt_kv = PromptKVCounts()
        self.publisher: IndexPublisher | None = None
        if index is not None and index.redis_url is not None:
            self.publisher = IndexPublisher(self.cache_events, index)
            self.publisher.start()
        self.loop = EngineLoop(self.engine, self._role())
        cache = self.engine.runner.kv_cache
        self.staging = StagingPool(STAGING_BYTES, cache.device, cache.dtype)
        self._layout: KVLayout | None = None
        self._no_transfer: str | None = None  # why this worker's KV cannot move, if it cannot
        try:
            tp_size = self.engine.config.tensor_parallel_size
            self._layout = KVLayout.of_cache(
                self.engine.transfer_kv_cache,
                self.engine.model_id,
                tp_size,
                self.engine.kv_scales_digest,
            )
        except InvalidRequest as e:
            self._no_transfer = str(e)

    @property
    def layout(self) -> KVLayout:
        """The layout of the KV this worker ships or receives (every KV head of the model,
        whatever its tensor-parallel size). Raises KVTransferError for a worker whose KV
        cannot move (engine.Engine.transfer_kv_cache)."""
        if self._layout is None:
            raise KVTransferError(f"{self.worker_id}: its KV cannot be transferred: "
                                  f"{self._no_transfer}")  # fmt: skip
        return self._layout

    def transfer_cache(self) -> torch.Tensor:
        """The cache transfers read and write (engine.Engine.transfer_kv_cache); raises
        KVTransferError as `layout` does."""
        assert self.layout is not None
        return self.engine.transfer_kv_cache

    async def _open_sender(self, address: Any, pair_key: str, config: TransportConfig) -> KVSender:
        """Form a pair as its sending side with the receiver endpoint at `address` over a
        transport of `config` (the role's `transport_for`), proving the cluster secret;
        within the transport's connect timeout, or KVTransferError."""
        from kvtransfer.handshake import ClusterSecret
        from kvtransfer.pair import connect_pair
        from kvtransfer.sender import KVSender

        layout, cache = self.layout, self.transfer_cache()
        secret = ClusterSecret.from_environment()
        channel, control = await asyncio.to_thread(
            connect_pair, address, pair_key, config, cache.device, secret, layout
        )
        return KVSender(
            channel, control, cache, layout, self.engine.block_manager.release, self.staging
        )

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
        counters) and health (`failure`: why the engine stopped or, idle, a tensor-parallel
        rank is gone; None while it runs)."""
        failure = self.loop.failure or self.engine.dead_ranks()
        if failure is not None:
            return WorkerStats(num_requests=self.loop.num_requests, failure=failure)

        def read(engine: Engine) -> tuple[WorkerStats, int]:
            scheduler = engine.scheduler
            return WorkerStats(
                num_requests=self.loop.num_requests,
                num_running=len(scheduler.running),
                num_waiting=len(scheduler.waiting),
                num_preemptions=scheduler.num_preemptions,
                num_free_blocks=engine.block_manager.num_free_blocks,
                num_blocks=engine.block_manager.num_blocks,
                max_num_seqs=engine.scheduler.config.max_num_seqs,
                num_prompt_tokens_computed=engine.num_prompt_tokens_computed,
            ), engine.num_kv_staging_waits

        stats, staging_waits = await asyncio.to_thread(self.loop.call, read)
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
            **dataclasses.asdict(self.prompt_kv),
            prompts_recomputed_by_reason=self._prompts_recomputed(),
            kv_staging_waits=staging_waits,
            offers_deferred=sum(m.offers_deferred for m in transfers),
            offers_refused_for_room=sum(m.offers_refused_for_room for m in transfers),
        )
        return dataclasses.replace(stats, kv=kv)

    def _prompts_recomputed(self) -> dict[str, int]:
        """Prompts computed again here because their transferred KV did not come (decode)."""
        return {}

    def shutdown(self) -> None:
        """Stop the engine (a tensor-parallel engine's other ranks with it) and take this
        worker's entries out of the prefix index."""
        self.loop.stop()
        self.engine.close()
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

    def _role(self) -> LoopRole:
        """The role's part of the engine loop (called once, from __init__)."""
        return LoopRole()

    def _transfer_metrics(self) -> list[Any]:
        """The role's transfer counters: retired pairs' first, then each live pair's."""
        raise NotImplementedError

    def _pairs_refused(self) -> dict[str, int]:
        return {}

    def _transfer_holders(self) -> list[str]:
        """Owners of KV this worker holds legitimately outside sequences (engine thread)."""
        return self.loop.role.holders()

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
        """Yield a request's outputs until the finished one (or a prefill's one Prefilled);
        abort it if abandoned."""
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = not isinstance(item, RequestOutput) or item.finished
                yield item
        finally:
            if not finished:  # cancelled or abandoned mid-stream
                self.loop.abort(request_id)
