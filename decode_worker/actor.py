"""The worker actor: an engine behind an EngineLoop, reachable through Ray.

Created by cluster.service with `ray.remote(num_gpus=..., ...)(EngineWorker)`; the class itself
does not import Ray, so it is testable in-process. Methods are async: Ray runs them on the
actor's event loop, many requests at once, while the engine thread batches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from decode_worker.engine_loop import EngineLoop
from engine.config import EngineConfig
from engine.engine import Engine
from engine.output_processor import RequestOutput
from engine.sampling_params import SamplingParams


class EngineWorker:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = Engine(config)
        self.loop = EngineLoop(self.engine)

    def model_info(self) -> dict[str, Any]:
        """What the router needs to validate requests for this worker's model."""
        return {
            "model_id": self.engine.model_id,
            "model_spec": self.engine.config.model,
            "vocab_size": self.engine.model_config.vocab_size,
            "max_model_len": self.engine.max_model_len,
        }

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: dict[str, Any],
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs, the last with finished=True. Raises the engine's
        typed error (e.g. InvalidRequest) if it refuses the request. Cancelling the call (the
        router's client went away) aborts the request and frees its KV."""
        stream = self.loop.submit(
            request_id, prompt_token_ids, SamplingParams(**params), cache_salt
        )
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

    async def stats(self) -> dict[str, Any]:
        """Load figures for placement: requests in flight, free KV blocks."""

        def read(engine: Engine) -> dict[str, Any]:
            return {
                "num_requests": self.loop.num_requests,
                "num_free_blocks": engine.block_manager.num_free_blocks,
                "num_blocks": engine.block_manager.num_blocks,
            }

        return await asyncio.to_thread(self.loop.call, read)

    async def check_integrity(self) -> None:
        """Assert the engine's KV bookkeeping is consistent (tests call it after each case)."""
        await asyncio.to_thread(self.loop.call, lambda engine: engine.check_integrity())

    def shutdown(self) -> None:
        self.loop.stop()
