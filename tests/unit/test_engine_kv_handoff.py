"""The engine ends of a KV transfer, in one process: a prefill engine runs a request
prefill_only (first token sampled, no text, no finish, prompt KV pinned), its blocks are copied
into blocks a decode engine reserved, and the decode engine takes the request over
(add_remote_request: the first token's text and finish; attach_kv: the KV) exactly as one
engine would. The transport between them is tested in
tests/integration/test_kvtransfer_protocol.py."""

from __future__ import annotations

import dataclasses

import pytest

from contracts.errors import InvalidRequest
from contracts.outputs import FinishReason
from contracts.sampling_params import SamplingParams
from engine.engine import Engine
from kvtransfer.coalesce import gather_blocks, scatter_blocks
from tests.conftest import greedy, make_engine, prompt_ids, ship_prefilled


def prefill_and_hand_off(
    prefill: Engine, decode: Engine, request_id: str, prompt: list[int], params: SamplingParams
) -> list[int]:
    """Prefill on one engine, move the KV, decode on the other; the decode's token ids."""
    prefill.add_request(request_id, None, params, prompt_token_ids=prompt, prefill_only=True)
    while not (done := prefill.take_prefilled()):
        assert [o for o in prefill.step() if o.request_id == request_id] == []  # no text
    (prefilled,) = done
    kept = prefilled.kv
    assert kept.num_tokens == len(prompt) and prefilled.usage.prompt_tokens == len(prompt)
    owner = f"in:{request_id}"
    dst = decode.block_manager.reserve(owner, len(kept.block_ids))
    assert dst is not None
    staging = gather_blocks(prefill.runner.kv_cache, kept.block_ids)
    scatter_blocks(decode.runner.kv_cache, dst, staging)
    assert prefill.block_manager.release(kept.owner)
    prefill.check_integrity()
    output = decode.add_remote_request(
        request_id, prompt, prefilled.first_token_id, params, prefill_usage=prefilled.usage
    )
    tokens = list(output.new_token_ids)
    if output.finished:
        assert decode.block_manager.release(owner)
        return tokens
    decode.attach_kv(request_id, owner)
    while decode.has_unfinished_requests():
        tokens += [
            t for out in decode.step() if out.request_id == request_id for t in out.new_token_ids
        ]
    decode.check_integrity()
    return tokens


@pytest.mark.parametrize("length", [3, 4, 5, 17])  # < 1 block, 1 block, block + 1, several
def test_decode_from_transferred_kv_equals_one_engine(length: int) -> None:
    prompt = prompt_ids(seed=length, length=length)
    params = greedy(max_tokens=12)
    expected = make_engine().generate([prompt], params)[0].token_ids
    got = prefill_and_hand_off(make_engine(), make_engine(), "r", prompt, params)
    assert got == expected


def test_seeded_sampling_continues_as_on_one_engine() -> None:
    prompt = prompt_ids(seed=5, length=9)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    expected = make_engine().generate([prompt], params)[0].token_ids
    got = prefill_and_hand_off(make_engine(), make_engine(), "s", prompt, params)
    assert got == expected
    other_seed = dataclasses.replace(params, seed=8)
    assert make_engine().generate([prompt], other_seed)[0].token_ids != expected  # seed matters


def test_transferred_request_joins_a_running_batch() -> None:
    decode, single = make_engine(), make_engine()
    params = greedy(max_tokens=10)
    others = [prompt_ids(seed=s, length=6 + s) for s in range(3)]
    for i, prompt in enumerate(others):
        decode.add_request(f"o{i}", None, params, prompt_token_ids=prompt)
    decode.step()
    decode.step()
    prompt = prompt_ids(seed=9, length=11)
    got = prefill_and_hand_off(make_engine(), decode, "moved", prompt, params)
    assert got == single.generate([prompt], params)[0].token_ids


def test_the_prefix_of_a_transferred_request_is_cached_on_the_decode_side() -> None:
    decode = make_engine()
    prompt = prompt_ids(seed=3, length=13)
    prefill_and_hand_off(make_engine(), decode, "a", prompt, greedy(max_tokens=2))
    usage = decode.generate([prompt], greedy(max_tokens=1))[0].usage
    assert usage.cached_tokens == 12  # 3 full blocks of 4; the 13th token is recomputed


