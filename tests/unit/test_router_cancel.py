"""router.server: a request whose client goes away is aborted on its workers, however its
stream stops; one moved off an unreachable worker is aborted there.

grpc.aio stops a handler in one of two ways when the client cancels or its deadline passes:
it cancels the handler's task (CancelledError wherever the request awaits), or, when that
happens while a response is being written, it closes the handler's generator
(GeneratorExit at its `yield`). Both must reach the workers as `abort`, or the request runs
on to its last token. So must the loss of a worker that is only unreachable, whose request
moves elsewhere. The workers here are fake worker clients (router.workers.WorkerClient);
the real path (Ray, gRPC over loopback, a deadline) is
tests/integration/test_service.py::test_deadline_exceeded_frees_the_request.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from contracts.errors import WorkerLost
from contracts.handoff import KVHandle, PrefillResult
from contracts.outputs import FinishReason, RequestOutput, Usage
from proto.tandem.v1 import tandem_pb2 as pb
from router.placement import Member
from router.requests import ServedModel
from router.server import ServingGate, TandemServicer

PROMPT = [5, 6, 7, 8]
FIRST_TOKEN = 11


def _output(request_id: str, token: int, finished: bool = False) -> RequestOutput:
    usage = Usage(prompt_tokens=len(PROMPT), cached_tokens=0, completion_tokens=1)
    reason = FinishReason.LENGTH if finished else None
    return RequestOutput(request_id, (token,), "", finished, reason, usage)


class FakeWorker:
    """A worker client (router.workers.WorkerClient) that prefills (returning a PrefillResult:
    its KV shipped where the router says) and streams whatever the test puts in `batches`
    through its `outputs` (a decode worker: the first token's output too).

    Tests name a request by its client id ("r1"); the router gives workers ids of its own
    (one per attempt), so a batch waits for a request to be started here and is delivered
    under its id (as a real worker's outputs follow the start), and `aborted` reports ids the
    router issued as "r1"."""

    issued: ClassVar[set[str]] = set()  # ids the router gave any fake worker (uuids: never reused)

    def __init__(self, name: str, fails: BaseException | None = None) -> None:
        self.name = name
        self.fails = fails  # raised by its start_generate / prefill calls
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.batches: asyncio.Queue[Any] = asyncio.Queue()
        self.subscribers: list[str] = []
        self.unfinished: list[str] = []  # ids started here whose last output is not out
        self.started = asyncio.Event()

    @property
    def key(self) -> str:
        return self.name

    @property
    def worker_id(self) -> str:
        return self.name

    async def start_generate(self, subscriber: str, request_id: str, *args: Any) -> None:
        self._started("start_generate", subscriber, request_id, *args)

    async def start_continue(self, subscriber: str, request_id: str, *args: Any) -> None:
        self._started("start_continue", subscriber, request_id, *args)

    async def prefill(
        self, request_id: str, prompt: list[int], params: Any, salt: Any, ship_to: Any, *rest: Any
    ) -> PrefillResult:
        self.calls.append(("prefill", (request_id, prompt, params, salt, ship_to, *rest)))
        FakeWorker.issued.add(request_id)
        if self.fails is not None:
            raise self.fails
        usage = Usage(prompt_tokens=len(PROMPT), cached_tokens=0, completion_tokens=1)
        kv = None if ship_to is None else KVHandle("t", self.name, ship_to, len(PROMPT))
        return PrefillResult(FIRST_TOKEN, None, usage, kv)

    def abort(self, request_id: str) -> None:
        self.calls.append(("abort", (request_id,)))

    async def outputs(self, subscriber: str) -> Any:
        self.subscribers.append(subscriber)
        while True:
            batch = await self.batches.get()
            if isinstance(batch, BaseException):
                raise batch
            if batch is None:
                return
            while not self.unfinished:
                self.started.clear()
                await self.started.wait()
            request_id = self.unfinished[-1]
            if any(isinstance(item, BaseException) or item.finished for _, item in batch):
                self.unfinished.pop()
            yield [(request_id, item) for _, item in batch]

    def _started(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        request_id = args[1]
        FakeWorker.issued.add(request_id)
        if self.fails is not None:
            raise self.fails
        self.unfinished.append(request_id)
        self.started.set()

    def aborted(self) -> list[str]:
        return [
            "r1" if args[0] in FakeWorker.issued else args[0]
            for name, args in self.calls
            if name == "abort"
        ]


class FakePool:
    """A pool (router.placement.PoolView) of fixed members."""

    def __init__(self, name: str, workers: list[Any]) -> None:
        self.name = name
        self._members = [Member(worker) for worker in workers]

    def members(self) -> list[Member]:
        return list(self._members)

    def mark_down(self, member: Member) -> None:
        member.load.down = True


class FakeContext:
    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> float:
        return 0.0  # the deadline passed

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"unexpected abort: {code} {details}")


def _servicer(disaggregated: bool) -> tuple[TandemServicer, FakeWorker, FakeWorker | None]:
    model = ServedModel("m", vocab_size=100, max_model_len=64, tokenizer=None)
    decode = FakeWorker("decode-0")
    prefill = FakeWorker("prefill-0") if disaggregated else None
    servicer = TandemServicer(
        model,
        FakePool("decode", [decode]),
        FakePool("prefill", [prefill]) if prefill is not None else None,
    )
    return servicer, decode, prefill


def _request() -> Any:
    request = pb.GenerateRequest(request_id="r1", sampling=pb.SamplingParameters(max_tokens=8))
    request.token_ids.ids.extend(PROMPT)
    return request


def _stream(servicer: TandemServicer, through_gate: bool) -> Any:
    """A Generate stream as grpc iterates it: the ServingGate's (as served), or the
    servicer's own."""
    if not through_gate:
        return servicer.Generate(_request(), FakeContext())
    gate = ServingGate()
    gate.open(servicer)
    return gate.Generate(_request(), FakeContext())


@pytest.mark.parametrize("through_gate", [False, True], ids=["servicer", "gate"])
@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
@pytest.mark.parametrize("after", [1, 2], ids=["first-token", "second-token"])
def test_a_stream_closed_at_a_response_aborts_the_request(
    disaggregated: bool, after: int, through_gate: bool
) -> None:
    """grpc closes the handler's generator while it is suspended at a `yield`: the request is
    aborted at once on the worker that holds it (decode worker: the KV may be shipped
    already), not whenever the generators are collected."""

    async def run() -> None:
        servicer, decode, _ = _servicer(disaggregated)
        stream = _stream(servicer, through_gate)
        # the first token comes from the (decode) worker's output stream in both modes
        decode.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        if after == 2:
            decode.batches.put_nowait([("r1", _output("r1", 12))])
        for _ in range(after):
            await stream.__anext__()
        assert decode.aborted() == []
        await stream.aclose()  # GeneratorExit at the yield; no loop turn after it
        assert decode.aborted() == ["r1"]
        assert servicer.outputs.num_open == 0

    asyncio.run(run())


@pytest.mark.parametrize(
    "disaggregated, num_outputs",
    [(False, 1), (True, 2), (True, 1)],
    ids=["colocated", "disaggregated", "disaggregated-first-token-ends-it"],
)
def test_a_stream_closed_at_its_last_response_aborts_nothing(
    disaggregated: bool, num_outputs: int
) -> None:
    """Closed at the yield of the finished output (the write raced the deadline): the
    request is over on its worker, which is not sent an abort it would only remember."""

    async def run() -> None:
        servicer, decode, prefill = _servicer(disaggregated)
        stream = _stream(servicer, through_gate=True)
        first = _output("r1", FIRST_TOKEN, finished=num_outputs == 1)
        outputs = [first, _output("r1", 12, finished=True)][:num_outputs]
        for output in outputs:
            decode.batches.put_nowait([("r1", output)])
        for _ in range(num_outputs):
            response = await stream.__anext__()
        assert response.HasField("usage")  # the finished one
        await stream.aclose()
        assert decode.aborted() == []
        assert prefill is None or prefill.aborted() == []

    asyncio.run(run())


@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
def test_a_cancelled_stream_aborts_the_request(disaggregated: bool) -> None:
    """The handler's task is cancelled while it waits for the next output."""

    async def run() -> None:
        servicer, decode, _ = _servicer(disaggregated)
        decode.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        stream = servicer.Generate(_request(), FakeContext())
        await stream.__anext__()
        task = asyncio.ensure_future(stream.__anext__())  # waits: no more outputs come
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert decode.aborted() == ["r1"]

    asyncio.run(run())


def test_a_finished_request_is_not_aborted() -> None:
    async def run() -> None:
        servicer, decode, prefill = _servicer(True)
        decode.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        decode.batches.put_nowait([("r1", _output("r1", 12, finished=True))])
        responses = [r async for r in servicer.Generate(_request(), FakeContext())]
        assert [list(r.token_ids) for r in responses] == [[FIRST_TOKEN], [12]]
        assert decode.aborted() == []
        assert prefill is not None and prefill.aborted() == []

    asyncio.run(run())


@pytest.mark.parametrize("unreachable", [True, False], ids=["unreachable", "dead"])
@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
def test_a_worker_lost_mid_request_is_told_to_abort_if_it_may_come_back(
    disaggregated: bool, unreachable: bool
) -> None:
    """The request moves to another worker; the lost one, if only unreachable, would run it
    on once back: it is sent an abort. A dead one is not (nothing to stop, and Ray would log
    the failed call)."""
    error = WorkerLost("the worker is gone", unreachable=unreachable)

    async def run() -> None:
        model = ServedModel("m", vocab_size=100, max_model_len=64, tokenizer=None)
        lost, healthy = FakeWorker("w0", fails=error), FakeWorker("w1")
        decode = FakeWorker("decode-0")
        if disaggregated:
            servicer = TandemServicer(
                model, FakePool("decode", [decode]), FakePool("prefill", [lost, healthy])
            )
            decode.batches.put_nowait([("r1", _output("r1", 12, finished=True))])
        else:
            servicer = TandemServicer(model, FakePool("decode", [lost, healthy]))
            healthy.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN, finished=True))])
        responses = [r async for r in servicer.Generate(_request(), FakeContext())]
        assert responses[-1].HasField("usage")  # served by the other worker
        assert lost.aborted() == (["r1"] if unreachable else [])
        assert healthy.aborted() == [] and decode.aborted() == []
        assert servicer.num_retried == 1

    asyncio.run(run())
