"""The router's Admin service (router.admin) and `tandem drain-node` (cluster.node_cli): admin
keys (their own format rules, never tenant keys), the refusals (none configured: PERMISSION_
DENIED; missing, malformed, wrong or a tenant's key: UNAUTHENTICATED), the control plane's typed
errors as status codes, and the CLI's exit status. A real grpc.aio server on loopback serves the
real AdminServicer; only the control plane behind it (the node drainer) is a stand-in here, the
real one is tested through the service (tests/integration/test_service.py,
tests/integration/test_multinode.py)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from cluster.cli import main
from contracts.drain import NodeDrainReport, WorkerDrainOutcome
from contracts.errors import (
    AmbiguousNode,
    NodeDrainTimedOut,
    NodeNotDrainable,
    UnknownNode,
    WorkerUnavailable,
)
from proto.tandem.v1 import admin_pb2 as pb
from proto.tandem.v1 import admin_pb2_grpc
from router.admin import (
    ENV_ADMIN_KEYS,
    INTERNAL_ERROR,
    NOT_CONFIGURED,
    AdminServicer,
    add_admin_service,
    load_admin_keys,
    parse_admin_keys,
    peer_ip,
)

ADMIN_KEY = "admin-key-0123456789abcdef"
TENANT_KEY = "tenant-key-0123456789abcdef"
NODE_IP = "10.1.2.3"


def report(left_empty: bool = True, num_failed: int = 0) -> NodeDrainReport:
    return NodeDrainReport(
        node_ip=NODE_IP,
        workers=(
            WorkerDrainOutcome("decode", "decode-1", left_empty),
            WorkerDrainOutcome("prefill", "prefill-0", True),
        ),
        replacement_ids=("decode-2", "prefill-1"),
        num_replacements_failed=num_failed,
        num_replacements_pending=0,
        already_draining=False,
        elapsed_s=1.5,
    )


class Drainer:
    """The control plane's side (Service.drain_node) as the servicer sees it: records each
    call, answers with `outcome` (a report, or an exception to raise)."""

    def __init__(self, outcome: NodeDrainReport | Exception) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, node_ip: str, timeout_s: float) -> NodeDrainReport:
        self.calls.append((node_ip, timeout_s))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class _Loop:
    """One event loop in a thread for every server of this module (grpc.aio binds itself to
    the first loop it runs on)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)


_LOOP: _Loop | None = None


@contextmanager
def admin_server(
    keys_text: str | None, drainer: Drainer, refusals: list[str] | None = None
) -> Iterator[str]:
    """A grpc.aio server with the Admin service on a loopback port; yields its address.
    Refused calls' reasons are appended to `refusals`."""
    global _LOOP
    _LOOP = _LOOP or _Loop()
    keys = None if keys_text is None else parse_admin_keys(keys_text, "test")

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server()
        on_refused = None if refusals is None else refusals.append
        add_admin_service(AdminServicer(keys, drainer, on_refused), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = _LOOP.run(start())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _LOOP.run(server.stop(0))


def drain_call(target: str, key: str | None, node_ip: str = NODE_IP, timeout_s: float = 60) -> Any:
    metadata = () if key is None else (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(target) as channel:
        return admin_pb2_grpc.AdminStub(channel).DrainNode(
            pb.DrainNodeRequest(node_ip=node_ip, timeout_s=timeout_s), timeout=30,
            metadata=metadata,
        )  # fmt: skip


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def test_admin_keys_take_name_key_lines_and_refuse_a_bound() -> None:
    keys = parse_admin_keys(f"ops:{ADMIN_KEY}\n# comment\n", "file")
    assert [t.name for t in keys.tenants] == ["ops"]
    assert keys.find(ADMIN_KEY) is not None and keys.find(TENANT_KEY) is None
    with pytest.raises(ValueError, match="max_inflight bound; admin keys take 'name:key'"):
        parse_admin_keys(f"ops:{ADMIN_KEY}:3", "file")
    with pytest.raises(ValueError, match="file line 1: the key of tenant 'ops' must be at least"):
        parse_admin_keys("ops:short", "file")


def test_admin_keys_come_from_the_file_else_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "admin-keys"
    path.write_text(f"ops:{ADMIN_KEY}\n")
    assert load_admin_keys(str(path), {}) is not None
    assert load_admin_keys(None, {ENV_ADMIN_KEYS: f"ops:{ADMIN_KEY}"}) is not None
    assert load_admin_keys(None, {}) is None
    with pytest.raises(ValueError, match=r"admin_keys_file=.*cannot read it"):
        load_admin_keys(str(tmp_path / "absent"), {})


def test_without_admin_keys_every_call_is_refused_saying_how_to_configure_them() -> None:
    drainer = Drainer(report())
    with admin_server(None, drainer) as target:
        error = refused(lambda: drain_call(target, ADMIN_KEY))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == NOT_CONFIGURED and "--admin-keys-file" in error.details()
    assert drainer.calls == []


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (None, "missing API key"),
        ("not-the-admin-key-0123456789", "invalid admin key"),
        (TENANT_KEY, "invalid admin key"),  # a tenant's API key opens nothing here
    ],
)
def test_a_call_without_a_valid_admin_key_is_unauthenticated(key: str | None, problem: str) -> None:
    drainer = Drainer(report())
    with admin_server(f"ops:{ADMIN_KEY}", drainer) as target:
        error = refused(lambda: drain_call(target, key))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert problem in (error.details() or "")
    assert drainer.calls == []


