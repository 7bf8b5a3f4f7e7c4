"""A real redis-server for tests: on a free loopback port, in a temp dir, no persistence.

scripts/setup.sh --test installs the binary; without it, tests that need Redis fail with a
message that says so (they are not skipped: CI must run them).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: run scripts/setup.sh --test "
            "(or apt-get install redis-server / brew install redis)",
            pytrace=False,
        )
    return binary


class RedisServer:
    """One redis-server process; `stop` and `start` again keep the port (its data is lost)."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.binary = redis_server_binary()
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.process is None, "redis-server already running"
        config = self.directory / "redis.conf"
        config.write_text(self._config())
        self.process = subprocess.Popen(
            [self.binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while not self._answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill the server at once (SIGKILL: no goodbye to its clients)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, password=self.password, socket_timeout=5)

    def _answers_ping(self) -> bool:
        import redis

        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _config(self) -> str:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            f"dir {self.directory}",
            f"logfile {self.directory / 'redis.log'}",
        ]
        if self._version() >= (7, 0):
            lines.append("enable-debug-command yes")  # DEBUG SLEEP in slow-Redis tests
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n"

    def _version(self) -> tuple[int, int]:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"v=(\d+)\.(\d+)", out)
        return (int(match.group(1)), int(match.group(2))) if match else (0, 0)
