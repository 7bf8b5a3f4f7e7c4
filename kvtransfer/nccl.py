"""The NCCL pair channel: kvtransfer.channel's interface over CUDA tensors, one NCCL
communicator per pair, created during formation by the handshake.

A broken channel is aborted on close (only an abort cancels a stuck NCCL kernel); channels
refuse to form unless torch's NCCL watchdog is told to abort the failed communicator only
(`configure_nccl_environment`, at worker start-up). The host never blocks inside torch or CUDA:
it polls a CUDA event recorded after each operation, at a fine timer slack. Why, and what was
measured (failure recovery, GPU memory per pair, poll latency): docs/kvtransfer.md.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from contracts.errors import KVTransferError
from kvtransfer.backend import PostedReceive
from kvtransfer.channel import MAX_POSTED, PairChannel, check_contiguous
from kvtransfer.header import HEADER_NUMEL, HEADER_TAG, PAYLOAD_TAG
from kvtransfer.transport import PairAddress, TransportConfig

logger = logging.getLogger(__name__)

NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
_SAFE_NCCL_ERROR_HANDLING = ("0", "2")  # no handling / clean up only: never kill the process
_POLL_S = 20e-6  # host poll interval of an operation's completion
POLL_TIMER_SLACK_NS = 1_000  # a polling thread's timer slack (Linux default: 50,000)
_PR_SET_TIMERSLACK = 29  # prctl option (linux/prctl.h)
_thread_state = threading.local()


class NcclPairChannel(PairChannel):
    """A pair over NCCL: CUDA tensors on one device, one communicator per pair."""

    backend = "nccl"
    _named_receives_ahead = True

    @staticmethod
    def prepare_device(device: torch.device | str | None) -> torch.device:
        _check_nccl_error_handling()
        if device is None or torch.device(device).type != "cuda":
            raise ValueError(f"an NCCL channel needs a CUDA device, got {device!r}")
        resolved = torch.device(device)
        return resolved if resolved.index is not None else torch.device("cuda", 0)

    @staticmethod
    def make_process_group(
        store: Any, address: PairAddress, config: TransportConfig, device: torch.device
    ) -> Any:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=config.backstop_timeout_s)
        options.is_high_priority_stream = config.nccl_high_priority
        if config.nccl_max_ctas is not None:
            options.config.min_ctas = 1
            options.config.max_ctas = config.nccl_max_ctas
        return dist.ProcessGroupNCCL(store, address.rank, 2, options)

    def _check_tensor(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            raise ValueError(
                f"this NCCL channel moves tensors on {self.device}, not {tensor.device}"
            )
        check_contiguous(tensor)

    def _teardown(self, pg: Any, must_abort: bool) -> None:
        """Always abort: nothing needs flushing (every operation was waited for), and on 2x
        H100 (torch 2.11, NCCL 2.28) `shutdown()` of one side blocked until the peer closed
        too, so a sender closing before its receiver hung. Abort also cancels kernels still
        waiting for a peer that will not come."""
        del must_abort
        pg.abort()

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # Receives are posted from the caller's stream, and NCCL's stream waits for that stream
        # before each operation; drains (scatters) queued there would hold back the next part's
        # receive. They run on this stream instead, which waits for the receive of their part.
        self._drain_stream = torch.cuda.Stream(self.device)
        self._posted_headers_device = torch.empty(
            (MAX_POSTED, HEADER_NUMEL), dtype=torch.int64, device=self.device
        )
        self._send_header_host = torch.empty(HEADER_NUMEL, dtype=torch.int64, pin_memory=True)

    def _stage_header(self, values: torch.Tensor) -> None:
        """Through pinned memory, asynchronously: from pageable memory torch would synchronize
        the current stream on the host before the send could be posted. The pinned row is
        rewritten only by the next operation, which starts after this one completed (every
        operation ends in _complete, which covers this copy; a failed one breaks the
        channel)."""
        self._send_header_host.copy_(values)
        self._send_header.copy_(self._send_header_host, non_blocking=True)

    @contextmanager
    def _draining(self) -> Iterator[None]:
        self._drain_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._drain_stream):
            yield

    def _after_drains(self) -> None:
        # Not after each drain: the next part's receive would wait for it (NCCL's stream waits
        # for the current stream at every post), serialising receives and scatters.
        torch.cuda.current_stream(self.device).wait_stream(self._drain_stream)

    def _post_ahead(
        self,
        pg: Any,
        posted: PostedReceive,
        parts: Sequence[torch.Tensor],
        drain: Callable[[int], object] | None,
    ) -> None:
        """Receives, then on the drain stream: the header's copy to pinned host memory and
        each part's drain after its receive, then an event the host polls. Nothing queued on
        the caller's stream: a later post must not wait for these drains."""
        peer = self.address.peer_rank
        slot = posted.seq % MAX_POSTED
        header = self._posted_headers_device[slot]
        header_work = pg.recv([header], peer, HEADER_TAG)
        part_works = [pg.recv([part], peer, PAYLOAD_TAG) for part in parts]
        with self._draining():
            header_work.wait()  # the drain stream waits for the receive, the host does not
            self._posted_headers[slot].copy_(header, non_blocking=True)
            for index, work in enumerate(part_works):
                work.wait()
                if drain is not None:
                    drain(index)
            posted.done = torch.cuda.Event()
            posted.done.record()

    def _posted_header(self, posted: PostedReceive, deadline: float) -> list[int]:
        _poll(posted.done, deadline)  # header, parts and drains: one event for all
        return self._posted_headers[posted.seq % MAX_POSTED].tolist()

    def _posted_payload(self, pg: Any, posted: PostedReceive, deadline: float) -> None:
        return None  # in and drained before the header could be read

    def settle(self, timeout_s: float) -> bool:
        try:
            _poll(self._drain_stream, time.monotonic() + timeout_s)
        except KVTransferError:
            return False
        return True

    def _complete(self, works: list[Any], deadline: float) -> None:
        """Order the current stream after every operation, then poll a CUDA event recorded on
        it until done or `deadline`. torch's own timed wait sleeps in whole milliseconds
        between checks (~1 ms per message), and a wait that times out inside torch marks the
        work failed for its watchdog; polling an event costs microseconds and leaves torch's
        state alone, so a timeout here only breaks this channel (closed by abort)."""
        for work in works:
            work.wait()  # no timeout: the current stream waits for NCCL's, the host does not
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))  # this device's, whichever the
        _poll(event, deadline)  # thread's current one (formation runs on other threads)

    def _order_after(self, work: Any, deadline: float) -> None:
        work.wait()  # the current stream waits for the receive; the host does not

    def _post_group(
        self, pg: Any, post: Callable[..., Any], tensors: Sequence[torch.Tensor]
    ) -> list[Any]:
        """Post the operations inside one NCCL group (torch's coalescing, as batch_isend_irecv
        does, here on the pair's own process group): one work for all. torch runs grouped
        point-to-point on a communicator of its own (created on first use, both sides at once,
        which each group's first use is). Without coalescing in this torch: one by one."""
        if len(tensors) == 1 or not hasattr(pg, "_start_coalescing"):
            return super()._post_group(pg, post, tensors)
        pg._start_coalescing()
        try:
            for tensor in tensors:
                post([tensor], self.address.peer_rank, PAYLOAD_TAG)
        finally:
            work = pg._end_coalescing()
        return [work]