def test_a_valid_admin_key_drains_and_gets_the_report() -> None:
    drainer = Drainer(report(left_empty=False))
    with admin_server(f"ops:{ADMIN_KEY}", drainer) as target:
        reply = drain_call(target, ADMIN_KEY, timeout_s=42)
    assert drainer.calls == [(NODE_IP, 42)]
    assert reply.node_ip == NODE_IP and not reply.completed  # decode-1 retired busy
    assert [(w.pool, w.worker_id, w.left_empty) for w in reply.workers] == [
        ("decode", "decode-1", False), ("prefill", "prefill-0", True)
    ]  # fmt: skip
    assert list(reply.replacement_worker_ids) == ["decode-2", "prefill-1"]


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (UnknownNode("no live node of the Ray cluster has the address 10.1.2.3"), "NOT_FOUND"),
        (NodeNotDrainable("node 10.1.2.3 runs this router"), "FAILED_PRECONDITION"),
        (WorkerUnavailable("starting: the worker pools are not ready"), "UNAVAILABLE"),
        (AmbiguousNode("2 live nodes of the Ray cluster have the address"), "FAILED_PRECONDITION"),
        (NodeDrainTimedOut("the drain of node 10.1.2.3 did not end"), "DEADLINE_EXCEEDED"),
    ],
)
def test_the_control_planes_typed_errors_become_status_codes(outcome: Exception, code: str) -> None:
    with admin_server(f"ops:{ADMIN_KEY}", Drainer(outcome)) as target:
        error = refused(lambda: drain_call(target, ADMIN_KEY))
    assert error.code() == grpc.StatusCode[code]
    assert error.details() == str(outcome)


