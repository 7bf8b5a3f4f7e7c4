"""Client-chosen request ids are never internal keys (docs/reliability.md, promise 12, I10).

The router gives every attempt of a request an id of its own (the workers, their output
streams, KV transfers and aborts only ever see those); a request id that is live already is
refused with ALREADY_EXISTS; a worker whose KV transfer cannot be submitted releases the KV it
kept for it, and an engine never crashes on a reused id. The real path (Ray, gRPC, both worker
kinds) is tests/integration/test_hostile_clients.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from contracts.sampling_params import SamplingParams
from decode_worker.actor import WorkerBase
from engine.config import EngineConfig
from prefill_worker.actor import PrefillWorker
from router.requests import ServedModel
from router.server import TandemServicer
from tests.conftest import greedy, make_engine
from tests.unit.test_router_cancel import (
    FIRST_TOKEN,
    FakeContext,
    FakePool,
    FakeWorker,
    _output,
    _request,
)


class _Refused(Exception):
    """What FakeContext.abort raises here, as grpc's context.abort does."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class _Context(FakeContext):
    def time_remaining(self) -> float:
        return 60.0

    async def abort(self, code: Any, details: str) -> None:
        raise _Refused(code, details)


def _worker_ids(*workers: FakeWorker) -> list[str]:
    """The request ids the router gave the workers, in call order."""
    ids = []
    for worker in workers:
        for name, args in worker.calls:
            if name in ("prefill", "abort"):
                ids.append(args[0])
            elif name in ("start_generate", "start_continue"):
                ids.append(args[1])
    return ids


@pytest.mark.parametrize("disaggregated", [False, True], ids=["colocated", "disaggregated"])
def test_the_client_id_is_echoed_but_never_reaches_a_worker(disaggregated: bool) -> None:
    async def run() -> None:
        model = ServedModel("m", vocab_size=100, max_model_len=64, tokenizer=None)
        decode = FakeWorker("decode-0")
        prefill = FakeWorker("prefill-0") if disaggregated else None
        servicer = TandemServicer(
            model, FakePool("decode", [decode]), FakePool("prefill", [prefill]) if prefill else None
        )
        responses = []
        for _ in range(2):  # the same id twice in sequence: both served
            decode.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN, finished=True))])
            responses += [r async for r in servicer.Generate(_request(), _Context())]
        assert {r.request_id for r in responses} == {"r1"}
        ids = _worker_ids(decode, *([prefill] if prefill else []))
        assert ids and "r1" not in ids
        assert len(set(ids)) == 2, f"one id per request, each attempt its own: {ids}"

    asyncio.run(run())


def test_a_live_request_id_is_refused_with_already_exists() -> None:
    async def run() -> None:
        model = ServedModel("m", vocab_size=100, max_model_len=64, tokenizer=None)
        decode = FakeWorker("decode-0")
        servicer = TandemServicer(model, FakePool("decode", [decode]))
        first = servicer.Generate(_request(), _Context())
        decode.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        assert list((await first.__anext__()).token_ids) == [FIRST_TOKEN]
        with pytest.raises(_Refused) as refused:
            await asyncio.wait_for(servicer.Generate(_request(), _Context()).__anext__(), 5)
        assert refused.value.code is grpc.StatusCode.ALREADY_EXISTS
        assert "r1" in refused.value.details
        decode.batches.put_nowait([("r1", _output("r1", 12, finished=True))])
        rest = [r async for r in first]  # (a hang here: the duplicate took its outputs)
        assert [list(r.token_ids) for r in rest] == [[12]], "the first keeps its own tokens"
        assert len(decode.calls) == 1, "the duplicate never reached a worker"
        # over: the id is free again
        decode.batches.put_nowait([("r1", _output("r1", 13, finished=True))])
        again = [r async for r in servicer.Generate(_request(), _Context())]
        assert [list(r.token_ids) for r in again] == [[13]]

    asyncio.run(run())


class _FailingSender:
    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> None:
        self.submitted += 1
        raise ValueError("transfer_id already used")

    def owners(self) -> list[str]:
        return []

    def abort(self, *args: Any) -> None:
        pass


def test_a_prefill_whose_transfer_cannot_be_submitted_releases_its_kv() -> None:
    """`sender.submit` raising (a reused transfer id, a closed pair) left the kept KV held
    for good: 94 blocks per request in the review's probe."""
    config = EngineConfig(model="dummy:tiny", device="cpu", num_kv_blocks=64, block_size=4)
    worker = PrefillWorker(config, "prefill-0")
    sender = _FailingSender()
    worker.senders["decode-0"] = sender  # type: ignore[assignment]
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    async def run() -> None:
        for _ in range(3):
            with pytest.raises(ValueError, match="already used"):
                await worker.prefill("a", list(range(1, 30)), params, None, "decode-0")

    try:
        asyncio.run(run())
        assert sender.submitted == 3
        manager = worker.engine.block_manager
        assert worker.loop.failure is None
        assert manager.num_free_blocks == manager.num_blocks
        asyncio.run(WorkerBase.check_integrity(worker))
    finally:
        worker.shutdown()


def test_an_engine_keeps_kv_of_a_reused_request_id_without_failing() -> None:
    """KV kept for a request id whose earlier KV is still held (being shipped) must not stop
    the engine ("'kept:<id>' already holds blocks" crashed the prefill worker)."""
    engine = make_engine()
    owners = []
    for tokens in ([5] * 9, [6] * 9):
        engine.add_request("a", None, greedy(max_tokens=1), prompt_token_ids=tokens, keep_kv=True)
        while engine.has_unfinished_requests():
            engine.step()
        kept = engine.take_kept_kv("a")  # shipped, not released yet
        assert kept is not None
        owners.append(kept.owner)
    assert len(set(owners)) == 2, f"each keep has an owner of its own: {owners}"
    engine.check_integrity(holders=owners)
    for owner in owners:
        assert engine.block_manager.release(owner)
    engine.check_integrity()
