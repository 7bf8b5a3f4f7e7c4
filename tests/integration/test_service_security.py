"""Who may call, and over what, through the whole service: one colocated worker with the default
model on CPU behind the router on loopback (gRPC and the OpenAI-compatible HTTP edge), serving
mutual TLS with certificates the test makes, and API keys of two tenants (alpha at most one
request in flight, beta unbounded).
A plain TLS server (no client certificates) is checked without Ray: its gate answers health
checks from the start."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from tests.certs import Certificates, make_certificates
from tests.integration.test_service import RunningService, greedy_sampling, local_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ray = pytest.importorskip("ray")

KEY_ALPHA = "alpha-key-0123456789abcdef"
KEY_BETA = "beta-key-0123456789abcdef"
# Tokens enough for several 16-token blocks of prefix cache.
PROMPT = "Here is a list of fruits: apple, banana, cherry, date, elderberry, fig, grape, honeydew."


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def service(certs: Certificates) -> Iterator[RunningService]:
    from cluster.service import ServiceConfig
    from engine.config import EngineConfig
    from router.auth import parse_api_keys
    from router.tls import TlsConfig

    keys = parse_api_keys(f"alpha:{KEY_ALPHA}:1\nbeta:{KEY_BETA}\n", "test keys")
    config = ServiceConfig(
        engine=EngineConfig(device="cpu", num_kv_blocks=256, block_size=16),
        mode="colocated",
        num_workers=1,
        port=0,
        http_port=0,  # the OpenAI-compatible edge: the same keys, bounds and certificates
        api_keys=keys,
        tls=TlsConfig(str(certs.server_cert), str(certs.server_key), str(certs.client_ca)),
    )
    with local_service(config) as running:
        yield running


@pytest.fixture(autouse=True)
def clean_workers(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "service" in request.fixturenames:
        request.getfixturevalue("service").assert_workers_idle_and_intact()


def credentials(certs: Certificates, client_cert: bool = True, rogue: bool = False) -> Any:
    cert, key = (certs.rogue_cert, certs.rogue_key) if rogue else (
        certs.client_cert, certs.client_key)  # fmt: skip
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=key.read_bytes() if client_cert else None,
        certificate_chain=cert.read_bytes() if client_cert else None,
    )


@pytest.fixture(scope="module")
def stub(service: RunningService, certs: Certificates) -> Iterator[Any]:
    """A mutual-TLS client of the service (with no API key of its own)."""
    with grpc.secure_channel(f"127.0.0.1:{service.service.port}", credentials(certs)) as channel:
        yield tandem_pb2_grpc.TandemStub(channel)


def ask(stub: Any, key: str, salt: str = "", max_tokens: int = 2, text: str = PROMPT) -> Any:
    """The last response of a greedy request as tenant `key`."""
    request = pb.GenerateRequest(text=text, sampling=greedy_sampling(max_tokens), cache_salt=salt)
    return list(stub.Generate(request, timeout=120, metadata=bearer(key)))[-1]


def failures(service: RunningService, name: str, **labels: str) -> float:
    value = service.service.metrics.registry.get_sample_value(f"{name}_total", labels)
    return value or 0.0


def test_mutual_tls_with_a_key_serves(stub: Any) -> None:
    last = ask(stub, KEY_BETA, max_tokens=3)
    assert last.usage.completion_tokens == 3 and last.finish_reason == pb.FINISH_REASON_LENGTH
    models = stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=bearer(KEY_ALPHA))
    assert models.models[0].id


@pytest.mark.parametrize("client", ["plaintext", "no client certificate", "untrusted client"])
def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(
    service: RunningService, certs: Certificates, client: str
) -> None:
    target = f"127.0.0.1:{service.service.port}"
    if client == "plaintext":
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(
            target, credentials(certs, client_cert=client != "no client certificate",
                                rogue=client == "untrusted client"),
        )  # fmt: skip
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub = tandem_pb2_grpc.TandemStub(channel)
        stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer(KEY_BETA))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value


@pytest.mark.parametrize(
    "metadata, reason",
    [((), "missing"), ((("authorization", KEY_BETA),), "malformed"),
     (bearer("not-the-key-of-anyone-here"), "invalid_key")],
)  # fmt: skip
def test_a_call_without_a_valid_key_is_unauthenticated_and_counted(
    service: RunningService, stub: Any, metadata: Any, reason: str
) -> None:
    before = failures(service, "tandem_auth_failures", reason=reason)
    request = pb.GenerateRequest(text=PROMPT, sampling=greedy_sampling(2))
    for call in (
        lambda: list(stub.Generate(request, timeout=30, metadata=metadata)),
        lambda: stub.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=30, metadata=metadata),
        lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=metadata),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert KEY_BETA not in (refused.value.details() or "")
    assert failures(service, "tandem_auth_failures", reason=reason) == before + 3


def test_health_checks_need_no_key(service: RunningService, certs: Certificates) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{service.service.port}"
    with grpc.secure_channel(target, credentials(certs)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_tenants_never_share_cached_prefixes(stub: Any) -> None:
    text = "Cache test. " + PROMPT  # a prompt no other case sends

    def cached(key: str, salt: str = "") -> int:
        return int(ask(stub, key, salt, text=text).usage.cached_tokens)

    assert cached(KEY_ALPHA) == 0
    assert cached(KEY_ALPHA) > 0  # the same tenant hits
    assert cached(KEY_BETA) == 0  # another tenant: no hit
    # nor can beta name its way into alpha's scope with a salt of its own
    assert cached(KEY_BETA, salt="tenant:alpha/") == 0
    assert cached(KEY_BETA) > 0
    # a request's salt still parts a tenant's own requests
    assert cached(KEY_ALPHA, salt="other") == 0


def test_a_tenant_at_its_bound_is_refused_and_starves_no_one(
    service: RunningService, stub: Any
) -> None:
    guard = service.service.guard
    assert guard is not None
    request = pb.GenerateRequest(text=PROMPT, sampling=greedy_sampling(2000))
    long_call = stub.Generate(request, timeout=120, metadata=bearer(KEY_ALPHA))
    next(long_call)  # alpha's one request is streaming
    before = failures(service, "tandem_tenant_rejections", tenant="alpha")
    with pytest.raises(grpc.RpcError) as refused:
        ask(stub, KEY_ALPHA)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'alpha' has 1 requests in flight (its limit 1)" in refused.value.details()
    assert failures(service, "tandem_tenant_rejections", tenant="alpha") == before + 1
    assert ask(stub, KEY_BETA, max_tokens=3).usage.completion_tokens == 3  # beta goes on
    long_call.cancel()
    service.run(_until(lambda: "alpha" not in guard.in_flight))
    assert ask(stub, KEY_ALPHA).usage.completion_tokens == 2  # alpha's place is back


async def _until(condition: Any, timeout_s: float = 30) -> None:
    """Poll `condition` on the service's loop (where the guard lives) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_tandem_client_and_bench_take_the_tls_and_key_flags(
    service: RunningService, certs: Certificates, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from cluster.cli import main

    monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    connection = ["--target", f"127.0.0.1:{service.service.port}", "--tls-ca", str(certs.ca),
                  "--tls-client-cert", str(certs.client_cert),
                  "--tls-client-key", str(certs.client_key)]  # fmt: skip
    assert main(["client", "Hi", "--max-tokens", "3", *connection]) == 2
    assert "UNAUTHENTICATED: missing API key" in capsys.readouterr().err
    monkeypatch.setenv("TANDEM_API_KEY", KEY_BETA)
    assert main(["client", "Hi", "--max-tokens", "3", *connection]) == 0
    assert "[3 tokens in" in capsys.readouterr().out
    output = tmp_path / "bench.json"
    flags = ["--num-prompts", "2", "--input-len", "16", "--output-len", "3", "--num-warmup", "0",
             "--no-plot", "--output", str(output), "--api-key", KEY_BETA]  # fmt: skip
    monkeypatch.delenv("TANDEM_API_KEY")
    assert main(["bench", *connection, *flags]) == 0
    text = output.read_text()
    summary = json.loads(text)["runs"][0]["summary"]
    assert (summary["num_completed"], summary["num_failed"]) == (2, 0), summary["errors"]
    assert KEY_BETA not in text


