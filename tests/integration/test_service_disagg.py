"""Per-request prefill placement through the real service (router.disagg): one prefill and two
decode workers, every request prefilled on its decode worker (`never`). A decode worker killed
mid-prefill moves its request to the other one, with the single engine's output, and is
replaced; nothing leaks. Multi-turn conversations continue on the decode worker that decoded
their last turn (its cache in the router's own index), which prefills (`never`) or receives
(`always`) only the missing suffix of the prompt. The placement modes on the usual pools:
tests/integration/test_service.py (test_disagg_*)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from contracts.workers import WorkerStats
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from proto.tandem.v1 import tandem_pb2 as pb
from tests.conftest import greedy
from tests.integration.test_service import (
    MID_PREFILL_PROMPT,
    PREFILL_CHUNK_TOKENS,
    RunningService,
    generate,
    greedy_sampling,
    local_service,
    placed,
    placing,
    wait_replaced,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    from cluster.service import ServiceConfig
    from router.disagg import DisaggPolicy

    config = ServiceConfig(
        engine=EngineConfig(
            device="cpu",
            num_kv_blocks=512,
            block_size=16,
            scheduler=SchedulerConfig(max_prefill_chunk_tokens=PREFILL_CHUNK_TOKENS),
        ),
        mode="disaggregated",
        num_prefill_workers=1,
        num_decode_workers=2,
        disagg=DisaggPolicy(mode="never"),
        port=0,
    )
    with local_service(config) as running:
        yield running


def busy_decode_worker(service: RunningService, timeout_s: float = 30) -> int:
    """The index of a decode worker with a request in flight."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        for index, worker in enumerate(service.service.workers):
            if ray.get(worker.stats.remote(), timeout=30).num_requests:
                return index
        assert time.monotonic() < deadline, "no decode worker started the request"
        time.sleep(0.02)


def test_a_decode_worker_killed_mid_local_prefill_moves_its_request_to_the_other(
    service: RunningService, default_model_engine: Engine
) -> None:
    prompt = "(local, killed) " + MID_PREFILL_PROMPT  # unique from its start: no cached prefix
    call = service.stub.Generate(
        pb.GenerateRequest(text=prompt, sampling=greedy_sampling(4)), timeout=120
    )
    busy = busy_decode_worker(service)
    victim = service.service.workers[busy]
    servicer = service.service._servicer
    assert servicer is not None
    retried = servicer.num_retried
    ray.kill(victim, no_restart=True)
    responses = list(call)  # nothing had streamed: the client never sees the loss
    expected = default_model_engine.generate([prompt], greedy(max_tokens=4))[0]
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert servicer.num_retried == retried + 1
    assert placed(service, "local", "forced_local") >= 1
    prefill_stats = ray.get(service.service.prefill_workers[0].stats.remote(), timeout=30)
    assert prefill_stats.kv.transfers_completed == 0  # the prefill pool was never used
    wait_replaced(lambda: service.service.workers, busy, victim)
    assert generate(service.stub, text="Hi", sampling=greedy_sampling(3))[-1].usage
    service.assert_workers_idle_and_intact()


BLOCK = 16  # the services' block size: decode workers reuse whole blocks only


def eventually(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def decode_settled(service: RunningService) -> bool:
    """The router sees every decode worker idle, no KV in use (cached blocks are free): load
    alone then ties, and the first decode worker wins."""
    members = service.service.pools["decode"].members()
    return all(m.load.in_flight == 0 and m.load.kv_used == 0 for m in members)


def generate_ids(service: RunningService, ids: list[int], max_tokens: int) -> list[int]:
    request = pb.GenerateRequest(sampling=greedy_sampling(max_tokens))
    request.token_ids.ids.extend(ids)
    return [t for r in service.stub.Generate(request, timeout=120) for t in r.token_ids]


def prompt_ids(service: RunningService, text: str) -> list[int]:
    return list(service.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30).token_ids)


def decode_cached(service: RunningService, ids: list[int]) -> list[int]:
    """What the router's index says each decode worker holds of a prompt, in tokens."""
    servicer = service.service._servicer
    assert servicer is not None
    request = SimpleNamespace(prompt_token_ids=ids, cache_salt=None)
    cached = service.run(servicer._cached_tokens(request, servicer.decode)) or {}
    return [cached.get(m, 0) for m in servicer.decode.members()]


def delta(after: WorkerStats, before: WorkerStats) -> dict[str, int]:
    """The prompt tokens a worker computed, and the KV it sent, received and reused, between
    two reports."""
    counters = ["tokens_sent", "blocks_sent", "tokens_received", "blocks_received",
                "tokens_reused"]  # fmt: skip
    changes = {name: getattr(after.kv, name) - getattr(before.kv, name) for name in counters}
    computed = after.num_prompt_tokens_computed - before.num_prompt_tokens_computed
    return {"computed": computed, **{k: v for k, v in changes.items() if v}}


