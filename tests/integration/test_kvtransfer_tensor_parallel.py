"""KV transfer between tensor-parallel layouts (issue 24): real workers in this process (no Ray)
over real gloo pairs, their ranks real processes. The default model (3 KV heads) prefilled at
TP=a and decoded at TP=b gives the single engine's greedy output for (a, b) in 1->3, 3->1,
3->3 and 1->1; each transfer is one payload per layer chunk whatever the layouts; nothing
leaks on either side; a pair's layout check names both ends' tensor-parallel sizes. A rank that
dies on either side fails the request as a lost worker and leaves nothing held on the other.
All of it twice: TP=3 ranks sharing one KV cache (CPU), and each holding its own (the GPU's
way: tensor_parallel_shared_kv=False)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

import decode_worker.actor as decode_actor
import prefill_worker.actor as prefill_actor
from contracts.errors import KVTransferError, WorkerLost
from contracts.sampling_params import SamplingParams
from decode_worker.actor import EngineWorker
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from kvtransfer.layout import KVLayout
from kvtransfer.pair import connect_pair
from kvtransfer.transport import TransportConfig
from prefill_worker.actor import PrefillWorker
from tests.conftest import greedy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOST = "127.0.0.1"
FAST = TransportConfig(backend="gloo", timeout_s=10.0, connect_timeout_s=8.0, gloo_hostname=HOST)
SIZES = (1, 3)
PROMPT = "The capital of France is"
MAX_TOKENS = 5


def engine_config(tp_size: int, shared_kv: bool = True) -> EngineConfig:
    return EngineConfig(
        device="cpu", num_kv_blocks=64, block_size=4, seed=0, tensor_parallel_size=tp_size,
        tensor_parallel_shared_kv=shared_kv, kv_transfer=True,  # as the disaggregated pools'
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256),
    )  # fmt: skip


@pytest.fixture(scope="module", params=["shared", "private"])
def workers(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[dict[int, PrefillWorker], dict[int, EngineWorker]]]:
    """A prefill and a decode worker at TP=1 and at TP=3, every prefill worker paired with
    every decode worker. "shared": the TP=3 ranks map one KV cache; "private": each holds its
    own KV head, as GPU ranks do, and a transfer gathers to (scatters from) rank 0."""
    shared_kv = request.param == "shared"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_actor, "transport_for", lambda engine, *host: FAST)
        patch.setattr(prefill_actor, "transport_for", lambda engine, *host: FAST)
        prefill: dict[int, PrefillWorker] = {}
        decode: dict[int, EngineWorker] = {}
        try:
            for size in SIZES:
                config = engine_config(size, shared_kv)
                prefill[size] = PrefillWorker(config, f"prefill-tp{size}")
                decode[size] = EngineWorker(config, f"decode-tp{size}")
            for b, worker in decode.items():
                address = worker.open_endpoint(HOST)
                for a, sender in prefill.items():
                    asyncio.run(sender.connect(f"decode-tp{b}", address, f"tp{a}/tp{b}"))
            yield prefill, decode
        finally:
            for sender in prefill.values():
                for b in decode:
                    asyncio.run(sender.disconnect(f"decode-tp{b}"))
                sender.shutdown()
            for worker in decode.values():
                worker.shutdown()


async def prefill_then_decode(
    prefill: PrefillWorker, decode: EngineWorker, request_id: str, prompt: list[int]
) -> tuple[list[int], int]:
    """The request prefilled on `prefill`, its KV shipped to `decode`, decoded there: its
    tokens and the number of prompt tokens whose KV moved."""
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    result = await prefill.prefill(request_id, prompt, params, None, decode.worker_id)
    assert result.kv is not None and result.kv.decode_worker == decode.worker_id
    outputs = decode.outputs("test")
    await decode.start_continue("test", request_id, prompt, result, params)
    token_ids: list[int] = []
    async for batch in outputs:
        for got_id, output in batch:
            assert got_id == request_id
            if isinstance(output, BaseException):
                raise output
            token_ids += output.new_token_ids
            if output.finished:
                await outputs.aclose()
                return token_ids, result.kv.num_tokens
    raise AssertionError("the output stream ended early")


def completed(worker: Any) -> tuple[int, int]:
    kv = asyncio.run(worker.stats()).kv
    return kv.transfers_completed, kv.bytes_sent + kv.bytes_received


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp"), [(1, 3), (3, 1), (3, 3), (1, 1)], ids=lambda n: f"tp{n}"
)
def test_kv_moves_between_layouts_with_the_single_engines_output(
    workers: tuple[dict[int, PrefillWorker], dict[int, EngineWorker]],
    default_model_engine: Engine,
    prefill_tp: int,
    decode_tp: int,
) -> None:
    prefill, decode = workers[0][prefill_tp], workers[1][decode_tp]
    prompt = default_model_engine.tokenizer.encode(PROMPT)  # type: ignore[union-attr]
    expected = default_model_engine.generate([PROMPT], greedy(max_tokens=MAX_TOKENS))[0]
    sender = prefill.senders[decode.worker_id]
    (done, received_bytes), sent = completed(decode), sender.channel._num_sent
    request_id = f"r-{prefill_tp}-{decode_tp}"
    token_ids, num_tokens = asyncio.run(prefill_then_decode(prefill, decode, request_id, prompt))
    assert token_ids == expected.token_ids
    layout = decode.layout  # every KV head travels (3), whatever either side's TP
    assert layout.num_kv_heads == 3 and layout.tensor_parallel_size == decode_tp
    assert prefill.layout.tensor_parallel_size == prefill_tp
    num_blocks = -(-num_tokens // layout.block_size)
    assert completed(decode) == (done + 1, received_bytes + num_blocks * layout.bytes_per_block)
    assert sender.channel._num_sent == sent + 1, "one payload: all layers, every rank's heads"
    for worker in (prefill, decode):
        deadline = time.monotonic() + 10
        while True:  # the sender frees its pinned blocks once the receiver acknowledged
            stats = asyncio.run(worker.stats())
            if stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks:
                break
            assert time.monotonic() < deadline, f"{worker.worker_id} still holds KV: {stats}"
            time.sleep(0.02)
        asyncio.run(worker.check_integrity())


def test_a_pair_of_other_layouts_is_refused_naming_both_tensor_parallel_sizes(
    workers: tuple[dict[int, PrefillWorker], dict[int, EngineWorker]],
) -> None:
    decode = workers[1][3]
    address = decode.open_endpoint(HOST)
    other = KVLayout(
        model_id=decode.layout.model_id, dtype="float16", block_size=4, num_layers=30,
        num_kv_heads=3, head_dim=64, tensor_parallel_size=1,
    )  # fmt: skip
    with pytest.raises(KVTransferError) as refused:
        connect_pair(address, "other/tp3", FAST, "cpu", layout=other)
    assert str(refused.value) == (
        "pair 'other/tp3' refused: the prefill (sender, tensor_parallel_size 1) and decode "
        "(receiver, tensor_parallel_size 3) KV layouts differ: dtype float16 != float32; "
        "serve both with the same --kv-cache-dtype, --kv-cache-scales and model"
    )


# ---- a rank that dies (these two leave their workers failed: they run last) ---------------


def kill_rank_1(worker: Any) -> int:
    followers = worker.engine.tp.followers
    pid = followers.processes[0].pid
    os.kill(pid, signal.SIGKILL)
    return int(pid)


def wait_idle_and_intact(worker: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = asyncio.run(worker.stats())
        if stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks:
            break
        assert time.monotonic() < deadline, f"{worker.worker_id} still holds KV: {stats}"
        time.sleep(0.05)
    asyncio.run(worker.check_integrity())


def test_a_dead_decode_rank_fails_the_request_as_lost_and_the_sender_frees_its_kv(
    workers: tuple[dict[int, PrefillWorker], dict[int, EngineWorker]],
    default_model_engine: Engine,
) -> None:
    prefill, decode = workers[0][1], workers[1][3]
    pid = kill_rank_1(decode)
    prompt = default_model_engine.tokenizer.encode(PROMPT)  # type: ignore[union-attr]
    with pytest.raises(WorkerLost, match=rf"rank 1 \(pid {pid}\) exited with code -9"):
        asyncio.run(prefill_then_decode(prefill, decode, "r-dead-decode-rank", prompt))
    assert asyncio.run(decode.stats()).failure is not None  # the control plane replaces it
    wait_idle_and_intact(prefill)  # the prefill side holds nothing for the transfer
    # nor does the failed worker (its engine thread is gone: read its bookkeeping directly);
    # with private KV the rank's death failed the scatter of the KV that had landed
    decode.engine.check_integrity(holders=decode._transfer_holders())


def test_a_dead_prefill_rank_fails_the_prefill_as_lost_and_ships_nothing(
    workers: tuple[dict[int, PrefillWorker], dict[int, EngineWorker]],
    default_model_engine: Engine,
) -> None:
    prefill, decode = workers[0][3], workers[1][1]
    completed_before = completed(decode)
    pid = kill_rank_1(prefill)
    deadline = time.monotonic() + 10
    while asyncio.run(prefill.stats()).failure is None:  # idle, the health check sees it too
        assert time.monotonic() < deadline, "an idle worker's dead rank went unnoticed"
        time.sleep(0.02)
    assert f"rank 1 (pid {pid}) exited with code -9" in str(asyncio.run(prefill.stats()).failure)
    prompt = default_model_engine.tokenizer.encode(PROMPT)  # type: ignore[union-attr]
    with pytest.raises(WorkerLost, match=rf"rank 1 \(pid {pid}\) exited with code -9"):
        asyncio.run(prefill_then_decode(prefill, decode, "r-dead-prefill-rank", prompt))
    assert completed(decode) == completed_before
    wait_idle_and_intact(decode)
