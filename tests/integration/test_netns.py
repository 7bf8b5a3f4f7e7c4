"""The namespace harness of the multi-node test (tests/integration/netns.py) cleans up after
itself: every namespace deleted, every process killed and every scratch directory removed,
even when a step of the cleanup fails; names never collide with existing namespaces."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.netns import Network, _existing_namespaces, unavailable_reason

pytestmark = [pytest.mark.integration]


@pytest.fixture(autouse=True)
def needs_namespaces() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def test_names_are_random_and_free() -> None:
    first, second = Network(num_nodes=1), Network(num_nodes=1)
    assert first.prefix != second.prefix
    existing = _existing_namespaces()
    assert not {first.name(i) for i in range(2)} & existing


def test_cleanup_runs_every_step_even_when_one_fails(tmp_path: Path) -> None:
    net = Network(num_nodes=2)
    scratch = tmp_path / "ray-temp"
    scratch.mkdir()
    net.scratch.append(scratch)
    try:
        net.create()
        names = [net.name(i) for i in range(3)]
        assert set(names) <= _existing_namespaces()
        sleeper = net.start(1, ["sleep", "600"], {"PATH": "/usr/bin:/bin"}, tmp_path / "log")
        kill = net._kill

        def failing_kill(namespace: str) -> None:
            if namespace == names[2]:
                raise RuntimeError("injected: cannot kill")
            kill(namespace)

        net._kill = failing_kill  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match=f"kill {names[2]}: injected: cannot kill"):
            net.destroy()
        assert sleeper.poll() is not None  # the other namespaces' processes died anyway
        assert not set(names) & _existing_namespaces()
        assert not scratch.exists()
        net.destroy()  # idempotent: nothing left to do
    finally:
        for index in range(3):
            subprocess.run(["ip", "netns", "del", net.name(index)], capture_output=True)
