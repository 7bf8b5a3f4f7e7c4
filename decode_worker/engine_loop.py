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
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.engine import Engine
from engine.errors import TandemError, WorkerUnavailable
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # the engine thread's sleep when it has nothing to do (woken by submits)


@dataclass(frozen=True, slots=True)
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    stream: asyncio.Queue[Any]
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Submit | _Abort | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Submit] = {}  # engine thread only
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> asyncio.Queue[Any]:
        """Queue a request; its RequestOutputs (or one exception) arrive on the returned queue,
        the last output having finished=True. Call from a running event loop."""
        if self._failure is not None:
            raise WorkerUnavailable(f"engine loop stopped: {self._failure}")
        stream: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._inbox.put(
            _Submit(request_id, list(prompt_token_ids), params, cache_salt, stream, loop)
        )
        self._wake.set()
        return stream

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
        done.wait()
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

    # -- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox():
                    return
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        self._deliver(output.request_id, output, done=output.finished)
                else:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
        except Exception as e:
            logger.exception("engine loop failed")
            self._failure = f"{type(e).__name__}: {e}"
            for request_id in list(self._streams):
                self._deliver(request_id, WorkerUnavailable(self._failure), done=True)

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
                output = self.engine.abort_request(item.request_id)
                if output is not None:
                    self._deliver(item.request_id, output, done=True)
            else:
                item(self.engine)

    def _add(self, item: _Submit) -> None:
        if item.request_id in self._streams:
            error = TandemError(f"request_id {item.request_id!r} is already in use")
            item.loop.call_soon_threadsafe(item.stream.put_nowait, error)
            return
        self._streams[item.request_id] = item
        try:
            self.engine.add_request(
                item.request_id,
                None,
                item.params,
                prompt_token_ids=item.prompt_token_ids,
                cache_salt=item.cache_salt,
            )
        except TandemError as e:
            self._deliver(item.request_id, e, done=True)

    def _deliver(self, request_id: str, item: Any, done: bool) -> None:
        target = self._streams.pop(request_id, None) if done else self._streams.get(request_id)
        if target is not None:
            target.loop.call_soon_threadsafe(target.stream.put_nowait, item)
