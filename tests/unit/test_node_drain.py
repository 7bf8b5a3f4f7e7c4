"""The orchestration of a node drain (cluster.node_drain, issue 22.3) at unit level: which
workers leave, when replacements are awaited (make before break only for a pool with no other
worker), failures of single workers, the bound on the whole drain, the registry of drains by
Ray node id and the refusal of an address several nodes share. Ray's calls (the node table,
the actor table, DrainNode, killing an actor) and the service's worker calls are stand-ins
here: the real drain runs in tests/integration/test_multinode.py and test_service.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import cluster.node_drain as node_drain
from cluster.membership import PoolMembership
from cluster.node_drain import NodeDrains, RayNode, drain_node
from contracts.drain import NodeDrainReport
from contracts.errors import AmbiguousNode, NodeDrainTimedOut, UnknownNode
from router.placement import Member

NODE_IP, OTHER_IP = "10.0.0.2", "10.0.0.3"
ROUTER = RayNode("n-router", "10.0.0.1")
NODE, OTHER = RayNode("n-b", NODE_IP), RayNode("n-c", OTHER_IP)


class Client:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id


class FakeService:
    """What cluster.node_drain asks of cluster.service.Service, with the workers' calls
    recorded: `loads` gates replacements' start; `hang`/`fail` name workers whose drain hangs
    or raises."""

    def __init__(self) -> None:
        self.pools = {"decode": PoolMembership("decode")}
        self.gate = SimpleNamespace(servicer=object())
        self.config = SimpleNamespace(worker_start_timeout_s=600.0)
        self.node_drains = NodeDrains()
        self.loads = asyncio.Event()
        self.location: dict[str, str] = {}  # worker id -> node id
        self.hang: set[str] = set()
        self.fail: set[str] = set()
        self.draining_at_first_drain: list[str] | None = None
        self.members_at_drain: list[str] = []
        self.starts_cancelled = 0
        self._next = 0

    def add(self, worker_id: str, node: RayNode) -> Member:
        self.location[worker_id] = node.node_id
        return self.pools["decode"].add(Client(worker_id))  # type: ignore[arg-type]

    def ids(self) -> list[str]:
        return [m.worker_id for m in self.pools["decode"].members()]

    async def start_worker(self, pool: str) -> tuple[Any, Any]:
        self._next += 1
        worker_id = f"new-{self._next}"
        try:
            await self.loads.wait()
        except asyncio.CancelledError:  # the real one kills the actor it started
            self.starts_cancelled += 1
            raise
        self.location[worker_id] = OTHER.node_id
        return Client(worker_id), SimpleNamespace(index_key=None)

    async def drain_worker(self, pool: str, member: Member, timeout_s: float) -> Any:
        if self.draining_at_first_drain is None:
            self.draining_at_first_drain = [
                m.worker_id for m in self.pools[pool].members() if m.load.draining
            ]
            self.members_at_drain = self.ids()
        if member.worker_id in self.hang:
            await asyncio.Event().wait()
        if member.worker_id in self.fail:
            raise RuntimeError("ray.exceptions.ActorDiedError: the actor died")
        await self.retire_worker(pool, member)
        return SimpleNamespace(left_empty=True)

    async def retire_worker(self, pool: str, member: Member) -> None:
        self.forget_worker(pool, member)

    def forget_worker(self, pool: str, member: Member) -> None:
        self.pools[pool].remove(member)


@pytest.fixture
def ray_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """Ray's calls, answered from `calls.nodes` and the service's `location`; records drains
    marked and actors killed."""
    calls = SimpleNamespace(nodes=[ROUTER, NODE, OTHER], marked=[], killed=[], service=None)
    monkeypatch.setattr(node_drain, "live_nodes", lambda: list(calls.nodes))
    monkeypatch.setattr(node_drain, "own_node_id", lambda: ROUTER.node_id)
    monkeypatch.setattr(node_drain, "nodes_of_actors", lambda: dict(calls.service.location))
    monkeypatch.setattr(node_drain, "actor_id_of", lambda m: m.worker_id)
    monkeypatch.setattr(
        node_drain, "mark_draining", lambda node_id, *_: calls.marked.append(node_id)
    )
    monkeypatch.setattr(node_drain, "kill_member", lambda m: calls.killed.append(m.worker_id))
    yield calls


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def drained(service: FakeService, timeout_s: float = 600) -> NodeDrainReport:
    """drain_node of NODE_IP on the stand-in service, answered within 5 s of real time."""
    return await asyncio.wait_for(drain_node(service, NODE_IP, timeout_s), 5)  # type: ignore[arg-type]


async def poll(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def test_a_pool_with_other_workers_answers_without_waiting_for_its_replacements(
    ray_calls: SimpleNamespace,
) -> None:
    """No free capacity (a replacement that does not load): the drain still answers once its
    workers drained, the replacement reported pending; it joins the pool once it loads."""

    async def scenario() -> None:
        service = ray_calls.service = FakeService()
        service.add("d-0", NODE)
        service.add("d-1", OTHER)
        report = await drained(service)
        assert report.completed and report.num_replacements_pending == 1
        assert report.replacement_ids == () and report.num_replacements_failed == 0
        assert [(w.worker_id, w.left_empty) for w in report.workers] == [("d-0", True)]
        assert service.ids() == ["d-1"] and ray_calls.marked == [NODE.node_id]
        assert len(service.node_drains.background) == 1
        service.loads.set()
        await poll(lambda: service.ids() == ["d-1", "new-1"])
        await poll(lambda: not service.node_drains.background)

    run(scenario())


def test_a_pending_replacement_is_cancelled_when_the_service_stops(
    ray_calls: SimpleNamespace,
) -> None:
    async def scenario() -> None:
        service = ray_calls.service = FakeService()
        service.add("d-0", NODE)
        service.add("d-1", OTHER)
        report = await drained(service)
        assert report.num_replacements_pending == 1
        service.node_drains.cancel()  # Service.stop
        await poll(lambda: not service.node_drains.background)
        assert service.starts_cancelled == 1 and service.ids() == ["d-1"]

    run(scenario())


def test_a_pool_with_no_other_worker_waits_for_its_replacement_before_draining(
    ray_calls: SimpleNamespace,
) -> None:
    """Make before break; a worker on a node under another drain does not count as other."""

    async def scenario() -> None:
        service = ray_calls.service = FakeService()
        service.add("d-0", NODE)
        service.add("d-1", OTHER)
        under_way: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        service.node_drains.start(OTHER, under_way)  # OTHER is being drained meanwhile
        service.loads.set()
        report = await drained(service)
        assert service.members_at_drain == ["d-0", "d-1", "new-1"]  # started before the drain
        assert report.replacement_ids == ("new-1",) and report.num_replacements_pending == 0
        under_way.cancel()

    run(scenario())


def test_every_leaving_worker_is_marked_draining_before_any_drain_starts(
    ray_calls: SimpleNamespace,
) -> None:
    async def scenario() -> None:
        service = ray_calls.service = FakeService()
        for worker_id in ("d-0", "d-1", "d-2"):
            service.add(worker_id, NODE)
        service.add("d-3", OTHER)
        report = await drained(service)
        assert service.draining_at_first_drain == ["d-0", "d-1", "d-2"]
        assert report.num_replacements_pending == 3
        service.node_drains.cancel()

    run(scenario())


def test_a_worker_whose_drain_fails_is_retired_and_reported_not_empty(
    ray_calls: SimpleNamespace,
) -> None:
    async def scenario() -> None:
        service = ray_calls.service = FakeService()
        service.add("d-0", NODE)
        service.add("d-1", NODE)
        service.add("d-2", OTHER)
        service.fail = {"d-0"}
        report = await drained(service)
        assert [(w.worker_id, w.left_empty) for w in report.workers] == [
            ("d-0", False), ("d-1", True)
        ]  # fmt: skip
        assert not report.completed and service.ids() == ["d-2"]
        service.node_drains.cancel()

    run(scenario())


def test_a_hung_drain_is_given_up_its_workers_retired_and_forgotten(
    ray_calls: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_drain, "DRAIN_MARGIN_S", 0.1)

    async def scenario() -> None:
        service = ray_calls.service = FakeService()
        service.add("d-0", NODE)
        service.add("d-1", OTHER)
        service.hang = {"d-0"}
        with pytest.raises(NodeDrainTimedOut, match="did not end within its timeout"):
            await drained(service, 0.2)
        assert service.ids() == ["d-1"] and ray_calls.killed == ["d-0"]
        assert len(service.node_drains) == 0  # forgotten: the next call drains afresh
        service.add("d-4", NODE)
        report = await drained(service)
        assert not report.already_draining and [w.worker_id for w in report.workers] == ["d-4"]
        service.node_drains.cancel()

    run(scenario())


def test_drains_are_known_by_node_id_not_address(ray_calls: SimpleNamespace) -> None:
    """A drained node that left: its address answers as drained; a new node with the same
    address (a reused pod IP) is drained afresh."""

    async def scenario() -> None:
        service = ray_calls.service = FakeService()
        service.add("d-0", NODE)
        service.add("d-1", OTHER)
        first = await drain_node(service, NODE_IP, 600)  # type: ignore[arg-type]
        again = await drain_node(service, NODE_IP, 600)  # type: ignore[arg-type]
        assert not first.already_draining and again.already_draining and again.workers == ()
        ray_calls.nodes = [ROUTER, OTHER]  # its raylet left
        gone = await drain_node(service, NODE_IP, 600)  # type: ignore[arg-type]
        assert gone.already_draining and len(service.node_drains) == 0  # pruned
        reused = RayNode("n-new", NODE_IP)
        ray_calls.nodes = [ROUTER, OTHER, reused]
        service.add("d-5", reused)
        fresh = await drain_node(service, NODE_IP, 600)  # type: ignore[arg-type]
        assert not fresh.already_draining and [w.worker_id for w in fresh.workers] == ["d-5"]
        assert ray_calls.marked == [NODE.node_id, NODE.node_id, "n-new"]
        with pytest.raises(UnknownNode):
            await drain_node(service, "10.9.9.9", 600)  # type: ignore[arg-type]
        service.node_drains.cancel()

    run(scenario())


def test_an_address_several_live_nodes_share_is_refused_naming_them(
    ray_calls: SimpleNamespace,
) -> None:
    async def scenario() -> None:
        service = ray_calls.service = FakeService()
        service.add("d-0", NODE)
        ray_calls.nodes = [ROUTER, NODE, RayNode("n-b2", NODE_IP)]
        with pytest.raises(AmbiguousNode, match=r"2 live nodes .* \(n-b, n-b2\)"):
            await drain_node(service, NODE_IP, 600)  # type: ignore[arg-type]
        assert ray_calls.marked == [] and service.ids() == ["d-0"]

    run(scenario())


def test_rays_node_addresses_are_normalized_like_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    nodes = [
        {"NodeID": "a", "NodeManagerAddress": "fd00::0:1", "Alive": True},
        {"NodeID": "b", "NodeManagerAddress": "10.0.0.5", "Alive": False},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert node_drain.live_nodes() == [RayNode("a", "fd00::1")]


def test_a_hung_node_lookup_is_a_typed_timeout(
    ray_calls: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    release = threading.Event()
    monkeypatch.setattr(node_drain, "LOOKUP_TIMEOUT_S", 0.1)
    monkeypatch.setattr(node_drain, "live_nodes", lambda: release.wait(5) and [])

    async def scenario() -> None:
        service = ray_calls.service = FakeService()
        with pytest.raises(NodeDrainTimedOut, match=r"node table did not answer within 0\.1 s"):
            await drain_node(service, NODE_IP, 600)  # type: ignore[arg-type]
        release.set()

    run(scenario())


class _Method:
    def __init__(self, result: Any) -> None:
        self.result = result

    def remote(self, *args: Any) -> Any:
        async def call() -> Any:
            if isinstance(self.result, BaseException):
                raise self.result
            return self.result

        return call()


class _Actor:
    """A Ray actor handle's stand-in: `disconnect` answers `disconnected` (or raises it)."""

    def __init__(self, name: str, disconnected: Any = None) -> None:
        self._actor_id = SimpleNamespace(hex=lambda: name)
        self.disconnect = _Method(disconnected)
        self.shutdown = _Method(None)


def test_retiring_a_decode_worker_survives_a_prefill_worker_gone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A prefill worker killed meanwhile (a concurrent drain) fails its unpairing: logged, and
    the decode worker is still retired (out of its pool, stopped)."""
    import ray

    from cluster.service import Service, ServiceConfig
    from cluster.workers import RayWorkerClient

    killed: list[Any] = []
    monkeypatch.setattr(ray, "kill", killed.append)

    async def scenario() -> None:
        service = Service(ServiceConfig(mode="disaggregated"))
        service.pools = {"decode": PoolMembership("decode"), "prefill": PoolMembership("prefill")}
        gone = RuntimeError("ray.exceptions.ActorDiedError: prefill-0 died")
        service.pools["prefill"].add(RayWorkerClient(_Actor("p0", gone), "prefill-0"))
        service.pools["prefill"].add(RayWorkerClient(_Actor("p1"), "prefill-1"))
        decode = _Actor("d0")
        member = service.pools["decode"].add(RayWorkerClient(decode, "decode-0"))
        await service.retire_worker("decode", member)
        assert member not in service.pools["decode"] and killed == [decode]

    run(scenario())
    assert "unpairing retired decode worker decode-0 from a prefill worker failed" in caplog.text
