"""What an operator's node drain did (cluster.node_drain, answered by router.admin's DrainNode):
one typed report, built by the control plane and turned into protobuf at the router's edge;
and the check of a drain's arguments, done at the edge and again by the control plane.
Torch-free.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from contracts.errors import InvalidRequest

MAX_DRAIN_TIMEOUT_S = 3600.0  # the bound on a drain's timeout_s (admin.proto says so too)


def normalized_ip(address: str) -> str | None:
    """An IP address in one form (what Ray reports, what an operator types: `fd00::0:1` and
    `fd00::1` are one address); None if `address` is not one."""
    try:
        return str(ipaddress.ip_address(address.strip()))
    except ValueError:
        return None


def check_drain_arguments(node_ip: str, timeout_s: float) -> str:
    """The normalized address; InvalidRequest naming a malformed address or timeout (a bool
    is no timeout)."""
    if isinstance(timeout_s, bool) or not (
        isinstance(timeout_s, (int, float))
        and math.isfinite(timeout_s)
        and 0 < timeout_s <= MAX_DRAIN_TIMEOUT_S
    ):
        raise InvalidRequest(
            "timeout_s", f"{timeout_s!r} must be in (0, {MAX_DRAIN_TIMEOUT_S:g}] seconds"
        )
    address = normalized_ip(node_ip) if isinstance(node_ip, str) else None
    if address is None:
        raise InvalidRequest("node_ip", f"{node_ip!r} is not an IP address")
    return address


@dataclass(frozen=True, slots=True)
class WorkerDrainOutcome:
    """One worker of the drained node: its pool ("prefill" or "decode"), its id, and whether it
    left empty (False: the drain timeout retired it busy; a decode stream still on it resumes
    elsewhere by replay, within --max-migrations)."""

    pool: str
    worker_id: str
    left_empty: bool


@dataclass(frozen=True, slots=True)
class NodeDrainReport:
    """How draining the node at `node_ip` went. `workers`: the Tandem workers that were on it,
    each drained and retired; `replacement_ids`: the workers started on other nodes to keep
    each pool at its size, started before the drain answered; `num_replacements_failed`:
    those that did not start (their pool is smaller until the autoscaler or a later drain adds
    one); `num_replacements_pending`: those still starting when it answered (a pool that kept
    other workers does not wait for its replacements: they join it once loaded, or are killed
    if they fail, and are not reported again); `already_draining`: the
    node was drained before by this router (the call is idempotent: it drains whatever Tandem
    worker is still there, usually none); `elapsed_s`: wall time of the call."""

    node_ip: str
    workers: tuple[WorkerDrainOutcome, ...]
    replacement_ids: tuple[str, ...]
    num_replacements_failed: int
    num_replacements_pending: int
    already_draining: bool
    elapsed_s: float

    @property
    def completed(self) -> bool:
        """Every worker left empty and no replacement failed (one still starting is no
        failure: its pool kept other workers)."""
        return self.num_replacements_failed == 0 and all(w.left_empty for w in self.workers)
