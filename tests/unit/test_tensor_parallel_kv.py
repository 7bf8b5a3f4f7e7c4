"""KV transfer with ranks that each hold their own KV heads (issue 24; what GPU ranks do, run
here on gloo with the /dev/shm sharing off): a transfer's blocks are gathered to rank 0 before
they ship and scattered from it once they land, through the step plan's KV kinds, in rank 0's
bounded staging region (engine.transfer_region). KV moved engine to engine as a pair would
move it (every head, staging blocks) gives the single engine's greedy output for TP 1->2,
2->1, 2->2 and at TP=4 (KV heads replicated), also through a staging region of one prompt
(back-pressure on both sides); a rank killed in the middle of a gather or before a scatter
fails that side with RankFailed and leaves no block, and no staging block, held."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from contracts.errors import InvalidRequest, KVTransferError, RankFailed
from contracts.outputs import FinishReason, RequestOutput
from engine.config import EngineConfig
from engine.engine import Engine, KeptKV, KVPending, Prefilled
from engine.kv_quant import dequantize_rows
from prefill_worker.held_kv import HeldKV
from tests.conftest import greedy, make_engine, prompt_ids
from worker.engine_loop import EngineLoop

TINY = "dummy:tiny"  # 4 heads, 2 KV heads
PROMPT = prompt_ids(7, 19)  # 5 blocks of 4 tokens, the last partly filled
MAX_TOKENS = 5


def private(size: int, kv_transfer: bool = True, **kwargs: object) -> Engine:
    """A TP engine whose ranks hold their own KV heads; one that transfers KV unless told."""
    return make_engine(
        TINY,
        tensor_parallel_size=size,
        tensor_parallel_shared_kv=False,
        kv_transfer=kv_transfer,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def single() -> Iterator[Engine]:
    with make_engine(TINY) as engine:
        yield engine


@pytest.fixture(scope="module")
def expected(single: Engine) -> list[int]:
    return single.generate([PROMPT], greedy(MAX_TOKENS))[0].token_ids


def test_the_switch_is_a_bool() -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_shared_kv='no' must be a bool"):
        EngineConfig(tensor_parallel_shared_kv="no")  # type: ignore[arg-type]


def test_the_kv_transfer_switch_is_a_bool() -> None:
    with pytest.raises(ValueError, match=r"kv_transfer=1 must be a bool"):
        EngineConfig(kv_transfer=1)  # type: ignore[arg-type]


KV_BUDGET_BYTES = 1 << 20


def test_an_engine_that_transfers_no_kv_pays_no_memory_for_it_and_refuses_transfers() -> None:
    """Private KV without kv_transfer (a colocated worker, `tandem generate`): no whole-head
    cache, the blocks of the shared-cache sizing (each rank's heads in the budget), and a
    request that would ship or receive KV is refused by name. It held 1/3 of them before."""
    with make_engine(TINY, num_kv_blocks=None, kv_cache_bytes=KV_BUDGET_BYTES) as single:
        whole_blocks = single.num_kv_blocks  # both KV heads per block in the budget
    with private(2, kv_transfer=False, num_kv_blocks=None, kv_cache_bytes=KV_BUDGET_BYTES) as tp:
        assert tp.num_kv_blocks == 2 * whole_blocks  # one KV head per rank
        assert tp.tp is not None and tp.tp.whole_kv_cache is None
        assert tp.runner.kv_cache.shape[2] == tp.num_kv_blocks
        for field, kwargs in [("keep_kv", {"keep_kv": True}),
                              ("prefill_only", {"prefill_only": True})]:  # fmt: skip
            with pytest.raises(InvalidRequest, match=rf"^{field}: .*kv_transfer=True"):
                tp.add_request(field, None, greedy(1), prompt_token_ids=PROMPT, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match=r"^first_token_id: .*kv_transfer=True"):
            tp.add_remote_request("remote", PROMPT, 1, greedy(MAX_TOKENS))
        with pytest.raises(InvalidRequest, match=r"^kv_transfer: "):
            tp.transfer_kv_cache  # noqa: B018
        assert_nothing_held(tp)
        assert not tp.has_unfinished_requests()


def test_an_engine_that_transfers_kv_keeps_nearly_its_followers_capacity() -> None:
    """Private KV with kv_transfer: rank 0's budget loses only its staging region (one
    max_model_len sequence and one step's prompt tokens by default), not a whole-head cache
    as large as its own. It held 1/3 of its followers' blocks before (341 of 1024 here)."""
    with make_engine(TINY, num_kv_blocks=None, kv_cache_bytes=KV_BUDGET_BYTES) as single:
        whole_blocks = single.num_kv_blocks  # both KV heads per block in the budget
    follower_blocks = 2 * whole_blocks  # one KV head per rank
    with private(
        2, num_kv_blocks=None, kv_cache_bytes=KV_BUDGET_BYTES, max_model_len=64
    ) as transferring:
        assert transferring.num_kv_blocks >= 0.8 * follower_blocks
        staging = transferring.transfer_region
        assert staging is not None and staging.num_blocks == (64 + 256) // 4
        # a staging block holds both heads: two of rank 0's own blocks
        assert transferring.num_kv_blocks == follower_blocks - 2 * staging.num_blocks
        assert transferring.transfer_kv_cache.shape[2] == staging.num_blocks
        assert transferring.runner.kv_cache.shape[2] == transferring.num_kv_blocks


def ship(src: Engine, dst: Engine, request_id: str) -> tuple[str, str, int]:
    """Prefill PROMPT on `src`, then copy its KV into blocks `dst` reserves, every head, as a
    pair would: the request on `dst` (awaiting its KV), the owner of the landed blocks and
    the first token. `src` holds nothing afterwards."""
    src.add_request(request_id, None, greedy(1), prompt_token_ids=PROMPT, prefill_only=True)
    while src.has_unfinished_requests():
        src.step()
    (done,) = src.take_prefilled()
    remote = f"{request_id}/decoded"
    dst.add_remote_request(remote, PROMPT, done.first_token_id, greedy(MAX_TOKENS))
    owner = land(src, dst, done.kv, f"arrived:{request_id}")
    src.block_manager.release(done.kv.owner)
    return remote, owner, done.first_token_id


def land(src: Engine, dst: Engine, kept: KeptKV, owner: str) -> str:
    """Copy `kept` (every head, from `src`'s transfer cache) into blocks `dst` reserves for
    `owner`, as a pair moves it; `owner`."""
    ids = dst.reserve_transfer(owner, len(kept.block_ids))
    assert ids is not None
    dst.transfer_kv_cache[:, :, ids] = src.transfer_kv_cache[:, :, list(kept.transfer_block_ids)]
    return owner


def decode(dst: Engine, remote: str, owner: str, first_token_id: int) -> list[int]:
    dst.attach_kv(remote, owner)
    token_ids = [first_token_id]
    while dst.has_unfinished_requests():
        token_ids += [t for o in dst.step() for t in o.new_token_ids]
    return token_ids


def assert_nothing_held(*engines: Engine) -> None:
    for engine in engines:
        engine.check_integrity()  # staging held only by owners of blocks, too
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
        if engine.transfer_region is not None:
            assert engine.transfer_region.num_free_blocks == engine.transfer_region.num_blocks


def test_private_caches_hold_only_their_heads_and_transfer_every_head(
    single: Engine, expected: list[int]
) -> None:
    with private(2) as engine:
        assert engine.tp is not None
        assert engine.runner.kv_cache.shape[-2] == 1  # this rank's KV head only
        assert engine.runner.kv_cache.is_contiguous()  # as a GPU's kernels read it
        assert engine.transfer_kv_cache.shape[-2] == 2  # rank 0's staging: whole-head blocks
        assert not engine.tp.store.check(["kv-cache"]), "no cache is shared"
        for name, src, dst in [("1to2", single, engine), ("2to1", engine, single),
                               ("2to2", engine, engine)]:  # fmt: skip
            assert decode(dst, *ship(src, dst, name)) == expected, name
            assert_nothing_held(src, dst)


def test_replicated_kv_heads_transfer_too(single: Engine, expected: list[int]) -> None:
    with private(4) as engine:  # 2 KV heads over 4 ranks: ranks 0, 1 hold head 0; 2, 3 head 1
        assert engine.rank_kv_heads() == [(0, 1), (0, 1), (1, 1), (1, 1)]
        for name, src, dst in [("1to4", single, engine), ("4to1", engine, single)]:
            assert decode(dst, *ship(src, dst, name)) == expected, name
            assert_nothing_held(src, dst)


def dequantized(
    engine: Engine, block_ids: list[int], whole_scales: torch.Tensor | None
) -> torch.Tensor:
    """The FP8 KV of these blocks of the engine's transfer cache (every head), as fp32: a packed
    cache's own scales, or a per-head cache's `whole_scales` [layers, 2, every kv head]."""
    blocks = engine.transfer_kv_cache[:, :, block_ids]
    if whole_scales is None:
        return dequantize_rows(blocks)
    return blocks.view(torch.float8_e4m3fn).float() * whole_scales[:, :, None, None, :, None]


@pytest.mark.parametrize("scales", ["per_head", "per_token"])
def test_fp8_kv_moves_every_head_in_place(scales: str) -> None:
    """FP8 blocks gathered from the ranks (rank 0's staging region) read as the single
    engine's: a packed block (a block's values, then its scales) is not sliced by heads, the
    gather and scatter move each head's values and scale and pack again; a per-head block is
    e4m3 values only, whose scales every rank calibrated for its own heads at start-up, and
    the whole model's table (its digest) is the single engine's, so TP 1 and 2 pair."""
    fp8 = {"kv_cache_dtype": "fp8", "kv_cache_scales": scales}
    with (
        make_engine(TINY, **fp8) as single8,  # type: ignore[arg-type]
        private(2, **fp8) as engine,
    ):
        assert engine.kv_scales_digest == single8.kv_scales_digest
        assert (engine.kv_scales_digest is None) == (scales == "per_token")
        whole_scales = single8.model.kv_scales  # [layers, 2, 2 kv heads], or None
        if whole_scales is not None:  # each rank holds its own head's column
            assert engine.model.kv_scales is not None
            assert torch.equal(engine.model.kv_scales, whole_scales[:, :, :1])
        for src in (single8, engine):
            src.add_request("p", None, greedy(1), prompt_token_ids=PROMPT, prefill_only=True)
            while src.has_unfinished_requests():
                src.step()
        kept = [src.take_prefilled()[0].kv for src in (single8, engine)]
        read = [
            dequantized(src, list(k.transfer_block_ids), whole_scales)
            for src, k in zip((single8, engine), kept, strict=True)
        ]  # the gathered blocks read as the single engine's: each head in its place
        assert read[0].abs().amax() > 0
        torch.testing.assert_close(read[1], read[0], atol=0.05, rtol=0.1)
        for src, k in zip((single8, engine), kept, strict=True):
            src.block_manager.release(k.owner)
        expected8 = engine.generate([PROMPT], greedy(MAX_TOKENS))[0].token_ids
        assert decode(engine, *ship(engine, engine, "fp8")) == expected8  # scattered back
        assert decode(single8, *ship(engine, single8, "fp8-2to1")) == expected8
        assert_nothing_held(engine, single8)


def test_a_packed_fp8_cache_is_private_even_where_heads_split() -> None:
    """A shared cache's ranks view a range of heads; no range of heads of a packed FP8 block is
    a view (it failed: "an FP8 cache splits by whole blocks only")."""
    fp8 = {"kv_cache_dtype": "fp8", "kv_cache_scales": "per_token"}
    single = make_engine(TINY, **fp8).generate([PROMPT], greedy(MAX_TOKENS))  # type: ignore[arg-type]
    with make_engine(TINY, tensor_parallel_size=2, **fp8) as engine:  # type: ignore[arg-type]
        assert engine.tp is not None and not engine.tp.store.check(["kv-cache"])
        assert engine.generate([PROMPT], greedy(MAX_TOKENS))[0].token_ids == single[0].token_ids


def kill_follower(engine: Engine) -> int:
    assert engine.tp is not None and engine.tp.followers is not None
    follower = engine.tp.followers.processes[0]
    follower.kill()
    follower.wait()
    return follower.pid


def test_a_rank_killed_mid_gather_fails_the_prefill_and_holds_nothing(
    single: Engine, expected: list[int]
) -> None:
    with private(2, tensor_parallel_timeout_s=30.0) as engine:
        assert engine.tp is not None
        sent = engine.tp.request_kv
        killed: list[int] = []

        def request_then_die(block_ids: list[int], gather: bool) -> None:
            assert engine.transfer_region is not None  # the gather's staging blocks are taken ...
            assert (
                engine.transfer_region.num_free_blocks
                == engine.transfer_region.num_blocks - len(block_ids)
            )
            sent(block_ids, gather)  # the followers join the gather ... and rank 1 dies
            killed.append(kill_follower(engine))

        engine.tp.request_kv = request_then_die  # type: ignore[method-assign]
        engine.add_request("r", None, greedy(1), prompt_token_ids=PROMPT, prefill_only=True)
        with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) exited with code -9"):
            while engine.has_unfinished_requests():
                engine.step()
        assert killed and engine.take_prefilled() == []  # nothing to ship
        engine.abort_request("r")
        assert_nothing_held(engine)


