"""The router's end of the workers' batched output streams (decode_worker.outbox).

One `OutputStreams` per router: for each worker it serves requests on, one streaming call to
`EngineWorker.outputs(subscriber)` whose items are batches of (request id, output or error);
a pump task hands each item to the queue of its request. A request opens its queue before it
is started on the worker (so no output can come before anyone waits for it) and closes it when
it ends; outputs of closed requests (cancelled, say) are dropped.

When a worker's stream fails (the worker died) every open request on it gets that error, as a
per-request call would have raised it; the next request on a replacement opens a new stream.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from contracts.errors import WorkerLost
from router.workers import WorkerClient

logger = logging.getLogger(__name__)


@dataclass
class _Subscription:
    task: asyncio.Task[None] | None = None
    queues: dict[str, asyncio.Queue[Any]] = field(default_factory=dict)


class OutputStreams:
    """See the module docstring. Event-loop only."""

    def __init__(self, subscriber: str | None = None) -> None:
        self.subscriber = subscriber or f"router-{uuid.uuid4().hex[:12]}"
        self._subscriptions: dict[str, _Subscription] = {}  # actor id -> its stream

    def open(self, worker: WorkerClient, request_id: str) -> asyncio.Queue[Any]:
        """The queue `request_id`'s outputs on `worker` will arrive on: RequestOutputs, the
        last finished, or one exception. Open it before starting the request."""
        key = worker.key
        subscription = self._subscriptions.get(key)
        if subscription is None:
            subscription = self._subscriptions[key] = _Subscription()
            subscription.task = asyncio.ensure_future(self._pump(key, worker, subscription))
        assert request_id not in subscription.queues, f"request id {request_id!r} reused"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        subscription.queues[request_id] = queue
        return queue

    def close(self, worker: WorkerClient, request_id: str) -> None:
        """Stop routing `request_id`'s outputs (it ended or was cancelled)."""
        subscription = self._subscriptions.get(worker.key)
        if subscription is not None:
            subscription.queues.pop(request_id, None)

    def cut(
        self, worker: WorkerClient, error: BaseException, request_ids: Iterable[str] | None = None
    ) -> int:
        """End every request open on `worker` now (or those of `request_ids` open there) with
        `error` (a drain moves them away): it lands behind the outputs already queued, so a
        request's consumer gets each output the worker sent before the cut, then the error;
        what comes after is dropped once the request closes its queue. Returns how many
        requests were cut."""
        subscription = self._subscriptions.get(worker.key)
        if subscription is None:
            return 0
        queues = subscription.queues
        ids = list(queues) if request_ids is None else [i for i in request_ids if i in queues]
        for request_id in ids:
            queues[request_id].put_nowait(error)
        return len(ids)

    def open_ids(self, worker: WorkerClient) -> list[str]:
        """The ids of the requests open on `worker` now."""
        subscription = self._subscriptions.get(worker.key)
        return [] if subscription is None else list(subscription.queues)

    def stop(self) -> None:
        """Cancel every stream (the router is stopping)."""
        for subscription in self._subscriptions.values():
            if subscription.task is not None:
                subscription.task.cancel()
        self._subscriptions.clear()

    @property
    def num_open(self) -> int:
        return sum(len(s.queues) for s in self._subscriptions.values())

    async def _pump(self, key: str, worker: WorkerClient, subscription: _Subscription) -> None:
        error: BaseException
        try:
            async for batch in worker.outputs(self.subscriber):
                for request_id, item in batch:
                    queue = subscription.queues.get(request_id)
                    if queue is not None:
                        queue.put_nowait(item)
            error = WorkerLost("the worker's output stream ended")  # it stopped: resume elsewhere
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the worker died or became unreachable
            error = e
        if self._subscriptions.get(key) is subscription:
            del self._subscriptions[key]
        for queue in subscription.queues.values():
            queue.put_nowait(error)
        logger.info("output stream of worker %s ended: %r", key, error)
