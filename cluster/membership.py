"""Who is in each worker pool: the control plane's registry, read by the router.

Each pool holds its members in a stable order. A member is one incarnation of a worker
(router.placement.Member: its client, prefix-index key and load); a replacement takes its
predecessor's place and worker id with a fresh load, a new worker joins at the end, a
leaving one is drained (no new requests) and then removed. The router reads `members()` and
reports lost workers (`mark_down`); only the control plane changes who is in the pool.
"""

from __future__ import annotations

from collections.abc import Sequence

from contracts.workers import WorkerKey, WorkerStats
from router.placement import Member
from router.workers import WorkerClient


class PoolMembership:
    """One pool's members (router.placement.PoolView). Event-loop only."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._members: list[Member] = []

    @property
    def name(self) -> str:
        return self._name

    def members(self) -> Sequence[Member]:
        return tuple(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        return any(m is member for m in self._members)

    def add(self, client: WorkerClient, index_key: WorkerKey | None = None) -> Member:
        """A new worker joins the pool (at the end)."""
        member = Member(client, index_key)
        self._members.append(member)
        return member

    def replace(
        self, old: Member, client: WorkerClient, index_key: WorkerKey | None = None
    ) -> Member | None:
        """`client` takes `old`'s place (its worker id, a fresh load); None if `old` is not
        here any more (removed, or replaced already)."""
        index = self._index(old)
        if index is None:
            return None
        if client.worker_id != old.worker_id:
            raise ValueError(f"a replacement keeps the worker id {old.worker_id!r}, "
                             f"not {client.worker_id!r}")  # fmt: skip
        member = self._members[index] = Member(client, index_key)
        return member

    def remove(self, member: Member) -> bool:
        """Take a (drained) member out of the pool. False if it is not here."""
        index = self._index(member)
        if index is None:
            return False
        del self._members[index]
        return True

    def drain(self, member: Member) -> None:
        """Place nothing more on `member` (it is leaving); what it has runs to the end."""
        member.load.draining = True

    def mark_down(self, member: Member) -> None:
        member.load.down = True

    def observe(self, member: Member, stats: WorkerStats) -> None:
        """A member's latest report (its health check), for placement."""
        member.load.observe(stats)

    def _index(self, member: Member) -> int | None:
        return next((i for i, m in enumerate(self._members) if m is member), None)
