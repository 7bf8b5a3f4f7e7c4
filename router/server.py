"""The gRPC server (grpc.aio) in front of the worker pools: Generate, Tokenize, ListModels.

Generate checks sizes, admits, validates and tokenizes (off the event loop), places, then
streams: colocated, one worker prefills and decodes; disaggregated, a decode worker is chosen,
a prefill worker prefills and ships the KV to it, and the decode worker streams on. Each
attempt on a worker gets an id of the router's own (the client's id is only echoed back);
a cancelled or expired request is aborted on every worker that holds it; a stream whose decode
worker is lost resumes on another by replay (router.failover). Errors reach the client as
status codes (`status_of`), never as a hang. Workers are `WorkerClient`s in pools
the control plane keeps (`PoolView`); neither Ray nor torch is imported here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager, suppress
from typing import Any

import grpc

from contracts.block_hash import prompt_block_hashes
from contracts.errors import (
    AddressInUse,
    DuplicateRequest,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RequestAborted,
    TandemError,
    WorkerLost,
    WorkerUnavailable,
)
from contracts.handoff import PrefillResult
from prefix_cache.index import PrefixLookup
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from router.admission import Admission
from router.disagg import LOCAL, DecodeState, DisaggPolicy
from router.failover import FailoverConfig, with_failover
from router.outputs import OutputStreams
from router.placement import Member, Placement, PoolView, assigned
from router.requests import (
    ServedModel,
    check_sizes,
    prompt_token_ids,
    validate_generate_request,
)
from router.workers import WorkerClient
from telemetry.metrics import ServiceMetrics
from telemetry.tracing import child_carrier, end_span, record_span, start_span

logger = logging.getLogger(__name__)

# How a request's stream stops early: its task is cancelled (the client cancelled, or its
# deadline passed) while it awaits a worker, or grpc closes the stream (GeneratorExit at a
# `yield`) when that happens while a response is being written. Either way the workers must
# be told to abort, or the request runs on to its last token.
_STOPPED = (asyncio.CancelledError, GeneratorExit)

TOKENIZER_THREADS = 2  # prompts tokenized at once, off the event loop
# A client whose deadline passes cancels the call a little before the server's copy of the
# deadline (which started when the request arrived) runs out: a stop with less than this left
# is counted as DEADLINE_EXCEEDED, not CANCELLED.
DEADLINE_SLACK_S = 1.0

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def status_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status of a Tandem error."""
    if isinstance(error, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, DuplicateRequest):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, WorkerUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, RequestAborted):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class TandemServicer(tandem_pb2_grpc.TandemServicer):
    """The Tandem gRPC service over a decode pool (and, when disaggregated, a prefill pool)."""

    def __init__(
        self,
        model: ServedModel,
        decode: PoolView,
        prefill: PoolView | None = None,
        admission: Admission | None = None,
        prefix_index: PrefixLookup | None = None,
        metrics: ServiceMetrics | None = None,
        cache_weight: float = 1.0,
        disagg: DisaggPolicy | None = None,
        failover: FailoverConfig | None = None,
    ) -> None:
        """decode: the decode workers (colocated mode: without `prefill`, they prefill too);
        prefix_index: where the prefilling workers publish their cached blocks, under their
        members' index keys; cache_weight: see router.placement; disagg: where a
        disaggregated request is prefilled (router.disagg; default: always remote);
        failover: how streams whose decode worker is lost resume elsewhere (router.failover)."""
        self.model = model
        self.decode = decode
        self.prefill = prefill
        self.admission = admission or Admission()
        if self.admission.kv_capacity_tokens is None:
            self.admission.kv_capacity_tokens = self._decode_kv_tokens
        self.prefix_index = prefix_index
        self.disagg = disagg or DisaggPolicy()
        self.failover = failover or FailoverConfig()
        self.placement = {
            pool.name: Placement(prefill=pool is prefill, cache_weight=cache_weight)
            for pool in (decode, prefill)
            if pool is not None
        }
        self.num_retried = 0  # requests moved to another worker after losing theirs
        self.num_migrated = 0  # streams resumed on another decode worker (router.failover)
        self.metrics = metrics
        self.outputs = OutputStreams()  # one batched output stream per worker
        self._live_ids: set[str] = set()  # client request ids in flight
        self._tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self._recent: dict[str, deque[tuple[float, float]]] = {
            "ttft": deque(maxlen=4096),  # (when, seconds): for autoscaling signals
            "itl": deque(maxlen=16384),
        }

    def recent_latencies(self, window_s: float = 30.0) -> dict[str, list[float]]:
        """TTFTs and inter-token gaps of the requests that finished in the last `window_s`."""
        cutoff = time.monotonic() - window_s
        return {
            name: [value for when, value in values if when >= cutoff]
            for name, values in self._recent.items()
        }

    def _decode_kv_tokens(self) -> int:
        """The decode pool's KV capacity in tokens, as its workers last reported (0: none
        has): the prompts of the requests in flight must fit it (router.admission)."""
        blocks = sum(member.load.num_blocks for member in self.decode.members())
        return blocks * self.model.block_size

    @property
    def _prefilling(self) -> PoolView:
        """The pool whose workers prefill: the prefill pool, or the colocated workers."""
        return self.decode if self.prefill is None else self.prefill

    async def _cached_tokens(self, request: Any) -> dict[Member, int] | None:
        """How many of the prompt's tokens each prefilling worker holds in its prefix cache,
        by the index; None if there is no index or it cannot answer in time."""
        members = [m for m in self._prefilling.members() if m.index_key is not None]
        if self.prefix_index is None or not members:
            return None
        size = self.model.block_size
        hashes = prompt_block_hashes(
            request.prompt_token_ids, size, self.model.model_id, request.cache_salt
        )
        keys = [m.index_key for m in members if m.index_key is not None]
        counts = await self.prefix_index.lookup(hashes, keys)
        if counts is None:
            return None
        last = len(request.prompt_token_ids) - 1  # the last prompt token is always computed
        return {m: min(count * size, last) for m, count in zip(members, counts, strict=True)}

    async def Generate(self, request: Any, context: Any) -> Any:
        arrival, arrival_wall = time.monotonic(), time.time()
        seen = _Seen(arrival)
        # One trace per request; a client's traceparent (gRPC metadata) becomes its parent.
        span = start_span("tandem.Generate", dict(context.invocation_metadata() or ()))
        code = grpc.StatusCode.OK
        error: BaseException | None = None
        try:
            check_sizes(request, self.model)  # cheap: before it is admitted or tokenized
            with self.admission.admit(request_bytes=request.ByteSize()) as ticket:
                try:
                    validated = await self._off_loop(validate_generate_request, request)
                finally:
                    record_span("validate", arrival_wall, time.time(), span)
                span.set_attributes({"tandem.request_id": validated.request_id,
                                     "tandem.model": self.model.model_id})  # fmt: skip
                carrier = child_carrier(span)
                ticket.add_prompt_tokens(len(validated.prompt_token_ids))
                with self._live(validated.request_id):
                    place = self._colocated if self.prefill is None else self._disaggregated

                    def attempt(resumed: tuple[int, ...]) -> Any:
                        again = dataclasses.replace(validated, resumed_token_ids=resumed)
                        return place(again, arrival, carrier, span)

                    streams = with_failover(attempt, self.failover, self.decode, span,
                                            self._migrated)  # fmt: skip
                    # closed here, not whenever it is collected: its workers are told at once
                    async with aclosing(streams) as responses:
                        async for response in responses:
                            seen.response(response)
                            yield response
        except TandemError as e:  # refused, invalid, lost or failed
            code, error = status_of(e), e
            if isinstance(e, Overloaded) and self.metrics is not None:
                self.metrics.admission_rejections.inc()
            await context.abort(code, str(e))
        except _STOPPED as e:  # the client cancelled, or its deadline passed
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= DEADLINE_SLACK_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            error = e
            raise
        finally:
            usage = seen.usage
            finished = time.monotonic()
            if seen.ttft is not None:
                self._recent["ttft"].append((finished, seen.ttft))
            self._recent["itl"].extend((finished, gap) for gap in seen.gaps)
            if self.metrics is not None:
                self.metrics.record_finished(code.name, usage, time.monotonic() - arrival,
                                             seen.ttft, seen.queue, seen.gaps)  # fmt: skip
            attributes = {} if usage is None else {
                "tandem.prompt_tokens": usage.prompt_tokens,
                "tandem.cached_tokens": usage.cached_tokens,
                "tandem.completion_tokens": usage.completion_tokens,
            }  # fmt: skip
            end_span(span, error if code is not grpc.StatusCode.OK else None,
                     **{"rpc.grpc.status_code": code.value[0], **attributes})  # fmt: skip

    @contextmanager
    def _live(self, request_id: str) -> Iterator[None]:
        """Hold a client's request id while its request runs; DuplicateRequest if it is held
        already (the client reused it for a request still in flight)."""
        if request_id in self._live_ids:
            raise DuplicateRequest(f"request_id {request_id!r} is already in flight")
        self._live_ids.add(request_id)
        try:
            yield
        finally:
            self._live_ids.discard(request_id)

    async def _colocated(self, request: Any, arrival: float, carrier: Any, span: Any) -> Any:
        """Prefill and decode on one worker; a worker lost before any output is retried on
        another."""
        cached = await self._cached_tokens(request)
        async with aclosing(self._generate(request, arrival, carrier, span, cached)) as stream:
            async for response in stream:
                yield response

    async def _generate(
        self, request: Any, arrival: float, carrier: Any, span: Any,
        cached: dict[Member, int] | None, member: Member | None = None,
    ) -> Any:  # fmt: skip
        """Prefill and decode on one decode-pool worker (`member`, or the one placement picks);
        a worker lost before any output is retried on another of the pool."""
        tried: set[Member] = set()
        lost: WorkerLost | None = None
        while True:
            if member is None:
                try:
                    member = self._place(self.decode, tried, cached, span)
                except WorkerUnavailable:
                    if lost is None:
                        raise
                    raise lost from None  # none left now: router.failover waits for one
                self._count_retry(tried)
            tried.add(member)
            dispatched = time.monotonic()
            first, finished = True, False
            attempt = _attempt_id(request.request_id, span)
            with assigned(member, _uncached(request, cached, member)) as worker:
                outputs = self.outputs.open(worker, attempt)
                try:
                    await worker.start_generate(
                        self.outputs.subscriber, attempt, request.prompt_token_ids,
                        request.params, request.cache_salt, carrier, request.resumed_token_ids,
                    )  # fmt: skip
                    gaps = _Gaps(member)
                    async for output in _until_finished(outputs):
                        queued = _queued(output, arrival, dispatched) if first else None
                        finished = output.finished  # over on the worker: nothing to abort
                        gaps.output()
                        yield _timed(request.request_id, output, arrival, queued)
                        first = False
                    return
                except _STOPPED:
                    if not finished:
                        worker.abort(attempt)
                    raise
                except WorkerLost as e:
                    self.decode.mark_down(member)
                    _abandon(worker, attempt, e)
                    if not first:  # the client has seen tokens: resumed by router.failover
                        raise
                    self._retrying("worker", member, e)
                    member, lost = None, e
                finally:
                    self.outputs.close(worker, attempt)

    def _decide(self, request: Any, member: Member, span: Any) -> str:
        """Where this request is prefilled (router.disagg): `remote` or `local` on decode
        worker `member`; the decision and its reason go to the span and the metric. The decode
        worker's own prefix cache is not in the index yet: its cached tokens count as 0."""
        queues = [m.load.queued_tokens for m in self._prefilling.members() if m.placeable]
        load = member.load
        path, reason = self.disagg.decide(
            request.num_tokens,
            min(queues) if queues else None,
            DecodeState(load.decode_load, load.in_flight, load.recent_itl_s),
        )
        span.set_attributes({"tandem.prefill_path": path, "tandem.prefill_reason": reason})
        if self.metrics is not None:
            self.metrics.prefill_placement.labels(path=path, reason=reason).inc()
        return path

    async def _disaggregated(self, request: Any, arrival: float, carrier: Any, span: Any) -> Any:
        """Prefill on one pool, decode on the other; the KV moves between them. The prefill's
        PrefillResult (contracts.handoff) goes to the decode worker, which streams every
        output, the first token's included: it owns the request's text. Or, as the policy
        decides (router.disagg), the chosen decode worker prefills the request itself."""
        member = self._place(self.decode, set(), None, span)
        if self._decide(request, member, span) == LOCAL:
            local = self._generate(request, arrival, carrier, span, None, member)
            async with aclosing(local) as stream:
                async for response in stream:
                    yield response
            return
        # A first token that surely ends the request needs no KV at the decode worker.
        ship_to = None if _first_token_ends(request, self.model) else member.worker_id
        with assigned(member, request.num_tokens) as decode:
            attempts: list[str] = []  # the prefill attempts' ids, the one that shipped last
            try:
                result, dispatched = await self._prefill(request, ship_to, carrier, span, attempts)
            except _STOPPED:  # its KV may be on the way: the decode worker drops it
                if ship_to is not None and attempts:
                    decode.abort(attempts[-1])
                raise
            first, finished = True, False
            attempt = attempts[-1]  # the decode worker continues the prefill's attempt
            outputs = self.outputs.open(decode, attempt)
            try:
                await decode.start_continue(
                    self.outputs.subscriber, attempt, request.prompt_token_ids, result,
                    request.params, request.cache_salt, carrier, request.resumed_token_ids,
                )  # fmt: skip
                gaps = _Gaps(member)
                async for output in _until_finished(outputs):
                    queued = _queued(result, arrival, dispatched) if first else None
                    finished = output.finished
                    gaps.output()
                    yield _timed(request.request_id, output, arrival, queued)
                    first = False
            except _STOPPED:
                if not finished:
                    decode.abort(attempt)
                raise
            except WorkerLost as e:  # resumed elsewhere by router.failover
                self.decode.mark_down(member)
                _abandon(decode, attempt, e)
                raise
            finally:
                self.outputs.close(decode, attempt)

    async def _prefill(
        self, request: Any, ship_to: str | None, carrier: Any, span: Any, attempts: list[str]
    ) -> tuple[PrefillResult, float]:
        """(the PrefillResult, its KV shipped to decode worker `ship_to` if not None; when the
        prefill was dispatched). A prefill worker lost mid-prefill is replaced by another for
        the same request: nothing has reached the client yet. Each attempt's id is appended
        to `attempts` as it starts."""
        assert self.prefill is not None
        tried: set[Member] = set()
        cached = await self._cached_tokens(request)
        while True:
            member = self._place(self.prefill, tried, cached, span)
            self._count_retry(tried)
            tried.add(member)
            dispatched = time.monotonic()
            attempt = _attempt_id(request.request_id, span)
            attempts.append(attempt)
            with assigned(member, _uncached(request, cached, member)) as worker:
                try:
                    result = await worker.prefill(
                        attempt, request.prompt_token_ids, request.params, request.cache_salt,
                        ship_to, carrier, request.resumed_token_ids,
                    )  # fmt: skip
                    return result, dispatched
                except WorkerLost as e:
                    self.prefill.mark_down(member)
                    _abandon(worker, attempt, e)
                    self._retrying("prefill worker", member, e)

    def _place(
        self, pool: PoolView, tried: set[Member], cached: dict[Member, int] | None, span: Any
    ) -> Member:
        """Pick a member of `pool` (see Placement.pick), noting the choice in the request's
        span."""
        started = time.time()
        members = pool.members()
        counts = None if cached is None else [cached.get(m, 0) for m in members]
        index = self.placement[pool.name].pick(pool.name, members, tried, counts)
        member = members[index]
        attributes: dict[str, Any] = {f"tandem.{pool.name}_worker": index}
        if cached is not None:
            attributes["tandem.placement_cached_tokens"] = cached.get(member, 0)
        span.set_attributes(attributes)
        record_span("place", started, time.time(), span, **attributes)
        return member

    def _retrying(self, what: str, member: Member, error: BaseException) -> None:
        logger.warning("%s %s lost before any output; retrying if another is left: %s",
                       what, member.worker_id, error)  # fmt: skip

    def _migrated(self, reason: str) -> None:
        """A stream resumed on another decode worker after losing its own (router.failover)."""
        self.num_migrated += 1
        if self.metrics is not None:
            self.metrics.migrations.labels(reason=reason).inc()

    def _count_retry(self, tried: set[Member]) -> None:
        """A request placed again after losing a worker (`tried` holds the lost ones): counted
        as retried only now that there was somewhere to retry it."""
        if tried:
            self.num_retried += 1
            if self.metrics is not None:
                self.metrics.retried.inc()

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

    async def _off_loop(self, check: Any, request: Any) -> Any:
        """`check(request, model)` on the tokenizer threads: the event loop keeps serving."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, check, request, self.model)

    async def ListModels(self, request: Any, context: Any) -> Any:
        tokenizer = self.model.tokenizer
        info = pb.ModelInfo(
            id=self.model.model_id,
            max_model_len=self.model.max_model_len,
            vocab_size=self.model.vocab_size,
            has_chat_template=bool(tokenizer is not None and tokenizer.has_chat_template),
        )
        return pb.ListModelsResponse(models=[info])


def _attempt_id(request_id: str, span: Any) -> str:
    """A new id for one attempt of a request (one worker it is placed on): unique, unrelated
    to the client's id, which only the router and the client see. Logged and traced with it."""
    attempt = uuid.uuid4().hex
    logger.debug("request %r: attempt %s", request_id, attempt)
    span.set_attributes({"tandem.attempt_id": attempt})
    return attempt


