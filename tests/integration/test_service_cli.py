"""`tandem serve` and `tandem client` as a user runs them: separate processes, a real local Ray
cluster, gRPC on loopback; Ctrl-C stops the server cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("ray")

CLI = [sys.executable, "-m", "cluster.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health_until_serving(port: int, timeout_s: float) -> list[str]:
    """The distinct health statuses seen, polling until SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as e:
                name = e.code().name  # not listening yet
            if not seen or seen[-1] != name:
                seen.append(name)
            if name == "SERVING":
                return seen
            time.sleep(0.1)
    raise AssertionError(f"not SERVING within {timeout_s} s: {seen}")


def test_serve_then_client_then_ctrl_c() -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--port",
            str(port),
            "--mode",
            "colocated",
            "--workers",
            "1",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        statuses = health_until_serving(port, timeout_s=180)
        assert "NOT_SERVING" in statuses, f"never NOT_SERVING while loading: {statuses}"
        assert server.stdout is not None
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            lines.append(line)
            if "tandem: serving on" in line or not line:
                break
        assert f"tandem: serving on 127.0.0.1:{port}" in lines[-1], "".join(lines)
        client = subprocess.run(
            [*CLI, "client", "What is 2+2?", "--chat", "--target", f"127.0.0.1:{port}",
             "--max-tokens", "6"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        assert "tokens in" in client.stdout and len(client.stdout.strip()) > 0
        bad = subprocess.run(
            [*CLI, "client", "", "--target", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 2
        assert "INVALID_ARGUMENT: text: prompt is empty" in bad.stderr
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=60)
        assert server.returncode == 0, out
        assert "tandem: stopped" in out
    finally:
        if server.poll() is None:
            server.kill()


def test_bad_pool_sizes_are_refused_before_anything_starts() -> None:
    result = subprocess.run(
        [*CLI, "serve", "--decode-workers", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "num_decode_workers=0 must be an int >= 1" in result.stderr


def test_demo_serves_answers_and_stops() -> None:
    result = subprocess.run(
        [*CLI, "demo", "What is 2+2?", "Say hi.", "--max-tokens", "5", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("> ") == 2
    assert result.stdout.count("[TTFT ") == 2
    assert "1 prefill + 1 decode workers" in result.stdout, "disaggregated by default"
    assert "tandem: stopped" in result.stdout