def test_keep_kv_is_released_by_owner_and_abort_pins_nothing() -> None:
    engine = make_engine()
    engine.add_request("k", None, greedy(max_tokens=1), prompt_token_ids=[5] * 9, keep_kv=True)
    engine.add_request("x", None, greedy(max_tokens=4), prompt_token_ids=[6] * 9, keep_kv=True)
    engine.step()
    engine.abort_request("x")
    assert engine.take_kept_kv("x") is None
    kept = engine.take_kept_kv("k")
    assert kept is not None and len(kept.block_ids) == 3
    assert engine.take_kept_kv("k") is None, "taken once"
    with pytest.raises(AssertionError, match="leaked"):
        engine.check_integrity()  # taken but not released: a leak the check must see
    engine.check_integrity(holders=[kept.owner])
    assert engine.block_manager.release(kept.owner)
    assert not engine.block_manager.release(kept.owner), "release is idempotent"
    engine.check_integrity()


def test_add_transferred_request_rejects_bad_input_and_keeps_blocks() -> None:
    engine = make_engine()
    dst = engine.block_manager.reserve("in:t", 2)
    assert dst is not None
    params = greedy(max_tokens=4)
    with pytest.raises(InvalidRequest, match="first_token_id"):
        engine.add_transferred_request("t", [1, 2, 3], 10**9, params, kv_owner="in:t")
    with pytest.raises(ValueError, match="holds no blocks"):
        engine.add_transferred_request("t", [1, 2, 3], 7, params, kv_owner="in:other")
    with pytest.raises(ValueError, match="do not fit"):
        engine.add_transferred_request("t", list(range(1, 12)), 7, params, kv_owner="in:t")
    assert not engine.has_unfinished_requests()
    engine.check_integrity(holders=["in:t"])
    assert engine.block_manager.release("in:t")
    engine.check_integrity()


def test_a_prefill_only_request_ends_prefilled_without_text_or_finish() -> None:
    engine = make_engine()
    prompt = prompt_ids(seed=2, length=9)
    params = greedy(max_tokens=1)  # even a request the first token ends: decode decides that
    (expected,) = make_engine().generate([prompt], params)
    engine.add_request("p", None, params, prompt_token_ids=prompt, prefill_only=True)
    assert engine.step() == []  # no output: no text, no finish reason
    (done,) = engine.take_prefilled()
    assert engine.take_prefilled() == [], "each once"
    assert done.first_token_id == expected.token_ids[0]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt), 1)
    assert len(done.kv.block_ids) == 3 and not engine.has_unfinished_requests()
    with pytest.raises(AssertionError, match="leaked"):
        engine.check_integrity()  # the KV is held for its transfer
    engine.check_integrity(holders=[done.kv.owner])
    assert engine.block_manager.release(done.kv.owner)
    engine.check_integrity()


def test_a_request_awaiting_its_kv_can_be_aborted_and_its_first_token_can_end_it() -> None:
    engine = make_engine()
    prompt = prompt_ids(seed=4, length=7)
    first = engine.add_remote_request("w", prompt, 5, greedy(max_tokens=4))
    assert first.new_token_ids == (5,) and not first.finished
    assert not engine.has_unfinished_requests()  # nothing to step before its KV is here
    closing = engine.abort_request("w")
    assert closing is not None and closing.finish_reason is FinishReason.ABORT
    with pytest.raises(ValueError, match="not awaiting"):
        engine.attach_kv("w", None)
    only = engine.add_remote_request("one", prompt, 5, greedy(max_tokens=1))
    assert only.finished and only.finish_reason is FinishReason.LENGTH
    assert only.usage.completion_tokens == 1 and engine.abort_request("one") is None
    engine.check_integrity()


def hand_off_suffix(
    prefill: Engine, decode: Engine, request_id: str, prompt: list[int], skip_tokens: int
) -> tuple[list[int], int]:
    """Prefill `prompt` on one engine, ship only its blocks from token `skip_tokens` on (the
    decode engine holds the ones before in its prefix cache), decode; (token ids, blocks
    shipped)."""
    params = greedy(max_tokens=6)
    output, owner, num_shipped = ship_prefilled(
        prefill, decode, request_id, prompt, params, skip_tokens
    )
    if not decode.hold_prefix(request_id, skip_tokens):  # evicted here: recompute it all
        assert decode.block_manager.release(owner)
        owner = None  # type: ignore[assignment]
    decode.attach_kv(request_id, owner)
    tokens = list(output.new_token_ids)
    while decode.has_unfinished_requests():
        tokens += [t for out in decode.step() for t in out.new_token_ids]
    decode.check_integrity()
    return tokens, num_shipped