@pytest.mark.parametrize(
    "outcome",
    [
        RuntimeError("ray.exceptions.RaySystemError: GCS at 10.0.0.1:6379 secret-detail"),
        ValueError("an internal check failed: secret-detail"),  # not the caller's argument
    ],
)
def test_any_other_error_is_internal_with_a_generic_message_and_logged(
    outcome: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """A Ray exception or an internal bug is no caller's business: INTERNAL, a fixed message
    (never its text), the whole error in the router's log."""
    with admin_server(f"ops:{ADMIN_KEY}", Drainer(outcome)) as target:
        error = refused(lambda: drain_call(target, ADMIN_KEY))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == INTERNAL_ERROR and "secret-detail" not in (error.details() or "")
    assert "secret-detail" in caplog.text


@pytest.mark.parametrize(
    ("keys_text", "key", "reason"),
    [
        (None, ADMIN_KEY, "not_configured"),
        (f"ops:{ADMIN_KEY}", None, "missing"),
        (f"ops:{ADMIN_KEY}", "wrong-admin-key-0123456789abcdef", "invalid_key"),
    ],
)
def test_a_refused_call_is_logged_with_its_peer_and_counted_never_showing_the_key(
    keys_text: str | None, key: str | None, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    refusals: list[str] = []
    caplog.set_level("DEBUG")
    with admin_server(keys_text, Drainer(report()), refusals) as target:
        error = refused(lambda: drain_call(target, key))
    assert refusals == [reason]
    assert f"admin call refused ({reason}) from ipv4:127.0.0.1:" in caplog.text
    for secret in (ADMIN_KEY, "wrong-admin-key-0123456789abcdef"):
        assert secret not in caplog.text and secret not in (error.details() or "")


@pytest.mark.parametrize("name", ["self", "self-prestop"])
def test_a_self_scoped_key_drains_only_the_node_it_calls_from(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    refusals: list[str] = []
    drainer = Drainer(report())
    with admin_server(f"{name}:{ADMIN_KEY}\nops:{TENANT_KEY}", drainer, refusals) as target:
        error = refused(lambda: drain_call(target, ADMIN_KEY, NODE_IP))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == (
            f"admin key {name!r} may drain only the node it calls from (127.0.0.1), not {NODE_IP}"
        )
        assert drainer.calls == [] and refusals == ["other_node"]
        drain_call(target, ADMIN_KEY, "127.0.0.1")  # its own node (loopback here)
        drain_call(target, TENANT_KEY, NODE_IP)  # an unscoped admin key: any node
    assert drainer.calls == [("127.0.0.1", 60), (NODE_IP, 60)]
    assert ADMIN_KEY not in caplog.text


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.5:41234", "10.0.0.5"),
        ("ipv6:[fd00::0:1]:41234", "fd00::1"),
        ("ipv6:%5Bfd00::1%5D:41234", "fd00::1"),
        ("ipv6:[::ffff:10.0.0.5]:41234", "10.0.0.5"),
        ("unix:/tmp/socket", None),
        ("ipv4:not-an-ip:1", None),
        ("", None),
    ],
)
def test_a_grpc_peer_gives_its_normalized_address(peer: str, address: str | None) -> None:
    assert peer_ip(peer) == address


@pytest.mark.parametrize(
    ("node_ip", "timeout_s", "says"),
    [
        *((NODE_IP, t, "timeout_s: ") for t in (0.0, -1.0, float("nan"), float("inf"), 3601.0)),
        ("node-b", 30.0, "node_ip: 'node-b' is not an IP address"),
    ],
)
def test_a_bad_argument_is_refused_before_any_drain(
    node_ip: str, timeout_s: float, says: str
) -> None:
    drainer = Drainer(report())
    with admin_server(f"ops:{ADMIN_KEY}", drainer) as target:
        error = refused(lambda: drain_call(target, ADMIN_KEY, node_ip, timeout_s=timeout_s))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (error.details() or "") and drainer.calls == []


@pytest.mark.parametrize(
    ("outcome", "key", "status", "says"),
    [
        (report(), ADMIN_KEY, 0, "drained in 1.5 s"),
        (report(left_empty=False), ADMIN_KEY, 1, "did not complete"),
        (report(num_failed=1), ADMIN_KEY, 1, "did not complete"),
        (UnknownNode("no live node has the address 10.1.2.3"), ADMIN_KEY, 2, "NOT_FOUND"),
        (report(), "wrong-admin-key-0123456789", 2, "UNAUTHENTICATED: invalid admin key"),
        (report(), None, 2, "no admin key: set $TANDEM_ADMIN_KEY"),
    ],
)
def test_drain_node_cli_exits_by_how_the_drain_went(
    outcome: Any,
    key: str | None,
    status: int,
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if key is None:
        monkeypatch.delenv("TANDEM_ADMIN_KEY", raising=False)
    else:
        monkeypatch.setenv("TANDEM_ADMIN_KEY", key)
    drainer = Drainer(outcome)
    with admin_server(f"ops:{ADMIN_KEY}", drainer) as target:
        args = ["drain-node", "--router", target, "--node-ip", NODE_IP, "--timeout-s", "7"]
        assert main(args) == status
    out = capsys.readouterr()
    assert says in out.out + out.err
    assert drainer.calls == ([] if status == 2 and key != ADMIN_KEY else [(NODE_IP, 7.0)])


def test_drain_node_cli_if_present_takes_an_unknown_node_as_drained(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The preStop hook's form: a node that left the cluster already has nothing to drain."""
    monkeypatch.setenv("TANDEM_ADMIN_KEY", ADMIN_KEY)
    with admin_server(f"ops:{ADMIN_KEY}", Drainer(UnknownNode("no live node"))) as target:
        args = ["drain-node", "--router", target, "--node-ip", NODE_IP, "--if-present"]
        assert main(args) == 0
    assert "is not in the cluster: nothing to drain" in capsys.readouterr().out


def test_drain_node_cli_prints_the_report_as_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TANDEM_ADMIN_KEY", ADMIN_KEY)
    with admin_server(f"ops:{ADMIN_KEY}", Drainer(report())) as target:
        assert main(["drain-node", "--router", target, "--node-ip", NODE_IP, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["completed"] and printed["replacement_worker_ids"] == ["decode-2", "prefill-1"]


def test_drain_node_cli_names_an_unreachable_router(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.ports import free_port_range

    monkeypatch.setenv("TANDEM_ADMIN_KEY", ADMIN_KEY)
    port, _ = free_port_range(1)
    args = ["drain-node", "--router", f"127.0.0.1:{port}", "--node-ip", NODE_IP, "--timeout-s", "1"]
    assert main(args) == 2
    assert f"cannot reach a Tandem server at 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_reads_the_admin_keys_and_drops_them_from_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cluster.cli import admin_keys_of, build_parser

    monkeypatch.setenv(ENV_ADMIN_KEYS, f"ops:{ADMIN_KEY}")
    args = build_parser().parse_args(["serve"])
    keys = admin_keys_of(args)
    assert keys is not None and keys.find(ADMIN_KEY) is not None
    import os

    assert ENV_ADMIN_KEYS not in os.environ


@pytest.mark.parametrize(
    ("node_ip", "timeout_s", "problem"),
    [
        ("node-b", 30.0, "node_ip: 'node-b' is not an IP address"),
        ("10.1.2.3", 0.0, "timeout_s: 0.0 must be in (0, 3600] seconds"),
        ("10.1.2.3", float("nan"), "timeout_s: nan must be in"),
        ("10.1.2.3", 3601.0, "timeout_s: 3601.0 must be in"),
        ("10.1.2.3", True, "timeout_s: True must be in"),  # a bool is no number of seconds
    ],
)
def test_a_node_drain_refuses_a_malformed_address_or_timeout(
    node_ip: str, timeout_s: float, problem: str
) -> None:
    from contracts.drain import check_drain_arguments
    from contracts.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as raised:
        check_drain_arguments(node_ip, timeout_s)
    assert problem in str(raised.value)
    assert check_drain_arguments(" 10.1.2.3 ", 30.0) == "10.1.2.3"
    assert check_drain_arguments("fd00::0:1", 30.0) == "fd00::1"  # the form Ray reports


def _fake_ray(tmp_path: Path) -> Path:
    """A `ray` command standing in for Ray's: it dumps its environment and arguments, has its
    parent (`tandem node`, here the test process) told to stop, then waits for SIGTERM."""
    script = tmp_path / "ray"
    script.write_text(
        "#!/bin/sh\n"
        f"env > {tmp_path}/ray.env\n"
        f'echo "$@" > {tmp_path}/ray.args\n'
        "kill -TERM $PPID\n"
        "exec sleep 60\n"
    )
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("from_file", [False, True])
def test_tandem_node_keeps_the_admin_key_out_of_rays_environment(
    from_file: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`tandem node` starts `ray start --block` (a real child process) with an environment
    without $TANDEM_ADMIN_KEY: the raylet and every Ray worker on the node would inherit it.
    The key still reaches the drain on SIGTERM (the admin server accepts it)."""
    import cluster.node_cli as node_cli

    monkeypatch.setattr(node_cli, "ray_executable", lambda: str(_fake_ray(tmp_path)))
    key_args: list[str] = []
    if from_file:
        monkeypatch.delenv("TANDEM_ADMIN_KEY", raising=False)
        (tmp_path / "admin-key").write_text(f"{ADMIN_KEY}\n")
        key_args = ["--admin-key-file", str(tmp_path / "admin-key")]
    else:
        monkeypatch.setenv("TANDEM_ADMIN_KEY", ADMIN_KEY)
    drainer = Drainer(report(left_empty=False))  # not completed: Ray is stopped at once
    with admin_server(f"ops:{ADMIN_KEY}", drainer) as target:
        args = ["node", "--router", target, "--node-ip", NODE_IP, "--drain-timeout-s", "9",
                *key_args, "--", "--address=10.0.0.1:6379"]  # fmt: skip
        assert main(args) == 1
    environment = (tmp_path / "ray.env").read_text()
    assert "TANDEM_ADMIN_KEY" not in environment and ADMIN_KEY not in environment
    assert "PATH=" in environment  # the rest of the environment is passed on
    assert (tmp_path / "ray.args").read_text().split() == [
        "start", "--block", f"--node-ip-address={NODE_IP}", "--address=10.0.0.1:6379"
    ]  # fmt: skip
    assert drainer.calls == [(NODE_IP, 9.0)]  # the key was sent with the drain
    assert "did not complete" in capsys.readouterr().err


def test_tandem_node_without_an_admin_key_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No key: found at start (exit 2, Ray not started), not at the first SIGTERM."""
    import cluster.node_cli as node_cli

    monkeypatch.setattr(node_cli, "ray_executable", lambda: str(_fake_ray(tmp_path)))
    monkeypatch.delenv("TANDEM_ADMIN_KEY", raising=False)
    assert main(["node", "--router", "127.0.0.1:1", "--node-ip", NODE_IP]) == 2
    assert "no admin key" in capsys.readouterr().err
    assert not (tmp_path / "ray.env").exists()


@pytest.mark.parametrize(("content", "says"), [(None, "cannot read it"), ("\n", "is empty")])
def test_drain_node_cli_names_a_bad_admin_key_file(
    content: str | None, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "admin-key"
    if content is not None:
        path.write_text(content)
    args = ["drain-node", "--router", "127.0.0.1:1", "--node-ip", NODE_IP,
            "--admin-key-file", str(path)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"admin_key_file='{path}'" in err and says in err