async def _until_finished(outputs: asyncio.Queue[Any]) -> Any:
    """A request's outputs from its OutputStreams queue, up to the finished one; raises the
    exception that ended it instead, if one did."""
    while True:
        item = await outputs.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finished:
            return


def _abandon(worker: WorkerClient, request_id: str, error: WorkerLost) -> None:
    """A worker lost mid-request: if it was only unreachable (it may come back, and would run
    the request on to its end), tell it to abort; a dead one has nothing left to stop."""
    if error.unreachable:
        worker.abort(request_id)


class _Gaps:
    """Feeds the gaps between a request's outputs to its worker's recent ITL (router.disagg
    reads it)."""

    def __init__(self, member: Member) -> None:
        self.load = member.load
        self.last: float | None = None

    def output(self) -> None:
        now = time.monotonic()
        if self.last is not None:
            self.load.observe_itl(now - self.last)
        self.last = now


class _Seen:
    """What the client has been sent of one request: for its latency metrics."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.last = arrival
        self.ttft: float | None = None
        self.queue: float | None = None
        self.gaps: list[float] = []  # between consecutive messages after the first
        self.usage: Any = None

    def response(self, response: Any) -> None:
        now = time.monotonic()
        if self.ttft is None:
            self.ttft = now - self.arrival
            self.queue = response.timing.queue_seconds
        else:
            self.gaps.append(now - self.last)
        self.last = now
        if response.HasField("usage"):
            self.usage = response.usage


def _uncached(request: Any, cached: dict[Member, int] | None, member: Member) -> int:
    """The prompt tokens `member` will compute: its share of the pool's queue."""
    return request.num_tokens - (cached.get(member, 0) if cached is not None else 0)


