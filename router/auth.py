"""Who may call: API keys, each naming a tenant, and each tenant's bound on requests in flight.

Transport-neutral: the gRPC interceptor (`router.interceptor`) and the HTTP edge call the same
`Guard`. A caller presents `Authorization: Bearer <key>` (HTTP header, or gRPC metadata
`authorization`); `Guard.authenticate` returns the key's `Tenant` or raises `Unauthenticated`
(gRPC UNAUTHENTICATED, HTTP 401) before any work is done. `Guard.acquire` takes one of the
tenant's in-flight places (a `Place`, released once the request ends) or raises
`TenantOverloaded` (an `Overloaded`: RESOURCE_EXHAUSTED, 429). `current_tenant`, set in the task
that serves the request, scopes its prefix-cache salt (`tenant_cache_salt`). An edge does:

    tenant = guard.authenticate(authorization_value)   # Unauthenticated: 401 / UNAUTHENTICATED
    place = guard.acquire(tenant)                       # TenantOverloaded: 429 / RESOURCE_EXHAUSTED
    current_tenant.set(tenant)
    try: ...serve the request...
    finally: place.release()

Keys come from a file (`--api-keys-file`) or `$TANDEM_API_KEYS`, in one format: one entry per
line (the environment also takes commas between entries), `#` comments and blank lines skipped:

    tenant:key                  # bound: the tenant's other lines', else --tenant-max-inflight
    tenant:key:max_inflight     # this tenant's own bound on requests in flight

A tenant may have several keys (rotation); the bounds its lines give must agree. Plain lines,
not JSON or YAML: a Kubernetes Secret or an env var holds them as they are, and a key is one
token with no quoting rules to get wrong. Keys are kept only as SHA-256 digests, compared in
constant time, and never logged nor put in an error message (errors name the line). Not
thread-safe: one `Guard` per router, called on its event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from contracts.errors import Overloaded, TandemError

ENV_API_KEYS = "TANDEM_API_KEYS"
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_KEY_CHARS = 16
KEY_CHARS = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750's b64token: fits a Bearer header
FAILURE_REASONS = ("missing", "malformed", "invalid_key")  # tandem_auth_failures_total{reason}


class Unauthenticated(TandemError):
    """A request without a valid API key (gRPC UNAUTHENTICATED, HTTP 401). `reason` is one of
    FAILURE_REASONS; the message never holds the key."""

    http_status = 401

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TenantOverloaded(Overloaded):
    """A tenant is at its bound on requests in flight (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""

    http_status = 429


@dataclass(frozen=True, slots=True)
class Tenant:
    """Whoever holds one of a set of API keys. `max_inflight`: its requests in flight at most
    (None: unbounded, only the router's admission applies)."""

    name: str
    max_inflight: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TENANT_NAME.fullmatch(self.name):
            raise ValueError(
                f"tenant name={self.name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                "(starting with a letter or digit)"
            )
        _check_bound("max_inflight", self.max_inflight)

    def cache_salt(self, request_salt: str | None) -> str:
        """The prefix-cache salt of this tenant's request: the tenant's own scope, within it the
        request's salt if it set one. Two tenants never share a cached prefix, whatever salts
        their requests carry (a shared one would let a tenant learn from `cached_tokens`
        whether another sent a prompt); one tenant's requests share theirs as before."""
        return f"tenant:{self.name}/{request_salt or ''}"


# The tenant of the request the current task serves: set by the gRPC interceptor (each call runs
# in its own task) and read where the request's cache salt is decided. None: auth is off.
current_tenant: ContextVar[Tenant | None] = ContextVar("tandem_current_tenant", default=None)


def tenant_cache_salt(request_salt: str | None) -> str | None:
    """The cache salt a request gets: scoped to `current_tenant` when there is one, else the
    request's own."""
    tenant = current_tenant.get()
    return request_salt if tenant is None else tenant.cache_salt(request_salt)


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The keys a router accepts: SHA-256 digest -> tenant. Its repr shows tenants only."""

    tenants_by_digest: Mapping[bytes, Tenant] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.tenants_by_digest:
            raise ValueError("api keys: no keys given (an empty file or variable)")

    @property
    def tenants(self) -> list[Tenant]:
        return sorted(set(self.tenants_by_digest.values()), key=lambda t: t.name)

    def find(self, key: str) -> Tenant | None:
        """The tenant of `key`, or None. Compares with every known digest, in constant time
        each, so the time taken does not depend on which key (if any) matched."""
        digest = _digest(key)
        found = None
        for known, tenant in self.tenants_by_digest.items():
            if hmac.compare_digest(known, digest):
                found = tenant
        return found


def parse_api_keys(text: str, source: str, default_max_inflight: int | None = None) -> ApiKeys:
    """Parse the key format (module docstring); raises ValueError naming `source` and the line
    of the first bad entry (never the key)."""
    _check_bound("tenant_max_inflight", default_max_inflight)
    entries = [(n, line) for n, raw in enumerate(text.splitlines(), 1)
               for line in _entries(raw, split_commas=source.startswith("$"))]  # fmt: skip
    parsed = [(f"{source} line {n}", *_parse_entry(entry, f"{source} line {n}"))
              for n, entry in entries]  # fmt: skip
    bounds: dict[str, int] = {}  # a tenant's bound: the one its lines give, alike on each
    for where, name, _, bound in parsed:
        if bound is not None and bounds.setdefault(name, bound) != bound:
            raise ValueError(f"{where}: tenant {name!r} has two different in-flight bounds")
    digests: dict[bytes, Tenant] = {}
    for where, name, key, _ in parsed:
        digest = _digest(key)
        if digest in digests:
            raise ValueError(f"{where}: this key is given twice (a key names one tenant)")
        digests[digest] = Tenant(name, bounds.get(name, default_max_inflight))
    if not digests:
        raise ValueError(f"{source}: no keys in it")
    return ApiKeys(digests)


def read_keys_source(
    path: str | None, env_var: str, field: str, environ: Mapping[str, str] | None = None
) -> tuple[str, str] | None:
    """(text, source name for errors) of a keys file at `path`, else of $`env_var` (when set
    and not empty); None when neither is given. ValueError naming `field` for a file that
    cannot be read."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8"), path
        except OSError as e:
            raise ValueError(f"{field}={path!r}: cannot read it: {e.strerror}") from None
    from_env = (os.environ if environ is None else environ).get(env_var)
    return (from_env, f"${env_var}") if from_env else None


