"""cluster.membership: the control plane's pools. Replacements keep their place and worker
id with a fresh load (requests on the old incarnation end on its books); drained members are
skipped by placement; removal and replacement of a member that left are refused quietly."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cluster.membership import PoolMembership
from contracts.workers import WorkerKey, WorkerStats
from router.placement import Placement, assigned


@dataclass(frozen=True)
class Client:
    worker_id: str
    incarnation: int = 0

    @property
    def key(self) -> str:
        return f"{self.worker_id}#{self.incarnation}"


def test_a_replacement_takes_the_place_and_id_with_a_fresh_load() -> None:
    pool = PoolMembership("decode")
    a = pool.add(Client("decode-0"))  # type: ignore[arg-type]
    pool.add(Client("decode-1"))  # type: ignore[arg-type]
    a.load.observe(WorkerStats(num_requests=1, num_blocks=10, num_free_blocks=0))
    with assigned(a, 5):
        key = WorkerKey("decode-0", "e2")
        a2 = pool.replace(a, Client("decode-0", 1), key)  # type: ignore[arg-type]
        assert a2 is not None and pool.members()[0] is a2
        assert a2.index_key == key and a2.load.in_flight == 0 and a2.load.kv_used == 0
    assert a.load.in_flight == 0  # the old request ended on the old member's books
    assert a not in pool and a2 in pool
    assert pool.replace(a, Client("decode-0", 2)) is None  # replaced already  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keeps the worker id 'decode-0'"):
        pool.replace(a2, Client("decode-9"))  # type: ignore[arg-type]


def test_drained_and_down_members_are_not_placed_and_removal_is_final() -> None:
    pool = PoolMembership("prefill")
    a, b = pool.add(Client("p-0")), pool.add(Client("p-1"))  # type: ignore[arg-type]
    placement = Placement(prefill=True)
    pool.drain(a)
    assert pool.members()[placement.pick("prefill", pool.members())] is b
    pool.mark_down(b)
    with pytest.raises(Exception, match="no live prefill worker"):
        placement.pick("prefill", pool.members())
    assert pool.remove(a) and not pool.remove(a)
    assert [m.worker_id for m in pool.members()] == ["p-1"] and len(pool) == 1
