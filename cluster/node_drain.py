"""Draining a whole node of the Ray cluster (issue 22.3): an operator's `tandem drain-node`, a
Kubernetes worker pod's preStop hook, `tandem node` on SIGTERM all end here, through the
router's Admin service (router.admin) and `Service.drain_node`.

    1. find the live Ray node with that address; refuse the router's own (UnknownNode,
       NodeNotDrainable)
    2. mark it draining in Ray's GCS (DrainNode, reason PREEMPTION): Ray schedules nothing
       new there, not our replacements, not a dead worker's replacement, not an autoscaler's
       worker; once it is idle its raylet exits by itself (Ray >= 2.9)
    3. per pool, start as many replacements as it has workers there (Ray puts them on other
       nodes) and add them to the pool
    4. drain every worker of the node at once (Service.drain_worker: decode streams move to
       the pool's other workers with their KV; prefills finish and their KV lands), then each
       is retired. A pool with no placeable worker off the node waits for its replacements
       first (make before break: its streams need somewhere to go); the others drain at once.

Why Ray's DrainNode and not node-affinity or label scheduling for the replacements: the
drained node must be closed to every worker started from anywhere (the health loop's
replacements, the autoscaler's growth, a worker the pool restarts later), not only to the
ones started here; DrainNode is the one mark Ray's scheduler itself honours for all of them,
it is what Ray's autoscaler v2 and `ray start`'s own SIGTERM handler use (so KubeRay reads the
node as leaving too), and PREEMPTION drains are never rejected. It has no undo: a drained node
leaves the cluster once idle, and comes back by restarting Ray there. The GCS client and the
actor table are Ray developer APIs (`GcsClient.drain_node`, `ray._private.state.actors`: the
public state API needs the dashboard, which Tandem runs without); both are in Ray 2.60.

Timing: one deadline, `timeout_s` from the call, bounds the replacements' start and the drains;
a replacement that has not loaded by then is given up (counted in the report), a worker still
busy then is retired busy (its streams resume elsewhere by replay, within --max-migrations).
Calls for the same node are idempotent: a second call while one runs waits for it and returns
its report marked `already_draining`; one after it drains whatever Tandem worker is still
there (none, unless placed before Ray saw the mark). Event-loop only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from cluster.workers import actor_of
from contracts.drain import NodeDrainReport, WorkerDrainOutcome
from contracts.errors import NodeNotDrainable, UnknownNode, WorkerUnavailable
from router.placement import Member

if TYPE_CHECKING:
    from cluster.service import Service

logger = logging.getLogger(__name__)

MAX_TIMEOUT_S = 3600.0


@dataclass(frozen=True, slots=True)
class RayNode:
    """A live node of the Ray cluster: its hex id and its address."""

    node_id: str
    ip: str


def live_nodes() -> list[RayNode]:
    """The cluster's live nodes (ray.nodes(): a GCS call; blocking)."""
    import ray

    return [RayNode(n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes() if n["Alive"]]


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


def check_arguments(node_ip: str, timeout_s: float) -> str:
    """The normalized address; ValueError naming a malformed address or timeout."""
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
            and 0 < timeout_s <= MAX_TIMEOUT_S):  # fmt: skip
        raise ValueError(f"timeout_s={timeout_s!r} must be in (0, {MAX_TIMEOUT_S:g}] seconds")
    try:
        return str(ipaddress.ip_address(node_ip.strip()))
    except ValueError:
        raise ValueError(f"node_ip={node_ip!r} is not an IP address") from None


