"""The gRPC side of `router.auth`: a server interceptor that checks each Tandem call's API key
before the call runs, and holds the tenant's in-flight place while it does.

A call without a valid `authorization: Bearer <key>` metadata entry ends UNAUTHENTICATED before
its handler runs; a tenant at its bound gets RESOURCE_EXHAUSTED (Generate and Tokenize hold a
place; ListModels only needs the key). The handler runs with `router.auth.current_tenant` set,
which scopes the request's prefix-cache salt. Health checks and reflection stay open (an
orchestrator probes health without a key). Runs on the server's event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc

from contracts.errors import Overloaded
from router.auth import Guard, Place, Tenant, Unauthenticated, current_tenant
from router.server import status_of

TANDEM_SERVICE_PREFIX = "/tandem.v1.Tandem/"
HOLDING_METHODS = ("Generate", "Tokenize")  # the calls that do work: bounded per tenant


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call to the Tandem service with `guard`."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(TANDEM_SERVICE_PREFIX):
            return handler
        try:
            tenant = self.guard.authenticate(_authorization(handler_call_details))
        except Unauthenticated as e:
            return _refusing(handler, status_of(e), str(e))
        holds = method.removeprefix(TANDEM_SERVICE_PREFIX) in HOLDING_METHODS
        return _as_tenant(handler, self.guard, tenant, holds)


def _authorization(handler_call_details: Any) -> str | None:
    """The `authorization` metadata value of a call, or None."""
    for key, value in handler_call_details.invocation_metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _refusing(handler: Any, code: grpc.StatusCode, details: str) -> Any:
    """`handler` with its behavior replaced by one that ends the call with `code` at once."""
    if handler.response_streaming:

        async def refuse_stream(request: Any, context: Any) -> Any:
            await context.abort(code, details)
            yield  # an async generator, like the handler it stands for

        return handler._replace(unary_stream=refuse_stream)

    async def refuse(request: Any, context: Any) -> Any:
        await context.abort(code, details)

    return handler._replace(unary_unary=refuse)


def _as_tenant(handler: Any, guard: Guard, tenant: Tenant, holds: bool) -> Any:
    """`handler` run with `current_tenant` set to `tenant` (each call runs in its own task), in
    one of its in-flight places if `holds`."""
    if handler.response_streaming:
        behavior = handler.unary_stream

        async def stream(request: Any, context: Any) -> Any:
            current_tenant.set(tenant)
            place = await _acquire(guard, tenant, context) if holds else None
            try:
                # closed with this stream: the servicer tells its workers at once
                async with aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            finally:
                if place is not None:
                    place.release()

        return handler._replace(unary_stream=stream)

    unary = handler.unary_unary

    async def call(request: Any, context: Any) -> Any:
        current_tenant.set(tenant)
        place = await _acquire(guard, tenant, context) if holds else None
        try:
            return await unary(request, context)
        finally:
            if place is not None:
                place.release()

    return handler._replace(unary_unary=call)


async def _acquire(guard: Guard, tenant: Tenant, context: Any) -> Place:
    """One of the tenant's places, or the call ends RESOURCE_EXHAUSTED."""
    try:
        return guard.acquire(tenant)
    except Overloaded as e:
        await context.abort(status_of(e), str(e))
        raise AssertionError("context.abort raises") from e