def _first_token_ends(request: Any, model: ServedModel) -> bool:
    """Whether the first token ends the request whatever it is (max_tokens 1, or the context
    full after it): its prefill then ships no KV."""
    left = request.params.max_tokens - len(request.resumed_token_ids)
    return bool(left == 1 or request.num_tokens + 1 >= model.max_model_len)


def _queued(output: Any, arrival: float, dispatched: float) -> float:
    """Arrival to the start of prefill: the router's time before it sent the request to the
    worker that served it, plus the wait in that worker's engine."""
    return (dispatched - arrival) + output.usage.queue_seconds


def _timed(request_id: str, output: Any, arrival: float, queued: float | None = None) -> Any:
    """The response of an output, with the queue time and the time to first token (on the
    first, given `queued`) and the total time (on the last) since the request arrived."""
    response = _response(request_id, output)
    elapsed = time.monotonic() - arrival
    if queued is not None:
        response.timing.queue_seconds = queued
        response.timing.ttft_seconds = elapsed
    if output.finished:
        response.timing.total_seconds = elapsed
    return response


def _response(request_id: str, output: Any) -> Any:
    response = pb.GenerateResponse(
        request_id=request_id, token_ids=output.new_token_ids, text=output.text_delta
    )
    for lp in output.logprobs:
        response.logprobs.add(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
        )
    if output.finished:
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

    async def Generate(self, request: Any, context: Any) -> Any:
        await _refuse_malformed(request, context)
        servicer = await self._ready(context)
        task = asyncio.current_task()
        assert task is not None, "grpc runs each call in a task"
        self._streams.add(task)
        self._idle.clear()
        try:
            # closed with this stream: grpc stops iterating, and the workers must hear it now
            async with aclosing(servicer.Generate(request, context)) as responses:
                async for response in responses:
                    yield response
        except asyncio.CancelledError:
            if self._cut_reason is None:
                raise  # the client went away or grpc is stopping: nobody to answer
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._cut_reason)
        finally:
            self._streams.discard(task)
            if not self._streams:
                self._idle.set()

    async def Tokenize(self, request: Any, context: Any) -> Any:
        await _refuse_malformed(request, context)
        return await (await self._ready(context)).Tokenize(request, context)

    async def ListModels(self, request: Any, context: Any) -> Any:
        await _refuse_malformed(request, context)
        return await (await self._ready(context)).ListModels(request, context)

    async def _ready(self, context: Any) -> TandemServicer:
        if self._closed_reason is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._closed_reason)
        if self.servicer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "starting: worker pools not ready")
        assert self.servicer is not None
        return self.servicer


HEALTH_OVERALL = ""  # grpc.health.v1 convention: the whole server
POOL_HEALTH_NAMES = {"prefill": "tandem.pool.prefill", "decode": "tandem.pool.decode"}


async def start_server(host: str, port: int) -> tuple[Any, int, ServingGate, Any]:
    """Start serving on host:port (0: any free port) with the Tandem API behind a gate, the
    standard health service (everything NOT_SERVING until set) and server reflection.
    Returns (server, port bound, gate, health servicer)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    if port:  # refused here with a clear error, before grpc's core logs its own
        error = _bind_error(host, port)
        if isinstance(error, AddressInUse):
            raise error
    # No SO_REUSEPORT: a second server on a busy port must fail, not share its traffic.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    gate = ServingGate()
    add_tandem_service(gate, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    tandem_name = pb.DESCRIPTOR.services_by_name["Tandem"].full_name
    for name in (HEALTH_OVERALL, tandem_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [tandem_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )  # fmt: skip
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
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
