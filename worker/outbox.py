"""Outputs of many requests, handed to their router in batches.

Each router holds one streaming call per worker (`EngineWorker.outputs`) whose every item is
a batch of all the (request id, output or error) pairs produced since the last item, instead
of one Ray object per token (which capped both serving modes at ~26 requests/s on 2x H100).
Under load batches grow with the backlog, so the per-object cost is paid per batch.
Details: docs/architecture.md, "Workers".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

Batch = list[tuple[str, Any]]  # (request id, RequestOutput or the exception that ended it)


class Outbox:
    """One subscriber's pending outputs. Event-loop only (not thread-safe)."""

    def __init__(self) -> None:
        self._items: Batch = []
        self._ready = asyncio.Event()
        self.requests: set[str] = set()  # forwarding into this outbox now
        self.closed = False

    def put(self, request_id: str, item: Any) -> bool:
        """Queue an output (or a request's final exception); False once the outbox is closed
        (its subscriber left: nobody will read it)."""
        if self.closed:
            return False
        self._items.append((request_id, item))
        self._ready.set()
        return True

    async def take(self) -> Batch:
        """Everything queued since the last take, waiting for at least one item."""
        await self._ready.wait()
        self._ready.clear()
        items, self._items = self._items, []
        return items

    def forward(self, request_id: str, outputs: AsyncIterator[Any]) -> asyncio.Task[None]:
        """Copy a request's outputs here until its last one, then the exception that ended it
        early, if any. Stops (closing `outputs`, which aborts the request) if the outbox
        closes first. Returns the forwarding task; the caller keeps a reference to it."""
        self.requests.add(request_id)

        async def run() -> None:
            try:
                async for output in outputs:
                    if not self.put(request_id, output):
                        break
            except Exception as e:  # refused, its KV lost, or the engine failed
                self.put(request_id, e)
            finally:
                await outputs.aclose()  # type: ignore[attr-defined]
                self.requests.discard(request_id)

        return asyncio.ensure_future(run())