def test_a_rank_killed_before_the_scatter_fails_the_attach_and_holds_nothing(
    single: Engine,
) -> None:
    with private(2, tensor_parallel_timeout_s=30.0) as engine:
        remote, owner, _ = ship(single, engine, "dies")
        pid = kill_follower(engine)
        with pytest.raises(RankFailed, match=rf"rank 1 \(pid {pid}\) exited with code -9"):
            engine.attach_kv(remote, owner)
        assert engine.block_manager.holds[owner], "the landed blocks are still the owner's"
        assert engine.transfer_region is not None and engine.transfer_region.ids_of(owner), (
            "and its staging"
        )
        engine.block_manager.release(owner)  # as the decode worker's failure frees them
        engine.abort_request(remote)
        assert_nothing_held(engine, single)


# ---- a staging region of one prompt: back-pressure on both sides ------------------------

ONE_PROMPT_LEN = 24  # PROMPT (19 tokens) and MAX_TOKENS (5): 6 blocks of 4, the staging region


def one_prompt_staging() -> Engine:
    return private(2, kv_staging_blocks=6, max_model_len=ONE_PROMPT_LEN)


def prefill_two(src: Engine) -> tuple[Prefilled, Prefilled | None]:
    """Prefill "a" and "b" (one step); with a staging region of one prompt, b's KV stays
    pinned, waiting for staging, and its result does not come (None)."""
    for request_id in ("a", "b"):
        src.add_request(request_id, None, greedy(1), prompt_token_ids=PROMPT, prefill_only=True)
    done: list[Prefilled] = []
    while not done:
        src.step()
        done = src.take_prefilled()
    if src.transfer_region is None:
        return done[0], done[1]
    assert [p.request_id for p in done] == ["a"]
    for _ in range(3):
        src.step()  # nothing to run: b waits for staging, each step a little
        assert src.take_prefilled() == [] and src.has_unfinished_requests()
    assert src.transfer_region.num_free_blocks == 1, "a's 5 blocks staged, b's not"
    src.check_integrity(holders=[done[0].kv.owner])  # b's pin, waiting, is not a leak
    return done[0], None


