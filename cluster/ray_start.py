"""Starting (or joining) the Ray cluster the service runs on, with retries.

Ray gives a starting node a fixed 30 s to register its raylet with the GCS and then fails
with "The current node timed out during startup" (ray/_private/node.py). On a busy machine a
cold start sometimes needs longer (1 of 4 cold starts on the review's 2-core machine). That
failure leaves nothing worth keeping, so the start is retried after a clean `ray.shutdown()`;
after the last attempt the error says what happened and what to look at. Any other failure
is not retried. Ray is imported lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

RAY_START_ATTEMPTS = 3
_STARTUP_TIMEOUT = "timed out during startup"  # Ray's message for a node start-up timeout


class RayStartError(RuntimeError):
    """Ray's node did not start, every attempt timing out."""


def init_ray(
    attempts: int = RAY_START_ATTEMPTS,
    init: Callable[..., Any] | None = None,
    shutdown: Callable[[], None] | None = None,
    **options: Any,
) -> None:
    """`ray.init(**options)`, retried (after `ray.shutdown()`) while it fails with Ray's node
    start-up timeout, at most `attempts` times. Raises RayStartError after the last; any other
    error at once. `init`/`shutdown` default to Ray's own."""
    if attempts < 1:
        raise ValueError(f"attempts={attempts!r} must be >= 1")
    if init is None or shutdown is None:
        import ray

        init, shutdown = init or ray.init, shutdown or ray.shutdown
    for attempt in range(1, attempts + 1):
        try:
            init(**options)
            return
        except Exception as e:
            if _STARTUP_TIMEOUT not in str(e):
                raise
            shutdown()  # whatever part of the node started
            if attempt == attempts:
                raise RayStartError(
                    f"Ray's node did not start in {attempts} attempts: its raylet did not "
                    f"register with the GCS within Ray's 30 s start-up wait ({e}). The machine "
                    "is likely overloaded (CPU, memory or /tmp/ray disk space); see the raylet "
                    "and GCS logs under /tmp/ray/session_latest/logs"
                ) from e
            logger.warning("Ray's node timed out during start-up (attempt %d of %d); retrying",
                           attempt, attempts)  # fmt: skip
