"""cluster.ray_start: Ray's node start-up timeout is retried, then explained (issue 16.7).

`init`/`shutdown` stand in for ray.init/ray.shutdown (what is tested is the retry policy, not
Ray); the real start is every integration test's fixture."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.ray_start import RayStartError, init_ray

RAY_TIMEOUT = Exception(
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)


class FlakyRay:
    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls: list[str] = []

    def init(self, **options: Any) -> None:
        self.calls.append("init")
        assert options == {"num_cpus": 4}
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def test_a_start_up_timeout_is_retried_after_a_clean_shutdown() -> None:
    ray = FlakyRay([RAY_TIMEOUT, RAY_TIMEOUT])
    init_ray(init=ray.init, shutdown=ray.shutdown, num_cpus=4)
    assert ray.calls == ["init", "shutdown", "init", "shutdown", "init"]


def test_after_the_last_attempt_the_error_explains() -> None:
    ray = FlakyRay([RAY_TIMEOUT] * 3)
    with pytest.raises(RayStartError, match="did not start in 3 attempts") as raised:
        init_ray(init=ray.init, shutdown=ray.shutdown, num_cpus=4)
    assert "overloaded" in str(raised.value) and "/tmp/ray/session_latest/logs" in str(raised.value)
    assert ray.calls.count("init") == 3


def test_other_failures_are_not_retried() -> None:
    ray = FlakyRay([ConnectionError("no cluster at that address")])
    with pytest.raises(ConnectionError):
        init_ray(init=ray.init, shutdown=ray.shutdown, num_cpus=4)
    assert ray.calls == ["init"]
