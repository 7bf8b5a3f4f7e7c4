"""ChannelBackend: what a pair channel's backend supplies to the protocol that kvtransfer.channel
builds on it: process-group construction, the tensors it moves, completion of posted operations
(gloo waits on the host; NCCL orders CUDA streams and polls an event), receives posted ahead of
their headers, and teardown. Implemented by kvtransfer.gloo and kvtransfer.nccl; no protocol
logic (sequence numbers, header checks) lives here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvtransfer.header import PAYLOAD_TAG
from kvtransfer.transport import PairAddress, TransportConfig


@dataclass(eq=False)
class PostedReceive:
    """A payload's receive posted before its header arrived (PairChannel.post_recv); pass it
    to `wait_posted`. Backend state only: nothing here is for callers to read or change."""

    seq: int
    expected: tuple[int, int, int]  # (tag, nbytes, part_nbytes) its header must announce
    works: list[Any] = field(default_factory=list)  # gloo: the header's
    parts: tuple[torch.Tensor, ...] = ()  # gloo: received once the header checked out
    drain: Callable[[int], object] | None = None  # gloo: run as each part arrives
    done: Any = None  # NCCL: event after the header's copy to the host and every drain


class ChannelBackend(ABC):
    """The hooks a backend implements; PairChannel calls them from its one transfer thread
    (`settle` and `_teardown` from any thread)."""

    address: PairAddress  # set by PairChannel
    device: torch.device

    backend: ClassVar[str]
    # recv/recv_parts post header and parts together (see recv_parts): NCCL only, where a
    # payload of another size cannot take the process down
    _named_receives_ahead: ClassVar[bool] = False

    @staticmethod
    @abstractmethod
    def prepare_device(device: torch.device | str | None) -> torch.device:
        """The device this channel's tensors live on, after checking that this process can run
        the backend (ValueError if not). Formation only."""

    @staticmethod
    @abstractmethod
    def make_process_group(
        store: Any, address: PairAddress, config: TransportConfig, device: torch.device
    ) -> Any:
        """A 2-rank process group over `store`; blocks until the peer has joined. Formation
        only."""

    @abstractmethod
    def settle(self, timeout_s: float) -> bool:
        """After a failure (the channel closed or broken): wait up to timeout_s until no
        device work queued by this channel's receives (drains) can still run, so memory they
        write may be handed to someone else. True once settled (always on gloo, whose drains
        run on the caller's thread); False if device work is still pending."""

    @abstractmethod
    def _complete(self, works: list[Any], deadline: float) -> None:
        """Wait until the operations in `works` (in the order posted) and the device work queued
        on the current stream so far are complete, or `deadline` (time.monotonic) passes."""

    @abstractmethod
    def _order_after(self, work: Any, deadline: float) -> None:
        """Make work queued next on the current stream run after `work`; on gloo, wait for it."""

    def _post_group(
        self, pg: Any, post: Callable[..., Any], tensors: Sequence[torch.Tensor]
    ) -> list[Any]:
        """Post one send or receive per tensor (gloo: each its own message); their works."""
        return [post([tensor], self.address.peer_rank, PAYLOAD_TAG) for tensor in tensors]

    @abstractmethod
    def _draining(self) -> AbstractContextManager[object]:
        """Where drains run (on NCCL a stream of their own)."""

    @abstractmethod
    def _after_drains(self) -> None:
        """Order the current stream after every drain queued so far."""

    @abstractmethod
    def _post_ahead(
        self,
        pg: Any,
        posted: PostedReceive,
        parts: Sequence[torch.Tensor],
        drain: Callable[[int], object] | None,
    ) -> None:
        """Post `posted`'s receives (at least its header's) and record in it what
        `wait_posted` needs."""

    @abstractmethod
    def _posted_header(self, posted: PostedReceive, deadline: float) -> list[int]:
        """Wait for a posted receive's header; the header's values."""

    @abstractmethod
    def _posted_payload(self, pg: Any, posted: PostedReceive, deadline: float) -> None:
        """After its header checked out: complete a posted receive's parts and drains."""

    @abstractmethod
    def _check_tensor(self, tensor: torch.Tensor) -> None:
        """ValueError unless the backend can move `tensor` as is."""

    @abstractmethod
    def _teardown(self, pg: Any, must_abort: bool) -> None:
        """Free the process group; abort it if an operation may still be pending."""