def load_api_keys(
    path: str | None,
    environ: Mapping[str, str] | None = None,
    default_max_inflight: int | None = None,
) -> ApiKeys | None:
    """The keys from `path` (a file), else from $TANDEM_API_KEYS; None when neither is given
    (authentication off). Raises ValueError for an unreadable or malformed source."""
    found = read_keys_source(path, ENV_API_KEYS, "api_keys_file", environ)
    if found is not None:
        return parse_api_keys(*found, default_max_inflight)
    if default_max_inflight is not None:
        raise ValueError(
            f"tenant_max_inflight={default_max_inflight!r} needs API keys "
            f"(--api-keys-file or ${ENV_API_KEYS}): without them there are no tenants"
        )
    return None


def bearer_key(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` value; Unauthenticated if missing or not
    that form."""
    if not authorization:
        raise Unauthenticated("missing", "missing API key: send 'authorization: Bearer <key>'")
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthenticated(
            "malformed", "malformed authorization: expected 'Bearer <key>' (the scheme, a space, "
            "the key)"
        )  # fmt: skip
    return key


class Guard:
    """Authentication and per-tenant bounds for one router. `on_failure(reason)` and
    `on_refused(tenant)` feed metrics (telemetry.metrics); both optional."""

    def __init__(
        self,
        keys: ApiKeys,
        on_failure: Callable[[str], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.keys = keys
        self._on_failure = on_failure
        self._on_refused = on_refused
        self.in_flight: dict[str, int] = {}  # tenant name: requests held

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an Authorization value (header or metadata, None if absent); raises
        Unauthenticated (counted) if there is no valid key in it. The HTTP edge's whole check:
        catch Unauthenticated and answer `error.http_status` (401) with `str(error)`."""
        try:
            tenant = self.keys.find(bearer_key(authorization))
            if tenant is None:
                raise Unauthenticated("invalid_key", "invalid API key")
        except Unauthenticated as e:
            if self._on_failure is not None:
                self._on_failure(e.reason)
            raise
        return tenant

    def acquire(self, tenant: Tenant) -> Place:
        """Take one of `tenant`'s in-flight places; raises TenantOverloaded (taking nothing,
        counted) at its bound. The caller must `release()` the Place it gets (idempotent: a
        streaming edge may release it both where its stream ends and where its response ends,
        in case the stream never started)."""
        held = self.in_flight.get(tenant.name, 0)
        if tenant.max_inflight is not None and held >= tenant.max_inflight:
            if self._on_refused is not None:
                self._on_refused(tenant.name)
            raise TenantOverloaded(
                f"overloaded: tenant {tenant.name!r} has {held} requests in flight "
                f"(its limit {tenant.max_inflight})"
            )
        self.in_flight[tenant.name] = held + 1
        return Place(self, tenant)

    def _give_back(self, tenant: Tenant) -> None:
        held = self.in_flight[tenant.name] - 1
        assert held >= 0, f"tenant {tenant.name!r} gave back more places than it took"
        if held:
            self.in_flight[tenant.name] = held
        else:
            del self.in_flight[tenant.name]

    @contextmanager
    def hold(self, tenant: Tenant) -> Iterator[Tenant]:
        """One of `tenant`'s in-flight places while the block runs (`acquire`, `release`)."""
        place = self.acquire(tenant)
        try:
            yield tenant
        finally:
            place.release()


class Place:
    """One in-flight place of a tenant, taken by `Guard.acquire`."""

    def __init__(self, guard: Guard, tenant: Tenant) -> None:
        self._guard: Guard | None = guard
        self.tenant = tenant

    def release(self) -> None:
        """Give the place back; later calls do nothing."""
        if self._guard is not None:
            guard, self._guard = self._guard, None
            guard._give_back(self.tenant)


def _entries(raw: str, split_commas: bool) -> list[str]:
    text = raw.split("#", 1)[0]
    parts = text.split(",") if split_commas else [text]
    return [part.strip() for part in parts if part.strip()]


def _parse_entry(entry: str, where: str) -> tuple[str, str, int | None]:
    """(tenant, key, its bound or None) of one entry."""
    parts = entry.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"{where}: expected tenant:key or tenant:key:max_inflight")
    name, key = parts[0], parts[1]
    if not TENANT_NAME.fullmatch(name):
        raise ValueError(
            f"{where}: tenant name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
        )
    if len(key) < MIN_KEY_CHARS or not KEY_CHARS.fullmatch(key):
        raise ValueError(
            f"{where}: the key of tenant {name!r} must be at least {MIN_KEY_CHARS} characters "
            "of A-Z a-z 0-9 - . _ ~ + / (then '=' padding), e.g. `openssl rand -hex 32`"
        )
    if len(parts) == 2:
        return name, key, None
    try:
        bound = int(parts[2])
    except ValueError:
        raise ValueError(f"{where}: max_inflight {parts[2]!r} is not an integer") from None
    if bound < 1:
        raise ValueError(f"{where}: max_inflight {bound} must be >= 1")
    return name, key, bound


def _check_bound(name: str, value: int | None) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"{name}={value!r} must be an int >= 1 (or None: unbounded)")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()
