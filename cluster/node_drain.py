"""Draining a whole node of the Ray cluster (issue 22.3): an operator's `tandem drain-node`, a
Kubernetes worker pod's preStop hook, `tandem node` on SIGTERM all end here, through the
router's Admin service (router.admin) and `Service.drain_node`.

    1. find the live Ray node with that address; refuse the router's own and an address
       several live nodes share (raylets on one host: refused naming their ids, never one
       picked at random) (UnknownNode, NodeNotDrainable, AmbiguousNode)
    2. mark it draining in Ray's GCS (DrainNode, reason PREEMPTION): Ray schedules nothing
       new there, not our replacements, not a dead worker's replacement, not an autoscaler's
       worker; once it is idle its raylet exits by itself (Ray >= 2.9)
    3. per pool, start as many replacements as it has workers there (Ray puts them on other
       nodes) and add them to the pool
    4. mark every worker of the node draining (all at once, before any drain starts: no
       drain pairs with, or moves streams to, a sibling about to leave), then drain them all
       at once (Service.drain_worker: decode streams move to the pool's other workers with
       their KV; prefills finish and their KV lands), then each is retired. A pool with no
       placeable worker off the node (or only on nodes being drained) waits for its
       replacements first (make before break: its streams need somewhere to go); the others
       drain at once and answer without waiting for theirs: those are reported pending and
       go on starting in the background (bounded by the worker start timeout; they join the
       pool once loaded, a failed one is killed; `tandem serve`'s stop cancels them). A
       worker whose drain fails (its actor died, a Ray call failed) is retired anyway and
       reported as not left empty.

Why Ray's DrainNode and not node-affinity or label scheduling for the replacements: the
drained node must be closed to every worker started from anywhere (the health loop's
replacements, the autoscaler's growth, a worker the pool restarts later), not only to the
ones started here; DrainNode is the one mark Ray's scheduler itself honours for all of them,
it is what Ray's autoscaler v2 and `ray start`'s own SIGTERM handler use (so KubeRay reads the
node as leaving too), and PREEMPTION drains are never rejected. It has no undo: a drained node
leaves the cluster once idle, and comes back by restarting Ray there. The GCS client and the
actor table are Ray developer APIs (`GcsClient.drain_node`, `ray._private.state.actors`: the
public state API needs the dashboard, which Tandem runs without); both are in Ray 2.60.
Ray's node addresses are normalized like the request's (contracts.drain.normalized_ip).

Timing: one deadline, `timeout_s` from the call, bounds the drains (and, for a pool with no
other worker, its replacements' start: one not loaded by then is given up, counted failed); a
worker still busy then is retired busy (its streams resume elsewhere by replay, within
--max-migrations). The whole drain is bounded too, by `timeout_s + DRAIN_MARGIN_S`: a Ray call
that hangs (the GCS, a worker's stats or KV pairing) ends it with NodeDrainTimedOut, the
workers it marked retired at once (removed and killed), and forgets it.

Calls for the same node are idempotent (NodeDrains: by Ray node id, not address, since a pod's
IP is reused): a second call while one runs waits for it and returns its report marked
`already_draining`; one after it drains whatever Tandem worker is still there (none, unless
placed before Ray saw the mark), or, once the node left the cluster, answers an empty report
marked `already_draining`. A failed or timed-out drain is forgotten. Event-loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cluster.workers import actor_of
from contracts.drain import (
    NodeDrainReport,
    WorkerDrainOutcome,
    check_drain_arguments,
    normalized_ip,
)
from contracts.errors import (
    AmbiguousNode,
    NodeDrainTimedOut,
    NodeNotDrainable,
    UnknownNode,
    WorkerUnavailable,
)
from router.placement import Member

if TYPE_CHECKING:
    from cluster.service import Service

logger = logging.getLogger(__name__)

DRAIN_MARGIN_S = 20.0  # a drain ends within timeout_s + this (node_cli waits 30 s more)
LOOKUP_TIMEOUT_S = 30.0  # bound on finding the node (ray.nodes())
RETIRE_TIMEOUT_S = 15.0  # a worker whose drain failed: bound on retiring it, then it is killed
MAX_LEFT_NODES = 1024  # addresses of drained nodes that left, remembered for idempotent calls


@dataclass(frozen=True, slots=True)
class RayNode:
    """A live node of the Ray cluster: its hex id and its address (normalized)."""

    node_id: str
    ip: str


def live_nodes() -> list[RayNode]:
    """The cluster's live nodes (ray.nodes(): a GCS call; blocking)."""
    import ray

    return [
        RayNode(n["NodeID"], normalized_ip(n["NodeManagerAddress"]) or n["NodeManagerAddress"])
        for n in ray.nodes()
        if n["Alive"]
    ]