def decode_all(dst: Engine, first_token_ids: dict[str, int]) -> dict[str, list[int]]:
    tokens = {remote: [first] for remote, first in first_token_ids.items()}
    while dst.has_unfinished_requests():
        for output in dst.step():
            tokens[output.request_id] += output.new_token_ids
    return tokens


@pytest.mark.parametrize("layout", ["1to2", "2to1", "2to2"])
def test_a_staging_region_of_one_prompt_moves_two_by_back_pressure(
    single: Engine, expected: list[int], layout: str
) -> None:
    """The sender's second prompt waits for the first's staging blocks to free (shipped and
    acknowledged: released), the receiver finds no room for it until the first landed KV is
    attached (scattered: staging freed); both then decode as the single engine."""
    with contextlib.ExitStack() as stack:
        tp = [stack.enter_context(one_prompt_staging()) for _ in range(layout.count("2"))]
        src, dst = {"1to2": (single, tp[0]), "2to1": (tp[0], single), "2to2": tp}[layout]
        a, b = prefill_two(src)
        for request_id in ("a", "b"):
            dst.add_remote_request(f"{request_id}/d", PROMPT, expected[0], greedy(MAX_TOKENS))
        landed_a = land(src, dst, a.kv, "arrived:a")
        if dst.transfer_region is not None:  # no room for b: the receiver waits (may_wait_for_room)
            assert dst.reserve_transfer("arrived:b", len(a.kv.block_ids)) is None
            assert dst.may_wait_for_room(len(a.kv.block_ids))
            assert "arrived:b" not in dst.block_manager.holds, "nothing held for b"
        src.block_manager.release(a.kv.owner)  # a acknowledged: its pin and staging go
        while b is None:
            src.step()  # b's KV staged now
            b = next(iter(src.take_prefilled()), None)
        dst.attach_kv("a/d", landed_a)  # scattered: a's staging blocks free
        landed_b = land(src, dst, b.kv, "arrived:b")
        src.block_manager.release(b.kv.owner)
        dst.attach_kv("b/d", landed_b)
        outputs = decode_all(dst, {"a/d": a.first_token_id, "b/d": b.first_token_id})
        assert outputs == {"a/d": expected, "b/d": expected}
        assert_nothing_held(src, dst)


