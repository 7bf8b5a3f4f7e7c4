"""router.server in disaggregated mode with per-request prefill placement (router.disagg): a
request placed `local` runs whole on its decode worker (start_generate, no prefill call, no
KV shipped), `remote` as before; the decision is counted by path and reason; a local request
whose decode worker is lost before any output moves to another decode worker; a cancelled
local request is aborted there. Fake worker clients (tests/unit/test_router_cancel.py); the
real path: tests/integration/test_service_disagg.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from contracts.errors import WorkerLost
from proto.tandem.v1 import tandem_pb2 as pb
from router.disagg import DisaggPolicy
from router.requests import ServedModel
from router.server import TandemServicer
from telemetry.metrics import ServiceMetrics
from tests.unit.test_router_cancel import FIRST_TOKEN, FakeContext, FakePool, FakeWorker, _output

MODEL = ServedModel("m", vocab_size=100, max_model_len=64, tokenizer=None)


def request(num_tokens: int) -> Any:
    message = pb.GenerateRequest(request_id="r1", sampling=pb.SamplingParameters(max_tokens=8))
    message.token_ids.ids.extend(range(5, 5 + num_tokens))
    return message


def servicer(
    policy: DisaggPolicy, decodes: list[FakeWorker], prefills: list[FakeWorker]
) -> tuple[TandemServicer, ServiceMetrics]:
    metrics = ServiceMetrics()
    served = TandemServicer(
        MODEL, FakePool("decode", decodes), FakePool("prefill", prefills), metrics=metrics,
        disagg=policy,
    )  # fmt: skip
    return served, metrics


def placements(metrics: ServiceMetrics) -> dict[tuple[str, str], float]:
    return {
        (s.labels["path"], s.labels["reason"]): s.value
        for family in metrics.registry.collect()
        if family.name == "tandem_prefill_placement"
        for s in family.samples
        if s.name.endswith("_total")
    }


def called(worker: FakeWorker) -> list[str]:
    return [name for name, _ in worker.calls]


def test_never_prefills_on_the_decode_worker_and_counts_it() -> None:
    async def run() -> None:
        decode, prefill = FakeWorker("decode-0"), FakeWorker("prefill-0")
        served, metrics = servicer(DisaggPolicy(mode="never"), [decode], [prefill])
        decode.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        decode.batches.put_nowait([("r1", _output("r1", 12, finished=True))])
        responses = [r async for r in served.Generate(request(4), FakeContext())]
        assert [list(r.token_ids) for r in responses] == [[FIRST_TOKEN], [12]]
        assert called(decode) == ["start_generate"] and prefill.calls == []
        assert placements(metrics) == {("local", "forced_local"): 1.0}
        assert served.outputs.num_open == 0
        member = served.decode.members()[0]
        assert (member.load.in_flight, member.load.queued_tokens) == (0, 0)
        assert member.load.recent_itl_s is not None  # the gap between its two outputs

    asyncio.run(run())


def test_auto_sends_short_prompts_local_and_long_ones_remote() -> None:
    async def run() -> None:
        decode, prefill = FakeWorker("decode-0"), FakeWorker("prefill-0")
        policy = DisaggPolicy(mode="auto", local_max_tokens=4)
        served, metrics = servicer(policy, [decode], [prefill])
        for num_tokens in (4, 5):
            decode.batches.put_nowait([("r1", _output("r1", 12, finished=True))])
            [r async for r in served.Generate(request(num_tokens), FakeContext())]
        assert called(decode) == ["start_generate", "start_continue"]
        assert called(prefill) == ["prefill"]
        assert placements(metrics) == {
            ("local", "short_prompt"): 1.0,
            ("remote", "long_prompt"): 1.0,
        }

    asyncio.run(run())


def test_auto_prefills_locally_when_no_prefill_worker_is_left() -> None:
    async def run() -> None:
        decode, prefill = FakeWorker("decode-0"), FakeWorker("prefill-0")
        served, metrics = servicer(DisaggPolicy(mode="auto", local_max_tokens=0), [decode],
                                   [prefill])  # fmt: skip
        assert served.prefill is not None
        served.prefill.mark_down(served.prefill.members()[0])
        decode.batches.put_nowait([("r1", _output("r1", 12, finished=True))])
        responses = [r async for r in served.Generate(request(6), FakeContext())]
        assert responses[-1].HasField("usage")
        assert placements(metrics) == {("local", "no_prefill_worker"): 1.0}

    asyncio.run(run())


@pytest.mark.parametrize("unreachable", [True, False], ids=["unreachable", "dead"])
def test_a_local_request_moves_to_another_decode_worker_if_its_own_is_lost(
    unreachable: bool,
) -> None:
    async def run() -> None:
        error = WorkerLost("the worker is gone", unreachable=unreachable)
        lost, healthy = FakeWorker("decode-0", fails=error), FakeWorker("decode-1")
        served, _ = servicer(DisaggPolicy(mode="never"), [lost, healthy], [FakeWorker("p")])
        healthy.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN, finished=True))])
        responses = [r async for r in served.Generate(request(4), FakeContext())]
        assert responses[-1].HasField("usage")  # served by the other decode worker
        assert called(healthy) == ["start_generate"]
        assert lost.aborted() == (["r1"] if unreachable else [])
        assert served.num_retried == 1
        assert served.decode.members()[0].load.down

    asyncio.run(run())


def test_a_cancelled_local_request_is_aborted_on_its_decode_worker() -> None:
    async def run() -> None:
        decode = FakeWorker("decode-0")
        served, _ = servicer(DisaggPolicy(mode="never"), [decode], [FakeWorker("p")])
        decode.batches.put_nowait([("r1", _output("r1", FIRST_TOKEN))])
        stream = served.Generate(request(4), FakeContext())
        await stream.__anext__()
        await stream.aclose()  # grpc closes it at the yield
        assert decode.aborted() == ["r1"]
        assert served.outputs.num_open == 0

    asyncio.run(run())


def reuse_servicer(
    policy: DisaggPolicy, cached_blocks: int, num_tokens: int
) -> tuple[TandemServicer, list[FakeWorker], FakeWorker, ServiceMetrics]:
    """Two decode workers and a prefill worker; the in-process index says decode-1 holds the
    first `cached_blocks` blocks of request(num_tokens)'s prompt (it decoded the last turn)."""
    from contracts.block_hash import prompt_block_hashes
    from contracts.workers import WorkerKey
    from prefix_cache.index import CacheEventBatch, LocalPrefixIndex

    decodes, prefill = [FakeWorker("decode-0"), FakeWorker("decode-1")], FakeWorker("prefill-0")
    index = LocalPrefixIndex()
    metrics = ServiceMetrics()
    served = TandemServicer(
        MODEL, FakePool("decode", decodes), FakePool("prefill", [prefill]), metrics=metrics,
        disagg=policy, prefix_index=index,
    )  # fmt: skip
    assert served.prefill is not None
    for member in served.decode.members() + served.prefill.members():
        member.index_key = WorkerKey(member.worker_id, "e1")
    hashes = prompt_block_hashes(list(request(num_tokens).token_ids.ids), 16, "m")
    index.apply(
        CacheEventBatch(WorkerKey("decode-1", "e1"), 1, True, tuple(hashes[:cached_blocks]))
    )
    return served, decodes, prefill, metrics


