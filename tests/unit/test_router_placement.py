"""Placement by load: the prefill pool by queued prompt tokens, the decode pool by running
sequences and KV use; dead workers skipped until replaced. Workers are opaque handles here."""

from __future__ import annotations

import pytest

from contracts.errors import WorkerUnavailable
from contracts.workers import WorkerStats
from router.placement import Pool


def stats(free: int, total: int = 100, max_num_seqs: int = 8) -> WorkerStats:
    return WorkerStats(
        num_requests=0, num_free_blocks=free, num_blocks=total, max_num_seqs=max_num_seqs
    )


def test_prefill_goes_to_the_fewest_queued_prompt_tokens() -> None:
    pool = Pool("prefill", ["a", "b", "c"])
    with (
        pool.assigned(0, prompt_tokens=900),
        pool.assigned(1, prompt_tokens=100),
        pool.assigned(1, prompt_tokens=100),
    ):
        assert pool.pick() == 2  # idle
        with pool.assigned(2, prompt_tokens=1000):
            assert pool.pick() == 1  # 200 queued tokens beat 900 and 1,000
    assert [load.queued_tokens for load in pool.loads] == [0, 0, 0]
    assert [load.in_flight for load in pool.loads] == [0, 0, 0]


def test_decode_weighs_running_sequences_and_kv_use() -> None:
    pool = Pool("decode", ["a", "b"])
    pool.observe("a", stats(free=90))
    pool.observe("b", stats(free=20))  # 80% of its KV in use
    assert pool.pick() == 0
    with pool.assigned(0, 10), pool.assigned(0, 10), pool.assigned(0, 10):
        assert pool.pick() == 0  # 3/8 running + 10% KV = 0.475 < 0.8
        with pool.assigned(0, 10), pool.assigned(0, 10):
            assert pool.pick() == 0  # 5/8 + 10% = 0.725 < 0.8
            with pool.assigned(0, 10):
                assert pool.pick() == 1  # 6/8 + 10% = 0.85 > 0.8


def test_exclusions_and_dead_workers_are_skipped_until_replaced() -> None:
    pool = Pool("prefill", ["a", "b"])
    assert pool.pick(exclude={0}) == 1
    pool.mark_down("a")
    assert pool.pick() == 1
    with pytest.raises(WorkerUnavailable, match="no live prefill worker"):
        pool.pick(exclude={1})
    assert pool.replace("a", "a2") and pool.workers == ["a2", "b"]
    assert pool.pick() == 0  # the replacement is live and idle
    assert not pool.replace("gone", "x")


def test_a_replaced_worker_starts_with_a_fresh_load() -> None:
    pool = Pool("decode", ["a", "b"])
    pool.observe("a", stats(free=0))
    with pool.assigned(0, 5):
        pool.replace("a", "a2")
        assert pool.loads[0].in_flight == 0 and pool.loads[0].kv_used == 0
    assert pool.loads[0].in_flight == 0  # the old request ended on the old load's books
    assert pool.pick() == 0


def test_an_empty_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="decode pool needs at least one worker"):
        Pool("decode", [])


def test_the_worker_holding_the_prefix_wins_until_its_queue_outweighs_it() -> None:
    pool = Pool("prefill", ["a", "b"])
    cached = [1000, 0]  # prompt tokens each worker holds
    assert pool.pick(cached=cached) == 0
    with pool.assigned(0, prompt_tokens=900):
        assert pool.pick(cached=cached) == 0  # 900 - 1000 < 0 queued on b
        with pool.assigned(0, prompt_tokens=200):
            assert pool.pick(cached=cached) == 1  # 1100 - 1000 > 0: the hot worker loses
    assert pool.pick(cached=[0, 0]) == 0  # no hits anywhere: load alone


def test_cache_weight_scales_the_hits_and_zero_is_load_only() -> None:
    light = Pool("prefill", ["a", "b"], cache_weight=0.5)
    load_only = Pool("prefill", ["a", "b"], cache_weight=0.0)
    for pool in (light, load_only):
        with pool.assigned(0, prompt_tokens=400):
            picked = pool.pick(cached=[1000, 0])
            assert picked == (0 if pool is light else 1)  # 400 - 500 < 0; weight 0: load
    with pytest.raises(ValueError, match="cache_weight=-1"):
        Pool("prefill", ["a"], cache_weight=-1)