def test_a_transfer_released_before_its_end_frees_its_staging() -> None:
    """Every way a transfer ends without attach (an abort, a lease, a dead peer) ends in
    block_manager.release(owner): the sender's pin (whole, or the suffix a decode worker that
    holds the prefix takes) and the receiver's reservation give their staging blocks back
    with their blocks."""
    with one_prompt_staging() as engine:
        a, _ = prefill_two(engine)  # b waits for staging
        engine.block_manager.release(a.kv.owner)  # a's transfer aborted
        b = None
        while b is None:
            engine.step()
            b = next(iter(engine.take_prefilled()), None)
        suffix = engine.kept_suffix(b.kv, 2)  # the receiver holds b's first 2 blocks
        assert suffix.staging_ids == b.kv.staging_ids[2:] and suffix.num_tokens == 19 - 8
        assert (
            engine.transfer_region is not None and engine.transfer_region.num_free_blocks == 6 - 3
        )
        engine.check_integrity(holders=[suffix.owner])  # b's owner holds nothing now
        engine.block_manager.release(suffix.owner)  # its transfer failed
        reserved = engine.reserve_transfer("kv-in:t", 5)  # a receiver's reservation ...
        assert reserved is not None and engine.transfer_region is not None
        assert engine.transfer_region.num_free_blocks == 1
        engine.block_manager.release("kv-in:t")  # ... failed (its sender died)
        assert_nothing_held(engine)


