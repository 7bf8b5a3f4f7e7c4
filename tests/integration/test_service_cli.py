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


def start_serve(port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--mode", "colocated", "--workers", "1",
         "--device", "cpu", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip


def wait_for_line(server: subprocess.Popen[str], text: str, timeout_s: float) -> list[str]:
    """The server's output lines up to the first that contains `text`."""
    assert server.stdout is not None
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        lines.append(line)
        if text in line or not line:
            break
    assert text in lines[-1], "".join(lines)
    return lines


def test_serve_then_client_then_ctrl_c() -> None:
    port = free_port()
    server = start_serve(port)
    try:
        statuses = health_until_serving(port, timeout_s=180)
        assert "NOT_SERVING" in statuses, f"never NOT_SERVING while loading: {statuses}"
        lines = wait_for_line(server, "tandem: serving on", timeout_s=180)
        assert lines == [f"tandem: serving on 127.0.0.1:{port}\n"], (
            "a clean start prints Tandem's own lines only (no Ray or gRPC banners): "
            + "".join(lines)
        )
        client = subprocess.run(
            [*CLI, "client", "What is the capital of France?", "--target", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        # the instruct model's chat template by default: raw text made it answer nothing
        assert client.stdout.startswith("The capital of France is Paris.\n["), client.stdout
        assert "cut short" not in client.stdout
        short = subprocess.run(
            [*CLI, "client", "What is the capital of France?", "--target", f"127.0.0.1:{port}",
             "--max-tokens", "3"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert short.returncode == 0, short.stderr
        assert "[3 tokens in" in short.stdout and "cut short: reached --max-tokens" in short.stdout
        bad = subprocess.run(
            [*CLI, "client", "", "--raw", "--target", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 2
        assert bad.stderr == "tandem: INVALID_ARGUMENT: text: prompt is empty\n"
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=60)
        assert server.returncode == 0, out
        assert "tandem: stopped" in out
    finally:
        if server.poll() is None:
            server.kill()


def test_a_port_in_use_is_refused_with_a_clear_error() -> None:
    """gRPC's default SO_REUSEPORT let a second server share a busy port and its traffic."""
    port = free_port()
    server = start_serve(port)
    try:
        wait_for_line(server, "tandem: serving on", timeout_s=180)
        second = subprocess.run(
            [*CLI, "serve", "--port", str(port), "--device", "cpu"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_ADDRESS": ""},
        )  # fmt: skip
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr == (
            f"tandem: error: 127.0.0.1:{port} is already in use by another process (another "
            "`tandem serve`?); choose another --port (0: any free one)\n"
        )
        assert "serving on" not in second.stdout
        with socket.socket() as taken:  # the metrics port too
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            metrics_port = taken.getsockname()[1]
            third = subprocess.run(
                [*CLI, "serve", "--port", "0", "--metrics-port", str(metrics_port),
                 "--device", "cpu"],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "RAY_ADDRESS": ""},
            )  # fmt: skip
        assert third.returncode == 2, third.stdout + third.stderr
        assert f"--metrics-port {metrics_port}: 127.0.0.1:{metrics_port} is already in use" in (
            third.stderr
        )
        assert health_until_serving(port, timeout_s=10) == ["SERVING"], "the first still serves"
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)


def test_sigterm_drains_then_stops() -> None:
    """Kubernetes stops pods with SIGTERM: health goes NOT_SERVING, new requests are refused,
    a request in flight finishes, one that cannot within the grace period is cut with
    UNAVAILABLE naming it, and the server exits 0."""
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc

    port = free_port()
    server = start_serve(port, "--shutdown-grace", "6")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_for_line(server, "tandem: serving on", timeout_s=180)
        stub = tandem_pb2_grpc.TandemStub(channel)
        results: dict[str, list[object]] = {"short": [], "long": []}
        started = {name: threading.Event() for name in results}

        def stream(name: str, max_tokens: int) -> None:
            request = pb.GenerateRequest(
                text="Once upon a time",
                sampling=pb.SamplingParameters(max_tokens=max_tokens, ignore_eos=True),
            )
            try:
                for response in stub.Generate(request, timeout=120):
                    started[name].set()
                    results[name].append(response)
            except grpc.RpcError as e:
                results[name].append(e)
            started[name].set()

        long = threading.Thread(target=stream, args=("long", 4000))
        long.start()
        assert started["long"].wait(60)
        short = threading.Thread(target=stream, args=("short", 12))
        short.start()
        assert started["short"].wait(60)
        server.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 5
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(text="Hi"), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (refused.value.details() or "")
        short.join(30)
        long.join(60)
        assert not short.is_alive() and not long.is_alive()
        last_short = results["short"][-1]
        assert isinstance(last_short, pb.GenerateResponse), last_short
        assert last_short.finish_reason == pb.FINISH_REASON_LENGTH, "finished within the grace"
        cut = results["long"][-1]
        assert isinstance(cut, grpc.RpcError), "a 4,000-token answer cannot finish in 6 s"
        assert cut.code() == grpc.StatusCode.UNAVAILABLE
        assert "6 s shutdown grace period" in (cut.details() or "")
        out, _ = server.communicate(timeout=60)
        assert server.returncode == 0, out
        assert "tandem: SIGTERM: stopping" in out and "tandem: stopped" in out
        assert "Traceback" not in out
    finally:
        channel.close()
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
    assert "tiny demo model" in result.stdout and "--model" in result.stdout
    # five tokens cannot end either answer: each says it was cut
    assert result.stdout.count("cut short at --max-tokens 5]") == 2, result.stdout
    assert "tandem: stopped" in result.stdout
    assert result.stderr == "", "a clean start prints Tandem's own lines only"