class NodeDrain:
    """One drain of one node for `service` (`run`)."""

    def __init__(self, service: Service, node_ip: str, timeout_s: float) -> None:
        self.service = service
        self.node_ip = node_ip
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def left_s(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    async def run(self, already_draining: bool) -> NodeDrainReport:
        """Drain the node (module docstring). Raises UnknownNode, NodeNotDrainable."""
        started = time.monotonic()
        node = await self._find_node(already_draining)
        if node is None:  # drained before, and its raylet has left since: nothing there
            return NodeDrainReport(self.node_ip, (), (), 0, True, time.monotonic() - started)
        message = f"tandem: an operator drains node {self.node_ip}"
        await asyncio.to_thread(mark_draining, node.node_id, message, self.timeout_s)
        located = await asyncio.to_thread(nodes_of_actors)
        leaving = {  # a member draining already (the autoscaler's shrink) is left to that drain
            pool: [
                m for m in members.members()
                if located.get(_actor_id(m)) == node.node_id and not m.load.draining
            ]
            for pool, members in self.service.pools.items()
        }  # fmt: skip
        logger.warning("draining node %s (%s): %s", self.node_ip, node.node_id,
                       {p: [m.worker_id for m in ms] for p, ms in leaving.items()})  # fmt: skip
        results = await asyncio.gather(*(self._drain_pool(p, ms) for p, ms in leaving.items()))
        outcomes = tuple(o for pool_outcomes, _, _ in results for o in pool_outcomes)
        replacement_ids = tuple(i for _, ids, _ in results for i in ids)
        num_failed = sum(failed for _, _, failed in results)
        elapsed_s = time.monotonic() - started
        return NodeDrainReport(self.node_ip, outcomes, replacement_ids, num_failed,
                               already_draining, elapsed_s)  # fmt: skip

    async def _find_node(self, already_draining: bool) -> RayNode | None:
        import ray

        nodes = await asyncio.to_thread(live_nodes)
        found = next((n for n in nodes if n.ip == self.node_ip), None)
        if found is None:
            if already_draining:
                return None
            raise UnknownNode(
                f"no live node of the Ray cluster has the address {self.node_ip} (live nodes: "
                f"{', '.join(sorted(n.ip for n in nodes)) or 'none'})"
            )
        if found.node_id == ray.get_runtime_context().get_node_id():
            raise NodeNotDrainable(
                f"node {self.node_ip} runs this router (the Ray driver of `tandem serve`): "
                "draining it would stop the service; stop `tandem serve` instead"
            )
        return found

    async def _drain_pool(
        self, pool: str, leaving: list[Member]
    ) -> tuple[list[WorkerDrainOutcome], list[str], int]:
        """Replace and drain `pool`'s members on the node: (their outcomes, replacement ids,
        replacements that failed to start)."""
        if not leaving:
            return [], [], 0
        members = self.service.pools[pool]
        has_other = any(
            m.placeable and all(m is not gone for gone in leaving) for m in members.members()
        )
        starting = asyncio.gather(*(self._replacement(pool) for _ in leaving))
        if not has_other:  # make before break: its streams need somewhere to go
            started = await starting
        drains = await asyncio.gather(
            *(self.service.drain_worker(pool, m, self.left_s()) for m in leaving)
        )
        if has_other:
            started = await starting
        outcomes = [
            WorkerDrainOutcome(pool, m.worker_id, d.left_empty)
            for m, d in zip(leaving, drains, strict=True)
        ]
        ids = [worker_id for worker_id in started if worker_id is not None]
        return outcomes, ids, len(started) - len(ids)

    async def _replacement(self, pool: str) -> str | None:
        """Start a worker for `pool` (Ray keeps it off the draining node) and add it; its id,
        or None if it did not start before the deadline."""
        try:
            client, info = await asyncio.wait_for(self.service.start_worker(pool), self.left_s())
        except Exception as e:  # counted in the report; the drain goes on without it
            logger.warning("node drain %s: a replacement %s worker did not start: %r",
                           self.node_ip, pool, e)  # fmt: skip
            return None
        self.service.pools[pool].add(client, info.index_key)
        logger.info("node drain %s: %s worker %s joined the pool", self.node_ip, pool,
                    client.worker_id)  # fmt: skip
        return client.worker_id


def _actor_id(member: Member) -> str:
    return str(actor_of(member)._actor_id.hex())


async def drain_node(service: Service, node_ip: str, timeout_s: float) -> NodeDrainReport:
    """Service.drain_node's body (module docstring): validate, join a drain of the same node
    under way, or run one. Raises ValueError, WorkerUnavailable (not serving yet),
    UnknownNode, NodeNotDrainable."""
    node_ip = check_arguments(node_ip, timeout_s)
    if not service.pools or service.gate is None or service.gate.servicer is None:
        raise WorkerUnavailable("starting: the worker pools are not ready; drain later")
    drains = service.node_drains
    under_way = drains.get(node_ip)
    if under_way is not None and not under_way.done():
        report = await asyncio.shield(under_way)
        return replace(report, already_draining=True)
    drained_before = under_way is not None  # a failed one was forgotten
    task = asyncio.ensure_future(NodeDrain(service, node_ip, timeout_s).run(drained_before))
    drains[node_ip] = task
    try:
        return await asyncio.shield(task)
    except BaseException:
        if task.done() and not task.cancelled() and task.exception() is not None:
            del drains[node_ip]  # failed (unknown node, refused): not drained
        raise
