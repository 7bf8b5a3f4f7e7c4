"""The request path behind both edges, transport-neutral: the gRPC servicer (router/server.py)
and the OpenAI-compatible HTTP edge (router/http.py) both call `RequestCore.generate`.

`generate` takes an `Incoming` request (the edge's own message behind three calls: a cheap size
check, its size in bytes, and a validation that tokenizes) and yields `Reply`s: the engine's
`RequestOutput` with the timing the client is told. Inside: sizes checked before anything is
converted, admission (router/admission.py), validation and tokenizing off the event loop,
placement (colocated, or disaggregated: prefill on one pool, decode on the other), output
streams, retries of a worker lost before any output, a stream whose decode worker is lost
resumed on another by replay (router/failover.py), metrics and one trace per request. Errors
are raised to the edge as TandemErrors (`status_of_error` names their canonical status, which
each edge maps to its own); a cancelled request (the edge's task cancelled, or its generator
closed) is aborted on every worker that holds it. Neither Ray nor torch nor any transport is
imported here.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from contracts.block_hash import prompt_block_hashes
from contracts.errors import (
    AdminDisabled,
    AdminScopeDenied,
    DuplicateRequest,
    InvalidRequest,
    ModelNotFound,
    NodeDrainTimedOut,
    NodeNotDrainable,
    Overloaded,
    RequestAborted,
    TandemError,
    UnknownNode,
    WorkerDraining,
    WorkerLost,
    WorkerUnavailable,
)
from contracts.handoff import MovedKV, PrefillResult
from contracts.outputs import RequestOutput
from prefix_cache.index import PrefixLookup
from router.admission import Admission
from router.auth import Unauthenticated, tenant_cache_salt
from router.disagg import LOCAL, DecodeState, DisaggPolicy
from router.failover import FailoverConfig, with_failover
from router.outputs import OutputStreams
from router.placement import Member, Placement, PoolView, assigned
from router.requests import ServedModel, ValidatedRequest
from router.workers import WorkerClient
from telemetry.metrics import ServiceMetrics
from telemetry.tracing import child_carrier, end_span, record_span, start_span

logger = logging.getLogger(__name__)

# How a request's stream stops early: its task is cancelled (the client cancelled, or its
# deadline passed) while it awaits a worker, or the edge closes the stream (GeneratorExit at a
# `yield`) when that happens while a response is being written. Either way the workers must
# be told to abort, or the request runs on to its last token.
STOPPED = (asyncio.CancelledError, GeneratorExit)
_STOPPED = STOPPED

TOKENIZER_THREADS = 2  # prompts tokenized at once, off the event loop
# A client whose deadline passes cancels the call a little before the server's copy of the
# deadline (which started when the request arrived) runs out: a stop with less than this left
# is counted as DEADLINE_EXCEEDED, not CANCELLED.
DEADLINE_SLACK_S = 1.0
_DRAIN_POLL_S = 0.02  # how often a drain cuts the streams newly open on its worker


class Status(enum.Enum):
    """How a request ended, by the canonical RPC status codes (gRPC's names and numbers);
    each edge maps them to its own (router/server.py: grpc.StatusCode; router/http.py: HTTP)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


def status_of_error(error: BaseException) -> Status:
    """The status of a Tandem error (the one place that decides it, for both edges)."""
    if isinstance(error, (ModelNotFound, UnknownNode)):
        return Status.NOT_FOUND
    if isinstance(error, NodeNotDrainable):
        return Status.FAILED_PRECONDITION
    if isinstance(error, NodeDrainTimedOut):
        return Status.DEADLINE_EXCEEDED
    if isinstance(error, (AdminDisabled, AdminScopeDenied)):
        return Status.PERMISSION_DENIED
    if isinstance(error, Unauthenticated):
        return Status.UNAUTHENTICATED
    if isinstance(error, InvalidRequest):
        return Status.INVALID_ARGUMENT
    if isinstance(error, DuplicateRequest):
        return Status.ALREADY_EXISTS
    if isinstance(error, Overloaded):
        return Status.RESOURCE_EXHAUSTED
    if isinstance(error, WorkerUnavailable):
        return Status.UNAVAILABLE
    if isinstance(error, RequestAborted):
        return Status.CANCELLED
    return Status.INTERNAL


class Incoming(Protocol):
    """A generate request as an edge received it (a GenerateRequest message, an OpenAI JSON
    body): what the core needs of it, in the order it asks."""

    @property
    def request_bytes(self) -> int:
        """Its size on the wire, counted by admission."""
        ...

    def check_sizes(self, model: ServedModel) -> None:
        """Cheap: refuse oversized strings and lists (InvalidRequest) before it is admitted."""
        ...

    def validate(self, model: ServedModel) -> ValidatedRequest:
        """Every field checked and the prompt tokenized (InvalidRequest, ModelNotFound); run
        off the event loop."""
        ...


@dataclass(frozen=True, slots=True)
class Reply:
    """One output of a request as its client gets it: the engine's output, and the request's
    timing since it arrived: queue and time to first token on the first reply, the total on
    the last (None elsewhere)."""

    request_id: str  # the client's
    output: RequestOutput
    queue_s: float | None = None
    ttft_s: float | None = None
    total_s: float | None = None


class RequestCore:
    """Admission, validation, placement, streams, metrics and traces over a decode pool (and,
    when disaggregated, a prefill pool), for whichever edge calls `generate`."""

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
        disaggregated request is prefilled (router.disagg; default: always remote)."""
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
            pool.name: Placement(
                prefill=pool is prefill,
                cache_weight=cache_weight,
                cache_as_share=prefill is not None and pool is decode,  # decode-side reuse
            )
            for pool in (decode, prefill)
            if pool is not None
        }
        self.num_retried = 0  # requests moved to another worker after losing theirs
        self.num_migrated = 0  # streams resumed on another decode worker (router.failover)
        # streams moved off draining decode workers, by how: with their KV, or by replay
        self.num_drain_moves = {"kv": 0, "replay": 0}
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

    async def _cached_tokens(self, request: Any, *pools: PoolView) -> dict[Member, int] | None:
        """How many of the prompt's tokens each worker of `pools` (default: the prefilling
        pool) holds in its prefix cache, by the index, as its engine would reuse them: whole
        blocks, leaving the last prompt token to compute. None if there is no index or it
        cannot answer in time. One lookup for all the pools."""
        members = [
            m for pool in pools or (self._prefilling,) for m in pool.members()
            if m.index_key is not None
        ]  # fmt: skip
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
        reusable = (len(request.prompt_token_ids) - 1) // size  # the last token is computed
        return {m: min(count, reusable) * size for m, count in zip(members, counts, strict=True)}

    async def generate(
        self,
        incoming: Incoming,
        trace_headers: Mapping[str, str] | None = None,
        *,
        time_remaining: Callable[[], float | None] | None = None,
        edge: str = "grpc",
    ) -> AsyncGenerator[Reply, None]:
        """Serve one request: its Replies, in order; raises the TandemError that refused or
        ended it (after counting it). `trace_headers`: the client's (a traceparent becomes
        the request's trace parent); `time_remaining`: the client's deadline, if it set one
        (a stop near it counts as DEADLINE_EXCEEDED); `edge`: which edge it came through
        ("grpc", "http"), for its trace. The edge has authenticated the caller already (when
        API keys are on) and set router.auth.current_tenant."""
        arrival, arrival_wall = time.monotonic(), time.time()
        seen = _Seen(arrival)
        # One trace per request; a client's traceparent becomes its parent.
        span = start_span("tandem.Generate", dict(trace_headers or ()), **{"tandem.edge": edge})
        code = Status.OK
        error: BaseException | None = None
        try:
            incoming.check_sizes(self.model)  # cheap: before it is admitted or tokenized
            with self.admission.admit(request_bytes=incoming.request_bytes) as ticket:
                try:
                    validated = await self._off_loop(_validate, incoming)
                finally:
                    record_span("validate", arrival_wall, time.time(), span)
                # a tenant's requests share cached prefixes only with its own: each edge
                # authenticates its caller and sets router.auth.current_tenant first
                validated = replace(validated, cache_salt=tenant_cache_salt(validated.cache_salt))
                span.set_attributes({"tandem.request_id": validated.request_id,
                                     "tandem.model": self.model.model_id})  # fmt: skip
                carrier = child_carrier(span)
                ticket.add_prompt_tokens(len(validated.prompt_token_ids))
                with self._live(validated.request_id):
                    place = self._colocated if self.prefill is None else self._disaggregated
                    # closed here, not whenever it is collected: its workers are told at once

                    def attempt(resumed: tuple[int, ...], moved: MovedKV | None) -> Any:
                        again = replace(validated, resumed_token_ids=resumed)
                        if moved is not None:  # its KV left a draining worker: continue it
                            return self._moved(again, moved, place, arrival, carrier, span)
                        return place(again, arrival, carrier, span)

                    streams = with_failover(attempt, self.failover, self.decode, span,
                                            self._migrated)  # fmt: skip
                    async with aclosing(streams) as replies:
                        async for reply in replies:
                            seen.reply(reply)
                            yield reply
        except TandemError as e:  # refused, invalid, lost or failed
            code, error = status_of_error(e), e
            if isinstance(e, Overloaded) and self.metrics is not None:
                self.metrics.admission_rejections.inc()
            raise
        except _STOPPED as e:  # the client cancelled, or its deadline passed
            remaining = None if time_remaining is None else time_remaining()
            expired = remaining is not None and remaining <= DEADLINE_SLACK_S
            code = Status.DEADLINE_EXCEEDED if expired else Status.CANCELLED
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
            end_span(span, error if code is not Status.OK else None,
                     **{"rpc.grpc.status_code": code.value, **attributes})  # fmt: skip

    async def migrate_off(self, member: Member, timeout_s: float, move_kv: bool = False) -> bool:
        """Move every stream off decode worker `member`, which is draining (not placeable):
        with `move_kv`, each running one with its KV (the worker ships it to another decode
        worker it has a pair with and ends the stream with WorkerMoved; router.failover
        continues it there); the others, or all without `move_kv`, by replay (router.failover):
        cut at a token boundary (WorkerDraining behind the outputs received so far), aborted
        there and resumed on another decode worker. A request still prefilling for it
        (disaggregated) is moved once its decode stream opens. True once nothing of the
        router's runs there, False if some still did after `timeout_s`. Only with another
        placeable decode worker (else nothing is moved)."""
        if not any(m.placeable for m in self.decode.members() if m is not member):
            return member.load.in_flight == 0
        deadline = time.monotonic() + timeout_s
        error = WorkerDraining(f"decode worker {member.worker_id} is draining")
        handled: set[str] = set()  # attempts moved or cut already
        while member.load.in_flight:
            await self._move_off(member, handled, error, move_kv)
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_DRAIN_POLL_S)
        return True

    async def _move_off(
        self, member: Member, handled: set[str], error: WorkerDraining, move_kv: bool
    ) -> None:
        """One round of a drain: with `move_kv`, ask draining worker `member` to move each
        attempt newly open on it to the least loaded other placeable decode worker; cut the
        ones it did not move, or all without `move_kv` (replayed). Counted by how."""
        ids = [i for i in self.outputs.open_ids(member.client) if i not in handled]
        targets = sorted((m for m in self.decode.members() if m is not member and m.placeable),
                         key=lambda m: m.load.in_flight)  # fmt: skip
        if not ids or not targets:
            return
        handled.update(ids)
        moved: set[str] = set()
        if move_kv:
            moves = [(attempt, targets[n % len(targets)].worker_id)
                     for n, attempt in enumerate(ids)]  # fmt: skip
            try:
                moved = set(await member.client.move_out(moves))
            except TandemError as e:  # lost: its streams fail and are replayed by failover
                logger.warning("moving KV off decode worker %s failed: %s; replaying its "
                               "streams", member.worker_id, e)  # fmt: skip
        replayed = self.outputs.cut(member.client, error, [i for i in ids if i not in moved])
        self.num_drain_moves["kv"] += len(moved)
        self.num_drain_moves["replay"] += replayed
        if self.metrics is not None:
            self.metrics.drain_moves.labels(how="kv").inc(len(moved))
            self.metrics.drain_moves.labels(how="replay").inc(replayed)

    async def _moved(
        self, request: Any, moved: MovedKV, place: Any, arrival: float, carrier: Any, span: Any
    ) -> Any:
        """A stream whose KV left its draining decode worker (WorkerMoved): continued on the
        decode worker the KV went to, from it (start_continue with the move's PrefillResult,
        the tokens sent before its last as resumed tokens; the worker's first output repeats
        that last token, sent already: dropped). Replayed instead (`place`) if that worker is
        no longer placeable or the tokens sent do not match the move."""
        sent = request.resumed_token_ids
        result = moved.result
        assert result.kv is not None, "a MovedKV names its transfer"
        target = result.kv.decode_worker
        members = self.decode.members()
        member = next((m for m in members if m.worker_id == target and m.placeable), None)
        if (
            member is None
            or len(sent) != moved.num_output_tokens
            or sent[-1] != result.first_token_id
        ):
            logger.warning("request %r: its moved KV cannot continue (worker %s, %d tokens "
                           "sent, %d moved); replaying it", request.request_id,
                           result.kv.decode_worker, len(sent), moved.num_output_tokens)  # fmt: skip
            if member is not None:  # its KV is freed as it lands there
                member.client.abort(moved.request_id)
            async with aclosing(place(request, arrival, carrier, span)) as stream:
                async for response in stream:
                    yield response
            return
        span.set_attributes({"tandem.kv_moved_tokens": result.kv.num_tokens})
        request = replace(request, resumed_token_ids=sent[:-1])
        with assigned(member, request.num_tokens) as decode:
            stream = self._decode_on(member, decode, moved.request_id, request, result, carrier,
                                     arrival, time.monotonic(), repeats_first=True)  # fmt: skip
            async with aclosing(stream) as replies:
                async for response in replies:
                    yield response

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
                    member = self._place(
                        self.decode, tried, cached, span, len(request.prompt_token_ids)
                    )
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

    def _decide(self, request: Any, member: Member, decode_cached: int, span: Any) -> str:
        """Where this request is prefilled (router.disagg): `remote` or `local` on decode
        worker `member`, which holds `decode_cached` of its prompt tokens in its prefix cache
        (by the index: only the rest is computed there, or shipped to it); the decision and
        its reason go to the span and the metric."""
        queues = [m.load.queued_tokens for m in self._prefilling.members() if m.placeable]
        load = member.load
        path, reason = self.disagg.decide(
            request.num_tokens - decode_cached,
            min(queues) if queues else None,
            DecodeState(load.decode_load, load.in_flight, load.recent_itl_s),
        )
        if not queues and path != LOCAL:  # the prefill pool is down (forced remote): no
            path, reason = LOCAL, "no_prefill_worker"  # request fails for it (promise 2)
        span.set_attributes({"tandem.prefill_path": path, "tandem.prefill_reason": reason})
        if self.metrics is not None:
            self.metrics.prefill_placement.labels(path=path, reason=reason).inc()
        return path

    async def _disaggregated(self, request: Any, arrival: float, carrier: Any, span: Any) -> Any:
        """Prefill on one pool, decode on the other; the KV moves between them. The prefill's
        PrefillResult (contracts.handoff) goes to the decode worker, which streams every
        output, the first token's included: it owns the request's text. Or, as the policy
        decides (router.disagg), the chosen decode worker prefills the request itself."""
        assert self.prefill is not None
        cached = await self._cached_tokens(request, self.decode, self.prefill)
        member = self._place(self.decode, set(), cached, span, len(request.prompt_token_ids))
        decode_cached = 0 if cached is None else cached.get(member, 0)
        span.set_attributes({"tandem.decode_cached_tokens": decode_cached})
        if self._decide(request, member, decode_cached, span) != LOCAL:
            try:
                remote = self._remote(request, arrival, carrier, span, cached, member,
                                      decode_cached)  # fmt: skip
                async with aclosing(remote) as stream:
                    async for response in stream:
                        yield response
                return
            except _PrefillPoolDown as e:  # nothing was streamed: prefill it on `member`
                logger.warning("%s; prefilling on decode worker %s", e, member.worker_id)
                span.set_attributes({"tandem.prefill_path": LOCAL,
                                     "tandem.prefill_reason": "no_prefill_worker"})  # fmt: skip
        local = self._generate(request, arrival, carrier, span, cached, member)
        async with aclosing(local) as stream:
            async for response in stream:
                yield response

    async def _remote(
        self, request: Any, arrival: float, carrier: Any, span: Any,
        cached: dict[Member, int] | None, member: Member, decode_cached: int,
    ) -> Any:  # fmt: skip
        """Prefilled on the prefill pool, its KV shipped to decode worker `member`, decoded
        there. Raises _PrefillPoolDown, before anything is streamed, when the request's
        prefill worker is lost and no other is placeable."""
        assert self.prefill is not None
        # A first token that surely ends the request needs no KV at the decode worker.
        ship_to = None if _first_token_ends(request, self.model) else member.worker_id
        with assigned(member, request.num_tokens) as decode:
            attempts: list[str] = []  # the prefill attempts' ids, the one that shipped last
            try:
                result, dispatched = await self._prefill(
                    request, ship_to, carrier, span, attempts, cached,
                    decode_cached if ship_to is not None else 0,
                )  # fmt: skip
            except _STOPPED:  # its KV may be on the way: the decode worker drops it
                if ship_to is not None and attempts:
                    decode.abort(attempts[-1])
                raise
            attempt = attempts[-1]  # the decode worker continues the prefill's attempt
            stream = self._decode_on(member, decode, attempt, request, result, carrier, arrival,
                                     dispatched)  # fmt: skip
            async with aclosing(stream) as replies:
                async for response in replies:
                    yield response

    async def _decode_on(
        self, member: Member, decode: WorkerClient, attempt: str, request: Any,
        result: PrefillResult, carrier: Any, arrival: float, dispatched: float,
        repeats_first: bool = False,
    ) -> Any:  # fmt: skip
        """Decode worker `member` (its client `decode`) continues attempt `attempt` of a
        request from `result` (start_continue); its replies. repeats_first: its first output
        repeats a token the client has (a stream whose KV moved): dropped. WorkerLost is
        raised on (router.failover resumes it elsewhere)."""
        first, finished = True, False
        outputs = self.outputs.open(decode, attempt)
        try:
            await decode.start_continue(
                self.outputs.subscriber, attempt, request.prompt_token_ids, result,
                request.params, request.cache_salt, carrier, request.resumed_token_ids,
            )  # fmt: skip
            gaps = _Gaps(member)
            async for output in _until_finished(outputs):
                finished = output.finished
                gaps.output()
                if repeats_first:
                    repeats_first = False
                    if not finished:
                        continue
                    output = replace(output, new_token_ids=(), text_delta="", logprobs=())
                queued = _queued(result, arrival, dispatched) if first else None
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
        self, request: Any, ship_to: str | None, carrier: Any, span: Any, attempts: list[str],
        cached: dict[Member, int] | None, decode_cached: int = 0,
    ) -> tuple[PrefillResult, float]:  # fmt: skip
        """(the PrefillResult, its KV shipped to decode worker `ship_to` if not None, less
        the first `decode_cached` tokens, which that worker holds; when the prefill was
        dispatched). A prefill worker lost mid-prefill is replaced by another for the same
        request: nothing has reached the client yet. Each attempt's id is appended to
        `attempts` as it starts."""
        assert self.prefill is not None
        tried: set[Member] = set()
        while True:
            try:
                member = self._place(self.prefill, tried, cached, span)
            except WorkerUnavailable as e:
                if any(m.placeable for m in self.prefill.members()):
                    raise
                raise _PrefillPoolDown(str(e)) from e
            self._count_retry(tried)
            tried.add(member)
            dispatched = time.monotonic()
            attempt = _attempt_id(request.request_id, span)
            attempts.append(attempt)
            with assigned(member, _uncached(request, cached, member)) as worker:
                try:
                    result = await worker.prefill(
                        attempt, request.prompt_token_ids, request.params, request.cache_salt,
                        ship_to, carrier, decode_cached, request.resumed_token_ids,
                    )  # fmt: skip
                    _note_transfer(span, result)
                    return result, dispatched
                except WorkerLost as e:
                    self.prefill.mark_down(member)
                    _abandon(worker, attempt, e)
                    self._retrying("prefill worker", member, e)

    def _place(
        self, pool: PoolView, tried: set[Member], cached: dict[Member, int] | None, span: Any,
        prompt_tokens: int = 0,
    ) -> Member:  # fmt: skip
        """Pick a member of `pool` (see Placement.pick; `prompt_tokens`: the prompt's length),
        noting the choice in the request's span."""
        started = time.time()
        members = pool.members()
        counts = None if cached is None else [cached.get(m, 0) for m in members]
        index = self.placement[pool.name].pick(pool.name, members, tried, counts, prompt_tokens)
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

    async def _off_loop(self, check: Any, request: Any) -> Any:
        """`check(request, model)` on the tokenizer threads: the event loop keeps serving."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, check, request, self.model)


class _PrefillPoolDown(Exception):
    """No prefill worker is placeable for a request that has streamed nothing yet: every one
    is dead or draining (their replacements still loading). Its decode worker prefills it."""


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

    def reply(self, reply: Reply) -> None:
        now = time.monotonic()
        if self.ttft is None:
            self.ttft = now - self.arrival
            self.queue = reply.queue_s or 0.0
        else:
            self.gaps.append(now - self.last)
        self.last = now
        if reply.output.finished:
            self.usage = reply.output.usage


def _note_transfer(span: Any, result: PrefillResult) -> None:
    """The KV a prefill shipped, in the request's span (the prompt less the decode worker's
    cached prefix, if it held one)."""
    if result.kv is not None:
        span.set_attributes({"tandem.kv_transfer_tokens": result.kv.num_tokens,
                             "tandem.kv_transfer_blocks": result.kv.num_blocks})  # fmt: skip


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


def _timed(request_id: str, output: RequestOutput, arrival: float,
           queued: float | None = None) -> Reply:  # fmt: skip
    """The reply of an output, with the queue time and the time to first token (on the first,
    given `queued`) and the total time (on the last) since the request arrived."""
    elapsed = time.monotonic() - arrival
    return Reply(
        request_id,
        output,
        queue_s=queued,
        ttft_s=elapsed if queued is not None else None,
        total_s=elapsed if output.finished else None,
    )


def _validate(incoming: Incoming, model: ServedModel) -> ValidatedRequest:
    return incoming.validate(model)
