"""router.failover, with fake worker clients: a stream whose decode worker is lost resumes on
another, started with the token ids the client already has (`resumed_token_ids`), and the
client sees one stream (only its first message carries the time to first token); past
--max-migrations the stream ends with UNAVAILABLE naming the cap; a pool with no decode
worker left waits for a replacement. A drain (`migrate_off`) cuts a worker's streams at a
token boundary and moves them the same way, outside the cap; with move_kv, a stream the
draining worker moved with its KV (WorkerMoved) continues on the worker the KV went to, from
it, its repeated first output dropped, and one it did not move is replayed. Through Ray and
gRPC:
tests/integration/test_service.py::test_a_decode_worker_killed_mid_stream_resumes_its_streams_unchanged,
tests/integration/test_service.py::test_draining_a_decode_worker_moves_its_streams_unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from contracts.errors import WorkerLost, WorkerMoved
from contracts.handoff import KVHandle, MovedKV, PrefillResult
from contracts.outputs import Usage
from router.failover import FailoverConfig
from router.requests import ServedModel
from router.server import TandemServicer
from tests.unit.test_router_cancel import (
    FIRST_TOKEN,
    PROMPT,
    FakePool,
    FakeWorker,
    _output,
    _request,
)


class AbortingContext:
    """A grpc context that records how the call was ended."""

    def __init__(self) -> None:
        self.ended: tuple[Any, str] | None = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> float:
        return 60.0

    async def abort(self, code: Any, details: str) -> None:
        self.ended = (code, details)
        raise asyncio.CancelledError  # as grpc's abort ends the handler


class MovingWorker(FakeWorker):
    """A draining decode worker that moves every request it is asked to with its KV
    (`moves`: else none): its stream ends with WorkerMoved after its last output, as a real
    worker's does (its last token, 12, the move's first token)."""

    def __init__(self, name: str, moves: bool = True) -> None:
        super().__init__(name)
        self.moves = moves
        self.asked: list[tuple[str, str]] = []

    async def move_out(self, moves: list[tuple[str, str]]) -> list[str]:
        self.asked.extend(moves)
        if not self.moves:
            return []
        for request_id, peer in moves:
            usage = Usage(prompt_tokens=len(PROMPT), cached_tokens=0, completion_tokens=2)
            kv = KVHandle("moved", self.name, peer, len(PROMPT) + 1)
            moved = MovedKV(request_id, 2, PrefillResult(12, None, usage, kv))
            self.batches.put_nowait([("r1", WorkerMoved("KV moved", moved))])
        return [request_id for request_id, _ in moves]


def _servicer(
    disaggregated: bool, num_decode: int, max_migrations: int = 3, move_kv: bool | None = None
) -> tuple[TandemServicer, list[FakeWorker]]:
    model = ServedModel("m", vocab_size=100, max_model_len=64, tokenizer=None)
    decodes = [FakeWorker(f"decode-{i}") for i in range(num_decode)]
    if move_kv is not None:
        decodes[0] = MovingWorker("decode-0", moves=move_kv)
    prefill = FakeWorker("prefill-0") if disaggregated else None
    servicer = TandemServicer(
        model,
        FakePool("decode", decodes),  # type: ignore[list-item]
        FakePool("prefill", [prefill]) if prefill is not None else None,
        failover=FailoverConfig(max_migrations=max_migrations, replacement_wait_s=0.5),
    )
    return servicer, decodes


def _resumed(worker: FakeWorker) -> list[Any]:
    """The resumed_token_ids each start call on `worker` passed (its last argument)."""
    return [args[-1] for name, args in worker.calls if name.startswith("start_")]


async def _ended(servicer: TandemServicer) -> tuple[Any, str]:
    """Run one request until the servicer aborts its call; the (code, details) it aborted
    with."""
    context = AbortingContext()
    with pytest.raises(asyncio.CancelledError):
        async for _ in servicer.Generate(_request(), context):
            pass
    assert context.ended is not None
    return context.ended


@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
def test_a_lost_stream_resumes_on_another_worker_with_the_tokens_sent(
    disaggregated: bool,
) -> None:
    async def run() -> None:
        servicer, (lost, other) = _servicer(disaggregated, 2)
        lost.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        lost.batches.put_nowait([("r1", _output("r1", 12))])
        stream = servicer.Generate(_request(), AbortingContext())
        first, second = [await stream.__anext__() for _ in range(2)]
        lost.batches.put_nowait(WorkerLost("worker lost: ActorDiedError"))
        other.batches.put_nowait([("r1", _output("r1", 13))])
        other.batches.put_nowait([("r1", _output("r1", 14, finished=True))])
        rest = [response async for response in stream]
        tokens = [list(r.token_ids) for r in [first, second, *rest]]
        assert tokens == [[FIRST_TOKEN], [12], [13], [14]]
        assert _resumed(lost) == [()] and _resumed(other) == [(FIRST_TOKEN, 12)]
        assert first.timing.ttft_seconds > 0
        assert all(r.timing.ttft_seconds == 0 for r in [second, *rest])
        assert servicer.num_migrated == 1
        assert servicer.outputs.num_open == 0

    asyncio.run(run())


@pytest.mark.parametrize("max_migrations", [0, 1])
def test_past_max_migrations_the_stream_ends_unavailable_naming_the_cap(
    max_migrations: int,
) -> None:
    async def run() -> None:
        servicer, workers = _servicer(False, 2, max_migrations)
        for worker in workers:
            worker.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
            worker.batches.put_nowait(WorkerLost("worker lost: ActorDiedError"))
        code, details = await _ended(servicer)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert f"--max-migrations ({max_migrations})" in details
        assert servicer.num_migrated == max_migrations

    asyncio.run(run())


def test_with_no_decode_worker_left_it_waits_for_a_replacement_then_gives_up() -> None:
    async def run() -> None:
        servicer, (only,) = _servicer(False, 1)
        only.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        only.batches.put_nowait(WorkerLost("worker lost: ActorDiedError"))
        code, details = await _ended(servicer)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "no live decode worker to resume the request on within 0.5 s" in details

    asyncio.run(run())


@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
def test_a_request_arriving_while_every_decode_worker_is_down_waits_for_a_replacement(
    disaggregated: bool,
) -> None:
    """Found by the chaos run: a request sent just after both decode workers were killed
    ended UNAVAILABLE at once ("no live decode worker left to place the request on") while
    their replacements loaded; the streams already running waited for them and finished."""

    async def run() -> None:
        servicer, (only,) = _servicer(disaggregated, 1)
        member = servicer.decode.members()[0]
        member.load.down = True  # killed; the control plane is loading its replacement
        only.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        only.batches.put_nowait([("r1", _output("r1", 12, finished=True))])

        async def replaced() -> None:
            await asyncio.sleep(0.2)
            member.load.down = False

        replacement = asyncio.create_task(replaced())
        context = AbortingContext()
        tokens = [list(r.token_ids) async for r in servicer.Generate(_request(), context)]
        await replacement
        assert context.ended is None
        assert tokens == [[FIRST_TOKEN], [12]]
        assert servicer.num_migrated == 0  # nothing had streamed: not a move

    asyncio.run(run())


def test_with_no_decode_worker_at_all_a_new_request_waits_then_gives_up_naming_it() -> None:
    async def run() -> None:
        servicer, _ = _servicer(False, 1)
        servicer.decode.members()[0].load.down = True
        code, details = await _ended(servicer)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "no live decode worker to place the request on within 0.5 s" in details

    asyncio.run(run())


def test_failover_config_names_a_bad_field() -> None:
    with pytest.raises(ValueError, match="max_migrations=-1"):
        FailoverConfig(max_migrations=-1)
    with pytest.raises(ValueError, match="replacement_wait_s=inf"):
        FailoverConfig(replacement_wait_s=float("inf"))
    with pytest.raises(ValueError, match="migrate_on_drain=1"):
        FailoverConfig(migrate_on_drain=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="move_kv_on_drain=None"):
        FailoverConfig(move_kv_on_drain=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
def test_a_drain_cuts_the_stream_at_a_token_boundary_and_resumes_it_elsewhere(
    disaggregated: bool,
) -> None:
    """Every output the draining worker sent before the cut reaches the client, nothing after
    it does; the attempt is aborted there; the move is not capped by --max-migrations (0)."""

    async def run() -> None:
        servicer, (draining, other) = _servicer(disaggregated, 2, max_migrations=0)
        member = servicer.decode.members()[0]
        draining.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        draining.batches.put_nowait([("r1", _output("r1", 12))])
        stream = servicer.Generate(_request(), AbortingContext())
        first = await stream.__anext__()
        await asyncio.sleep(0.05)  # the second output is in the request's queue, not yet read
        member.load.draining = True
        moving = asyncio.ensure_future(servicer.migrate_off(member, timeout_s=5))
        await asyncio.sleep(0)
        draining.batches.put_nowait([("r1", _output("r1", 99))])  # after the cut: dropped
        other.batches.put_nowait([("r1", _output("r1", 13))])
        other.batches.put_nowait([("r1", _output("r1", 14, finished=True))])
        rest = [response async for response in stream]
        assert await moving is True
        tokens = [list(r.token_ids) for r in [first, *rest]]
        assert tokens == [[FIRST_TOKEN], [12], [13], [14]]
        assert _resumed(other) == [(FIRST_TOKEN, 12)]
        assert draining.aborted() == ["r1"]
        assert servicer.num_migrated == 1
        assert member.load.in_flight == 0 and servicer.outputs.num_open == 0

    asyncio.run(run())


def test_a_drain_with_no_other_decode_worker_cuts_nothing() -> None:
    async def run() -> None:
        servicer, (only,) = _servicer(False, 1)
        member = servicer.decode.members()[0]
        only.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        stream = servicer.Generate(_request(), AbortingContext())
        await stream.__anext__()
        member.load.draining = True
        assert await servicer.migrate_off(member, timeout_s=0.1) is False  # it runs on there
        only.batches.put_nowait([("r1", _output("r1", 12, finished=True))])
        assert [list(r.token_ids) async for r in stream] == [[12]]
        assert servicer.num_migrated == 0

    asyncio.run(run())


@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
@pytest.mark.parametrize("moves", [True, False], ids=["kv_moved", "not_moved"])
def test_a_drain_with_kv_moves_continues_the_stream_where_its_kv_went(
    disaggregated: bool, moves: bool
) -> None:
    """Moved: the other worker continues the same attempt from the move's PrefillResult, the
    tokens before its last as resumed tokens; its first output (repeating 12) is dropped;
    nothing is aborted on the draining worker. Not moved: cut and replayed as without
    move_kv. Counted by how."""

    async def run() -> None:
        servicer, (draining, other) = _servicer(disaggregated, 2, move_kv=moves)
        assert isinstance(draining, MovingWorker)
        member = servicer.decode.members()[0]
        draining.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        draining.batches.put_nowait([("r1", _output("r1", 12))])
        stream = servicer.Generate(_request(), AbortingContext())
        first = await stream.__anext__()
        await asyncio.sleep(0.05)  # the second output is in the request's queue, not yet read
        member.load.draining = True
        moving = asyncio.ensure_future(servicer.migrate_off(member, timeout_s=5, move_kv=True))
        await asyncio.sleep(0)
        if moves:
            other.batches.put_nowait([("r1", _output("r1", 12))])  # the repeat: dropped
        other.batches.put_nowait([("r1", _output("r1", 13))])
        other.batches.put_nowait([("r1", _output("r1", 14, finished=True))])
        rest = [response async for response in stream]
        assert await moving is True
        tokens = [list(r.token_ids) for r in [first, *rest]]
        assert tokens == [[FIRST_TOKEN], [12], [13], [14]]
        ((attempt, target),) = draining.asked
        assert target == "decode-1"
        starts = [(name, args) for name, args in other.calls if name.startswith("start_")]
        assert len(starts) == 1
        name, args = starts[0]
        if moves:
            assert name == "start_continue" and args[1] == attempt
            assert args[3].first_token_id == 12 and args[3].kv.transfer_id == "moved"
            assert args[-1] == (FIRST_TOKEN,)
            assert draining.aborted() == []
            assert servicer.num_drain_moves == {"kv": 1, "replay": 0}
        else:
            assert args[-1] == (FIRST_TOKEN, 12)
            assert draining.aborted() == ["r1"]
            assert servicer.num_drain_moves == {"kv": 0, "replay": 1}
        assert servicer.num_migrated == 1
        assert member.load.in_flight == 0 and servicer.outputs.num_open == 0

    asyncio.run(run())