def own_node_id() -> str:
    """The id of the router's node (the Ray driver's)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


def nodes_of_actors() -> dict[str, str]:
    """Actor id (hex) -> the id (hex) of the node it runs on, for every actor the GCS knows
    (blocking)."""
    from ray._private.state import actors

    return {actor_id: info["Address"]["NodeID"] for actor_id, info in actors().items()}


def mark_draining(node_id: str, message: str, timeout_s: float) -> None:
    """Mark a node draining in Ray's GCS (blocking); NodeNotDrainable if Ray refuses."""
    import ray
    from ray.core.generated import autoscaler_pb2

    worker: Any = ray._private.worker.global_worker
    reasons: Any = getattr(autoscaler_pb2, "DrainNodeReason")  # noqa: B009 (stubs lack it)
    gcs_client = worker.gcs_client
    deadline_ms = int(time.time() * 1000 + timeout_s * 1000)
    reason = reasons.DRAIN_NODE_REASON_PREEMPTION
    accepted, why = gcs_client.drain_node(node_id, reason, message, deadline_ms, timeout=30)
    if not accepted:
        raise NodeNotDrainable(f"Ray refused to drain node {node_id}: {why}")


def actor_id_of(member: Member) -> str:
    """The Ray actor id (hex) of a pool member."""
    return str(actor_of(member)._actor_id.hex())


def kill_member(member: Member) -> None:
    """Kill a member's actor (blocking briefly; an actor gone already is no error)."""
    import ray

    with contextlib.suppress(Exception):
        ray.kill(actor_of(member))


