"""`tandem drain-node` and `tandem node`: an operator's (or a worker pod's preStop hook's) way
to drain a node through the router's Admin service (router.admin, tandem.v1.Admin/DrainNode).

`tandem drain-node --router HOST:PORT --node-ip IP [--timeout-s S]` asks the router to drain the
Ray node at IP (cluster.node_drain) and waits for the answer. The admin key comes from
--admin-key-file, else $TANDEM_ADMIN_KEY (never a flag's value: it would show in the process
list); TLS flags as `tandem client`'s.
Exit status: 0 the drain completed (every worker left empty, no replacement failed; one still
starting, in a pool that kept other workers, is reported pending); 1 it ran but did not
complete (the report says which worker or replacement); 2 it was refused or failed (no key,
bad key, unknown node, unreachable router: the message says which).
`--if-present` (the chart's preStop hook): a node the cluster no longer has exits 0.

`tandem node --router HOST:PORT --node-ip IP [--drain-timeout-s S] -- RAY_START_ARGS...` is the
bare-metal counterpart of the Helm chart's preStop hook: it runs `ray start --block
--node-ip-address=IP RAY_START_ARGS` and, on SIGTERM or SIGINT, first has the router drain this
node, then stops Ray: SIGTERM to `ray start`, which stops the node's processes (a raylet Ray
marked draining finishes its drain first, up to Ray's own 30 s, and the GCS records the node's
end as the drain's). Not waited for first: `ray start --block` never exits by itself when its
raylet exits cleanly (Ray reports only unexpected exits), so a wait would only add its length
to every stop. Ray's child runs in its own session, so a signal to this process's group
reaches Ray only through here.
The admin key is read once, at start (a missing key exits 2 before Ray starts), and Ray is
started with an environment without $TANDEM_ADMIN_KEY: the raylet and every Ray worker and
task on the node would inherit it otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from bench.serving.cli import add_tls_arguments  # argparse only: cheap

ADMIN_KEY_ENV = "TANDEM_ADMIN_KEY"
RPC_MARGIN_S = 30.0  # the DrainNode call waits this much longer than the drain's own bound
RAY_STOP_WAIT_S = 60.0  # after the drain, `ray start --block` gets this long to stop on SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def add_drain_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", required=True, help="the router's gRPC address, HOST:PORT")
    parser.add_argument("--node-ip", required=True, help="the Ray node's address (a pod's IP)")
    parser.add_argument(
        "--timeout-s", type=float, default=300.0,
        help="bound on the drain (replacements' start and every worker's drain), seconds",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.add_argument(
        "--if-present", action="store_true",
        help="a node the cluster does not have (left already) is no error: exit 0 (preStop)",
    )  # fmt: skip
    add_admin_connection_arguments(parser)


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", required=True, help="the router's gRPC address, HOST:PORT")
    parser.add_argument(
        "--node-ip", required=True, help="this node's address, for Ray and the drain"
    )
    parser.add_argument(
        "--drain-timeout-s", type=float, default=300.0,
        help="on SIGTERM: bound on draining this node before Ray stops, seconds",
    )  # fmt: skip
    parser.add_argument(
        "ray_args", nargs=argparse.REMAINDER,
        help="after `--`: arguments of `ray start` (--address=HEAD:6379, ...)",
    )  # fmt: skip
    add_admin_connection_arguments(parser)


def add_admin_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        f"connection (TLS; the admin key from --admin-key-file or ${ADMIN_KEY_ENV})"
    )
    group.add_argument(
        "--admin-key-file", default=None,
        help=f"a file holding the admin key (else ${ADMIN_KEY_ENV}; never a flag's value)",
    )  # fmt: skip
    add_tls_arguments(group)


class NoAdminKey(Exception):
    """No admin key was given, or its file cannot be read (the message says which)."""


def admin_key_of(args: argparse.Namespace, environ: dict[str, str] | None = None) -> str:
    """The admin key: the first line of --admin-key-file, else $TANDEM_ADMIN_KEY. Raises
    NoAdminKey naming what to set (never the key)."""
    environ = dict(os.environ) if environ is None else environ
    path = getattr(args, "admin_key_file", None)
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").strip().splitlines()
        except OSError as e:
            raise NoAdminKey(f"admin_key_file={path!r}: cannot read it: {e.strerror}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise NoAdminKey(f"admin_key_file={path!r} is empty: it must hold an admin key")
        return key
    key = environ.get(ADMIN_KEY_ENV, "").strip()
    if not key:
        raise NoAdminKey(f"no admin key: set ${ADMIN_KEY_ENV} or --admin-key-file to one of the "
                         "router's admin keys (`tandem serve --admin-keys-file`)")  # fmt: skip
    return key


def request_drain(args: argparse.Namespace, key: str, node_ip: str, timeout_s: float) -> int:
    """Ask the router to drain `node_ip` with admin key `key`; print the outcome; the exit
    status (module docstring)."""
    import grpc

    from bench.serving.connection import client_tls_of, open_channel
    from cluster.cli import describe_rpc_error
    from proto.tandem.v1 import admin_pb2 as pb
    from proto.tandem.v1 import admin_pb2_grpc

    with open_channel(args.router, client_tls_of(args)) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            reply = stub.DrainNode(
                pb.DrainNodeRequest(node_ip=node_ip, timeout_s=timeout_s),
                timeout=timeout_s + RPC_MARGIN_S,
                metadata=(("authorization", f"Bearer {key}"),),
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND and getattr(args, "if_present", False):
                print(f"tandem: node {node_ip} is not in the cluster: nothing to drain", flush=True)
                return 0
            print(f"tandem: drain of node {node_ip} failed: {describe_rpc_error(e, args.router)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    print(_describe(reply, as_json=getattr(args, "json", False)), flush=True)
    if not reply.completed:
        print(f"tandem: the drain of node {node_ip} did not complete: a worker was retired busy "
              "or a replacement failed to start (see above)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _describe(reply: Any, as_json: bool) -> str:
    workers = [{"pool": w.pool, "worker_id": w.worker_id, "left_empty": w.left_empty}
               for w in reply.workers]  # fmt: skip
    if as_json:
        return json.dumps({
            "node_ip": reply.node_ip, "completed": reply.completed, "workers": workers,
            "replacement_worker_ids": list(reply.replacement_worker_ids),
            "num_replacements_failed": reply.num_replacements_failed,
            "num_replacements_pending": reply.num_replacements_pending,
            "already_draining": reply.already_draining, "elapsed_s": reply.elapsed_s,
        })  # fmt: skip
    drained = ", ".join(
        f"{w['pool']} {w['worker_id']} ({'empty' if w['left_empty'] else 'retired busy'})"
        for w in workers
    )
    again = " (it was being drained already)" if reply.already_draining else ""
    failed, pending = reply.num_replacements_failed, reply.num_replacements_pending
    return (f"tandem: node {reply.node_ip} drained in {reply.elapsed_s:.1f} s{again}: "
            f"workers {drained or 'none'}; replacements "
            f"{', '.join(reply.replacement_worker_ids) or 'none'}"
            f"{f', {failed} failed to start' if failed else ''}"
            f"{f', {pending} still starting' if pending else ''}")  # fmt: skip


def run_drain_node(args: argparse.Namespace) -> int:
    try:
        key = admin_key_of(args)
    except NoAdminKey as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    return request_drain(args, key, args.node_ip, args.timeout_s)


def ray_executable() -> str:
    """The `ray` command of this Python environment."""
    return str(Path(sys.executable).parent / "ray")


def run_node(args: argparse.Namespace) -> int:
    """`ray start --block` for this node; on SIGTERM/SIGINT drain it through the router first."""
    try:  # read once, at start: Ray's processes on this node never see it
        key = admin_key_of(args)
    except NoAdminKey as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    ray_env = {name: value for name, value in os.environ.items() if name != ADMIN_KEY_ENV}
    ray_args = [a for a in args.ray_args if a != "--"]
    command = [ray_executable(), "start", "--block", f"--node-ip-address={args.node_ip}", *ray_args]
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        return _run_ray_until_stopped(args, key, command, ray_env, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_ray_until_stopped(
    args: argparse.Namespace,
    key: str,
    command: list[str],
    ray_env: dict[str, str],
    stop: threading.Event,
) -> int:
    child = subprocess.Popen(command, start_new_session=True, env=ray_env)
    print(f"tandem: node {args.node_ip}: {' '.join(command[1:])} (pid {child.pid})", flush=True)
    while child.poll() is None and not stop.wait(0.5):
        pass
    if child.poll() is not None:
        print(f"tandem: `ray start` exited with status {child.returncode}", file=sys.stderr)
        return 1
    print(f"tandem: stopping: draining node {args.node_ip} through {args.router}", flush=True)
    status = request_drain(args, key, args.node_ip, args.drain_timeout_s)
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        child.wait(RAY_STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    print(f"tandem: node {args.node_ip} stopped", flush=True)
    return status
