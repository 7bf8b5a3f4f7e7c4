"""router.server: what a client's end is counted as (issue 16.6).

A client whose own deadline passes cancels the call a moment before the server's copy of the
deadline expires (the server's started when the request arrived, later): the server sees a
cancellation with a little time left, and counted 12 of 20 expiries as CANCELLED. A request
that could not be moved anywhere was counted as retried. Malformed messages (bad protobuf,
invalid UTF-8) are the real path's: tests/integration/test_hostile_clients.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from contracts.errors import WorkerLost
from router.failover import FailoverConfig
from router.requests import ServedModel
from router.server import TandemServicer, _Malformed, _parser
from telemetry.metrics import ServiceMetrics
from tests.unit.test_request_ids import _Context, _Refused
from tests.unit.test_router_cancel import FIRST_TOKEN, FakePool, FakeWorker, _output, _request


class _Expiring(_Context):
    def __init__(self, remaining_s: float) -> None:
        self.remaining_s = remaining_s

    def time_remaining(self) -> float:
        return self.remaining_s


def _count(metrics: ServiceMetrics, code: str) -> float:
    return metrics.requests.labels(code=code)._value.get()


@pytest.mark.parametrize(
    ("remaining_s", "code"),
    [(0.0, "DEADLINE_EXCEEDED"), (0.05, "DEADLINE_EXCEEDED"), (30.0, "CANCELLED")],
)
def test_a_stream_stopped_at_its_deadline_counts_as_deadline_exceeded(
    remaining_s: float, code: str
) -> None:
    async def run() -> ServiceMetrics:
        metrics = ServiceMetrics()
        decode = FakeWorker("decode-0")
        model = ServedModel("m", vocab_size=100, max_model_len=64, tokenizer=None)
        servicer = TandemServicer(model, FakePool("decode", [decode]), metrics=metrics)
        decode.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        stream = servicer.Generate(_request(), _Expiring(remaining_s))
        await stream.__anext__()
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        task.cancel()  # grpc cancels the handler when the client goes
        with pytest.raises(asyncio.CancelledError):
            await task
        return metrics

    metrics = asyncio.run(run())
    assert _count(metrics, code) == 1
    other = "CANCELLED" if code == "DEADLINE_EXCEEDED" else "DEADLINE_EXCEEDED"
    assert _count(metrics, other) == 0


def test_a_request_with_nowhere_else_to_go_is_not_counted_as_retried() -> None:
    async def run() -> tuple[TandemServicer, ServiceMetrics, Any]:
        metrics = ServiceMetrics()
        model = ServedModel("m", vocab_size=100, max_model_len=64, tokenizer=None)
        only = FakeWorker("w0", fails=WorkerLost("worker lost: ActorDiedError"))
        # the lost worker's replacement never comes: the wait for it is short here
        servicer = TandemServicer(model, FakePool("decode", [only]), metrics=metrics,
                                  failover=FailoverConfig(replacement_wait_s=0.2))  # fmt: skip
        with pytest.raises(_Refused) as refused:
            [r async for r in servicer.Generate(_request(), _Context())]
        return servicer, metrics, refused.value

    servicer, metrics, refused = asyncio.run(run())
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert servicer.num_retried == 0
    assert metrics.retried._value.get() == 0


@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff", b"\x1a\x02\xc3\x28"],  # not protobuf; text (field 3) not UTF-8
    ids=["malformed", "invalid-utf8"],
)
def test_a_message_that_does_not_parse_becomes_a_typed_refusal(data: bytes) -> None:
    from proto.tandem.v1 import tandem_pb2 as pb

    parsed = _parser(pb.GenerateRequest)(data)
    assert isinstance(parsed, _Malformed)
    assert "GenerateRequest" in parsed.reason
    assert _parser(pb.GenerateRequest)(pb.GenerateRequest(text="ok").SerializeToString()).text