def test_a_staging_region_that_cannot_hold_a_sequence_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match=r"^kv_staging_blocks=5 cannot hold one sequence of "
                       r"max_model_len=24 tokens \(6 blocks of 4\).*raise kv_staging_blocks "
                       r"to >= 6 or lower max_model_len$"):  # fmt: skip
        private(2, kv_staging_blocks=5, max_model_len=ONE_PROMPT_LEN)


@pytest.mark.parametrize("value", [0, -1, "4", 2.0])
def test_the_staging_size_is_a_positive_int(value: object) -> None:
    with pytest.raises(ValueError, match=rf"^kv_staging_blocks={value!r} must be an int >= 1$"):
        EngineConfig(kv_staging_blocks=value)  # type: ignore[arg-type]


def test_a_request_aborted_while_its_kv_waits_for_staging_holds_nothing() -> None:
    """b's prefill is done but its result waits for staging: an abort now (its client gone)
    must free its pin, as nobody will ever take its result."""
    with one_prompt_staging() as engine:
        a, _ = prefill_two(engine)
        closing = engine.abort_request("b")  # its caller still waits: it gets the ending
        assert closing is not None and closing.finished
        assert closing.finish_reason is FinishReason.ABORT
        assert not engine.has_unfinished_requests()
        engine.block_manager.release(a.kv.owner)
        engine.step()
        assert engine.take_prefilled() == []
        assert_nothing_held(engine)