@pytest.mark.parametrize("num_tokens", [40, 48])  # the prompt's last block partial, or full
def test_the_decode_worker_holding_the_prefix_gets_only_the_missing_suffix(
    num_tokens: int,
) -> None:
    """decode-1 holds 2 blocks of 16 (32 tokens) of the prompt; it is chosen over the idle
    decode-0 (the cache preference) and the prefill ships the prompt less those 32 tokens:
    decode_cached_tokens=32 goes to the prefill worker with the decode worker as ship_to."""

    async def run() -> None:
        served, decodes, prefill, _ = reuse_servicer(DisaggPolicy(mode="always"), 2, num_tokens)
        decodes[1].batches.put_nowait([("r1", _output("r1", FIRST_TOKEN, finished=True))])
        [r async for r in served.Generate(request(num_tokens), FakeContext())]
        assert decodes[0].calls == [] and called(decodes[1]) == ["start_continue"]
        ((_, args),) = prefill.calls
        assert args[4] == "decode-1" and args[6] == 32  # ship_to, decode_cached_tokens

    asyncio.run(run())


def test_a_cached_prefix_caps_at_whole_blocks_leaving_the_last_prompt_token() -> None:
    """A 32-token prompt whose 2 blocks decode-1 caches: an engine reuses only 1 of them (the
    last prompt token is always computed), so 16 tokens are cached, not 31 or 32."""

    async def run() -> None:
        served, decodes, prefill, _ = reuse_servicer(DisaggPolicy(mode="always"), 2, 32)
        decodes[1].batches.put_nowait([("r1", _output("r1", FIRST_TOKEN, finished=True))])
        [r async for r in served.Generate(request(32), FakeContext())]
        ((_, args),) = prefill.calls
        assert args[6] == 16

    asyncio.run(run())


def test_auto_counts_the_decode_workers_cached_prefix_as_computed() -> None:
    """48 prompt tokens over local_max_tokens=20 would go remote; 32 of them cached on the
    decode worker leave 16 uncached: prefilled there (short_prompt), no prefill call."""

    async def run() -> None:
        policy = DisaggPolicy(mode="auto", local_max_tokens=20)
        served, decodes, prefill, metrics = reuse_servicer(policy, 2, 48)
        decodes[1].batches.put_nowait([("r1", _output("r1", FIRST_TOKEN, finished=True))])
        [r async for r in served.Generate(request(48), FakeContext())]
        assert called(decodes[1]) == ["start_generate"] and prefill.calls == []
        assert placements(metrics) == {("local", "short_prompt"): 1.0}

    asyncio.run(run())
