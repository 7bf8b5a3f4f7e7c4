"""One engine driven by one thread, fed from asyncio: `submit` puts a request on the inbox and
returns an asyncio queue its outputs (RequestOutput, Prefilled or an exception) arrive on;
`abort` frees a request's KV within a step. Role-neutral: what only one role keeps lives in
that role's package as a `LoopRole` the loop calls each turn. Only the engine thread touches
the engine; an exception while stepping fails every request in flight with WorkerUnavailable
(WorkerLost when a tensor-parallel rank died: the worker is down as a unit) and stops the
loop (a worker in an unknown state is replaced, not trusted). No torch at
module level. The loop's picture: docs/architecture.md, "Workers".
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from contracts.errors import RankFailed, RequestAborted, TandemError, WorkerLost, WorkerUnavailable
from contracts.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.engine import Engine, Prefilled

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # the engine thread's sleep when it has nothing to do (woken by submits)
BUSY_POLL_S = 0.002  # its sleep while its role waits for something (e.g. transferred KV)
MAX_EARLY_ABORTS = 4096  # aborts remembered for requests that had not arrived yet ...
EARLY_ABORT_TTL_S = 30.0  # ... for this long (request ids may be reused after that)


@dataclass(frozen=True, slots=True)
class Submission:
    """A request on its way to the engine thread, and where its outputs go."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    stream: asyncio.Queue[Any]
    loop: asyncio.AbstractEventLoop
    prefill_only: bool = False  # prefill role: end as "prefill done, KV held" (Engine)
    # Instead of add_request: how the request enters the engine (engine thread; e.g. the
    # decode side taking over a prefilled request), and what to undo if it is refused.
    start: Callable[[EngineLoop, Submission], None] | None = None
    on_refused: Callable[[], None] | None = None
    resumed_token_ids: tuple[int, ...] = ()  # a replay: output tokens already streamed


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class LoopRole:
    """A worker role's part of the engine thread's turn. Every method runs on the engine
    thread; this default is a role with nothing of its own."""

    def turn(self, loop: EngineLoop) -> None:
        """Once per turn, before the engine steps."""

    def abort(self, loop: EngineLoop, request_id: str) -> bool:
        """An abort, before the engine sees it; True if the role has dealt with it fully."""
        return False

    def prefilled(self, loop: EngineLoop, item: Prefilled) -> None:
        """A prefill_only request ended; its KV is the role's now."""
        raise AssertionError(f"{type(self).__name__} runs no prefill_only requests")

    @property
    def is_waiting(self) -> bool:
        """Whether the role waits for something outside the engine (poll it often)."""
        return False

    def holders(self) -> list[str]:
        """Block-manager owners the role holds legitimately now (for integrity checks)."""
        return []


class EngineLoop:
    """See the module docstring."""

    def __init__(self, engine: Engine, role: LoopRole | None = None) -> None:
        self.engine = engine
        self.role = role or LoopRole()
        self._aborted: OrderedDict[str, float] = OrderedDict()  # early aborts -> expiry
        self._inbox: queue.SimpleQueue[Submission | _Abort | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, Submission] = {}  # engine thread only
        self._outgoing: list[tuple[Submission, Any]] = []  # delivered at the end of the turn
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
        prefill_only: bool = False,
        start: Callable[[EngineLoop, Submission], None] | None = None,
        on_refused: Callable[[], None] | None = None,
        resumed_token_ids: Sequence[int] = (),
    ) -> asyncio.Queue[Any]:
        """Queue a request; its outputs (or one exception) arrive on the returned queue, the
        last output having finished=True (a prefill_only request: one engine Prefilled). Call
        from a running event loop. start/on_refused/resumed_token_ids: see Submission."""
        if self._failure is not None:
            raise WorkerUnavailable(f"engine loop stopped: {self._failure}")
        stream: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._inbox.put(
            Submission(request_id, list(prompt_token_ids), params, cache_salt, stream, loop,
                       prefill_only, start, on_refused, tuple(resumed_token_ids))
        )  # fmt: skip
        self._wake.set()
        return stream

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

    def has_stream(self, request_id: str) -> bool:
        """Whether a request submitted here has not ended yet (engine thread)."""
        return request_id in self._streams

    def deliver(self, request_id: str, item: Any, done: bool) -> None:
        """Queue an output (or the exception that ends it) for a request's caller, sent at the
        end of this turn; done: it is the request's last (engine thread)."""
        target = self._streams.pop(request_id, None) if done else self._streams.get(request_id)
        if target is not None:
            self._outgoing.append((target, item))

    def fail(self, request_id: str, error: BaseException) -> None:
        """End a request with `error`, freeing whatever it holds in the engine (engine thread)."""
        self.engine.abort_request(request_id)
        self.deliver(request_id, error, done=True)

    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox():
                    return
                self.role.turn(self)
                busy = self.engine.has_unfinished_requests()
                if busy:
                    for output in self.engine.step():
                        self.deliver(output.request_id, output, done=output.finished)
                    for prefilled in self.engine.take_prefilled():
                        self.role.prefilled(self, prefilled)
                self._flush()
                if not busy:
                    self._wake.wait(BUSY_POLL_S if self.role.is_waiting else IDLE_WAIT_S)
                    self._wake.clear()
        except Exception as e:
            logger.exception("engine loop failed")
            self._failure = f"{type(e).__name__}: {e}"
            # a tensor-parallel rank died: the worker is down as a unit, as if it had died
            lost = WorkerLost if isinstance(e, RankFailed) else WorkerUnavailable
            for request_id in list(self._streams):
                self.deliver(request_id, lost(self._failure), done=True)
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
            if isinstance(item, Submission):
                self._add(item)
            elif isinstance(item, _Abort):
                self._abort(item.request_id)
            else:
                item(self.engine)

    def _abort(self, request_id: str) -> None:
        if self.role.abort(self, request_id):
            return
        output = self.engine.abort_request(request_id)
        if output is not None:
            self.deliver(request_id, output, done=True)
        elif request_id not in self._streams:  # not here yet: refuse it if it comes soon
            remember(self._aborted, request_id)

    def _add(self, item: Submission) -> None:
        if recalls(self._aborted, item.request_id):  # its cancel came first
            self._refuse(item, RequestAborted("aborted"))
            return
        if item.request_id in self._streams:
            self._refuse(item, TandemError(f"request_id {item.request_id!r} is already in use"))
            return
        self._streams[item.request_id] = item
        if item.start is not None:
            item.start(self, item)
            return
        try:
            self.engine.add_request(
                item.request_id,
                None,
                item.params,
                prompt_token_ids=item.prompt_token_ids,
                cache_salt=item.cache_salt,
                prefill_only=item.prefill_only,
                resumed_token_ids=item.resumed_token_ids,
            )
        except TandemError as e:
            self.deliver(item.request_id, e, done=True)

    def _refuse(self, item: Submission, error: BaseException) -> None:
        self._outgoing.append((item, error))
        if item.on_refused is not None:
            item.on_refused()

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


def remember(entries: OrderedDict[str, float], key: str) -> None:
    """Note `key` for EARLY_ABORT_TTL_S, keeping at most MAX_EARLY_ABORTS (oldest go first)."""
    entries.pop(key, None)
    entries[key] = time.monotonic() + EARLY_ABORT_TTL_S
    while len(entries) > MAX_EARLY_ABORTS:
        entries.popitem(last=False)


def recalls(entries: OrderedDict[str, float], key: str) -> bool:
    """Whether `key` was noted by `remember` and has not expired (forgetting it either way)."""
    until = entries.pop(key, None)
    return until is not None and time.monotonic() < until
