"""The gRPC edge (grpc.aio) in front of the worker pools: Generate, Tokenize, ListModels.

Generate hands each request to the transport-neutral request path (router/core.py, the same one
the HTTP edge calls): sizes, admission, validation and tokenizing off the event loop, placement,
streams, retries, metrics, traces. Here: the GenerateRequest behind core's `Incoming`, each
`Reply` as a GenerateResponse, each error as a status code (`status_of`), never a hang; a
cancelled call or one past its deadline is aborted on every worker that holds it. The gate
(`ServingGate`) answers UNAVAILABLE while the pools load and drains on shutdown, for both edges.
Neither Ray nor torch is imported here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import aclosing, contextmanager, suppress
from typing import Any

import grpc

from contracts.errors import (
    AddressInUse,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    TandemError,
    WorkerUnavailable,
)
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from router.core import Reply, RequestCore, status_of_error
from router.requests import (
    ServedModel,
    ValidatedRequest,
    check_sizes,
    prompt_token_ids,
    validate_generate_request,
)
from router.tls import TlsConfig

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def status_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status of a Tandem error (router.core.status_of_error)."""
    return grpc.StatusCode[status_of_error(error).name]


class _GrpcIncoming:
    """A GenerateRequest as router.core's Incoming."""

    def __init__(self, request: Any) -> None:
        self.request = request

    @property
    def request_bytes(self) -> int:
        return int(self.request.ByteSize())

    def check_sizes(self, model: ServedModel) -> None:
        check_sizes(self.request, model)

    def validate(self, model: ServedModel) -> ValidatedRequest:
        return validate_generate_request(self.request, model)


class TandemServicer(RequestCore, tandem_pb2_grpc.TandemServicer):
    """The Tandem gRPC service: router.core's RequestCore (over a decode pool and, when
    disaggregated, a prefill pool) with the gRPC methods on it."""

    async def Generate(self, request: Any, context: Any) -> Any:
        # the caller was authenticated by router.interceptor (when keys are on), which set
        # router.auth.current_tenant for this call
        metadata = dict(context.invocation_metadata() or ())
        try:
            replies = self.generate(
                _GrpcIncoming(request), metadata, time_remaining=context.time_remaining
            )
            # closed here, not whenever it is collected: its workers are told at once
            async with aclosing(replies) as stream:
                async for reply in stream:
                    yield _response(reply)
        except TandemError as e:  # refused, invalid, lost or failed (counted by the core)
            await context.abort(status_of(e), str(e))

    async def Tokenize(self, request: Any, context: Any) -> Any:
        """Admitted like a Generate (by count and size), tokenized off the event loop."""
        try:
            check_sizes(request, self.model)
            if request.model and request.model != self.model.model_id:
                raise ModelNotFound(request.model, [self.model.model_id])
            with self.admission.admit(request_bytes=request.ByteSize()):
                ids = await self._off_loop(prompt_token_ids, request)
        except (InvalidRequest, Overloaded) as e:
            await context.abort(status_of(e), str(e))
        return pb.TokenizeResponse(token_ids=ids)

    async def ListModels(self, request: Any, context: Any) -> Any:
        tokenizer = self.model.tokenizer
        info = pb.ModelInfo(
            id=self.model.model_id,
            max_model_len=self.model.max_model_len,
            vocab_size=self.model.vocab_size,
            has_chat_template=bool(tokenizer is not None and tokenizer.has_chat_template),
        )
        return pb.ListModelsResponse(models=[info])


def _response(reply: Reply) -> Any:
    """A Reply as a GenerateResponse."""
    output = reply.output
    response = pb.GenerateResponse(
        request_id=reply.request_id, token_ids=output.new_token_ids, text=output.text_delta
    )
    for lp in output.logprobs:
        response.logprobs.add(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
        )
    if reply.queue_s is not None:
        response.timing.queue_seconds = reply.queue_s
    if reply.ttft_s is not None:
        response.timing.ttft_seconds = reply.ttft_s
    if reply.total_s is not None:
        response.timing.total_seconds = reply.total_s
    if output.finished:
        assert output.finish_reason is not None
        response.finish_reason = _FINISH_REASONS[output.finish_reason.value]
        usage = output.usage
        response.usage.prompt_tokens = usage.prompt_tokens
        response.usage.cached_tokens = usage.cached_tokens
        response.usage.completion_tokens = usage.completion_tokens
    return response


