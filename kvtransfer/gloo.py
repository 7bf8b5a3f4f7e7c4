"""The gloo pair channel: kvtransfer.channel's interface over CPU tensors and TCP.

Every operation waits on the host with a timeout (`Work.wait`); drains run on the transfer
thread once their part arrived; a receive posted ahead posts only its header, and its parts
once the header checked out (gloo aborts the process on a message larger than the buffer
posted for it). Closing, or any timeout, drops the TCP connection: the peer's pending
operations fail at once. Costs a TCP connection and a few gloo threads, no tensor memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from contracts.errors import KVTransferError
from kvtransfer.backend import PostedReceive
from kvtransfer.channel import MAX_POSTED, PairChannel, check_contiguous
from kvtransfer.header import HEADER_TAG, PAYLOAD_TAG
from kvtransfer.transport import PairAddress, TransportConfig


class GlooPairChannel(PairChannel):
    """A pair over gloo: CPU tensors over TCP."""

    backend = "gloo"

    @staticmethod
    def prepare_device(device: torch.device | str | None) -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def make_process_group(
        store: Any, address: PairAddress, config: TransportConfig, device: torch.device
    ) -> Any:
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        # bounds gloo's connect to the peer (a peer gone after the rendezvous); every
        # operation waits with a timeout of its own (checked: longer ones are honoured)
        options._timeout = timedelta(seconds=config.connect_timeout_s)
        options._devices = [_gloo_device(config.gloo_hostname)]
        return dist.ProcessGroupGloo(store, address.rank, 2, options)

    def _check_tensor(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(f"gloo channels move CPU tensors, got one on {tensor.device}")
        check_contiguous(tensor)

    def _teardown(self, pg: Any, must_abort: bool) -> None:
        """Cancel this side's pending operation, where torch's gloo has abort() (2.13 does);
        the sockets close when the last reference to the process group goes, which fails the
        peer's pending operations. Nothing to flush: every operation was waited for."""
        abort = getattr(pg, "abort", None)
        if abort is not None:
            abort()

    def settle(self, timeout_s: float) -> bool:
        return True  # drains run on the transfer thread: none can be pending

    def _complete(self, works: list[Any], deadline: float) -> None:
        """Wait until the operations in `works` (in the order posted) and the device work queued
        on the current stream so far are complete, or `deadline` (time.monotonic) passes."""
        for work in works:
            _wait(work, deadline)

    def _order_after(self, work: Any, deadline: float) -> None:
        """Make work queued next on the current stream run after `work`; on gloo, wait for it."""
        _wait(work, deadline)

    def _draining(self) -> AbstractContextManager[object]:
        """Drains run on the caller's thread, after their part arrived."""
        return nullcontext()

    def _after_drains(self) -> None:
        """Nothing to order: every drain ran already."""
        return None

    def _post_ahead(
        self,
        pg: Any,
        posted: PostedReceive,
        parts: Sequence[torch.Tensor],
        drain: Callable[[int], object] | None,
    ) -> None:
        """Post `posted`'s header receive. On gloo the parts' receives wait for the header's
        check (_posted_payload): gloo aborts the process on a message larger than the buffer
        posted for it, and there is no GPU kernel to spare the wait (headers and payloads
        have tag slots of their own, so a later header may be posted first)."""
        header = self._posted_headers[posted.seq % MAX_POSTED]
        posted.works.append(pg.recv([header], self.address.peer_rank, HEADER_TAG))
        posted.parts, posted.drain = tuple(parts), drain

    def _posted_header(self, posted: PostedReceive, deadline: float) -> list[int]:
        """Wait for a posted receive's header (NCCL: for all of it); the header's values."""
        _wait(posted.works[0], deadline)
        return self._posted_headers[posted.seq % MAX_POSTED].tolist()

    def _posted_payload(self, pg: Any, posted: PostedReceive, deadline: float) -> None:
        """After its header checked out: receive a posted receive's parts, draining each."""
        for index, part in enumerate(posted.parts):
            _wait(pg.recv([part], self.address.peer_rank, PAYLOAD_TAG), deadline)
            if posted.drain is not None:
                posted.drain(index)


def _wait(work: Any, deadline: float) -> None:
    """Wait for a work handle until `deadline` (time.monotonic); torch raises on timeout."""
    remaining_s = deadline - time.monotonic()
    if remaining_s <= 0:
        raise KVTransferError("timed out")
    if not work.wait(timedelta(seconds=remaining_s)):
        raise KVTransferError("operation aborted")


def _gloo_device(hostname: str | None) -> Any:
    if hostname is None:
        return dist.ProcessGroupGloo.create_default_device()
    return dist.ProcessGroupGloo.create_device(hostname=hostname)
