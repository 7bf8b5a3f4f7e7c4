"""The OpenAI-compatible HTTP edge (`tandem serve --http-port`), in the router's process and
event loop beside gRPC: POST /v1/completions and /v1/chat/completions (streamed as server-sent
events, or whole), GET /v1/models and /health.

Every generate request goes through the same request path as a gRPC one (router/core.py:
admission, placement, metrics, traces), behind the same gate (router.server.ServingGate: 503
while the pools load and once shutdown begins; drained and cut with the gRPC streams). Bodies
map onto Tandem's request by router/openai_api.py. A request refused before its first output
gets an HTTP error status with OpenAI's error JSON, streamed or not; one that fails after its
stream began gets an `error` event, then the stream ends. A client that disconnects, at any
point, cancels the request: it is aborted on every worker that holds it, as a cancelled gRPC
call is (each request watches its connection for `http.disconnect` while it runs).

Starlette (routing, request and response objects) on uvicorn (HTTP/1.1 over h11), run as a
task on the router's loop, its own signal handling off (`tandem serve` handles signals).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import aclosing, nullcontext, suppress
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contracts.errors import AddressInUse, InvalidRequest, TandemError, WorkerUnavailable
from router.auth import Guard, Place, Tenant, current_tenant
from router.core import Reply, RequestCore
from router.openai_api import CHAT, COMPLETION, OpenAIRequest, error_body, model_card, models_body
from router.tls import TlsConfig

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_BODY_BYTES = 32 << 20  # a longer body is refused (413) before it is parsed
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies: pass events on at once
]


def openai_app(gate: Any, guard: Guard | None = None) -> Starlette:
    """The ASGI application of the HTTP edge over `gate` (a router.server.ServingGate); with
    `guard` (router.auth), every /v1 call needs an API key (`Authorization: Bearer ...`), and
    generate calls hold one of their tenant's in-flight places. /health stays open."""
    started = int(time.time())

    async def health(request: Request) -> Response:
        try:
            core = gate.ready()
        except WorkerUnavailable as e:
            return JSONResponse({"status": "unavailable", "reason": str(e)}, status_code=503)
        return JSONResponse({"status": "ok", "model": core.model.model_id})

    async def models(request: Request) -> Response:
        try:
            _authenticate(guard, request)
            core = gate.ready()
        except TandemError as e:
            return _error_response(e)
        return JSONResponse(models_body(core.model, started))

    async def model(request: Request) -> Response:
        try:
            _authenticate(guard, request)
            core = gate.ready()
        except TandemError as e:
            return _error_response(e)
        name = request.path_params["model"]
        if name != core.model.model_id:
            from contracts.errors import ModelNotFound

            return _error_response(ModelNotFound(name, [core.model.model_id]))
        return JSONResponse(model_card(core.model, started))

    return Starlette(
        routes=[
            Route("/v1/completions", _Generation(gate, COMPLETION, guard), methods=["POST"]),
            Route("/v1/chat/completions", _Generation(gate, CHAT, guard), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={404: _not_found, 405: _not_allowed},
    )


async def _not_found(request: Request, exc: Exception) -> Response:
    """An unknown route, answered in OpenAI's error JSON (as every other refusal)."""
    return _error_response(InvalidRequest("path", f"no route {request.url.path}"), 404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return _error_response(
        InvalidRequest("method", f"{request.method} is not allowed on {request.url.path}"), 405
    )


def _authenticate(guard: Guard | None, request: Request) -> Tenant | None:
    """The caller's tenant by its `Authorization` header (None when keys are off); raises
    router.auth.Unauthenticated (401), counted by the guard, before any work is done."""
    if guard is None:
        return None
    return guard.authenticate(request.headers.get("authorization"))


def _error_response(error: BaseException, http_status: int | None = None) -> JSONResponse:
    status, body = error_body(error, http_status)
    return JSONResponse(body, status_code=status)


class _Generation:
    """POST /v1/completions or /v1/chat/completions, as a plain ASGI app: it needs the raw
    `receive` to watch for the client going away while the request runs."""

    def __init__(self, gate: Any, kind: str, guard: Guard | None = None) -> None:
        self.gate = gate
        self.kind = kind
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        place: Place | None = None
        try:
            try:
                # the caller first (401 before the body is read), then one of its tenant's
                # in-flight places (429), as router.interceptor does for gRPC
                tenant = _authenticate(self.guard, request)
                if tenant is not None and self.guard is not None:
                    place = self.guard.acquire(tenant)
                    current_tenant.set(tenant)  # scopes the prefix-cache salt (router.core)
                body = await _read_body(request)
                core = self.gate.ready()
            except _TooLarge as e:
                await _error_response(e.error, 413)(scope, receive, send)
                return
            except TandemError as e:
                await _error_response(e)(scope, receive, send)
                return
            await self._serve(core, OpenAIRequest(self.kind, body), request, receive, send)
        finally:
            if place is not None:
                place.release()

    async def _serve(
        self, core: RequestCore, call: OpenAIRequest, request: Request, receive: Receive,
        send: Send,
    ) -> None:  # fmt: skip
        """Run the request until it ends or its client goes away (then cancel it)."""
        responder = _Responder(send)
        with self.gate.tracked():
            work = asyncio.ensure_future(
                self._respond(core, call, dict(request.headers), responder)
            )
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the gate cut the request (shutdown)
                await _cancel(work)
                gone.cancel()
                reason = self.gate.cut_reason
                if reason is None:
                    raise
                await responder.fail(WorkerUnavailable(reason))
                return
            if not work.done():  # the client went away: cancel the request on its workers
                logger.debug("HTTP client of %s disconnected; cancelling it", call.request_id)
                await _cancel(work)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            if work.done() and not work.cancelled() and work.exception() is not None:
                raise work.exception()  # type: ignore[misc]

    async def _respond(
        self, core: RequestCore, call: OpenAIRequest, headers: dict[str, str],
        responder: _Responder,
    ) -> None:  # fmt: skip
        replies = core.generate(call, headers, edge="http")
        try:
            async with aclosing(replies) as stream:
                # the body is parsed as the request path starts: `call.stream` is known after
                # the first reply (or the error, sent with its status: no header is out yet)
                first = await anext(stream, None)
                if first is None:
                    raise WorkerUnavailable("the request ended without any output")
                if call.stream:
                    await self._stream(core, call, first, stream, responder)
                else:
                    collected = [first] + [reply async for reply in stream]
                    await responder.json(200, call.response(core.model, collected))
        except TandemError as e:  # refused, or failed: before or during the stream
            await responder.fail(e)
        except OSError as e:  # a server that raises on a write to a closed connection
            logger.debug("HTTP client of %s went away: %r", call.request_id, e)

    async def _stream(
        self, core: RequestCore, call: OpenAIRequest, first: Reply, stream: Any,
        responder: _Responder,
    ) -> None:  # fmt: skip
        await responder.event(call.chunk(core.model, first, first=True))
        last = first
        async for reply in stream:
            await responder.event(call.chunk(core.model, reply, first=False))
            last = reply
        if call.include_usage:
            await responder.event(call.usage_chunk(core.model, last))
        await responder.done()


class _Responder:
    """Writes one response: a JSON body, or server-sent events (headers with the first);
    `fail` reports an error whichever it is in."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.streaming = False
        self.finished = False

    async def json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(data)).encode())]  # fmt: skip
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": data})
        self.finished = True

    async def event(self, body: dict[str, Any]) -> None:
        if not self.streaming:
            await self.send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            self.streaming = True
        data = b"data: " + json.dumps(body).encode() + b"\n\n"
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def done(self) -> None:
        if not self.streaming:  # nothing was streamed (cannot happen: a request has outputs)
            await self.event({"choices": []})
        await self.send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        self.finished = True

    async def fail(self, error: BaseException) -> None:
        if self.finished:
            return
        status, body = error_body(error)
        if not self.streaming:
            await self.json(status, body)
            return
        data = b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
        await self.send({"type": "http.response.body", "body": data})
        self.finished = True


class _TooLarge(Exception):
    def __init__(self, error: InvalidRequest) -> None:
        self.error = error


async def _read_body(request: Request) -> bytes:
    """The request body, refused (413) past MAX_BODY_BYTES before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _TooLarge(InvalidRequest("body", f"is {declared} bytes, limit {MAX_BODY_BYTES}"))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _TooLarge(InvalidRequest("body", f"is over {MAX_BODY_BYTES} bytes"))
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (or the response is complete)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it to end (its request aborted on the workers)."""
    task.cancel()
    with suppress(asyncio.CancelledError, Exception):
        await task


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the router's process handles SIGINT/SIGTERM."""

    def capture_signals(self) -> Any:
        return nullcontext()

    def install_signal_handlers(self) -> None:  # uvicorn releases before capture_signals
        pass


class HttpServer:
    """The HTTP edge listening on a bound socket, served as a task on the running loop."""

    def __init__(self, server: _Server, sock: socket.socket, task: asyncio.Task[None]) -> None:
        self._server = server
        self._socket = sock
        self._task = task
        self.port: int = sock.getsockname()[1]

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop listening; connections still open get `grace_s`, then are closed."""
        self._server.config.timeout_graceful_shutdown = math.ceil(grace_s)
        self._server.should_exit = True
        with suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(self._task), grace_s + 5.0)
        if not self._task.done():
            self._server.force_exit = True
            self._task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._task
        self._socket.close()


async def start_http_server(
    host: str, port: int, gate: Any, guard: Guard | None = None, tls: TlsConfig | None = None
) -> HttpServer:
    """Serve the OpenAI-compatible API of `gate` on host:port (0: any free port) from the
    running event loop, with `guard`'s API keys (router.auth) and over `tls` (router.tls: the
    gRPC edge's certificates) when given. AddressInUse if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise AddressInUse(
                f"{host}:{port} is already in use by another process; choose another "
                "--http-port (0: any free one)"
            ) from None
        raise OSError(f"cannot listen on {host}:{port} (--http-port): {e.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    secure = tls.uvicorn_kwargs() if tls is not None and tls.is_enabled else {}
    config = uvicorn.Config(
        openai_app(gate, guard), lifespan="off", log_level="warning", access_log=False,
        http="h11", ws="none", timeout_keep_alive=30, **secure,
    )  # fmt: skip
    server = _Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn sets it once it accepts connections
        if task.done():
            task.result()  # raises why it could not start
            raise OSError(f"the HTTP server on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    return HttpServer(server, sock, task)
