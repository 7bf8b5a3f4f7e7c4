"""Placement by load: the prefill pool by queued prompt tokens, the decode pool by running
sequences and KV use; dead and draining workers skipped. Workers are fake clients here."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from contracts.errors import WorkerUnavailable
from contracts.workers import WorkerStats
from router.placement import Member, Placement, assigned

PREFILL = Placement(prefill=True)
DECODE = Placement(prefill=False)


@dataclass(frozen=True)
class Client:
    worker_id: str

    @property
    def key(self) -> str:
        return self.worker_id


def members(*names: str) -> list[Member]:
    return [Member(Client(name)) for name in names]  # type: ignore[arg-type]


def stats(free: int, total: int = 100, max_num_seqs: int = 8) -> WorkerStats:
    return WorkerStats(
        num_requests=0, num_free_blocks=free, num_blocks=total, max_num_seqs=max_num_seqs
    )


def test_prefill_goes_to_the_fewest_queued_prompt_tokens() -> None:
    a, b, c = pool = members("a", "b", "c")
    with assigned(a, 900), assigned(b, 100), assigned(b, 100):
        assert PREFILL.pick("prefill", pool) == 2  # idle
        with assigned(c, prompt_tokens=1000):
            assert PREFILL.pick("prefill", pool) == 1  # 200 queued beat 900 and 1,000
    assert [m.load.queued_tokens for m in pool] == [0, 0, 0]
    assert [m.load.in_flight for m in pool] == [0, 0, 0]


def test_decode_weighs_running_sequences_and_kv_use() -> None:
    a, b = pool = members("a", "b")
    a.load.observe(stats(free=90))
    b.load.observe(stats(free=20))  # 80% of its KV in use
    assert DECODE.pick("decode", pool) == 0
    with assigned(a, 10), assigned(a, 10), assigned(a, 10):
        assert DECODE.pick("decode", pool) == 0  # 3/8 running + 10% KV = 0.475 < 0.8
        with assigned(a, 10), assigned(a, 10):
            assert DECODE.pick("decode", pool) == 0  # 5/8 + 10% = 0.725 < 0.8
            with assigned(a, 10):
                assert DECODE.pick("decode", pool) == 1  # 6/8 + 10% = 0.85 > 0.8


def test_exclusions_dead_and_draining_workers_are_skipped() -> None:
    a, b, c = pool = members("a", "b", "c")
    assert PREFILL.pick("prefill", pool, exclude={a}) == 1
    a.load.down = True
    c.load.draining = True
    assert PREFILL.pick("prefill", pool) == 1
    with pytest.raises(WorkerUnavailable, match="no live prefill worker"):
        PREFILL.pick("prefill", pool, exclude={b})


def test_the_worker_holding_the_prefix_wins_until_its_queue_outweighs_it() -> None:
    a, _ = pool = members("a", "b")
    cached = [1000, 0]  # prompt tokens each worker holds
    assert PREFILL.pick("prefill", pool, cached=cached) == 0
    with assigned(a, prompt_tokens=900):
        assert PREFILL.pick("prefill", pool, cached=cached) == 0  # 900 - 1000 < 0 on b
        with assigned(a, prompt_tokens=200):
            assert PREFILL.pick("prefill", pool, cached=cached) == 1  # 1100 - 1000 > 0
    assert PREFILL.pick("prefill", pool, cached=[0, 0]) == 0  # no hits anywhere: load alone


def test_cache_weight_scales_the_hits_and_zero_is_load_only() -> None:
    light = Placement(prefill=True, cache_weight=0.5)
    load_only = Placement(prefill=True, cache_weight=0.0)
    for placement in (light, load_only):
        a, _ = pool = members("a", "b")
        with assigned(a, prompt_tokens=400):
            picked = placement.pick("prefill", pool, cached=[1000, 0])
            assert picked == (0 if placement is light else 1)  # 400 - 500 < 0; weight 0: load
    with pytest.raises(ValueError, match="cache_weight=-1"):
        Placement(prefill=True, cache_weight=-1)


DECODE_REUSE = Placement(prefill=False, cache_as_share=True)  # a disaggregated decode pool


def test_the_decode_worker_holding_the_prefix_wins_until_its_load_outweighs_its_share() -> None:
    a, _ = pool = members("a", "b")
    for member in pool:
        member.load.observe(stats(free=100))  # no KV in use: load is running seqs / 8
    cached = [800, 0]  # 80% of a 1,000-token prompt, on a
    assert DECODE_REUSE.pick("decode", pool, cached=cached, prompt_tokens=1000) == 0
    with ExitStack() as running:
        for _ in range(6):  # 6/8 - 0.8 < 0 on b
            running.enter_context(assigned(a, 10))
        assert DECODE_REUSE.pick("decode", pool, cached=cached, prompt_tokens=1000) == 0
        assert DECODE.pick("decode", pool) == 1  # load alone would move it
        running.enter_context(assigned(a, 10))  # 7/8 - 0.8 > 0
        assert DECODE_REUSE.pick("decode", pool, cached=cached, prompt_tokens=1000) == 1
    assert DECODE_REUSE.pick("decode", pool, cached=[0, 800], prompt_tokens=1000) == 1


def test_decode_cache_weight_scales_the_share_and_zero_is_load_only() -> None:
    a, _ = pool = members("a", "b")
    for member in pool:
        member.load.observe(stats(free=100))
    with assigned(a, 10), assigned(a, 10), assigned(a, 10):  # 3/8 = 0.375
        for weight, expected in ((1.0, 0), (0.4, 1), (0.0, 1)):  # 0.5 x weight vs 0.375
            placement = Placement(prefill=False, cache_weight=weight, cache_as_share=True)
            assert placement.pick("decode", pool, cached=[500, 0], prompt_tokens=1000) == expected
