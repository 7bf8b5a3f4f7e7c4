"""The operator's entry point on the router: the gRPC `tandem.v1.Admin` service (DrainNode),
and the admin keys that guard it.

Admin keys are not tenants' API keys: they come from their own file (`tandem serve
--admin-keys-file`) or `$TANDEM_ADMIN_KEYS`, in router.auth's format with the name standing for
the operator (`name:key` per line; a max_inflight bound is refused: it means nothing here),
kept as SHA-256 digests and compared in constant time (router.auth.ApiKeys.find). A tenant's key
never opens the Admin service and an admin key never opens the Tandem service: the two sets are
checked by different code (router.interceptor only looks at /tandem.v1.Tandem/ calls).

Every call carries `authorization: Bearer <admin key>`. With no admin keys configured every
call is refused with PERMISSION_DENIED saying how to configure them (AdminDisabled); a
missing, malformed or unknown key is UNAUTHENTICATED. Each refusal is logged with the caller's
peer address and the reason (never the key) and counted by reason (`on_refused`:
tandem_admin_refusals). The request's arguments are checked here (contracts.drain: a bad one
is INVALID_ARGUMENT); the drain itself belongs to the control plane: the servicer is handed a
`NodeDrainer` (cluster.service.Service.drain_node) and converts its typed report to protobuf
here; nothing else of the control plane is imported. A Tandem error's status is decided by
router.core.status_of_error (the one mapping); any other exception (a Ray error, a bug) is
logged and answered INTERNAL with a generic message, its text never sent to the caller. Runs
on the server's event loop.

A key named `self` or `self-<anything>` is scoped to its caller's node: it drains only the
node whose address the call comes from (the gRPC peer's address must equal `node_ip`; else
PERMISSION_DENIED, AdminScopeDenied, counted as `other_node`). The Helm chart gives worker pods
such a key (`self-prestop`), so a process in a worker pod that reads it can drain its own node
and no other. Where the network rewrites pod source addresses (SNAT), that key cannot drain
anything; give the hook an unscoped key (router.admin.existingSecret).
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import grpc

from contracts.drain import NodeDrainReport, check_drain_arguments
from contracts.errors import AdminDisabled, AdminScopeDenied, TandemError
from proto.tandem.v1 import admin_pb2 as pb
from proto.tandem.v1 import admin_pb2_grpc
from router.auth import ApiKeys, Unauthenticated, bearer_key, parse_api_keys, read_keys_source
from router.server import status_of

logger = logging.getLogger(__name__)

ENV_ADMIN_KEYS = "TANDEM_ADMIN_KEYS"
INTERNAL_ERROR = "internal error: the drain failed; the router's log says why"
NOT_CONFIGURED = (
    "the admin service is off: no admin keys are configured; start `tandem serve` with "
    f"--admin-keys-file FILE or ${ENV_ADMIN_KEYS} ('name:key' per line; not a tenant API key)"
)


SELF_SCOPED = "self"  # an admin key named this, or "self-*", drains only its caller's node


def is_self_scoped(name: str) -> bool:
    """Whether the admin key of operator `name` may drain only the node it calls from."""
    return name == SELF_SCOPED or name.startswith(SELF_SCOPED + "-")


def peer_ip(peer: str) -> str | None:
    """The normalized IP address of a gRPC peer string (`ipv4:10.0.0.5:41234`,
    `ipv6:[fd00::1]:41234`, percent-encoded or not; an IPv4-mapped IPv6 address as its IPv4
    one); None for any other kind (unix sockets)."""
    kind, _, rest = urllib.parse.unquote(peer or "").partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6" and rest.startswith("["):
        host = rest[1:].partition("]")[0]
    else:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d
    return str(mapped or address)


class NodeDrainer(Protocol):
    """What drains a node (cluster.service.Service.drain_node). Raises TandemErrors:
    UnknownNode, NodeNotDrainable, WorkerUnavailable (not serving yet), NodeDrainTimedOut."""

    def __call__(self, node_ip: str, timeout_s: float) -> Awaitable[NodeDrainReport]: ...


def parse_admin_keys(text: str, source: str) -> ApiKeys:
    """Admin keys in router.auth's format (module docstring); ValueError naming `source` and
    the line of a bad entry (never the key), or a line that sets a bound."""
    keys = parse_api_keys(text, source)
    bounded = [t.name for t in keys.tenants if t.max_inflight is not None]
    if bounded:
        raise ValueError(f"{source}: admin key of {bounded[0]!r} sets a max_inflight bound; "
                         "admin keys take 'name:key' only")  # fmt: skip
    return keys


def load_admin_keys(path: str | None, environ: Mapping[str, str] | None = None) -> ApiKeys | None:
    """The admin keys from `path`, else from $TANDEM_ADMIN_KEYS; None when neither is given
    (the Admin service refuses every call). ValueError for an unreadable or malformed source."""
    found = read_keys_source(path, ENV_ADMIN_KEYS, "admin_keys_file", environ)
    return None if found is None else parse_admin_keys(*found)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """tandem.v1.Admin: checks the caller's admin key, then asks the control plane.
    `on_refused(reason)` counts a refused call (not_configured, missing, malformed,
    invalid_key, other_node)."""

    def __init__(
        self,
        keys: ApiKeys | None,
        drain_node: NodeDrainer,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.keys = keys
        self._drain_node = drain_node
        self._on_refused = on_refused

    def operator(self, authorization: str | None) -> str:
        """The name of the operator whose admin key `authorization` carries. Raises
        AdminDisabled (no keys configured) or Unauthenticated (no valid admin key)."""
        if self.keys is None:
            raise AdminDisabled(NOT_CONFIGURED)
        found = self.keys.find(bearer_key(authorization))
        if found is None:
            raise Unauthenticated("invalid_key", "invalid admin key")
        return found.name

    def _authorize(self, context: Any) -> str:
        """operator(), with a refusal logged (peer and reason, never the key) and counted."""
        metadata = dict(context.invocation_metadata() or ())
        try:
            return self.operator(metadata.get("authorization"))
        except (AdminDisabled, Unauthenticated) as e:
            reason = e.reason if isinstance(e, Unauthenticated) else "not_configured"
            logger.warning("admin call refused (%s) from %s", reason, context.peer())
            if self._on_refused is not None:
                self._on_refused(reason)
            raise

    def _check_scope(self, name: str, node_ip: str, context: Any) -> None:
        """AdminScopeDenied (logged, counted as other_node) when a key scoped to its caller's
        node (is_self_scoped) asks for another node."""
        if not is_self_scoped(name):
            return
        caller = peer_ip(context.peer())
        if caller == node_ip:
            return
        logger.warning("admin call refused (other_node) from %s: key %r drains only its own "
                       "node, asked for %s", context.peer(), name, node_ip)  # fmt: skip
        if self._on_refused is not None:
            self._on_refused("other_node")
        raise AdminScopeDenied(
            f"admin key {name!r} may drain only the node it calls from ({caller or 'unknown'}), "
            f"not {node_ip}"
        )

    async def DrainNode(self, request: Any, context: Any) -> Any:
        try:
            name = self._authorize(context)
            node_ip = check_drain_arguments(request.node_ip, request.timeout_s)
            self._check_scope(name, node_ip, context)
            logger.warning("admin %s: draining node %s (timeout %g s)", name, node_ip,
                           request.timeout_s)  # fmt: skip
            report = await self._drain_node(node_ip, request.timeout_s)
        except TandemError as e:
            code, details = status_of(e), str(e)
        except Exception:
            logger.exception("admin DrainNode failed")
            code, details = grpc.StatusCode.INTERNAL, INTERNAL_ERROR
        else:
            logger.warning("admin %s: node %s drained in %.1f s (completed: %s)", name,
                           report.node_ip, report.elapsed_s, report.completed)  # fmt: skip
            return drain_response(report)
        await context.abort(code, details)


def drain_response(report: NodeDrainReport) -> Any:
    """The DrainNodeResponse of a report."""
    return pb.DrainNodeResponse(
        node_ip=report.node_ip,
        completed=report.completed,
        workers=[
            pb.WorkerDrain(pool=w.pool, worker_id=w.worker_id, left_empty=w.left_empty)
            for w in report.workers
        ],
        replacement_worker_ids=list(report.replacement_ids),
        num_replacements_failed=report.num_replacements_failed,
        num_replacements_pending=report.num_replacements_pending,
        already_draining=report.already_draining,
        elapsed_s=report.elapsed_s,
    )


def add_admin_service(servicer: AdminServicer, server: Any) -> None:
    """Register tandem.v1.Admin on a grpc.aio server (before it starts)."""
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