@dataclass
class NodeDrains:
    """The router's node drains (Service.node_drains): the task of each, by Ray node id; the
    addresses of drained nodes that have left the cluster since (bounded); the replacements
    still starting in the background (cancelled by `cancel`, at the service's stop)."""

    tasks: dict[str, tuple[str, asyncio.Future[NodeDrainReport]]] = field(default_factory=dict)
    left: OrderedDict[str, None] = field(default_factory=OrderedDict)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.tasks)

    def get(self, node_id: str) -> asyncio.Future[NodeDrainReport] | None:
        entry = self.tasks.get(node_id)
        return None if entry is None else entry[1]

    def under_way(self) -> set[str]:
        """The ids of nodes with a drain running."""
        return {node_id for node_id, (_, task) in self.tasks.items() if not task.done()}

    def prune(self, live_ids: set[str]) -> None:
        """Forget the finished drains of nodes that have left (their address is remembered:
        a later call for it is answered as drained, unless a new node has it)."""
        for node_id, (ip, task) in list(self.tasks.items()):
            if task.done() and node_id not in live_ids:
                del self.tasks[node_id]
                self.left[ip] = None
                self.left.move_to_end(ip)
                while len(self.left) > MAX_LEFT_NODES:
                    self.left.popitem(last=False)

    def start(self, node: RayNode, task: asyncio.Future[NodeDrainReport]) -> None:
        """Remember a drain; it is forgotten if it fails (the node is not drained then)."""
        self.tasks[node.node_id] = (node.ip, task)
        self.left.pop(node.ip, None)

        def forget_failed(done: asyncio.Future[NodeDrainReport]) -> None:
            failed = done.cancelled() or done.exception() is not None  # (retrieved)
            if failed and self.tasks.get(node.node_id, (None, None))[1] is done:
                del self.tasks[node.node_id]

        task.add_done_callback(forget_failed)

    def in_background(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run `coroutine` (a replacement's start) past the drain; held until it ends."""
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def cancel(self) -> None:
        """Cancel every drain and background start (the service stops)."""
        for _, task in self.tasks.values():
            task.cancel()
        for task in list(self.background):
            task.cancel()


@dataclass
class _PoolResult:
    outcomes: list[WorkerDrainOutcome]
    replacement_ids: list[str]
    num_failed: int
    num_pending: int


class NodeDrain:
    """One drain of one node for `service` (`run`)."""

    def __init__(self, service: Service, node: RayNode, timeout_s: float) -> None:
        self.service = service
        self.node = node
        self.timeout_s = timeout_s
        self.deadline_monotonic_s = time.monotonic() + timeout_s
        self.marked: list[tuple[str, Member]] = []  # members this drain marked draining

    def left_s(self) -> float:
        return max(self.deadline_monotonic_s - time.monotonic(), 0.0)

    async def run(self, already_draining: bool) -> NodeDrainReport:
        """Drain the node (module docstring). Raises NodeNotDrainable. Cancelled (the bound
        of the whole drain), it retires the workers it marked at once."""
        try:
            return await self._run(already_draining)
        except BaseException:
            self._abandon()
            raise

    async def _run(self, already_draining: bool) -> NodeDrainReport:
        started = time.monotonic()
        node, service = self.node, self.service
        message = f"tandem: an operator drains node {node.ip}"
        await asyncio.to_thread(mark_draining, node.node_id, message, self.timeout_s)
        located = await asyncio.to_thread(nodes_of_actors)
        leaving = {  # a member draining already (the autoscaler's shrink) is left to that drain
            pool: [
                m for m in members.members()
                if located.get(actor_id_of(m)) == node.node_id and not m.load.draining
            ]
            for pool, members in service.pools.items()
        }  # fmt: skip
        for pool, members in leaving.items():  # all of them, before any drain starts
            for member in members:
                service.pools[pool].drain(member)
                self.marked.append((pool, member))
        busy_nodes = service.node_drains.under_way() | {node.node_id}
        has_other = {
            pool: any(
                m.placeable and located.get(actor_id_of(m)) not in busy_nodes
                for m in members.members()
            )
            for pool, members in service.pools.items()
        }
        logger.warning("draining node %s (%s): %s", node.ip, node.node_id,
                       {p: [m.worker_id for m in ms] for p, ms in leaving.items()})  # fmt: skip
        results = await asyncio.gather(
            *(self._drain_pool(p, ms, has_other[p]) for p, ms in leaving.items())
        )
        return NodeDrainReport(
            node_ip=node.ip,
            workers=tuple(o for r in results for o in r.outcomes),
            replacement_ids=tuple(i for r in results for i in r.replacement_ids),
            num_replacements_failed=sum(r.num_failed for r in results),
            num_replacements_pending=sum(r.num_pending for r in results),
            already_draining=already_draining,
            elapsed_s=time.monotonic() - started,
        )

    async def _drain_pool(self, pool: str, leaving: list[Member], has_other: bool) -> _PoolResult:
        """Replace and drain `pool`'s members on the node."""
        if not leaving:
            return _PoolResult([], [], 0, 0)
        ids: list[str] = []
        num_failed = num_pending = 0
        if has_other:  # drain at once; the replacements go on starting past the answer
            bound_s = self.service.config.worker_start_timeout_s + DRAIN_MARGIN_S
            for _ in leaving:
                self.service.node_drains.in_background(self._replacement(pool, bound_s))
            num_pending = len(leaving)
        else:  # make before break: its streams need somewhere to go
            started = await asyncio.gather(
                *(self._replacement(pool, self.left_s()) for _ in leaving)
            )
            ids = [worker_id for worker_id in started if worker_id is not None]
            num_failed = len(started) - len(ids)
        drained = await asyncio.gather(*(self._drain_one(pool, m) for m in leaving))
        outcomes = [
            WorkerDrainOutcome(pool, m.worker_id, left_empty)
            for m, left_empty in zip(leaving, drained, strict=True)
        ]
        return _PoolResult(outcomes, ids, num_failed, num_pending)

    async def _drain_one(self, pool: str, member: Member) -> bool:
        """Drain and retire one member; whether it left empty (a failed drain: False, and it
        is retired anyway)."""
        try:
            report = await self.service.drain_worker(pool, member, self.left_s())
            return report.left_empty
        except Exception as e:
            logger.warning("node drain %s: the drain of %s worker %s failed (%r): retiring it",
                           self.node.ip, pool, member.worker_id, e)  # fmt: skip
        try:
            await asyncio.wait_for(self.service.retire_worker(pool, member), RETIRE_TIMEOUT_S)
        except Exception as e:
            logger.warning("node drain %s: retiring %s worker %s failed (%r): killed",
                           self.node.ip, pool, member.worker_id, e)  # fmt: skip
            self._retire_now(pool, member)
        return False

    def _retire_now(self, pool: str, member: Member) -> None:
        self.service.forget_worker(pool, member)
        kill_member(member)

    def _abandon(self) -> None:
        """The drain was given up: retire what it marked and is still in its pool."""
        for pool, member in self.marked:
            if member in self.service.pools[pool]:
                logger.warning("node drain %s given up: %s worker %s retired at once",
                               self.node.ip, pool, member.worker_id)  # fmt: skip
                self._retire_now(pool, member)

    async def _replacement(self, pool: str, bound_s: float) -> str | None:
        """Start a worker for `pool` (Ray keeps it off the draining node) and add it; its id,
        or None if it did not start within `bound_s` (start_worker killed it)."""
        try:
            client, info = await asyncio.wait_for(self.service.start_worker(pool), bound_s)
        except Exception as e:  # counted in the report; the drain goes on without it
            logger.warning("node drain %s: a replacement %s worker did not start: %r",
                           self.node.ip, pool, e)  # fmt: skip
            return None
        self.service.pools[pool].add(client, info.index_key)
        logger.info("node drain %s: %s worker %s joined the pool", self.node.ip, pool,
                    client.worker_id)  # fmt: skip
        return client.worker_id


async def find_node(service: Service, node_ip: str) -> RayNode | None:
    """The live node at `node_ip` (normalized); None if none is but a node drained here had
    it. Raises UnknownNode, AmbiguousNode, NodeNotDrainable (the router's own node)."""
    try:
        nodes = await asyncio.wait_for(asyncio.to_thread(live_nodes), LOOKUP_TIMEOUT_S)
    except TimeoutError:
        raise NodeDrainTimedOut(
            f"the Ray cluster's node table did not answer within {LOOKUP_TIMEOUT_S:g} s: "
            f"node {node_ip} was not drained"
        ) from None
    service.node_drains.prune({n.node_id for n in nodes})
    found = [n for n in nodes if n.ip == node_ip]
    if not found:
        if node_ip in service.node_drains.left:
            return None
        raise UnknownNode(
            f"no live node of the Ray cluster has the address {node_ip} (live nodes: "
            f"{', '.join(sorted({n.ip for n in nodes})) or 'none'})"
        )
    if len(found) > 1:
        raise AmbiguousNode(
            f"{len(found)} live nodes of the Ray cluster have the address {node_ip} "
            f"({', '.join(sorted(n.node_id for n in found))}): a drain by address would pick "
            "one at random; stop the one meant (`ray stop` there) or give each its own address"
        )
    if found[0].node_id == own_node_id():
        raise NodeNotDrainable(
            f"node {node_ip} runs this router (the Ray driver of `tandem serve`): "
            "draining it would stop the service; stop `tandem serve` instead"
        )
    return found[0]


async def drain_node(service: Service, node_ip: str, timeout_s: float) -> NodeDrainReport:
    """Service.drain_node's body (module docstring): validate, join a drain of the same node
    under way, or run one. Raises InvalidRequest, WorkerUnavailable (not serving yet),
    UnknownNode, NodeNotDrainable, AmbiguousNode, NodeDrainTimedOut."""
    node_ip = check_drain_arguments(node_ip, timeout_s)
    if not service.pools or service.gate is None or service.gate.servicer is None:
        raise WorkerUnavailable("starting: the worker pools are not ready; drain later")
    node = await find_node(service, node_ip)
    if node is None:  # drained before, and its raylet has left since: nothing there
        return NodeDrainReport(node_ip, (), (), 0, 0, True, 0.0)
    drains = service.node_drains
    under_way = drains.get(node.node_id)
    if under_way is not None and not under_way.done():
        report = await _outcome(under_way, node_ip)
        return replace(report, already_draining=True)
    drain = NodeDrain(service, node, timeout_s)
    bounded = asyncio.wait_for(drain.run(under_way is not None), timeout_s + DRAIN_MARGIN_S)
    task = asyncio.ensure_future(bounded)
    drains.start(node, task)
    return await _outcome(task, node_ip)


async def _outcome(task: asyncio.Future[NodeDrainReport], node_ip: str) -> NodeDrainReport:
    """A drain's report (a caller that goes away does not cancel it); NodeDrainTimedOut."""
    try:
        return await asyncio.shield(task)
    except TimeoutError:
        raise NodeDrainTimedOut(
            f"the drain of node {node_ip} did not end within its timeout and "
            f"{DRAIN_MARGIN_S:g} s (a Ray call hung; see the router's log): given up, its "
            "workers retired at once"
        ) from None
