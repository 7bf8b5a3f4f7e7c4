"""Several "hosts" on one machine: Linux network namespaces joined by veth pairs, each with an
address of its own test network, for the multi-node tests (tests/integration/test_multinode.py)
and for running them by hand (docs/multinode.md).

    <prefix>-h (head): br0 10.213.N.1/24 ---+--- veth --- eth0 10.213.N.2   <prefix>-a
                                            +--- veth --- eth0 10.213.N.3   <prefix>-b

Nothing is added to the root namespace: the bridge and every address live inside the test's
namespaces, and each namespace's default route points at the test network (Ray picks a node's
address by its route), so traffic stays between them. Namespace names carry a random suffix,
checked against `ip netns list`, so runs side by side (or a leftover of a killed run) never
collide. Processes are started with `ip netns exec`; cleanup (`destroy`, also registered with
atexit) kills the processes of the test's namespaces by pid (never Ray's `ray stop`, which
would stop every Ray cluster on the machine), deletes every namespace and the scratch
directories, each step tried whatever the others did, and reports what failed. Needs root and
iproute2.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
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


def _existing_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _free_prefix(num_namespaces: int) -> str:
    """A random prefix none of whose namespace names exists yet."""
    existing = _existing_namespaces()
    for _ in range(100):
        prefix = f"tnd{secrets.token_hex(3)}"
        if not any(name.startswith(f"{prefix}-") for name in existing):
            return prefix
    raise RuntimeError(f"no free namespace prefix among {len(existing)} namespaces")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Network:
    """A head namespace with a bridge and `num_nodes` node namespaces wired to it."""

    num_nodes: int = 2
    prefix: str = ""  # "": a random one no existing namespace uses
    subnet: str = field(default_factory=lambda: f"10.213.{secrets.randbelow(250) + 1}")
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)  # directories removed by destroy

    def __post_init__(self) -> None:
        if not self.prefix:
            self.prefix = _free_prefix(self.num_nodes + 1)

    def address(self, index: int) -> str:
        """The address of namespace `index` (0: the head)."""
        return f"{self.subnet}.{index + 1}"

    def name(self, index: int) -> str:
        return f"{self.prefix}-{'h' if index == 0 else chr(ord('a') + index - 1)}"

    def create(self) -> None:
        """Make the namespaces and the links; on failure, `destroy` undoes what was made."""
        atexit.register(self._destroy_at_exit)  # also if the process ends without its finally
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
        return self._pids(self.name(index))

    def commands(self, index: int) -> list[str]:
        """The command lines (process titles) of the processes in namespace `index`."""
        return [line for _, line in self.processes_of(index)]

    def processes_of(self, index: int) -> list[tuple[int, str]]:
        """(pid, command line or process title) of the processes in namespace `index`."""
        found = []
        for pid in self.pids(index):
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            found.append((pid, raw.replace(b"\0", b" ").decode(errors="replace").strip()))
        return found

    def kill(self, index: int) -> None:
        """SIGKILL every process of namespace `index` (a host lost): until none is left."""
        self._kill(self.name(index))

    def destroy(self) -> None:
        """Kill every process of every namespace made, wait for the processes started, delete
        every namespace and scratch directory: each step runs whatever failed before it.
        Idempotent. Raises RuntimeError listing what failed, once all was tried."""
        errors: list[str] = []
        namespaces, self.namespaces = list(self.namespaces), []
        for namespace in reversed(namespaces):
            try:
                self._kill(namespace)
            except Exception as e:  # collected, reported at the end
                errors.append(f"kill {namespace}: {e}")
        processes, self.processes = list(self.processes), []
        for process in processes:
            try:
                process.wait(10)
            except Exception as e:
                errors.append(f"wait for {process.args!r}: {e}")
                with contextlib.suppress(OSError):
                    process.kill()
        for namespace in namespaces:
            done = subprocess.run(["ip", "netns", "del", namespace], capture_output=True, text=True)
            if done.returncode != 0 and namespace in _existing_namespaces():
                errors.append(f"ip netns del {namespace}: {done.stderr.strip()}")
        scratch, self.scratch = list(self.scratch), []
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                errors.append(f"rmtree {path}: still there")
        if errors:
            raise RuntimeError("network namespace cleanup: " + "; ".join(errors))

    def _destroy_at_exit(self) -> None:
        try:
            self.destroy()
        except RuntimeError as e:
            print(e, file=sys.stderr)

    def _kill(self, namespace: str) -> None:
        deadline = time.monotonic() + 10
        while pids := self._pids(namespace):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} of {namespace} survive SIGKILL")
            time.sleep(0.05)

    def _pids(self, namespace: str) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", namespace], capture_output=True, text=True
        ).stdout
        return [int(pid) for pid in out.split()]