@pytest.mark.parametrize("evicted", [False, True])
def test_a_second_turn_ships_only_the_suffix_the_decode_engine_lacks(evicted: bool) -> None:
    """Turn 2 extends turn 1's prompt and output: the decode engine that ran turn 1 holds
    their full blocks but the last (its last token's KV is never computed); only the rest of
    turn 2's prompt is shipped and attached after them, with one engine's output. Evicted
    before the KV lands: the prompt is recomputed there, with the same output."""
    decode, single = make_engine(), make_engine()
    turn1 = prompt_ids(seed=1, length=10)
    out1 = decode.generate([turn1], greedy(max_tokens=7))[0].token_ids  # 16 tokens computed
    assert single.generate([turn1], greedy(max_tokens=7))[0].token_ids == out1
    turn2 = turn1 + out1 + prompt_ids(seed=2, length=5)  # 22 tokens: 4 blocks cached of 6
    expected = single.generate([turn2], greedy(max_tokens=6))[0].token_ids
    if evicted:
        decode.block_manager.reset_prefix_cache()
    computed = decode.num_prompt_tokens_computed
    got, num_shipped = hand_off_suffix(make_engine(), decode, "t2", turn2, skip_tokens=16)
    assert got == expected
    assert num_shipped == 2  # blocks 4 and 5: tokens 16..21, the last block partial
    assert decode.num_prompt_tokens_computed - computed == (len(turn2) if evicted else 0)


def test_hold_prefix_refuses_bad_spans_and_an_abort_frees_the_prefix() -> None:
    decode = make_engine()
    turn1 = prompt_ids(seed=1, length=9)
    decode.generate([turn1], greedy(max_tokens=1))
    params = greedy(max_tokens=4)
    decode.add_remote_request("r", [*turn1, 5, 6], first_token_id=3, sampling_params=params)
    for bad in (0, 6, 12):  # nothing, not a block boundary, past the prompt
        with pytest.raises(ValueError, match="num_tokens"):
            decode.hold_prefix("r", bad)
    assert decode.hold_prefix("r", 8)
    with pytest.raises(ValueError, match="already"):
        decode.hold_prefix("r", 8)
    with pytest.raises(ValueError, match="not awaiting"):
        decode.hold_prefix("nobody", 8)
    decode.check_integrity()  # the held prefix is the request's, not a leak
    decode.abort_request("r")
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks
    decode.check_integrity()


@pytest.mark.parametrize(
    "params",
    [
        greedy(max_tokens=14),
        SamplingParams(max_tokens=14, temperature=1.0, top_k=50, seed=7, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_an_exported_running_request_continues_on_another_engine_unchanged(
    params: SamplingParams,
) -> None:
    """A drain's KV move (issue 22.3): a request running on one engine is exported after a
    few tokens (its KV up to its last token pinned, no closing output, nothing left there),
    its blocks copied into another engine, which takes it over from that last token
    (add_remote_request, the tokens before it resumed): the whole output equals the
    uninterrupted run's, nothing recomputed, no block leaked on either side."""
    prompt = prompt_ids(seed=3, length=21)
    expected = make_engine().generate([prompt], params)[0].token_ids
    source, target = make_engine(), make_engine()
    source.add_request("r", None, params, prompt_token_ids=prompt)
    tokens: list[int] = []
    while len(tokens) < 5:
        tokens += [t for out in source.step() for t in out.new_token_ids]
    moved = source.export_request("r")
    assert moved is not None and moved.first_token_id == tokens[-1]
    assert moved.usage.completion_tokens == len(tokens)
    kept = moved.kv
    assert kept.num_tokens == len(prompt) + len(tokens) - 1
    assert source.step() == [] and not source.has_unfinished_requests()
    owner = "in:r"
    dst = target.block_manager.reserve(owner, len(kept.block_ids))
    assert dst is not None
    scatter_blocks(
        target.runner.kv_cache, dst, gather_blocks(source.runner.kv_cache, kept.block_ids)
    )
    assert source.block_manager.release(kept.owner)
    source.check_integrity()
    first = target.add_remote_request(
        "r", prompt, moved.first_token_id, params, prefill_usage=moved.usage,
        resumed_token_ids=tokens[:-1],
    )  # fmt: skip
    assert first.new_token_ids == (tokens[-1],) and not first.finished
    computed = target.num_prompt_tokens_computed
    target.attach_kv("r", owner)
    rest: list[int] = []
    while target.has_unfinished_requests():
        rest += [t for out in target.step() for t in out.new_token_ids]
    assert tokens + rest == expected
    assert target.num_prompt_tokens_computed == computed  # decoded only
    target.check_integrity()


def test_only_a_running_request_with_its_kv_computed_is_exported() -> None:
    engine = make_engine()
    assert engine.export_request("unknown") is None
    engine.add_request("r", None, greedy(max_tokens=8), prompt_token_ids=prompt_ids(1, 5))
    assert engine.export_request("r") is None  # waiting: nothing computed yet
    engine.step()
    moved = engine.export_request("r")
    assert moved is not None and moved.kv.num_tokens == 5
    assert engine.export_request("r") is None  # gone
    assert engine.block_manager.release(moved.kv.owner)
    engine.check_integrity()