def test_an_offer_waits_only_for_staging_and_evicts_no_cached_block_meanwhile() -> None:
    """A receiver retries a waiting offer every turn (reserve_transfer, may_wait_for_room):
    with the staging region short, each retry reserved blocks first, evicting cached prefix
    blocks, then released them without their hashes (8 retries: the cache emptied). With this
    engine's own blocks short, the offer is refused at once (it waited ~5 s before)."""
    with private(2, kv_staging_blocks=6, max_model_len=ONE_PROMPT_LEN, num_kv_blocks=12) as engine:
        engine.generate([PROMPT], greedy(MAX_TOKENS))  # its full blocks stay cached
        cached = dict(engine.block_manager.hash_to_block)
        assert len(cached) >= 4
        assert engine.reserve_transfer("kv-in:a", 5) is not None  # 5 of the 6 staging blocks
        for _ in range(8):  # the staging region is short: b waits
            assert engine.reserve_transfer("kv-in:b", 5) is None
            assert engine.may_wait_for_room(5)
        assert engine.block_manager.hash_to_block == cached, "a waiting offer evicted blocks"
        assert "kv-in:b" not in engine.block_manager.holds
        engine.block_manager.release("kv-in:a")
        busy = engine.block_manager.reserve("busy", engine.block_manager.num_free_blocks - 4)
        assert busy is not None  # 4 blocks left, the staging region free
        assert engine.reserve_transfer("kv-in:c", 5) is None
        assert not engine.may_wait_for_room(5), "this engine's blocks are short: refuse now"
        engine.block_manager.release("busy")
        assert_nothing_held(engine)


def test_kept_kv_waiting_for_staging_is_pending_and_an_abort_frees_it_staged_or_not() -> None:
    """take_kept_kv said None both for "waiting for staging" and "none": a caller that gave
    up left KV staged later in the engine for good. Now it says KVPending.STAGING, and an
    abort frees kept KV nobody took, waiting or staged."""
    with one_prompt_staging() as engine:
        for request_id in ("a", "b", "c"):
            engine.add_request(request_id, None, greedy(1), prompt_token_ids=PROMPT, keep_kv=True)
        while engine.scheduler.num_unfinished:
            engine.step()
        assert engine.num_kv_waiting_for_staging == 2  # a's 5 blocks staged, b's and c's not
        assert engine.take_kept_kv("b") is KVPending.STAGING
        assert engine.take_kept_kv("nobody") is None
        a = engine.take_kept_kv("a")
        assert isinstance(a, KeptKV) and a.staging_ids
        assert engine.abort_request("c") is None  # finished: no closing output, its pin freed
        engine.block_manager.release(a.owner)
        engine.step()  # b staged now, and kept for take_kept_kv ...
        assert engine.num_kv_waiting_for_staging == 0
        assert engine.abort_request("b") is None  # ... which never comes: the abort frees it
        assert not engine.has_unfinished_requests()
        assert_nothing_held(engine)


def test_a_suffix_of_kept_kv_released_meanwhile_is_refused_and_holds_nothing() -> None:
    """kept_suffix ignored keep_tail's answer: kept KV released meanwhile (an abort on another
    thread) gave a suffix whose staging ids were free, and blocks held for it."""
    with one_prompt_staging() as engine:
        a, _ = prefill_two(engine)
        engine.abort_request("b")
        engine.block_manager.release(a.kv.owner)  # released meanwhile
        with pytest.raises(KVTransferError, match=r"was released .* before its suffix"):
            engine.kept_suffix(a.kv, 2)
        assert_nothing_held(engine)


