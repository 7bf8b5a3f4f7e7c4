"""cluster.workers: Ray's outcomes of a worker call become Tandem's errors (what the router's
retry and abort decisions rest on)."""

from __future__ import annotations

import pytest
import ray

from cluster.workers import translate
from contracts.errors import InvalidRequest, TandemError, WorkerLost


def test_an_unreachable_actor_is_lost_but_may_come_back() -> None:
    error = translate(ray.exceptions.ActorUnavailableError("unreachable", None))
    assert isinstance(error, WorkerLost) and error.unreachable


def test_a_dead_actor_is_lost_for_good() -> None:
    error = translate(ray.exceptions.ActorDiedError())
    assert isinstance(error, WorkerLost) and not error.unreachable


def test_a_workers_typed_error_arrives_as_itself() -> None:
    refused = InvalidRequest("max_tokens", "must be >= 1")
    assert translate(refused) is refused
    wrapped = ray.exceptions.RayTaskError("prefill", "traceback", refused)
    assert translate(wrapped) is refused


def test_anything_else_is_internal_and_lost_survives_pickling() -> None:
    error = translate(RuntimeError("boom"))
    assert type(error) is TandemError and "RuntimeError" in str(error)
    import pickle

    lost = pickle.loads(pickle.dumps(WorkerLost("gone", unreachable=True)))
    assert isinstance(lost, WorkerLost) and lost.unreachable and str(lost) == "gone"


@pytest.mark.parametrize("cause", [RuntimeError("x"), None])
def test_a_task_error_without_a_typed_cause_is_internal(cause: BaseException | None) -> None:
    error = translate(ray.exceptions.RayTaskError("prefill", "traceback", cause))
    assert type(error) is TandemError
