"""One engine driven by one thread, fed from asyncio: requests go in through a queue, outputs
come back per request through asyncio queues on the caller's event loop.

    async caller (Ray actor method)          engine thread
      submit() -> asyncio.Queue  --inbox-->    add_request
                                               step(), step(), ...
      await queue.get()  <--call_soon_threadsafe-- RequestOutput | exception
      abort()                    --inbox-->    abort_request (frees its KV within a step)

The engine is touched by the engine thread only (it is not thread-safe). An exception while
stepping fails every request in flight with WorkerUnavailable and stops the loop: a worker in
an unknown state must be replaced, not trusted.

A request whose KV this worker had no room for (the receiver refused the transfer) is not
failed after the first token the client already has: its prompt is recomputed here, the
sequence waiting in the engine's queue until blocks free up (held back, like a preempted one).
Any other transfer failure fails the request with WorkerUnavailable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from contracts.errors import RequestAborted, TandemError, WorkerUnavailable
from contracts.sampling_params import SamplingParams
from engine.engine import Engine
from kvtransfer.protocol import TransferMetrics, transfer_id_for

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # the engine thread's sleep when it has nothing to do (woken by submits)
ARRIVAL_POLL_S = 0.002  # its sleep while requests wait for transferred KV
UNCLAIMED_KV_S = 60.0  # transferred KV nobody continued within this is released
MAX_EARLY_ABORTS = 4096  # aborts remembered for requests that had not arrived yet ...
EARLY_ABORT_TTL_S = 30.0  # ... for this long (request ids may be reused after that)
# How a receiver refusing a transfer for lack of free blocks says so (kvtransfer.receiver).
NO_ROOM_FOR_KV = "no free KV blocks"


@dataclass(frozen=True, slots=True)
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    stream: asyncio.Queue[Any]
    loop: asyncio.AbstractEventLoop
    keep_kv: bool = False  # prefill role: pin the KV when it finishes (Engine keep_kv)
    first_token_id: int | None = None  # decode role: continue from transferred KV
    deadline: float = 0.0  # decode role: fail if the KV has not arrived by then (monotonic)


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class EngineLoop:
    """See the module docstring. In the decode role, `receivers` (kvtransfer.KVReceiver) are
    polled every turn: a request submitted with a first token waits, without blocking the
    loop, until the KV of its transfer (transfer_id_for(request_id)) has arrived."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.receivers: list[Any] = []  # appended by the decode worker as pairs form
        self.retired_metrics = TransferMetrics()  # of receivers dropped after their pair failed
        self._arrived: dict[str, tuple[Any, float]] = {}  # transfer id -> (ReceivedKV, when)
        self._waiting: dict[str, _Submit] = {}  # transfer id -> request waiting for its KV
        self._aborted: OrderedDict[str, float] = OrderedDict()  # early aborts -> expiry
        # transfers of aborted requests whose KV may still arrive -> expiry: freed on arrival
        self._dropped: OrderedDict[str, float] = OrderedDict()
        self._inbox: queue.SimpleQueue[_Submit | _Abort | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Submit] = {}  # engine thread only
        self._outgoing: list[tuple[_Submit, Any]] = []  # delivered at the end of the turn
        self._kept: dict[str, Any] = {}  # keep_kv requests' pinned KV, until taken
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        *,
        keep_kv: bool = False,
        first_token_id: int | None = None,
        kv_wait_s: float = 30.0,
    ) -> asyncio.Queue[Any]:
        """Queue a request; its RequestOutputs (or one exception) arrive on the returned queue,
        the last output having finished=True. Call from a running event loop.

        keep_kv: pin its KV when it finishes (the prefill role). first_token_id: the request
        was prefilled elsewhere and sampled this token; wait up to kv_wait_s for its KV to
        arrive through a receiver, then continue from it (the first token's own output is
        not delivered again; a request that never gets its KV fails with WorkerUnavailable).
        """
        if self._failure is not None:
            raise WorkerUnavailable(f"engine loop stopped: {self._failure}")
        stream: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + kv_wait_s
        self._inbox.put(
            _Submit(request_id, list(prompt_token_ids), params, cache_salt, stream, loop,
                    keep_kv, first_token_id, deadline)
        )  # fmt: skip
        self._wake.set()
        return stream

    def take_kept_kv(self, request_id: str) -> Any:
        """The pinned KV (engine KeptKV) of a finished keep_kv request, once; None if it has
        none. Any thread: it was put aside on the engine thread before the request's last
        output was delivered, so the caller need not wait for an engine turn."""
        return self._kept.pop(request_id, None)

    def wake(self) -> None:
        """Make the engine thread look at its inputs now (e.g. a new receiver)."""
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request (any thread); its KV is freed at the engine's next turn."""
        self._inbox.put(_Abort(request_id))
        self._wake.set()

    def call(self, fn: Any) -> Any:
        """Run `fn(engine)` on the engine thread and return its result (blocking): for
        inspection (stats, integrity checks) without racing the step loop."""
        done = threading.Event()
        box: list[Any] = []

        def job(engine: Engine) -> None:
            try:
                box.append((True, fn(engine)))
            except BaseException as e:
                box.append((False, e))
            done.set()

        self._inbox.put(job)  # type: ignore[arg-type]
        self._wake.set()
        while not done.wait(0.1):
            if not self._thread.is_alive():  # stopped or failed: nobody will run the job
                raise WorkerUnavailable(f"engine loop stopped: {self._failure or 'stopped'}")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._inbox.put(None)
        self._wake.set()
        self._thread.join(10)

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def failure(self) -> str | None:
        """Why the engine thread stopped, once it has (the worker must then be replaced)."""
        return self._failure

    # -- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox():
                    return
                self._take_arrivals()
                busy = self.engine.has_unfinished_requests()
                if busy:
                    for output in self.engine.step():
                        self._deliver(output.request_id, output, done=output.finished)
                self._flush()
                if not busy:
                    self._wake.wait(ARRIVAL_POLL_S if self._waiting else IDLE_WAIT_S)
                    self._wake.clear()
        except Exception as e:
            logger.exception("engine loop failed")
            self._failure = f"{type(e).__name__}: {e}"
            for request_id in list(self._streams):
                self._deliver(request_id, WorkerUnavailable(self._failure), done=True)
        finally:
            self._flush()

    def _drain_inbox(self) -> bool:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            if isinstance(item, _Submit):
                self._add(item)
            elif isinstance(item, _Abort):
                self._abort(item.request_id)
            else:
                item(self.engine)

    def _abort(self, request_id: str) -> None:
        kept = self._kept.pop(request_id, None)
        if kept is not None:  # finished, but its caller gave up before taking the KV
            self.engine.block_manager.release(kept.owner)
            return
        transfer_id = transfer_id_for(request_id)
        waiting = self._waiting.pop(transfer_id, None)
        output = self.engine.abort_request(request_id)
        if output is not None:
            self._deliver(request_id, output, done=True)
        elif waiting is not None:  # never started: nothing of it is in the engine
            self._deliver(request_id, RequestAborted("aborted"), done=True)
            self._drop_transfer(transfer_id)
        elif request_id not in self._streams:  # not here yet: refuse it if it comes soon
            self._drop_transfer(transfer_id)  # its KV may be here or on the way already
            _remember(self._aborted, request_id)

    def _add(self, item: _Submit) -> None:
        aborted_until = self._aborted.pop(item.request_id, None)
        if aborted_until is not None and time.monotonic() < aborted_until:  # cancel came first
            self._outgoing.append((item, RequestAborted("aborted")))
            return
        if item.request_id in self._streams:
            error = TandemError(f"request_id {item.request_id!r} is already in use")
            self._outgoing.append((item, error))
            return
        self._streams[item.request_id] = item
        if item.first_token_id is not None:
            self._waiting[transfer_id_for(item.request_id)] = item
            return
        try:
            self.engine.add_request(
                item.request_id,
                None,
                item.params,
                prompt_token_ids=item.prompt_token_ids,
                cache_salt=item.cache_salt,
                keep_kv=item.keep_kv,
            )
        except TandemError as e:
            self._deliver(item.request_id, e, done=True)

    def transfer_holders(self) -> list[str]:
        """Owners of transferred KV not yet in a sequence (engine thread: via `call`)."""
        held = [kv.owner for kv, _ in self._arrived.values()]
        return held + [owner for r in self.receivers for owner in r.owners()]

    def _take_arrivals(self) -> None:
        """Match transferred KV with the requests waiting for it; expire both sides."""
        now = time.monotonic()
        for receiver in self.receivers:
            for kv in receiver.poll():
                dropped_until = self._dropped.pop(kv.transfer_id, None)
                if dropped_until is not None and now < dropped_until:  # its request is gone
                    self.engine.block_manager.release(kv.owner)
                    continue
                self._arrived[kv.transfer_id] = (kv, now)
        for transfer_id in [t for t in self._waiting if t in self._arrived]:
            item = self._waiting.pop(transfer_id)
            kv, _ = self._arrived.pop(transfer_id)
            self._continue(item, kv)
        for transfer_id, item in list(self._waiting.items()):
            failed = self._transfer_failure(transfer_id)
            if failed is not None and NO_ROOM_FOR_KV in failed:
                del self._waiting[transfer_id]
                logger.info("request %s: no room for its KV here; recomputing its prompt when "
                            "blocks free up", item.request_id)  # fmt: skip
                self._continue(item, None)
            elif failed is not None or now > item.deadline:
                del self._waiting[transfer_id]
                why = failed or "it did not arrive in time"
                error = WorkerUnavailable(f"the prompt's KV from the prefill worker failed: {why}")
                self._deliver(item.request_id, error, done=True)
        for transfer_id, (kv, when) in list(self._arrived.items()):
            if now - when > UNCLAIMED_KV_S:  # its request never came (router gone): free it
                del self._arrived[transfer_id]
                self.engine.block_manager.release(kv.owner)
        self._prune_receivers()

    def _prune_receivers(self) -> None:
        """Drop receivers whose pair failed (their prefill worker died or left) once they hold
        nothing: a pool that keeps changing must not leave a trail of them to poll. Their
        counters carry on in `retired_metrics`."""
        for receiver in list(self.receivers):
            if receiver.failure is not None and receiver.num_live == 0 and not receiver.owners():
                self.receivers.remove(receiver)
                self.retired_metrics.absorb(receiver.metrics)

    def _transfer_failure(self, transfer_id: str) -> str | None:
        """Why a transfer ended without its KV (its sender died, aborted, ...), if it has."""
        for receiver in self.receivers:
            result = receiver.result(transfer_id)
            if result is not None and not result.ok:
                return f"{result.status.value}: {result.reason}"
        return None

    def _drop_transfer(self, transfer_id: str) -> None:
        """Free the KV of a request that will not continue: arrived, still arriving, or not
        offered yet (the abort overtook it: freed as it arrives, see _take_arrivals)."""
        arrived = self._arrived.pop(transfer_id, None)
        if arrived is not None:
            self.engine.block_manager.release(arrived[0].owner)
            return
        for receiver in self.receivers:  # in flight: freed once no data can land
            receiver.abort(transfer_id, "request cancelled")
        _remember(self._dropped, transfer_id)  # complete but not polled yet, or not offered

    def _continue(self, item: _Submit, kv: Any) -> None:
        """Continue a request from its transferred KV, or (kv None) by recomputing it."""
        assert item.first_token_id is not None
        try:
            output = self.engine.add_transferred_request(
                item.request_id,
                item.prompt_token_ids,
                item.first_token_id,
                item.params,
                kv_owner=None if kv is None else kv.owner,
                cache_salt=item.cache_salt,
            )
        except (TandemError, ValueError) as e:
            if kv is not None:
                self.engine.block_manager.release(kv.owner)
            self._deliver(item.request_id, e, done=True)
            return
        if output.finished:  # the first token (already sent by prefill) ended it: close
            closing = dataclasses.replace(output, new_token_ids=(), text_delta="", logprobs=())
            self._deliver(item.request_id, closing, done=True)

    def _deliver(self, request_id: str, item: Any, done: bool) -> None:
        target = self._streams.pop(request_id, None) if done else self._streams.get(request_id)
        if target is None:
            return
        if done and target.keep_kv:
            kept = self.engine.take_kept_kv(request_id)
            if kept is not None:
                self._kept[request_id] = kept
        self._outgoing.append((target, item))

    def _flush(self) -> None:
        """Hand this turn's outputs to their event loops: one wake-up per loop per turn (a
        step's outputs for many requests), not one per output."""
        if not self._outgoing:
            return
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for target, item in self._outgoing:
            batches.setdefault(target.loop, []).append((target.stream, item))
        self._outgoing = []
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop has closed: nobody is waiting any more
                logger.debug("outputs for a closed event loop dropped")


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)


def _remember(entries: OrderedDict[str, float], key: str) -> None:
    """Note `key` for EARLY_ABORT_TTL_S, keeping at most MAX_EARLY_ABORTS (oldest go first)."""
    entries.pop(key, None)
    entries[key] = time.monotonic() + EARLY_ABORT_TTL_S
    while len(entries) > MAX_EARLY_ABORTS:
        entries.popitem(last=False)
