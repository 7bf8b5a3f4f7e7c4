"""worker.outbox: many requests' outputs handed over in batches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from contracts.errors import InvalidRequest
from worker.outbox import Outbox


async def outputs_of(items: list[object], finished: asyncio.Event | None = None) -> AsyncIterator:
    try:
        for item in items:
            if isinstance(item, BaseException):
                raise item
            yield item
            await asyncio.sleep(0)
    finally:
        if finished is not None:
            finished.set()


def test_one_take_returns_everything_queued_since_the_last() -> None:
    async def run() -> None:
        box = Outbox()
        for i in range(5):
            assert box.put(f"r{i}", i)
        assert await box.take() == [(f"r{i}", i) for i in range(5)]
        waiter = asyncio.ensure_future(box.take())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # nothing queued: take waits
        box.put("r9", 9)
        assert await asyncio.wait_for(waiter, 1) == [("r9", 9)]

    asyncio.run(run())


def test_forwarders_interleave_requests_and_end_with_their_error() -> None:
    async def run() -> None:
        box = Outbox()
        refused = InvalidRequest("prompt", "too long")
        tasks = [box.forward("a", outputs_of([1, 2, 3])), box.forward("b", outputs_of([refused]))]
        assert box.requests == {"a", "b"}
        await asyncio.gather(*tasks)
        items = await box.take()
        assert [item for rid, item in items if rid == "a"] == [1, 2, 3]
        assert [item for rid, item in items if rid == "b"] == [refused]
        assert box.requests == set()

    asyncio.run(run())


def test_a_closed_outbox_stops_its_forwarders() -> None:
    """Its subscriber left: the forwarder stops reading and closes the request's outputs
    (which, in a worker, aborts the request)."""

    async def run() -> None:
        box = Outbox()
        closed = asyncio.Event()
        box.closed = True
        await box.forward("a", outputs_of(list(range(100)), closed))
        assert closed.is_set()
        assert not box.put("a", 1)
        assert box.requests == set()

    asyncio.run(run())


@pytest.mark.parametrize("count", [1, 64])
def test_batches_grow_with_the_backlog(count: int) -> None:
    """A slow reader gets one batch for a backlog, however many requests produced it."""

    async def run() -> None:
        box = Outbox()
        await asyncio.gather(*[box.forward(f"r{i}", outputs_of([i])) for i in range(count)])
        assert len(await box.take()) == count

    asyncio.run(run())
