"""The decode side of the handoff: requests prefilled elsewhere, joined to the KV their
`KVHandle` names as it arrives through the pairs' receivers (a `LoopRole` of the engine loop).

The first token's output goes out at once; the sequence waits (AWAITING_KV) until its KV lands.
A handle that ships only the prompt after a prefix this worker caches (`start_token`): that
prefix's blocks are held at once and the arrived ones attached after them; the prefix gone
from the cache already: the prompt is recomputed here.
When the KV will not come, the prompt is computed again here (issue 22.2), the request going on
as if it had been prefilled here, its output unchanged: no room for the KV, a transfer that
failed or timed out, one that did not arrive within `kv_wait_s`, or one never offered while
a pair failed (its prefill worker died after the first token, before shipping). Each such
recompute is counted (`num_recomputed`, by reason). KV nobody will use is freed as it arrives.
Engine thread only, except `submit`. Step by step: docs/architecture.md, "The prefill ->
decode handoff".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from contracts.errors import RankFailed, TandemError
from contracts.handoff import PrefillResult
from contracts.sampling_params import SamplingParams
from kvtransfer.protocol import TransferMetrics
from kvtransfer.receiver import KVReceiver
from worker.base import PromptKVCounts
from worker.engine_loop import EngineLoop, LoopRole, Submission, recalls, remember

logger = logging.getLogger(__name__)

UNCLAIMED_KV_S = 60.0  # transferred KV nobody continued within this is released
# How a receiver refusing a transfer for lack of free blocks says so (kvtransfer.receiver).
NO_ROOM_FOR_KV = "no free KV blocks"


@dataclass(frozen=True, slots=True)
class _Waiting:
    request_id: str
    deadline: float  # monotonic: recompute the prompt here if its KV has not arrived by then
    failed_pairs: int  # pairs seen failed when it began waiting
    reused_tokens: int = 0  # prompt tokens before the KV's start: held here, in this cache


class KVArrivals(LoopRole):
    """See the module docstring. `receivers` are appended (any thread) as pairs form."""

    def __init__(
        self, release: Callable[[str], bool], counts: PromptKVCounts | None = None
    ) -> None:
        """release: the engine's block_manager.release (frees KV by its owner); counts: where
        the KV attached (and the prefix reused) is counted."""
        self._release = release
        self.counts = counts or PromptKVCounts()
        self.receivers: list[KVReceiver] = []
        self.retired_metrics = TransferMetrics()  # of receivers dropped after their pair failed
        self._waiting: dict[str, _Waiting] = {}  # transfer id -> the request waiting for it
        self._transfer_of: dict[str, str] = {}  # waiting request id -> its transfer id
        self._arrived: dict[str, tuple[Any, float]] = {}  # transfer id -> (ReceivedKV, when)
        self._dropped: OrderedDict[str, float] = OrderedDict()  # transfer ids -> expiry
        # requests aborted before they came here: KV that arrives for them is freed
        self._dropped_requests: OrderedDict[str, float] = OrderedDict()
        self._failed_receivers: set[int] = set()  # ids of receivers seen failed
        self.num_failed_pairs = 0  # pairs seen failed, ever
        self.num_recomputed: dict[str, int] = {}  # prompts recomputed here, by reason

    def submit(
        self,
        loop: EngineLoop,
        request_id: str,
        prompt_token_ids: Sequence[int],
        prefill: PrefillResult,
        params: SamplingParams,
        cache_salt: str | None,
        kv_wait_s: float = 30.0,
        resumed_token_ids: Sequence[int] = (),
    ) -> asyncio.Queue[Any]:
        """Continue a request prefilled elsewhere (call from the worker's event loop): its
        outputs from the first token on arrive on the returned queue; it waits up to
        kv_wait_s for the KV its handle names."""
        deadline = time.monotonic() + kv_wait_s
        kv = prefill.kv
        return loop.submit(
            request_id, prompt_token_ids, params, cache_salt,
            start=functools.partial(self._start, prefill=prefill, deadline=deadline),
            on_refused=None if kv is None else functools.partial(self._drop, kv.transfer_id),
            resumed_token_ids=resumed_token_ids,
        )  # fmt: skip

    # -- engine thread --------------------------------------------------------------------------

    def _start(
        self, loop: EngineLoop, item: Submission, prefill: PrefillResult, deadline: float
    ) -> None:
        kv = prefill.kv
        try:
            output = loop.engine.add_remote_request(
                item.request_id, item.prompt_token_ids, prefill.first_token_id, item.params,
                cache_salt=item.cache_salt, logprobs=prefill.logprobs,
                prefill_usage=prefill.usage, resumed_token_ids=item.resumed_token_ids,
            )  # fmt: skip
        except (TandemError, ValueError) as e:
            if kv is not None:
                self._drop(kv.transfer_id)
            loop.deliver(item.request_id, e, done=True)
            return
        loop.deliver(item.request_id, output, done=output.finished)
        if output.finished:  # the first token ended it: its KV, if any was sent, is nobody's
            if kv is not None:
                self._drop(kv.transfer_id)
        elif kv is None:  # none was sent (the router expected the first token to end it)
            loop.engine.attach_kv(item.request_id, None)
        elif kv.start_token and not _hold_prefix(loop, item.request_id, kv.start_token):
            # The prefix the KV continues is no longer cached here (evicted since the router
            # looked): the prompt is recomputed here instead, and the transfer dropped.
            logger.info("request %s: its cached prefix of %d tokens is gone here; recomputing "
                        "its prompt", item.request_id, kv.start_token)  # fmt: skip
            self._drop(kv.transfer_id)
            loop.engine.attach_kv(item.request_id, None)
        else:
            self._waiting[kv.transfer_id] = _Waiting(
                item.request_id, deadline, self.num_failed_pairs, kv.start_token
            )
            self._transfer_of[item.request_id] = kv.transfer_id

    def abort(self, loop: EngineLoop, request_id: str) -> bool:
        transfer_id = self._transfer_of.pop(request_id, None)
        if transfer_id is not None:  # waiting for its KV: drop it (the engine aborts the rest)
            del self._waiting[transfer_id]
            self._drop(transfer_id)
        elif not loop.has_stream(request_id):  # not here yet: its KV may come first
            remember(self._dropped_requests, request_id)
            for transfer_id, (kv, _) in list(self._arrived.items()):
                if kv.request_id == request_id:
                    del self._arrived[transfer_id]
                    self._release(kv.owner)
        return False

    @property
    def is_waiting(self) -> bool:
        return bool(self._waiting)

    def holders(self) -> list[str]:
        held = [kv.owner for kv, _ in self._arrived.values()]
        return held + [owner for r in self.receivers for owner in r.owners()]

    def turn(self, loop: EngineLoop) -> None:
        """Take the KV that arrived; join it to its request; expire both sides."""
        now = time.monotonic()
        release = self._release
        for receiver in self.receivers:
            for kv in receiver.poll():
                if recalls(self._dropped, kv.transfer_id) or recalls(
                    self._dropped_requests, kv.request_id
                ):  # its request is gone, or ended at its first token
                    release(kv.owner)
                    continue
                self._arrived[kv.transfer_id] = (kv, now)
        for transfer_id in [t for t in self._waiting if t in self._arrived]:
            waiting = self._forget(transfer_id)
            kv, _ = self._arrived.pop(transfer_id)
            try:
                loop.engine.attach_kv(waiting.request_id, kv.owner)
            except ValueError as e:
                release(kv.owner)
                loop.fail(waiting.request_id, e)
                continue
            except RankFailed:  # a rank died in the scatter (private KV): the worker is down
                release(kv.owner)
                raise
            self.counts.tokens_received += kv.num_tokens
            self.counts.blocks_received += len(kv.block_ids)
            self.counts.tokens_reused += waiting.reused_tokens
        self._note_failed_pairs()
        for transfer_id, waiting in list(self._waiting.items()):
            failed = self._transfer_failure(transfer_id, waiting)
            if failed is None and now > waiting.deadline:
                failed = "timeout: it did not arrive in time"
                self._drop(transfer_id)  # if it comes after all, it is freed as it lands
            if failed is None:
                continue
            self._forget(transfer_id)
            reason = "no_room" if NO_ROOM_FOR_KV in failed else failed.partition(":")[0]
            self.num_recomputed[reason] = self.num_recomputed.get(reason, 0) + 1
            logger.info("request %s: its KV will not come (%s); recomputing its prompt here",
                        waiting.request_id, failed)  # fmt: skip
            loop.engine.attach_kv(waiting.request_id, None)
        for transfer_id, (kv, when) in list(self._arrived.items()):
            if now - when > UNCLAIMED_KV_S:  # its request never came (router gone): free it
                del self._arrived[transfer_id]
                release(kv.owner)
        self._prune_receivers()

    def _forget(self, transfer_id: str) -> _Waiting:
        waiting = self._waiting.pop(transfer_id)
        del self._transfer_of[waiting.request_id]
        return waiting

    def _prune_receivers(self) -> None:
        """Drop receivers whose pair failed (their prefill worker died or left) once they hold
        nothing: a pool that keeps changing must not leave a trail of them to poll. Their
        counters carry on in `retired_metrics`."""
        for receiver in list(self.receivers):
            if receiver.failure is not None and receiver.num_live == 0 and not receiver.owners():
                self.receivers.remove(receiver)
                self.retired_metrics.absorb(receiver.metrics)

    def _note_failed_pairs(self) -> None:
        for receiver in self.receivers:
            if receiver.failure is not None and id(receiver) not in self._failed_receivers:
                self._failed_receivers.add(id(receiver))
                self.num_failed_pairs += 1

    def _transfer_failure(self, transfer_id: str, waiting: _Waiting) -> str | None:
        """Why a transfer ended without its KV (its sender died, aborted, ...), if it has; or
        that it was never offered while a pair failed (its prefill worker was lost)."""
        offered = False
        for receiver in self.receivers:
            result = receiver.result(transfer_id)
            if result is not None and not result.ok:
                return f"{result.status.value}: {result.reason}"
            offered = offered or receiver.knows(transfer_id)
        if not offered and self.num_failed_pairs > waiting.failed_pairs:
            self._drop(transfer_id)  # if it was offered after all, it is freed as it lands
            return "pair_failed: a KV pair failed before this transfer was offered"
        return None

    def _drop(self, transfer_id: str) -> None:
        """Free the KV of a transfer whose request will not continue: arrived, still arriving,
        or not offered yet (freed as it arrives, see `turn`)."""
        arrived = self._arrived.pop(transfer_id, None)
        if arrived is not None:
            self._release(arrived[0].owner)
            return
        for receiver in self.receivers:  # in flight: freed once no data can land
            receiver.abort(transfer_id, "request ended")
        remember(self._dropped, transfer_id)  # complete but not polled yet, or not offered


def _hold_prefix(loop: EngineLoop, request_id: str, num_tokens: int) -> bool:
    """Hold the cached prefix a transfer continues (Engine.hold_prefix); False if it is not
    all cached here, or the handle's start does not fit the prompt (logged: a bug upstream)."""
    try:
        return loop.engine.hold_prefix(request_id, num_tokens)
    except ValueError as e:
        logger.warning("request %s: %s; recomputing its prompt", request_id, e)
        return False