class _Malformed:
    """A request message that did not parse (bad protobuf, a string that is not UTF-8)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parser(message_type: Any) -> Any:
    """A request deserializer that hands a message that does not parse to the handler as
    _Malformed (refused with INVALID_ARGUMENT), instead of letting grpc answer UNKNOWN."""
    from google.protobuf.message import DecodeError

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return _Malformed(f"{message_type.DESCRIPTOR.name} does not parse: {e}"[:256])

    return parse


def add_tandem_service(gate: Any, server: Any) -> None:
    """Register the Tandem API (the generated add_TandemServicer_to_server, with _parser as
    the request deserializers)."""
    methods = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            gate.Generate, _parser(pb.GenerateRequest), pb.GenerateResponse.SerializeToString
        ),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            gate.Tokenize, _parser(pb.TokenizeRequest), pb.TokenizeResponse.SerializeToString
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            gate.ListModels,
            _parser(pb.ListModelsRequest),
            pb.ListModelsResponse.SerializeToString,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["Tandem"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, methods),))
    server.add_registered_method_handlers(name, methods)


async def _refuse_malformed(request: Any, context: Any) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)


class ServingGate(tandem_pb2_grpc.TandemServicer):
    """What the server exposes: UNAVAILABLE while the worker pools load, then the
    TandemServicer (`open(servicer)`). Lets the port, health checks and reflection answer from
    the start, so an orchestrator sees NOT_SERVING rather than a refused connection.

    On shutdown it drains: `close()` refuses new calls (UNAVAILABLE) while the streams in flight
    go on; `wait_idle()` waits for them; `cut()` ends those still open with UNAVAILABLE and the
    reason, aborting their work on the workers. All on the server's event loop."""

    def __init__(self) -> None:
        self.servicer: TandemServicer | None = None
        self._closed_reason: str | None = None
        self._cut_reason: str | None = None
        self._streams: set[asyncio.Task[Any]] = set()  # the handler task of each open stream
        self._idle = asyncio.Event()
        self._idle.set()

    def open(self, servicer: TandemServicer) -> None:
        self.servicer = servicer

    @property
    def num_streams(self) -> int:
        """Generate streams in flight."""
        return len(self._streams)

    def close(self, reason: str) -> None:
        """Refuse every new call from now on with UNAVAILABLE and `reason`."""
        self._closed_reason = reason

    async def wait_idle(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the streams in flight to end; how many are still open."""
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return len(self._streams)

    def cut(self, reason: str) -> None:
        """End every open stream now with UNAVAILABLE and `reason` (its workers abort it)."""
        self._cut_reason = reason
        for task in list(self._streams):
            task.cancel()

    @property
    def cut_reason(self) -> str | None:
        """Why the open streams were cut (`cut`), or None."""
        return self._cut_reason

    def ready(self) -> TandemServicer:
        """The request path, for an edge about to serve a request; WorkerUnavailable (with
        the reason) while the pools load or once shutdown began."""
        if self._closed_reason is not None:
            raise WorkerUnavailable(self._closed_reason)
        if self.servicer is None:
            raise WorkerUnavailable("starting: worker pools not ready")
        return self.servicer

    @contextmanager
    def tracked(self) -> Iterator[None]:
        """Count the current task as an open stream while the block runs (any edge's): drain
        waits for it, `cut` cancels it."""
        task = asyncio.current_task()
        assert task is not None, "every edge serves a call in a task"
        self._streams.add(task)
        self._idle.clear()
        try:
            yield
        finally:
            self._streams.discard(task)
            if not self._streams:
                self._idle.set()

    async def Generate(self, request: Any, context: Any) -> Any:
        await _refuse_malformed(request, context)
        servicer = await self._ready(context)
        with self.tracked():
            try:
                # closed with this stream: grpc stops iterating, and the workers must hear it
                async with aclosing(servicer.Generate(request, context)) as responses:
                    async for response in responses:
                        yield response
            except asyncio.CancelledError:
                if self._cut_reason is None:
                    raise  # the client went away or grpc is stopping: nobody to answer
                await context.abort(grpc.StatusCode.UNAVAILABLE, self._cut_reason)

    async def Tokenize(self, request: Any, context: Any) -> Any:
        await _refuse_malformed(request, context)
        return await (await self._ready(context)).Tokenize(request, context)

    async def ListModels(self, request: Any, context: Any) -> Any:
        await _refuse_malformed(request, context)
        return await (await self._ready(context)).ListModels(request, context)

    async def _ready(self, context: Any) -> TandemServicer:
        try:
            return self.ready()
        except WorkerUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            raise  # context.abort raises; this is for the type checker


HEALTH_OVERALL = ""  # grpc.health.v1 convention: the whole server
POOL_HEALTH_NAMES = {"prefill": "tandem.pool.prefill", "decode": "tandem.pool.decode"}


async def start_server(
    host: str,
    port: int,
    tls: TlsConfig | None = None,
    interceptors: Sequence[Any] = (),
    admin: Any = None,
) -> tuple[Any, int, ServingGate, Any]:
    """Start serving on host:port (0: any free port) with the Tandem API behind a gate, the
    standard health service (everything NOT_SERVING until set) and server reflection; over TLS
    when `tls` is enabled (router.tls); `interceptors` (grpc.aio) see every call first
    (router.interceptor: API keys); `admin` (router.admin.AdminServicer), when given, serves
    tandem.v1.Admin beside it. Returns (server, port bound, gate, health servicer)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    if port:  # refused here with a clear error, before grpc's core logs its own
        error = _bind_error(host, port)
        if isinstance(error, AddressInUse):
            raise error
    # No SO_REUSEPORT: a second server on a busy port must fail, not share its traffic.
    credentials = tls.grpc_credentials() if tls is not None and tls.is_enabled else None
    server = grpc.aio.server(interceptors=list(interceptors), options=[("grpc.so_reuseport", 0)])
    gate = ServingGate()
    add_tandem_service(gate, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    tandem_name = pb.DESCRIPTOR.services_by_name["Tandem"].full_name
    if admin is not None:
        from router.admin import add_admin_service

        add_admin_service(admin, server)
    for name in (HEALTH_OVERALL, tandem_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [tandem_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )  # fmt: skip
    try:
        address = f"{host}:{port}"
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc >= 1.5x raises where older releases returned 0
        bound = 0
    if bound == 0:
        raise _bind_error(host, port) or OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return server, bound, gate, health_servicer


def _bind_error(host: str, port: int) -> Exception | None:
    """Why listening on host:port fails, found by binding a plain socket there (no
    SO_REUSEPORT); None if it would not."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # as grpc binds: connections of an earlier server in TIME_WAIT do not block it
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return AddressInUse(
                f"{host}:{port} is already in use by another process (another `tandem serve`?); "
                "choose another --port (0: any free one)"
            )
        return OSError(f"cannot listen on {host}:{port}: {e.strerror}")
    return None


async def set_serving(health_servicer: Any, pools: list[str], serving: bool) -> None:
    """Report the server, the API and each named pool as SERVING or NOT_SERVING."""
    from grpc_health.v1 import health_pb2

    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    names = [HEALTH_OVERALL, pb.DESCRIPTOR.services_by_name["Tandem"].full_name]
    for name in names + [POOL_HEALTH_NAMES[pool] for pool in pools]:
        await health_servicer.set(name, status)
