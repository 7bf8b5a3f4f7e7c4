"""router.outputs: one batched stream per worker, fanned out to per-request queues.

The worker here is a fake worker client (router.workers.WorkerClient: `outputs(subscriber)`,
an async iterator of batches); the real path (Ray, workers killed mid-stream) is covered by
tests/integration/test_service.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from contracts.errors import WorkerUnavailable
from router.outputs import OutputStreams


class FakeWorker:
    """A worker client whose output stream yields the batches the test pushes; an exception
    pushed ends it with that error, None ends it plainly."""

    def __init__(self, name: str) -> None:
        self.key = self.worker_id = name
        self.batches: asyncio.Queue[Any] = asyncio.Queue()
        self.subscribers: list[str] = []

    async def outputs(self, subscriber: str) -> Any:
        self.subscribers.append(subscriber)
        while True:
            batch = await self.batches.get()
            if isinstance(batch, BaseException):
                raise batch
            if batch is None:
                return
            yield batch


def test_batches_are_routed_to_their_requests() -> None:
    async def run() -> None:
        streams = OutputStreams("router-1")
        worker = FakeWorker("w1")
        a, b = streams.open(worker, "a"), streams.open(worker, "b")
        worker.batches.put_nowait([("a", 1), ("b", 2), ("gone", 3), ("a", 4)])
        assert [await a.get(), await a.get(), await b.get()] == [1, 4, 2]
        assert worker.subscribers == ["router-1"]  # one stream for both requests
        streams.close(worker, "a")
        worker.batches.put_nowait([("a", 5), ("b", 6)])
        assert await b.get() == 6
        assert a.empty()  # closed: dropped
        assert streams.num_open == 1
        streams.stop()

    asyncio.run(run())


def test_a_failed_stream_fails_every_open_request_and_is_replaced() -> None:
    async def run() -> None:
        streams = OutputStreams()
        worker = FakeWorker("w1")
        a, b = streams.open(worker, "a"), streams.open(worker, "b")
        died = RuntimeError("actor died")
        worker.batches.put_nowait(died)
        assert await asyncio.wait_for(a.get(), 1) is died
        assert await asyncio.wait_for(b.get(), 1) is died
        c = streams.open(worker, "c")  # a new stream for the next request
        worker.batches.put_nowait([("c", 7)])
        assert await asyncio.wait_for(c.get(), 1) == 7
        assert len(worker.subscribers) == 2
        worker.batches.put_nowait(None)  # a stream that just ends is a failure too
        assert isinstance(await asyncio.wait_for(c.get(), 1), WorkerUnavailable)
        streams.stop()

    asyncio.run(run())


def test_workers_have_separate_streams() -> None:
    async def run() -> None:
        streams = OutputStreams()
        one, two = FakeWorker("w1"), FakeWorker("w2")
        a, b = streams.open(one, "x"), streams.open(two, "x")  # same id on two workers
        two.batches.put_nowait([("x", "from two")])
        one.batches.put_nowait([("x", "from one")])
        assert await asyncio.wait_for(a.get(), 1) == "from one"
        assert await asyncio.wait_for(b.get(), 1) == "from two"
        streams.stop()

    asyncio.run(run())
