"""The EngineLoop that drives a worker's engine from one thread for asyncio callers, and the
decode role's KV arrivals on it: outputs equal the engine's own, aborts free the request
whether they come during it or before it, a continued request's first output comes before
its KV, KV that does not come (no room, a failed or timed-out transfer, a lost prefill
worker) is recomputed instead, KV whose request was aborted
(or ended at its first token) is freed as it comes, a failed engine fails fast."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from contracts.errors import RankFailed, RequestAborted, WorkerLost, WorkerUnavailable
from contracts.handoff import KVHandle, PrefillResult
from contracts.outputs import FinishReason, Usage
from contracts.sampling_params import SamplingParams
from decode_worker.kv_arrivals import KVArrivals
from kvtransfer.protocol import TransferMetrics, TransferResult, TransferStatus
from kvtransfer.receiver import ReceivedKV
from tests import conftest
from tests.conftest import greedy, make_engine, prompt_ids
from worker.engine_loop import EngineLoop


@pytest.fixture(autouse=True, params=[None, True], ids=["default", "overlap"])
def overlap_outputs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test twice: with the CPU default (synchronous steps) and with each step launched
    before the last one's outputs are made (the default on CUDA): the loop, the KV arrivals
    and aborts between steps then meet a step in flight."""
    overlap = request.param

    def engine(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("overlap_outputs", overlap)
        return conftest.make_engine(*args, **kwargs)

    monkeypatch.setattr(sys.modules[__name__], "make_engine", engine)


def decode_loop(*receivers: Any) -> tuple[EngineLoop, KVArrivals]:
    """An engine loop in the decode role, its KV coming through `receivers`."""
    engine = make_engine()
    arrivals = KVArrivals(engine.block_manager.release)
    arrivals.receivers.extend(receivers)
    return EngineLoop(engine, arrivals), arrivals


def prefilled(request_id: str, prompt: list[int], first_token_id: int) -> PrefillResult:
    """What a prefill worker returns for `request_id`, its KV named `t-<request_id>`."""
    handle = KVHandle(f"t-{request_id}", "prefill-0", "decode-0", len(prompt))
    return PrefillResult(first_token_id, None, Usage(len(prompt), 0, 1), handle)


async def drain(stream: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while True:
        item = await asyncio.wait_for(stream.get(), 30)
        items.append(item)
        if isinstance(item, BaseException) or item.finished:
            return items


def test_streams_equal_the_engine_and_run_concurrently() -> None:
    prompts = [prompt_ids(seed=s, length=5 + 3 * s) for s in range(4)]
    expected = [c.token_ids for c in make_engine().generate(prompts, greedy(max_tokens=9))]
    loop = EngineLoop(make_engine())

    async def main() -> list[list[int]]:
        streams = [loop.submit(f"r{i}", p, greedy(max_tokens=9)) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*(drain(s) for s in streams))
        return [[t for out in outs for t in out.new_token_ids] for outs in results]

    try:
        assert asyncio.run(main()) == expected
        loop.call(lambda engine: engine.check_integrity())
    finally:
        loop.stop()


def test_abort_mid_stream_and_abort_before_arrival() -> None:
    loop = EngineLoop(make_engine())

    async def main() -> tuple[list[Any], list[Any]]:
        stream = loop.submit("long", prompt_ids(1, 6), greedy(max_tokens=200))
        first = await stream.get()
        loop.abort("long")
        rest = await drain(stream)
        loop.abort("early")  # a cancel that overtakes its request
        early = await drain(loop.submit("early", prompt_ids(2, 6), greedy(max_tokens=5)))
        return [first, *rest], early

    try:
        outputs, early = asyncio.run(main())
        assert outputs[-1].finish_reason is FinishReason.ABORT
        assert len(outputs) < 200
        assert len(early) == 1 and isinstance(early[0], RequestAborted)
        assert loop.num_requests == 0
        loop.call(lambda engine: engine.check_integrity())
    finally:
        loop.stop()


class FailedTransfers:
    """A receiver whose transfers all failed (the real KVReceiver is tested across processes
    in tests/integration/test_kvtransfer_protocol.py)."""

    failure: str | None = None  # the pair itself is fine
    num_live = 0

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.metrics = TransferMetrics()

    def poll(self) -> list[Any]:
        return []

    def result(self, transfer_id: str) -> TransferResult | None:
        return TransferResult(transfer_id, "r", TransferStatus.FAILED, "peer process died")

    def knows(self, transfer_id: str) -> bool:
        return True

    def abort(self, transfer_id: str, reason: str = "") -> bool:
        self.aborted.append(transfer_id)
        return False

    def owners(self) -> list[str]:
        return []


class NoRoomForKV(FailedTransfers):
    """A receiver that refused every transfer: this worker had no free blocks for it."""

    def result(self, transfer_id: str) -> TransferResult:
        return TransferResult(
            transfer_id, "r", TransferStatus.FAILED, "no free KV blocks for 2 blocks"
        )


class NeverOffered(FailedTransfers):
    """A receiver that never hears of the transfer (its sender is slow, or gone)."""

    def result(self, transfer_id: str) -> None:
        return None

    def knows(self, transfer_id: str) -> bool:
        return False


class PairFailsBeforeTheOffer(NeverOffered):
    """The pair of the request's prefill worker fails (the worker died after the first token,
    before it offered the KV): its receiver reports the failure after a few turns."""

    def __init__(self) -> None:
        super().__init__()
        self.turns = 0

    def poll(self) -> list[Any]:
        self.turns += 1
        if self.turns > 3:
            self.failure = "peer closed the control connection"
        return []


# (receiver, the KV wait, the reason counted): issue 22.2, every way the KV may not come
KV_THAT_DOES_NOT_COME = {
    "no-room": (NoRoomForKV, 30.0, "no_room"),
    "failed": (FailedTransfers, 30.0, "failed"),
    "timeout": (NeverOffered, 0.3, "timeout"),
    "prefill-worker-lost": (PairFailsBeforeTheOffer, 30.0, "pair_failed"),
}


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded"])
@pytest.mark.parametrize("case", list(KV_THAT_DOES_NOT_COME))
def test_a_request_whose_kv_does_not_come_is_recomputed_not_failed(
    seed: int | None, case: str
) -> None:
    """Issue 16.6 (no room) and 22.2 (a failed or timed-out transfer, a prefill worker lost
    before it shipped): the decode worker used to fail requests after their first token (the
    client had it already). Now it recomputes the prompt: the same tokens as one engine."""
    receiver_type, kv_wait_s, reason = KV_THAT_DOES_NOT_COME[case]
    prompt = prompt_ids(1, 6)
    params = greedy(max_tokens=6)
    if seed is not None:
        params = SamplingParams(max_tokens=6, temperature=0.8, seed=seed, ignore_eos=True)
    (expected,) = make_engine().generate([prompt], params)
    receiver = receiver_type()
    loop, arrivals = decode_loop(receiver)

    async def main() -> list[Any]:
        result = prefilled("r", prompt, expected.token_ids[0])
        stream = arrivals.submit(loop, "r", prompt, result, params, None, kv_wait_s=kv_wait_s)
        return await drain(stream)

    try:
        outputs = asyncio.run(main())
        assert not any(isinstance(o, BaseException) for o in outputs), outputs
        assert [t for o in outputs for t in o.new_token_ids] == expected.token_ids
        assert outputs[-1].usage.completion_tokens == len(expected.token_ids)
        assert arrivals.num_recomputed == {reason: 1}
        if case in ("timeout", "prefill-worker-lost"):  # if it comes after all, it is freed
            assert receiver.aborted == ["t-r"]
        assert loop.num_requests == 0
        loop.call(lambda engine: engine.check_integrity())
    finally:
        loop.stop()


def test_a_failed_engine_fails_its_requests_and_refuses_calls() -> None:
    engine = make_engine()

    def broken_step() -> list[Any]:
        raise RuntimeError("device lost")

    engine.step = broken_step  # type: ignore[method-assign]
    loop = EngineLoop(engine)

    async def main() -> list[Any]:
        return await drain(loop.submit("r", prompt_ids(1, 6), greedy(max_tokens=5)))

    (error,) = asyncio.run(main())
    assert isinstance(error, WorkerUnavailable) and "device lost" in str(error)
    assert loop.failure == "RuntimeError: device lost"
    with pytest.raises(WorkerUnavailable, match="engine loop stopped"):
        loop.call(lambda e: e.check_integrity())  # no hang: nobody is left to run it
    with pytest.raises(WorkerUnavailable):
        loop.submit("later", prompt_ids(1, 6), greedy(max_tokens=5))


def test_a_dead_tensor_parallel_rank_fails_its_requests_as_a_lost_worker() -> None:
    """RankFailed takes the worker down as a unit: the router must see it lost (WorkerLost:
    mark it down, retry what had no output), not a plain failure (issue 24)."""
    engine = make_engine()

    def broken_step() -> list[Any]:
        raise RankFailed("tensor-parallel rank failed (rank 1 (pid 7) exited with code -9)")

    engine.step = broken_step  # type: ignore[method-assign]
    loop = EngineLoop(engine)

    async def main() -> list[Any]:
        return await drain(loop.submit("r", prompt_ids(1, 6), greedy(max_tokens=5)))

    (error,) = asyncio.run(main())
    assert isinstance(error, WorkerLost) and not error.unreachable
    assert "rank 1 (pid 7) exited with code -9" in str(error)


class GonePair:
    """A receiver whose prefill peer has left: failed, nothing live, nothing held."""

    def __init__(self, failure: str | None, owners: list[str]) -> None:
        self.failure = failure
        self.num_live = 0
        self._owners = owners
        self.metrics = TransferMetrics(bytes_received=1000, transfers_completed=2)

    def poll(self) -> list[Any]:
        return []

    def result(self, transfer_id: str) -> None:
        return None

    def owners(self) -> list[str]:
        return self._owners


def test_receivers_of_pairs_that_are_gone_are_dropped_keeping_their_counts() -> None:
    gone, holding, healthy = (
        GonePair("peer left", []),
        GonePair("peer left", ["kv:x"]),
        GonePair(None, []),
    )
    loop, arrivals = decode_loop(gone, holding, healthy)
    try:
        loop.call(lambda engine: None)  # one turn of the engine thread
        loop.wake()
        loop.call(lambda engine: None)
        assert arrivals.receivers == [holding, healthy]  # one still holds KV; one is live
        assert arrivals.retired_metrics.bytes_received == 1000
        assert arrivals.retired_metrics.transfers_completed == 2
    finally:
        loop.stop()


class LateArrivals:
    """A receiver that completes the transfers the test hands it (their KV reserved in the
    engine's block manager, as KVReceiver does) at the loop's next poll."""

    failure = None  # the pair is healthy
    num_live = 0

    def __init__(self) -> None:
        self.ready: list[Any] = []

    def arrive(self, engine: Any, request_id: str) -> str:
        """Reserve two blocks for `request_id`'s KV and complete its transfer; the owner."""
        owner = f"kv-in:{request_id}"
        blocks = engine.block_manager.reserve(owner, 2)
        transfer_id = f"t-{request_id}"  # as `prefilled` names it
        self.ready.append(ReceivedKV(transfer_id, request_id, owner, tuple(blocks), 20, 0.0))
        return owner

    def poll(self) -> list[Any]:
        ready, self.ready = self.ready, []
        return ready

    def result(self, transfer_id: str) -> None:
        return None

    def abort(self, transfer_id: str, reason: str) -> bool:
        return False  # not live here: complete already, or not offered yet

    def owners(self) -> list[str]:
        return []


def test_kv_arriving_after_its_request_was_aborted_is_freed_as_it_arrives() -> None:
    """The abort of a request overtakes its transfer's Offer (the router gave up during the
    prefill): the KV is released at arrival, not held as unclaimed for UNCLAIMED_KV_S. KV of
    a request nobody aborted stays for its continue call."""
    receiver = LateArrivals()
    loop, arrivals = decode_loop(receiver)
    try:
        loop.abort("gave-up")
        loop.call(lambda engine: None)  # the abort is taken: nothing of it is here yet
        loop.call(lambda engine: (receiver.arrive(engine, "gave-up"),
                                  receiver.arrive(engine, "kept")))  # fmt: skip
        loop.wake()
        loop.call(lambda engine: None)  # a turn that polls the arrivals
        loop.wake()
        held = loop.call(lambda engine: (arrivals.holders(),
                                         engine.block_manager.num_free_blocks,
                                         engine.block_manager.num_blocks))  # fmt: skip
        assert held == (["kv-in:kept"], held[2] - 2, held[2])
        loop.abort("kept")  # now the other one's request gives up too: freed at once
        loop.call(lambda engine: None)
        free = loop.call(lambda engine: engine.block_manager.num_free_blocks)
        assert free == held[2] and loop.call(lambda engine: arrivals.holders()) == []
        loop.call(lambda engine: engine.check_integrity())
    finally:
        loop.stop()


def test_kv_of_a_request_its_first_token_ended_is_freed_as_it_arrives() -> None:
    """The decode side owns the first token's finish: a first token that ends the request
    (here max_tokens=1; EOS or a stop string alike) closes it at once, and the KV the
    prefill worker shipped anyway is released when it lands, not held as unclaimed."""
    receiver = LateArrivals()
    loop, arrivals = decode_loop(receiver)
    prompt = prompt_ids(3, 6)

    async def main() -> list[Any]:
        result = prefilled("one", prompt, 9)
        return await drain(arrivals.submit(loop, "one", prompt, result, greedy(max_tokens=1), None))

    try:
        (only,) = asyncio.run(main())
        assert only.new_token_ids == (9,) and only.finish_reason is FinishReason.LENGTH
        assert only.usage.completion_tokens == 1 and only.usage.prompt_tokens == len(prompt)
        loop.call(lambda engine: receiver.arrive(engine, "one"))
        loop.wake()
        loop.call(lambda engine: None)  # a turn that polls the arrival
        loop.wake()
        free, total = loop.call(lambda engine: (engine.block_manager.num_free_blocks,
                                                engine.block_manager.num_blocks))  # fmt: skip
        assert free == total and loop.call(lambda engine: arrivals.holders()) == []
        assert loop.num_requests == 0
        loop.call(lambda engine: engine.check_integrity())
    finally:
        loop.stop()


class PendingTransfers:
    """A receiver whose transfers never complete; it records the ones dropped."""

    failure = None
    num_live = 0

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def poll(self) -> list[Any]:
        return []

    def result(self, transfer_id: str) -> None:
        return None

    def owners(self) -> list[str]:
        return []

    def abort(self, transfer_id: str, reason: str) -> None:
        self.aborted.append(transfer_id)


def test_a_prefix_gone_from_the_cache_drops_its_transfer_and_recomputes() -> None:
    """The router thought this decode worker held the prompt's first block (the index is a
    hint): the transfer ships only what follows it. It is not cached here, so the transfer is
    dropped at once and the prompt recomputed: one engine's output, nothing counted as reused."""
    prompt = prompt_ids(1, 10)
    params = greedy(max_tokens=6)
    (expected,) = make_engine().generate([prompt], params)
    receiver = PendingTransfers()
    loop, arrivals = decode_loop(receiver)

    async def main() -> list[Any]:
        handle = KVHandle("t-r", "prefill-0", "decode-0", 6, start_token=4, num_blocks=2)
        result = PrefillResult(expected.token_ids[0], None, Usage(10, 0, 1), handle)
        return await drain(arrivals.submit(loop, "r", prompt, result, params, None))

    try:
        outputs = asyncio.run(main())
        assert [t for o in outputs for t in o.new_token_ids] == expected.token_ids
        assert receiver.aborted == ["t-r"]
        assert (arrivals.counts.tokens_received, arrivals.counts.tokens_reused) == (0, 0)
        loop.call(lambda engine: engine.check_integrity())
    finally:
        loop.stop()