def test_tls_without_client_certificates(certs: Certificates) -> None:
    """A TLS server with no --tls-client-ca: any client that trusts its CA connects, a
    plaintext one is refused. (The gate answers health checks before the pools load.)"""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from router.server import start_server
    from router.tls import TlsConfig

    async def check() -> None:
        tls = TlsConfig(str(certs.server_cert), str(certs.server_key))
        server, port, _, _ = await start_server("127.0.0.1", 0, tls)
        try:
            target = f"127.0.0.1:{port}"
            creds = credentials(certs, client_cert=False)
            async with grpc.aio.secure_channel(target, creds) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
            async with grpc.aio.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(check())


def https(
    service: RunningService, certs: Certificates, method: str, path: str, body: Any = None,
    key: str | None = None, client_cert: bool = True,
) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """(status, JSON body) of one call to the HTTP edge over TLS (with the client certificate
    of mutual TLS unless told otherwise) and, if given, an API key."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    if client_cert:
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    assert service.service.http_port is not None
    connection = http.client.HTTPSConnection(
        "127.0.0.1", service.service.http_port, context=context, timeout=120
    )
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        connection.request(method, path, json.dumps(body) if body else None, headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        connection.close()


def test_the_http_edge_serves_the_same_certificates_keys_and_bounds(
    service: RunningService, certs: Certificates
) -> None:
    """HTTPS with the gRPC edge's certificates (mutual TLS: a client without a certificate,
    and a plaintext one, never get an answer); a missing or wrong key is a 401 in OpenAI's
    error JSON, counted with gRPC's; a tenant at its bound gets 429 while gRPC holds its
    place: one bound per tenant across both edges."""
    body = {"model": "x", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    assert https(service, certs, "GET", "/health")[0] == 200  # no key needed
    model = https(service, certs, "GET", "/v1/models", key=KEY_BETA)[1]["data"][0]["id"]
    body["model"] = model
    status, answer = https(service, certs, "POST", "/v1/completions", body, key=KEY_BETA)
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 2
    before = failures(service, "tandem_auth_failures", reason="missing")
    status, answer = https(service, certs, "POST", "/v1/completions", body)
    assert (status, answer["error"]["type"]) == (401, "authentication_error")
    assert failures(service, "tandem_auth_failures", reason="missing") == before + 1
    wrong = https(service, certs, "POST", "/v1/completions", body, key="not-the-key-of-anyone")
    assert wrong[0] == 401
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(service, certs, "GET", "/health", client_cert=False)
    plain = http.client.HTTPConnection("127.0.0.1", service.service.http_port, timeout=30)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/health")
        plain.getresponse()
    plain.close()


def test_a_tenant_bound_holds_across_both_edges(
    service: RunningService, certs: Certificates, stub: Any
) -> None:
    guard = service.service.guard
    assert guard is not None
    request = pb.GenerateRequest(text=PROMPT, sampling=greedy_sampling(2000))
    long_call = stub.Generate(request, timeout=120, metadata=bearer(KEY_ALPHA))
    next(long_call)  # alpha's one request is streaming over gRPC
    body = {"model": "x", "prompt": PROMPT, "max_tokens": 2}  # refused before it is read
    status, answer = https(service, certs, "POST", "/v1/completions", body, key=KEY_ALPHA)
    assert status == 429, answer
    assert "tenant 'alpha' has 1 requests in flight" in answer["error"]["message"]
    long_call.cancel()
    service.run(_until(lambda: "alpha" not in guard.in_flight))