def configure_nccl_environment() -> None:
    """Make NCCL failures abort only the failed communicator instead of the process: sets
    TORCH_NCCL_ASYNC_ERROR_HANDLING=2 unless already set. Call at worker start-up, before
    threads run. Raises ValueError if the variable is set to a value that kills the process."""
    os.environ.setdefault(NCCL_ERROR_HANDLING_ENV, "2")
    _check_nccl_error_handling()


def _check_nccl_error_handling() -> None:
    value = os.environ.get(NCCL_ERROR_HANDLING_ENV)
    if value not in _SAFE_NCCL_ERROR_HANDLING:
        raise ValueError(
            f"{NCCL_ERROR_HANDLING_ENV}={value!r}: NCCL channels need 2 (or 0), else torch's "
            "watchdog kills the process after one failed transfer; call "
            "kvtransfer.nccl.configure_nccl_environment() at worker start-up"
        )


def _poll(event: Any, deadline: float) -> None:
    """Poll a CUDA event (or stream) until it is done; KVTransferError once `deadline`
    passes. Sleeps between checks, at this thread's fine timer slack."""
    fine_timer_slack()
    while not event.query():
        if time.monotonic() > deadline:
            raise KVTransferError("timed out")
        time.sleep(_POLL_S)


def fine_timer_slack() -> None:
    """Cut the calling thread's timer slack to POLL_TIMER_SLACK_NS, once per thread (Linux
        only; elsewhere, or if prctl fails, sleeps stay as coarse as the system makes them).
        Linux lengthens every sleep of a thread by its slack, 50 us by default: a 20 us poll then
        wakes every ~85 us instead of ~35 us (bench/poll_latency.py), adding the difference to
        the latency of each message. Per thread: the threads that poll (a pair's transfer thread,
    and the one that formed it) wake more precisely, the engine's threads keep their slack."""
    if getattr(_thread_state, "slack_set", False):
        return
    _thread_state.slack_set = True
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        zero = ctypes.c_ulong(0)
        slack = ctypes.c_ulong(POLL_TIMER_SLACK_NS)
        if libc.prctl(ctypes.c_int(_PR_SET_TIMERSLACK), slack, zero, zero, zero) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_TIMERSLACK) failed")
    except (OSError, AttributeError) as e:
        logger.debug("timer slack left as is: %s", e)
