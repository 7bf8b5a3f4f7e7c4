"""API keys, tenants and their bounds (router.auth), TLS settings (router.tls) and the client
flags (bench.serving.cli): parsing, every refusal named, and keys never in a message."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from bench.serving.benchmark import REDACTED, _config, redacted_argv
from bench.serving.connection import ClientTls
from cluster.cli import build_parser, security_config
from contracts.errors import Overloaded
from router.auth import (
    ENV_API_KEYS,
    Guard,
    Tenant,
    TenantOverloaded,
    Unauthenticated,
    current_tenant,
    load_api_keys,
    parse_api_keys,
    tenant_cache_salt,
)
from router.tls import TlsConfig

KEY_A = "a-secret-key-0123456789"
KEY_A2 = "a-rotated-key-0123456789"
KEY_B = "b-secret-key-0123456789"
KEYS_TEXT = f"""
# tenants of the test
alpha:{KEY_A}:2
alpha:{KEY_A2}
beta:{KEY_B}   # unbounded
"""


def guard(text: str = KEYS_TEXT, default: int | None = None) -> tuple[Guard, list[str]]:
    failures: list[str] = []
    keys = parse_api_keys(text, "keys.txt", default)
    return Guard(keys, on_failure=failures.append), failures


def test_each_key_names_its_tenant_and_its_bound() -> None:
    g, failures = guard()
    assert g.authenticate(f"Bearer {KEY_A}") == Tenant("alpha", 2)
    assert g.authenticate(f"bearer  {KEY_A2} ") == Tenant("alpha", 2)  # one bound per tenant
    assert g.authenticate(f"Bearer {KEY_B}") == Tenant("beta", None)
    assert failures == []


def test_the_default_bound_applies_where_a_tenant_sets_none() -> None:
    g, _ = guard(default=5)
    assert g.authenticate(f"Bearer {KEY_B}").max_inflight == 5
    assert g.authenticate(f"Bearer {KEY_A}").max_inflight == 2


@pytest.mark.parametrize(
    "authorization, reason",
    [
        (None, "missing"),
        ("", "missing"),
        (KEY_A, "malformed"),  # no scheme
        (f"Basic {KEY_A}", "malformed"),
        ("Bearer ", "malformed"),
        ("Bearer not-a-known-key-at-all", "invalid_key"),
        (f"Bearer {KEY_A}x", "invalid_key"),
    ],
)
def test_a_call_without_a_valid_key_is_refused_and_counted(
    authorization: str | None, reason: str
) -> None:
    g, failures = guard()
    with pytest.raises(Unauthenticated) as refused:
        g.authenticate(authorization)
    assert refused.value.reason == reason and refused.value.http_status == 401
    assert failures == [reason]
    assert KEY_A not in str(refused.value)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "no keys"),
        ("# only a comment\n", "no keys"),
        ("alpha\n", "line 1: expected tenant:key"),
        (f"alpha:{KEY_A}:2:3\n", "line 1: expected tenant:key"),
        (f"\nbad name:{KEY_A}\n", "line 2: tenant name 'bad name'"),
        ("alpha:short\n", "line 1: the key of tenant 'alpha' must be at least 16"),
        (f"alpha:{KEY_A}:many\n", "line 1: max_inflight 'many' is not an integer"),
        (f"alpha:{KEY_A}:0\n", "line 1: max_inflight 0 must be >= 1"),
        (f"alpha:{KEY_A}\nbeta:{KEY_A}\n", "line 2: this key is given twice"),
        (f"alpha:{KEY_A}:1\nalpha:{KEY_B}:2\n", "line 2: tenant 'alpha' has two different"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_line_never_the_key(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_api_keys(text, "keys.txt")
    assert problem in str(refused.value) and "keys.txt" in str(refused.value)
    assert KEY_A not in str(refused.value) and KEY_B not in str(refused.value)


def test_keys_come_from_the_file_else_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alpha:{KEY_A}\n")
    environ = {ENV_API_KEYS: f"beta:{KEY_B}, gamma:{KEY_A2}:3"}
    from_file = load_api_keys(str(path), environ)
    assert from_file is not None and [t.name for t in from_file.tenants] == ["alpha"]
    from_env = load_api_keys(None, environ)
    assert from_env is not None
    assert from_env.tenants == [Tenant("beta"), Tenant("gamma", 3)]
    assert load_api_keys(None, {}) is None  # off by default
    with pytest.raises(ValueError, match="needs API keys"):
        load_api_keys(None, {}, default_max_inflight=4)
    with pytest.raises(ValueError, match="cannot read it"):
        load_api_keys(str(tmp_path / "absent"), {})


def test_keys_are_neither_in_the_repr_nor_kept_in_clear() -> None:
    keys = parse_api_keys(KEYS_TEXT, "keys.txt")
    assert KEY_A not in repr(keys) and KEY_A.encode() not in b"".join(keys.tenants_by_digest)


def test_a_tenant_at_its_bound_is_refused_until_a_place_frees() -> None:
    refused: list[str] = []
    g = Guard(parse_api_keys(KEYS_TEXT, "keys.txt"), on_refused=refused.append)
    alpha, beta = Tenant("alpha", 2), Tenant("beta")
    with g.hold(alpha), g.hold(alpha):
        with pytest.raises(TenantOverloaded) as full:
            g.acquire(alpha)
        assert isinstance(full.value, Overloaded) and full.value.http_status == 429
        assert "tenant 'alpha' has 2 requests in flight (its limit 2)" in str(full.value)
        # another tenant is not held back by alpha's bound
        places = [g.acquire(beta) for _ in range(10)]
        assert g.in_flight == {"alpha": 2, "beta": 10}
    assert refused == ["alpha"]
    for place in places:
        place.release()
        place.release()  # idempotent: an edge may release where its stream and response end
    assert g.in_flight == {}
    with g.hold(alpha):
        assert g.in_flight == {"alpha": 1}


def test_a_tenant_gets_its_own_cache_salt_scope() -> None:
    alpha, beta = Tenant("alpha"), Tenant("beta")
    assert alpha.cache_salt(None) == alpha.cache_salt("") != beta.cache_salt(None)
    assert alpha.cache_salt("x") != beta.cache_salt("x")
    # a request cannot name its way into another tenant's scope
    assert beta.cache_salt(alpha.cache_salt(None)) != alpha.cache_salt(None)
    assert tenant_cache_salt("x") == "x"  # auth off: the request's own salt
    token = current_tenant.set(alpha)
    try:
        assert tenant_cache_salt("x") == alpha.cache_salt("x")
    finally:
        current_tenant.reset(token)


@pytest.mark.parametrize("name", ["", "a b", "a:b", "a/b", "-a", "x" * 65])
def test_a_bad_tenant_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="tenant name"):
        Tenant(name)


def test_tls_config_checks_its_files_come_in_pairs() -> None:
    assert not TlsConfig().is_enabled and TlsConfig().uvicorn_kwargs() == {}
    with pytest.raises(ValueError, match="give both"):
        TlsConfig(cert_file="c.pem")
    with pytest.raises(ValueError, match="needs the server's own"):
        TlsConfig(client_ca_file="ca.pem")
    with pytest.raises(ValueError, match="give both"):
        ClientTls(cert_file="c.pem")
    with pytest.raises(ValueError, match=r"key_file='/absent/k.pem': cannot read it"):
        TlsConfig("/absent/c.pem", "/absent/k.pem").grpc_credentials()


def test_tls_config_gives_uvicorn_the_same_files() -> None:
    mutual = TlsConfig("c.pem", "k.pem", "ca.pem")
    assert mutual.uvicorn_kwargs() == {
        "ssl_certfile": "c.pem", "ssl_keyfile": "k.pem", "ssl_ca_certs": "ca.pem",
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
    }  # fmt: skip
    assert TlsConfig("c.pem", "k.pem").uvicorn_kwargs()["ssl_cert_reqs"] == ssl.CERT_NONE


def test_serve_flags_build_the_security_config(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alpha:{KEY_A}\n")
    args = build_parser().parse_args(
        ["serve", "--api-keys-file", str(path), "--tenant-max-inflight", "3",
         "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"]
    )  # fmt: skip
    keys, tls = security_config(args)
    assert keys.tenants == [Tenant("alpha", 3)]
    assert tls == TlsConfig("c.pem", "k.pem", "ca.pem")


def test_serve_takes_the_keys_out_of_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read once; Ray's processes, started later from `tandem serve`, never inherit them."""
    import os

    monkeypatch.setenv(ENV_API_KEYS, f"beta:{KEY_B}")
    keys, _ = security_config(build_parser().parse_args(["serve"]))
    assert keys.tenants == [Tenant("beta")] and ENV_API_KEYS not in os.environ


def test_bench_results_never_hold_the_api_key() -> None:
    argv = ["tandem", "bench", "--api-key", KEY_A, f"--api-key={KEY_B}", "--target", "h:1"]
    assert KEY_A not in str(redacted_argv(argv)) and KEY_B not in str(redacted_argv(argv))
    assert redacted_argv(argv)[-2:] == ["--target", "h:1"]
    args = build_parser().parse_args(["bench", "--api-key", KEY_A])
    assert _config(args)["api_key"] == REDACTED