def two_turns(
    service: RunningService, engine: Engine, opening: str, busy: Callable[[], Any] | None = None
) -> tuple[list[int], list[int], int, list[WorkerStats], list[WorkerStats]]:
    """Turn 1 (a prompt of `opening`, 9 tokens out), then turn 2 (turn 1's prompt and output
    and a new question), each checked against the single engine's greedy output. `busy`, if
    given, runs between them (and returns what to end after turn 2). Returns both turns'
    prompts, the tokens of turn 2's the decode worker of turn 1 can reuse (whole blocks of
    turn 1's computed tokens: its prompt and output less the last token, whose KV is never
    computed; at most the whole blocks before turn 2's last prompt token), and all workers'
    reports before and after turn 2 (decode workers first)."""
    turn1 = prompt_ids(service, opening)
    out1 = generate_ids(service, turn1, 9)
    assert out1 == engine.generate([turn1], greedy(max_tokens=9))[0].token_ids
    turn2 = turn1 + out1 + prompt_ids(service, " And what about the next one, please?")[1:]
    reusable = min((len(turn1) + len(out1) - 1) // BLOCK, (len(turn2) - 1) // BLOCK) * BLOCK
    stop = busy() if busy is not None else None
    eventually(lambda: max(decode_cached(service, turn2)) == reusable)  # the index caught up
    before = service.worker_stats()
    out2 = generate_ids(service, turn2, 6)
    after = service.worker_stats()
    if stop is not None:
        stop()
    assert out2 == engine.generate([turn2], greedy(max_tokens=6))[0].token_ids
    return turn1, turn2, reusable, before, after


def busy_first_decode_worker(service: RunningService) -> Callable[[], Any]:
    """Start a long request on the first decode worker (idle pools: the tie goes to it) and
    wait until its prompt is computed and its KV attached (its second token); the stop."""
    eventually(lambda: decode_settled(service))
    call = service.stub.Generate(
        pb.GenerateRequest(text="Count slowly:", sampling=greedy_sampling(400)), timeout=120
    )
    stream = iter(call)
    next(stream), next(stream)
    assert [s.num_requests for s in service.worker_stats()[:2]] == [1, 0]

    def stop() -> None:
        call.cancel()

    return stop


@pytest.mark.parametrize("mode", ["never", "always"])
def test_a_second_turn_goes_back_to_its_decode_worker_for_only_the_missing_suffix(
    service: RunningService, default_model_engine: Engine, mode: str
) -> None:
    """Turn 1 lands on decode worker 0 (idle pools). Before turn 2 a long request busies
    worker 0: by load alone turn 2 would go to worker 1; it holds the conversation's prefix,
    so it goes back to worker 0, which computes (never) or receives (always) only the
    prompt's missing suffix: len(turn 2) - reusable tokens, ceil(len / 16) - reusable / 16
    blocks (the last partly filled). Everything is freed after."""
    with placing(service, mode=mode):
        eventually(lambda: decode_settled(service))
        opening = (
            f"({mode}) You are a patient astronomy tutor for a class of ten-year-olds. Name "
            "one planet of the solar system, then tell us one fact about its moons."
        )
        turn1, turn2, reusable, before, after = two_turns(
            service, default_model_engine, opening, lambda: busy_first_decode_worker(service)
        )
    suffix = len(turn2) - reusable
    assert reusable >= 2 * BLOCK  # a real prefix: turn 1's prompt and most of its output
    changes = [delta(a, b) for a, b in zip(after, before, strict=True)]  # decode 0, 1, prefill
    if mode == "never":
        assert changes == [{"computed": suffix}, {"computed": 0}, {"computed": 0}]
    else:
        num_blocks = -(-len(turn2) // BLOCK) - reusable // BLOCK
        received = {"tokens_received": suffix, "blocks_received": num_blocks,
                    "tokens_reused": reusable}  # fmt: skip
        sent = {"tokens_sent": suffix, "blocks_sent": num_blocks}
        # the prefill worker holds turn 1's prompt (it prefilled it), not its output: it
        # computes the rest of turn 2's prompt and ships only the decode worker's suffix
        computed = len(turn2) - len(turn1) // BLOCK * BLOCK
        assert changes == [{"computed": 0, **received}, {"computed": 0},
                           {"computed": computed, **sent}]  # fmt: skip


def test_a_stream_whose_decode_worker_dies_resumes_on_the_other_prefilled_there(
    service: RunningService, default_model_engine: Engine
) -> None:
    """F4 on the local path (issue 22.1): a seeded stream whose decode worker is killed
    mid-stream resumes on the other decode worker, which prefills the prompt and the streamed
    tokens itself (`never`: no KV moves), continuing the same random stream."""
    from contracts.sampling_params import SamplingParams

    prompt = "(local replay) Once upon a time"
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=21, ignore_eos=True)
    sampling = pb.SamplingParameters(max_tokens=24, temperature=1.0, seed=21, ignore_eos=True)
    expected = default_model_engine.generate([prompt], params)[0]
    servicer = service.service._servicer
    assert servicer is not None
    migrated = servicer.num_migrated
    prefill = service.service.prefill_workers[0]
    shipped = ray.get(prefill.stats.remote(), timeout=30).kv.transfers_completed
    call = service.stub.Generate(pb.GenerateRequest(text=prompt, sampling=sampling), timeout=120)
    responses = [next(call) for _ in range(3)]
    busy = busy_decode_worker(service)
    victim = service.service.workers[busy]
    ray.kill(victim, no_restart=True)
    responses += list(call)
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert "".join(r.text for r in responses) == expected.text
    assert servicer.num_migrated == migrated + 1
    prefill_stats = ray.get(prefill.stats.remote(), timeout=30)
    assert prefill_stats.kv.transfers_completed == shipped  # replayed on the decode worker
    wait_replaced(lambda: service.service.workers, busy, victim)
    service.assert_workers_idle_and_intact()
