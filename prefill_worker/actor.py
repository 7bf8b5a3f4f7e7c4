"""The prefill worker actor.

    prefill(request, decode_index):  run the prompt (max_tokens = 1, keep_kv) in the engine,
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
from typing import Any

from cluster.prefix_index import IndexConfig
from decode_worker.actor import WorkerBase, transport_for
from engine.config import EngineConfig
from engine.output_processor import RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from kvtransfer.pair import EndpointAddress, connect_pair
from kvtransfer.protocol import transfer_id_for
from kvtransfer.sender import KVSender


class PrefillWorker(WorkerBase):
    def __init__(
        self, config: EngineConfig, worker_id: str = "prefill", index: IndexConfig | None = None
    ) -> None:
        super().__init__(config, worker_id, index)
        self.senders: dict[int, KVSender] = {}

    def _transfer_metrics(self) -> list[Any]:
        return [s.metrics for s in self.senders.values()]

    def _transfer_holders(self) -> list[str]:
        return [owner for s in self.senders.values() for owner in s.owners()]

    async def connect(self, decode_index: int, address: EndpointAddress, pair_key: str) -> None:
        """Form the pair with decode worker `decode_index` (replacing an older one)."""
        cache = self.engine.runner.kv_cache
        channel, control = await asyncio.to_thread(
            connect_pair, address, pair_key, transport_for(self.engine), cache.device
        )
        old = self.senders.get(decode_index)
        self.senders[decode_index] = KVSender(
            channel, control, cache, self.layout, self.engine.block_manager.release, self.staging
        )
        if old is not None:
            await asyncio.to_thread(old.close)

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: dict[str, Any],
        cache_salt: str | None,
        decode_index: int,
    ) -> tuple[RequestOutput, bool]:
        """(the first token's output as the whole request would see it, whether its KV is
        on its way to the decode worker). Cancelling aborts the prefill."""
        sampling = SamplingParams(**params)
        first_only = dataclasses.replace(sampling, max_tokens=1)
        stream = self.loop.submit(
            request_id, prompt_token_ids, first_only, cache_salt, keep_kv=True
        )
        output: RequestOutput | None = None
        async for item in self._stream(request_id, stream):
            output = item
        assert output is not None
        kept = await asyncio.to_thread(self.loop.call, lambda e: e.take_kept_kv(request_id))
        reason = self._finish_reason(output, sampling, len(prompt_token_ids))
        if reason is not None or kept is None:
            if kept is not None:
                self.engine.block_manager.release(kept.owner)
            return dataclasses.replace(output, finish_reason=reason), False
        sender = self.senders.get(decode_index)
        if sender is None:
            self.engine.block_manager.release(kept.owner)
            raise RuntimeError(f"no pair with decode worker {decode_index}")
        sender.submit(
            request_id, kept.owner, kept.block_ids, kept.num_tokens,
            transfer_id=transfer_id_for(request_id),
        )  # fmt: skip
        return dataclasses.replace(output, finished=False, finish_reason=None), True

    def _finish_reason(
        self, output: RequestOutput, params: SamplingParams, prompt_len: int
    ) -> FinishReason | None:
        """Whether the first token ends the real request (whose max_tokens may be > 1)."""
        if output.finish_reason is FinishReason.STOP:
            return FinishReason.STOP
        if params.max_tokens == 1 or prompt_len + 1 >= self.engine.max_model_len:
            return FinishReason.LENGTH
        return None
