"""What an operator's node drain did (cluster.node_drain, answered by router.admin's DrainNode):
one typed report, built by the control plane and turned into protobuf at the router's edge.
Torch-free, standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    each pool at its size; `num_replacements_failed`: those that did not start in time (their
    pool is smaller until the autoscaler or a later drain adds one); `already_draining`: the
    node was drained before by this router (the call is idempotent: it drains whatever Tandem
    worker is still there, usually none); `elapsed_s`: wall time of the call."""

    node_ip: str
    workers: tuple[WorkerDrainOutcome, ...]
    replacement_ids: tuple[str, ...]
    num_replacements_failed: int
    already_draining: bool
    elapsed_s: float

    @property
    def completed(self) -> bool:
        """Every worker left empty and every replacement started."""
        return self.num_replacements_failed == 0 and all(w.left_empty for w in self.workers)
