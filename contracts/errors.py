"""The exception hierarchy shared by every Tandem component.

"Broken" is an exception from this module; "can't now" (no free blocks, queue full) is a return
value and never raised. Torch-free: the router imports it. Mapping to gRPC status codes happens
in exactly one place (the router), not here.
"""

from __future__ import annotations

from typing import Any


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""


class InvalidRequest(TandemError):
    """A request field is invalid. `field` names it, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses process boundaries (Ray)
        return (InvalidRequest, (self.field, self.reason))


class ModelNotFound(InvalidRequest):
    """The request names a model this deployment does not serve (gRPC NOT_FOUND)."""

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__("model", f"model {model!r} is not served here; served: {served}")
        self.model, self.served = model, served

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:  # type: ignore[override]
        return (ModelNotFound, (self.model, self.served))


class DuplicateRequest(TandemError):
    """A request reuses the id of one still in flight (gRPC ALREADY_EXISTS)."""


class ModelLoadError(TandemError):
    """A model could not be loaded: missing file, unreadable weights, inconsistent config."""


class UnsupportedModel(ModelLoadError):
    """The model is readable but uses an architecture, dtype or tokenizer Tandem does not run."""


class Overloaded(TandemError):
    """Admission refused: bounded queues are full."""


class RequestAborted(TandemError):
    """The request was cancelled by its client, its deadline, or shutdown."""


class WorkerUnavailable(TandemError):
    """A worker died or cannot be reached."""


class WorkerLost(WorkerUnavailable):
    """A call failed because its worker died (`unreachable` False) or cannot be reached now
    (`unreachable` True: it may come back and run on, so what it holds must be aborted)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable

    def __reduce__(self) -> tuple[type, tuple[str, bool]]:  # type: ignore[override]
        return (WorkerLost, (str(self), self.unreachable))


class WorkerDraining(WorkerLost):
    """A stream is moved off its decode worker because that worker is leaving the pool (a
    drain: scaling down, an operator): the router cut it at a token boundary and resumes it on
    another worker by replay (router.failover). The worker is alive, so the attempt is aborted
    there (`unreachable` True), and the move does not count against --max-migrations."""

    def __init__(self, message: str) -> None:
        super().__init__(message, unreachable=True)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # type: ignore[override]
        return (WorkerDraining, (str(self),))


class WorkerMoved(WorkerDraining):
    """A stream's KV left its draining decode worker over the KV-transfer layer (issue 22.3):
    the worker ended the stream with this after its last output; the router continues it on
    the worker `moved` names (contracts.handoff.MovedKV) instead of replaying it. The request
    is no longer on this worker: nothing to abort here."""

    def __init__(self, message: str, moved: Any) -> None:
        super().__init__(message)
        self.unreachable = False
        self.moved = moved  # contracts.handoff.MovedKV

    def __reduce__(self) -> tuple[type, tuple[str, Any]]:  # type: ignore[override]
        return (WorkerMoved, (str(self), self.moved))


class AddressInUse(TandemError):
    """A port Tandem was asked to listen on is taken by another process."""


class UnknownNode(TandemError):
    """An operator named a node that is not a live node of the cluster (gRPC NOT_FOUND)."""


class NodeNotDrainable(TandemError):
    """A node cannot be drained: the router's own node, or Ray refused to mark it draining
    (gRPC FAILED_PRECONDITION; the message says which)."""


class AmbiguousNode(NodeNotDrainable):
    """Several live Ray nodes share the address an operator named (raylets on one host): a
    drain by address is refused, naming their ids (gRPC FAILED_PRECONDITION)."""


class NodeDrainTimedOut(TandemError):
    """A node drain did not end within its timeout and the margin, or the look-up of its node
    within its bound (a Ray call hung): given up, the workers it had marked retired at once
    (gRPC DEADLINE_EXCEEDED; the message says which)."""


class AdminDisabled(TandemError):
    """The Admin service has no admin keys configured: every call is refused (gRPC
    PERMISSION_DENIED; the message says how to configure them)."""


class AdminScopeDenied(TandemError):
    """An admin key scoped to its caller's own node (router.admin: a name `self` or `self-*`)
    asked to drain another node (gRPC PERMISSION_DENIED)."""


class KVTransferError(TandemError):
    """Moving KV blocks between processes failed."""


class TensorParallelShapeError(UnsupportedModel):
    """The model's heads, KV heads or MLP width do not divide across the tensor-parallel ranks
    asked for (the message names the sizes)."""


class RankFailed(WorkerUnavailable):
    """A tensor-parallel rank of this engine died, failed, or missed a collective's timeout;
    the engine is unusable (the worker goes down as a unit)."""
