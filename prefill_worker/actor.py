"""The prefill worker actor.

    prefill(request, decode_id):  run the prompt (max_tokens = 1, keep_kv) in the engine,
        batched with other prompts (chunked prefill); then either the first token ends the
        request (nothing to ship: the KV is released) or its KV is submitted to the KVSender
        of the chosen decode worker's pair, and the first token returns to the router, which
        streams it and asks the decode worker to continue.

Pairs with decode workers are formed on demand by `connect` (cluster.service calls it for
every decode worker, and again for a replacement).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from contracts.errors import WorkerUnavailable
from contracts.outputs import FinishReason, RequestOutput
from contracts.sampling_params import SamplingParams
from decode_worker.actor import WorkerBase, transport_for
from engine.config import EngineConfig
from kvtransfer.handshake import ClusterSecret
from kvtransfer.network import KVNetworkConfig
from kvtransfer.pair import EndpointAddress, connect_pair
from kvtransfer.protocol import TransferMetrics, TransferResult, transfer_id_for
from kvtransfer.sender import KVSender
from prefix_cache.index import IndexConfig
from telemetry.tracing import TracingConfig, record_span


class PrefillWorker(WorkerBase):
    def __init__(
        self,
        config: EngineConfig,
        worker_id: str = "prefill",
        index: IndexConfig | None = None,
        tracing: TracingConfig | None = None,
        kv_network: KVNetworkConfig | None = None,
    ) -> None:
        super().__init__(config, worker_id, index, tracing, kv_network)
        self.senders: dict[str, KVSender] = {}  # by decode worker id
        self.retired_metrics = TransferMetrics()  # of senders closed since (replaced, left)

    def _transfer_metrics(self) -> list[Any]:
        return [self.retired_metrics, *(s.metrics for s in self.senders.values())]

    def _transfer_holders(self) -> list[str]:
        return [owner for s in self.senders.values() for owner in s.owners()]

    async def connect(self, decode_id: str, address: EndpointAddress, pair_key: str) -> None:
        """Form the pair with decode worker `decode_id` (replacing an older one), proving the
        cluster secret; within the transport's connect timeout, or KVTransferError."""
        cache = self.engine.runner.kv_cache
        config = transport_for(self.engine, self.kv_address.host)
        secret = ClusterSecret.from_environment()
        channel, control = await asyncio.to_thread(
            connect_pair, address, pair_key, config, cache.device, secret, self.layout
        )
        old = self.senders.get(decode_id)
        self.senders[decode_id] = KVSender(
            channel, control, cache, self.layout, self.engine.block_manager.release, self.staging
        )
        if old is not None:
            await asyncio.to_thread(old.close)
            self.retired_metrics.absorb(old.metrics)

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: dict[str, Any],
        cache_salt: str | None,
        decode_id: str,
        trace_context: dict[str, str] | None = None,
    ) -> tuple[RequestOutput, bool]:
        """(the first token's output as the whole request would see it, whether its KV is
        on its way to the decode worker). Cancelling aborts the prefill."""
        sampling = SamplingParams(**params)
        first_only = dataclasses.replace(sampling, max_tokens=1)
        stream = self.loop.submit(
            request_id, prompt_token_ids, first_only, cache_salt, keep_kv=True
        )
        output: RequestOutput | None = None
        outputs = self._stream(request_id, stream)
        try:
            async for item in self._traced("tandem.prefill", request_id, trace_context, outputs):
                output = item
        except BaseException:  # cancelled or failed: its KV, if any was kept, is nobody's
            kept = self.loop.take_kept_kv(request_id)
            if kept is not None:
                self.engine.block_manager.release(kept.owner)
            raise
        assert output is not None
        kept = self.loop.take_kept_kv(request_id)
        reason = self._finish_reason(output, sampling, len(prompt_token_ids))
        if reason is not None or kept is None:
            if kept is not None:
                self.engine.block_manager.release(kept.owner)
            return dataclasses.replace(output, finish_reason=reason), False
        sender = self.senders.get(decode_id)
        if sender is None:
            self.engine.block_manager.release(kept.owner)
            raise WorkerUnavailable(f"no KV pair with decode worker {decode_id!r}")
        try:
            sender.submit(
                request_id, kept.owner, kept.block_ids, kept.num_tokens,
                transfer_id=transfer_id_for(request_id),
                on_done=_trace_transfer(trace_context, self.worker_id) if trace_context else None,
            )  # fmt: skip
        except ValueError:  # refused (e.g. a reused transfer id): the blocks are still ours
            self.engine.block_manager.release(kept.owner)
            raise
        return dataclasses.replace(output, finished=False, finish_reason=None), True

    def abort(self, request_id: str) -> None:
        """Abort a request: its prefill (here now or arriving later) and, if its KV is being
        shipped, the transfer (the decode worker frees what it reserved for it)."""
        super().abort(request_id)
        transfer_id = transfer_id_for(request_id)
        for sender in self.senders.values():
            sender.abort(transfer_id, "request cancelled")

    async def disconnect(self, decode_id: str) -> None:
        """Close the pair with a decode worker that left the pool (its transfers are over)."""
        sender = self.senders.pop(decode_id, None)
        if sender is not None:
            await asyncio.to_thread(sender.close)
            self.retired_metrics.absorb(sender.metrics)

    def _finish_reason(
        self, output: RequestOutput, params: SamplingParams, prompt_len: int
    ) -> FinishReason | None:
        """Whether the first token ends the real request (whose max_tokens may be > 1)."""
        if output.finish_reason is FinishReason.STOP:
            return FinishReason.STOP
        if params.max_tokens == 1 or prompt_len + 1 >= self.engine.max_model_len:
            return FinishReason.LENGTH
        return None


def _trace_transfer(carrier: dict[str, str], worker_id: str) -> Callable[[TransferResult], None]:
    """Record a finished transfer as a span of the request's trace (on the sender's thread)."""

    def done(result: TransferResult) -> None:
        end = time.time()
        record_span(
            "tandem.kv_transfer", end - result.seconds, end, carrier,
            **{"tandem.request_id": result.request_id, "tandem.worker": worker_id,
               "tandem.kv_bytes": result.num_bytes, "tandem.status": result.status.value},
        )  # fmt: skip

    return done
