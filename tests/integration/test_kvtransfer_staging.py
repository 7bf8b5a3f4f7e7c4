"""KV transfer through a staging region of one prompt (issue 24: private-KV tensor parallelism
keeps rank 0's transfer buffer bounded): real workers in this process (no Ray) over real gloo
pairs, their ranks real processes, the dummy tiny model at TP=2 with each rank holding its own
KV head. Two prompts in flight through one prompt's staging on each side both move: the
sender's second waits for the first's staging (freed at its Ack), the receiver defers the
second offer until the first landed KV is attached; outputs equal the single engine's and no
transfer is refused. An aborted transfer leaves no block and no staging block held."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

import decode_worker.actor as decode_actor
import prefill_worker.actor as prefill_actor
from contracts.sampling_params import SamplingParams
from decode_worker.actor import EngineWorker
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from kvtransfer.transport import TransportConfig
from prefill_worker.actor import PrefillWorker
from tests.conftest import prompt_ids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOST = "127.0.0.1"
FAST = TransportConfig(backend="gloo", timeout_s=10.0, connect_timeout_s=8.0, gloo_hostname=HOST)
PROMPT = prompt_ids(7, 19)  # 5 blocks of 4
MAX_TOKENS = 5
MAX_MODEL_LEN = 24  # the prompt and its tokens: 6 blocks, the whole staging region


def engine_config(tp_size: int) -> EngineConfig:
    return EngineConfig(
        model="dummy:tiny", device="cpu", num_kv_blocks=64, block_size=4, seed=0,
        max_model_len=MAX_MODEL_LEN, tensor_parallel_size=tp_size,
        tensor_parallel_shared_kv=False, kv_transfer=True, kv_staging_blocks=6,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64),
    )  # fmt: skip


@pytest.fixture(scope="module")
def expected() -> list[int]:
    engine = Engine(engine_config(1))
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    return engine.generate([PROMPT], params)[0].token_ids


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[PrefillWorker, EngineWorker]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_actor, "transport_for", lambda engine, *host: FAST)
        patch.setattr(prefill_actor, "transport_for", lambda engine, *host: FAST)
        prefill = PrefillWorker(engine_config(2), "prefill-tp2")
        decode = EngineWorker(engine_config(2), "decode-tp2")
        try:
            address = decode.open_endpoint(HOST)
            asyncio.run(prefill.connect(decode.worker_id, address, "tp2/tp2"))
            yield prefill, decode
        finally:
            asyncio.run(prefill.disconnect(decode.worker_id))
            prefill.shutdown()
            decode.shutdown()


async def decode_one(decode: EngineWorker, request_id: str, result: Any) -> list[int]:
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = decode.outputs(request_id)
    await decode.start_continue(request_id, request_id, PROMPT, result, params)
    token_ids: list[int] = []
    async for batch in outputs:
        for _, output in batch:
            if isinstance(output, BaseException):
                raise output
            token_ids += output.new_token_ids
            if output.finished:
                await outputs.aclose()
                return token_ids
    raise AssertionError("the output stream ended early")


async def two_through_one_staging(prefill: PrefillWorker, decode: EngineWorker) -> list[list[int]]:
    """Prefill a and b at once (b's KV waits for a's staging on the sender), then continue a
    (its attach frees the receiver's staging for b's deferred offer), then b."""
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    results = await asyncio.gather(
        *(prefill.prefill(r, PROMPT, params, None, decode.worker_id) for r in ("a", "b"))
    )
    return [await decode_one(decode, r, result) for r, result in zip("ab", results, strict=True)]


def staging_waits(worker: Any) -> int:
    return int(asyncio.run(worker.stats()).kv.kv_staging_waits)


def transfers(worker: Any) -> tuple[int, int]:
    kv = asyncio.run(worker.stats()).kv
    return kv.transfers_completed, kv.transfers_failed


def wait_idle_and_intact(worker: Any, timeout_s: float = 30) -> None:
    """Nothing held: every block free, every staging block free, the bookkeeping sound."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = asyncio.run(worker.stats())
        staging = worker.engine.transfer_region
        if (
            stats.num_requests == 0
            and stats.num_free_blocks == stats.num_blocks
            and staging.num_free_blocks == staging.num_blocks
        ):
            break
        assert time.monotonic() < deadline, f"{worker.worker_id} still holds KV: {stats}"
        time.sleep(0.02)
    asyncio.run(worker.check_integrity())


def test_two_prompts_move_through_one_prompts_staging_on_each_side(
    workers: tuple[PrefillWorker, EngineWorker], expected: list[int]
) -> None:
    prefill, decode = workers
    assert (
        decode.engine.transfer_region is not None and decode.engine.transfer_region.num_blocks == 6
    )
    completed, failed = transfers(decode)
    waits = staging_waits(prefill)
    outputs = asyncio.run(two_through_one_staging(prefill, decode))
    assert outputs == [expected, expected]
    assert transfers(decode) == (completed + 2, failed), "both moved: none refused, recomputed"
    assert staging_waits(prefill) == waits + 1, "b's KV waited for a's staging blocks"
    for worker in (prefill, decode):
        wait_idle_and_intact(worker)


def test_an_aborted_transfer_leaves_no_staging_held(
    workers: tuple[PrefillWorker, EngineWorker], expected: list[int]
) -> None:
    prefill, decode = workers
    prefill.inject_kv_faults(1, "abort")  # aborted just after it is submitted
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    result = asyncio.run(prefill.prefill("aborted", PROMPT, params, None, decode.worker_id))
    assert asyncio.run(decode_one(decode, "aborted", result)) == expected  # recomputed there
    for worker in (prefill, decode):
        wait_idle_and_intact(worker)
