"""Several "hosts" on one machine: Linux network namespaces joined by veth pairs, each with an
address of its own test network, for the multi-node tests (tests/integration/test_multinode.py)
and for running them by hand (docs/multinode.md).

    <prefix>-h (head): br0 10.213.N.1/24 ---+--- veth --- eth0 10.213.N.2   <prefix>-a
                                            +--- veth --- eth0 10.213.N.3   <prefix>-b

Nothing is added to the root namespace: the bridge and every address live inside the test's
namespaces, and each namespace's default route points at the test network (Ray picks a node's
address by its route), so traffic stays between them. Processes are started with
`ip netns exec`; cleanup kills the processes of the test's namespaces by pid (never Ray's
`ray stop`, which would stop every Ray cluster on the machine) and deletes the namespaces.
Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is missing (scripts/setup.sh --test installs it)"
    probe = f"tndprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Network:
    """A head namespace with a bridge and `num_nodes` node namespaces wired to it."""

    num_nodes: int = 2
    prefix: str = field(default_factory=lambda: f"tnd{os.getpid() % 100000}")
    subnet: str = field(default_factory=lambda: f"10.213.{os.getpid() % 250 + 1}")
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def address(self, index: int) -> str:
        """The address of namespace `index` (0: the head)."""
        return f"{self.subnet}.{index + 1}"

    def name(self, index: int) -> str:
        return f"{self.prefix}-{'h' if index == 0 else chr(ord('a') + index - 1)}"

    def create(self) -> None:
        head = self.name(0)
        for index in range(self.num_nodes + 1):
            _ip("netns", "add", self.name(index))
            self.namespaces.append(self.name(index))
            _ip("-n", self.name(index), "link", "set", "lo", "up")
        _ip("-n", head, "link", "add", "br0", "type", "bridge")
        _ip("-n", head, "addr", "add", f"{self.address(0)}/24", "dev", "br0")
        _ip("-n", head, "link", "set", "br0", "up")
        _ip("-n", head, "route", "add", "default", "dev", "br0")
        for index in range(1, self.num_nodes + 1):
            node, port = self.name(index), f"v{index}"
            _ip("-n", head, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", node)  # fmt: skip
            _ip("-n", head, "link", "set", port, "master", "br0", "up")
            _ip("-n", node, "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
            _ip("-n", node, "link", "set", "eth0", "up")
            _ip("-n", node, "route", "add", "default", "dev", "eth0")

    def start(
        self, index: int, command: Sequence[str], env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        """Run `command` in namespace `index`, output to `log`."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.name(index), *command],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        return process

    def run(self, index: int, command: Sequence[str], env: dict[str, str], timeout_s: float) -> str:
        """Run `command` in namespace `index` to completion; its stdout. Raises
        CalledProcessError (with its output) if it fails."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.name(index), *command],
            env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
        return done.stdout

    def pids(self, index: int) -> list[int]:
        """Every process in namespace `index`."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.name(index)], capture_output=True, text=True
        ).stdout
        return [int(pid) for pid in out.split()]

    def commands(self, index: int) -> list[str]:
        """The command lines (process titles) of the processes in namespace `index`."""
        lines = []
        for pid in self.pids(index):
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            lines.append(raw.replace(b"\0", b" ").decode(errors="replace").strip())
        return lines

    def kill(self, index: int) -> None:
        """SIGKILL every process of namespace `index` (a host lost): until none is left."""
        deadline = time.monotonic() + 10
        while pids := self.pids(index):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert time.monotonic() < deadline, f"processes of {self.name(index)} survive"
            time.sleep(0.05)

    def destroy(self) -> None:
        for index in range(len(self.namespaces) - 1, -1, -1):
            self.kill(index)
        for process in self.processes:
            process.wait(10)
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self.namespaces.clear()