async def prefill_then_abort_the_waiting_one(loop: EngineLoop, held: HeldKV) -> None:
    streams = {r: loop.submit(r, PROMPT, greedy(1), prefill_only=True) for r in ("a", "b")}
    a = await asyncio.wait_for(streams["a"].get(), 60)
    assert isinstance(a, Prefilled)  # its KV holds 5 of the 6 staging blocks: b's waits
    assert loop.call(lambda engine: engine.num_kv_waiting_for_staging) == 1
    loop.abort("b")
    closing = await asyncio.wait_for(streams["b"].get(), 30)  # it never came
    assert isinstance(closing, RequestOutput) and closing.finish_reason is FinishReason.ABORT
    assert not loop.call(lambda engine: loop.has_stream("b"))
    kept = held.take("a")
    assert kept is not None
    loop.call(lambda engine: engine.block_manager.release(kept.kv.owner))
    again = await asyncio.wait_for(loop.submit("b", PROMPT, greedy(1), prefill_only=True).get(), 60)
    assert isinstance(again, Prefilled), again  # the id is free again
    taken = held.take("b")
    assert taken is not None
    loop.call(lambda engine: engine.block_manager.release(taken.kv.owner))


def test_a_prefill_aborted_while_its_kv_waits_for_staging_ends_its_stream() -> None:
    """The prefill worker's loop: an abort of a prefill whose result waits for staging freed
    its KV but delivered nothing, so its stream stayed open (its caller hung) and its id was
    refused as in use."""
    with one_prompt_staging() as engine:
        held = HeldKV(engine.block_manager.release)
        loop = EngineLoop(engine, held)
        try:
            asyncio.run(prefill_then_abort_the_waiting_one(loop, held))
        finally:
            loop.stop()
        assert loop.failure is None
        assert_nothing_held(engine)


def child_pids() -> set[int]:
    import glob

    pids: set[int] = set()
    for path in glob.glob("/proc/self/task/*/children"):
        with open(path) as children:
            pids.update(int(pid) for pid in children.read().split())
    return pids


def test_a_staging_region_that_leaves_no_kv_block_is_refused_and_stops_the_ranks() -> None:
    """The default region (max_model_len 64 and 256 batched tokens: 80 blocks of 2 KiB) over
    a 100 kB budget: refused by name, and the follower it started is gone (it would wait for
    rank 0 without limit)."""
    before = child_pids()
    refusal = r"^the KV budget of 100000 bytes holds no block once the transfer staging region"
    with pytest.raises(ValueError, match=refusal + r" takes 163840 \(kv_staging_blocks"):
        private(2, num_kv_blocks=None, kv_cache_bytes=100_000, max_model_len=64)
    assert child_pids() == before


def test_a_shared_scale_table_gives_every_tensor_parallel_size_the_same_scales(
    tmp_path: Path,
) -> None:
    """Calibrated per-head scales can differ between TP sizes in bf16 (the all-reduces sum in
    another order); a table saved once and loaded by every worker cannot: the same digest at
    TP=2 as at TP=1, each rank holding its own heads' rows of it."""
    from engine.kv_calibration import save_kv_scales

    single = make_engine(TINY, kv_cache_dtype="fp8")
    assert single.kv_scales_table is not None
    table = single.kv_scales_table.clone()
    table[0, 0, 1] *= 4  # not what either would calibrate: the TP engine must load it
    path = tmp_path / "scales.json"
    save_kv_scales(path, table, single.model_id)
    with make_engine(
        TINY, tensor_parallel_size=2, kv_cache_dtype="fp8", kv_cache_scales_path=str(path)
    ) as engine:
        assert engine.kv_scales_table is not None and torch.equal(engine.kv_scales_table, table)
        assert engine.kv_scales_digest != single.kv_scales_digest
        assert engine.model.kv_scales is not None
        assert torch.equal(engine.model.kv_scales, table[:, :, :1])  # rank 0: KV head 0
        assert len(engine.generate([PROMPT], greedy(MAX_TOKENS))[0].token_ids) == MAX_TOKENS
