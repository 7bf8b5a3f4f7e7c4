"""PairChannel: one side of a 2-rank channel between two workers, the role-neutral interface
both ends use to move KV payloads (send, receive by name or by tag, post receives ahead), with
the protocol logic every backend shares: sequence counting, header checks, one thread per
channel, breaking for good on the first failure. Backends supply process-group construction,
completion and teardown: kvtransfer.gloo (CPU tensors) and kvtransfer.nccl (CUDA tensors).
The wire format is kvtransfer.header; the rules are in docs/kvtransfer.md.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from contracts.errors import KVTransferError
from kvtransfer.backend import ChannelBackend, PostedReceive
from kvtransfer.guard import ChannelGuard
from kvtransfer.header import (
    HEADER_NUMEL,
    HEADER_TAG,
    MARKER,
    PAYLOAD_TAG,
    VOID,
    check_exact,
    check_fields,
    check_group,
    check_next,
    check_parts,
    check_posted,
    check_tag,
    header_values,
)
from kvtransfer.transport import PairAddress, TransportConfig, describe

logger = logging.getLogger(__name__)

MAX_POSTED = 8  # receives a channel may have posted ahead of their headers at once


class PairChannel(ChannelBackend):
    """One side of a 2-rank channel. Use from one thread; `close` may come from any thread
    but does not cancel a gloo operation in flight: stop waiting by a short timeout_s."""

    def __init__(
        self, address: PairAddress, config: TransportConfig, store: Any, pg: Any, device: Any
    ) -> None:
        self.address = address
        self.config = config
        self.device = torch.device(device)
        self._guard = ChannelGuard(
            self._name(), pg, store, config.timeout_s, config.backstop_timeout_s
        )
        self._op = self._guard.operation
        self._num_sent = 0  # payloads sent: the seq of the next send
        self._num_received = 0
        self._pending: tuple[int, int] | None = None  # (nbytes, part_nbytes) not yet received
        self._posted: deque[PostedReceive] = deque()  # posted ahead, not yet waited for
        self._send_header = torch.empty(HEADER_NUMEL, dtype=torch.int64, device=self.device)
        self._recv_header = torch.empty(HEADER_NUMEL, dtype=torch.int64, device=self.device)
        # where posted-ahead headers land, one row per slot, readable on the host once done
        self._posted_headers = torch.empty(
            (MAX_POSTED, HEADER_NUMEL), dtype=torch.int64, pin_memory=self.device.type == "cuda"
        )

    def handshake(self, timeout_s: float) -> None:
        """One header from rank 0 to rank 1 (seq -1): proves both ends are connected and, on
        NCCL, creates the communicator. Does not count as a payload. Formation only."""
        with self._op("handshake", max(timeout_s, 0.001)) as (pg, deadline):
            if self.address.rank == 0:
                self._complete([self._post_header(pg, -1, 0, 0, 0)], deadline)
            else:
                self._expect_header(pg, -1, 0, 0, deadline)

    # -- data ---------------------------------------------------------------------------------

    def send(self, tensor: torch.Tensor, *, tag: int = 0, timeout_s: float | None = None) -> None:
        """Send `tensor` (contiguous, on this channel's device) to the peer, which must post a
        `recv` of the same number of bytes and tag as its next receive.

        Returns once the tensor may be reused. Raises KVTransferError if the peer does not take
        it within timeout_s (default config.timeout_s), died, or the channel is broken or closed;
        ValueError for a bad tensor or tag, before anything is sent. Transfer thread only.
        """
        self.send_parts([tensor], tag=tag, timeout_s=timeout_s)

    def send_parts(
        self,
        parts: Sequence[torch.Tensor],
        *,
        tag: int = 0,
        fill: Callable[[int], object] | None = None,
        timeout_s: float | None = None,
        void: bool = False,
    ) -> None:
        """Send one payload made of `parts` (contiguous, on this channel's device, all of the
        first one's size but the last, which may be smaller); the peer receives it with
        `recv_parts` over parts of the same sizes, or `recv` of the whole size if one part.

        fill(i), if given, runs just before part i is posted and may queue work on the current
        CUDA stream that writes part i (a gather): the send waits for it on the device, not the
        host, so filling part i + 1 overlaps sending part i. With `void`, the header flags the
        bytes as no data (the filler of a payload the peer posted ahead, see
        docs/kvtransfer.md). Returns once every part is sent and may be reused. Raises like `send`;
        ValueError for parts of mismatched sizes.
        """
        sizes = [self._checked_size(part) for part in parts]
        nbytes, part_nbytes = check_parts(tag, sizes)
        flags = VOID if void else 0
        with self._op("send", timeout_s) as (pg, deadline):
            works = [self._post_header(pg, self._num_sent, tag, nbytes, part_nbytes, flags)]
            for index, part in enumerate(parts):
                if fill is not None:
                    fill(index)
                works.append(pg.send([part], self.address.peer_rank, PAYLOAD_TAG))
            self._complete(works, deadline)
            self._num_sent += 1

    def send_group(
        self, tensors: Sequence[torch.Tensor], *, tag: int = 0, timeout_s: float | None = None
    ) -> None:
        """Send one payload made of `tensors` (contiguous, on this channel's device, of any
        sizes, at least one byte each), posted together (see docs/kvtransfer.md); the peer
        receives it with `recv_group` over tensors of the same sizes in the same order.
        Returns once all are sent. Raises like `send`."""
        sizes = [self._checked_size(tensor) for tensor in tensors]
        check_group(tag, sizes)
        with self._op("send", timeout_s) as (pg, deadline):
            works = [self._post_header(pg, self._num_sent, tag, sum(sizes), -len(sizes))]
            works += self._post_group(pg, pg.send, tensors)
            self._complete(works, deadline)
            self._num_sent += 1

    def recv_group(
        self, tensors: Sequence[torch.Tensor], *, tag: int = 0, timeout_s: float | None = None
    ) -> None:
        """Receive the peer's next payload, sent with `send_group`, into `tensors` (sized and
        ordered as the sender's). Returns once all have arrived. Raises like `recv`, also for
        a payload announced as anything but a group of that many tensors and bytes."""
        sizes = [self._checked_size(tensor) for tensor in tensors]
        check_group(tag, sizes)
        self._check_nothing_posted()
        with self._op("recv", timeout_s) as (pg, deadline):
            got_tag, got_nbytes = self._next_header(pg, deadline)
            got = (got_tag, got_nbytes, self.pending_part_nbytes)
            check_fields(got, (tag, sum(sizes), -len(sizes)))  # -n: a group of n
            self._recv_group_payload(pg, tensors, deadline)

    def recv_payload_group(
        self, tensors: Sequence[torch.Tensor], *, timeout_s: float | None = None
    ) -> None:
        """Receive the group announced by the last `recv_header` into `tensors`. ValueError
        (nothing received) if their number or total size differs from the announced ones."""
        sizes = [self._checked_size(tensor) for tensor in tensors]
        if self._pending is None:
            raise RuntimeError(f"{self._name()}: recv_payload_group without an announced payload")
        if (sum(sizes), -len(sizes)) != self._pending:
            raise ValueError(
                f"the announced payload is {self._pending[0]} bytes in {self._pending[1]} "
                f"(-n: a group of n), the tensors {sum(sizes)} bytes in a group of {len(sizes)}"
            )
        with self._op("recv", timeout_s) as (pg, deadline):
            self._recv_group_payload(pg, tensors, deadline)

    def _recv_group_payload(
        self, pg: Any, tensors: Sequence[torch.Tensor], deadline: float
    ) -> None:
        self._complete(self._post_group(pg, pg.recv, tensors), deadline)
        self._pending = None
        self._num_received += 1

    def send_marker(self, *, tag: int, timeout_s: float | None = None) -> None:
        """Send a header with no payload (nbytes = MARKER) in place of a payload: tells the
        peer that the payload it may be waiting for under `tag` will not come (an aborted
        transfer), keeping both sides' sequence in step. Counts as one payload."""
        check_tag(tag)
        with self._op("send", timeout_s) as (pg, deadline):
            self._complete([self._post_header(pg, self._num_sent, tag, MARKER, 0)], deadline)
            self._num_sent += 1

    def recv(self, tensor: torch.Tensor, *, tag: int = 0, timeout_s: float | None = None) -> None:
        """Receive the peer's next payload into `tensor` (preallocated, contiguous, on this
        channel's device, exactly the payload's size), checking its header (see `recv_parts`
        for when).

        Returns once the data is in `tensor`. Raises KVTransferError on timeout (default
        config.timeout_s), a dead peer, a header that does not match (size, tag or sequence), a
        marker instead of a payload (on NCCL: by timeout), a VOID payload, or a broken or closed
        channel; ValueError for a bad tensor or tag. Transfer thread only.
        """
        self.recv_parts([tensor], tag=tag, timeout_s=timeout_s)

    def recv_parts(
        self,
        parts: Sequence[torch.Tensor],
        *,
        tag: int = 0,
        drain: Callable[[int], object] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Receive the peer's next payload into `parts` (sized as the sender's parts), checking
        its header. drain(i), if given, runs once part i's receive is posted, with the current
        CUDA stream ordered after it (on gloo: after it completed), and may queue work that
        reads part i (a scatter): it overlaps the receive of part i + 1. Returns once every
        part has arrived and every drain's device work is complete. Raises like `recv`; a
        VOID payload raises KVTransferError too, but the channel stays usable.

        On NCCL the header is not waited for first: header and parts are posted together
        (`post_recv`) and the header checked once they are in, so the sender's kernel does not
        wait for this host to read the header. A marker in place of the payload then fails by
        timeout instead of at once (either way the channel breaks). On gloo, header first.
        """
        sizes = [self._checked_size(part) for part in parts]
        nbytes, part_nbytes = check_parts(tag, sizes)
        self._check_nothing_posted()
        if self._named_receives_ahead:
            self._guard.limit_s(timeout_s)  # ValueError before anything is posted
            posted = self.post_recv(parts, tag=tag, drain=drain)
            if self.wait_posted(posted, timeout_s=timeout_s):
                raise KVTransferError(f"{self._name()}: the payload tagged {tag} is VOID")
            return
        with self._op("recv", timeout_s) as (pg, deadline):
            got_tag, got_nbytes = self._next_header(pg, deadline)
            got = (got_tag, got_nbytes, self.pending_part_nbytes)
            check_fields(got, (tag, nbytes, part_nbytes))
            self._recv_payload(pg, parts, part_nbytes, drain, deadline)

    def post_recv(
        self,
        parts: Sequence[torch.Tensor],
        *,
        tag: int = 0,
        drain: Callable[[int], object] | None = None,
    ) -> PostedReceive:
        """Post the receive of the peer's next payload (after any posted before it) into
        `parts`, with its header, before that header has arrived; never blocks. On NCCL
        drain(i) runs now and may queue device work that reads part i, ordered after part i's
        receive on a stream of the channel's. On gloo only the header is posted now: the parts
        are received and drained in `wait_posted`, once the header checked out.

        `wait_posted` must follow for every posted receive, in order. On NCCL the header is
        checked only once everything is in, when a wrong payload may have been drained: drain
        only into memory the expected payload owns. RuntimeError with MAX_POSTED receives
        outstanding or a header read by `recv_header` still pending; ValueError for bad parts
        or tag."""
        sizes = [self._checked_size(part) for part in parts]
        nbytes, part_nbytes = check_parts(tag, sizes)
        if self._pending is not None:  # misuse: refused without breaking the channel
            raise RuntimeError(f"{self._name()}: post_recv with an announced payload pending")
        if len(self._posted) == MAX_POSTED:
            raise RuntimeError(f"{self._name()}: {MAX_POSTED} receives already posted")
        with self._op("recv", None) as (pg, _):
            posted = PostedReceive(self._num_received, (tag, nbytes, part_nbytes))
            try:
                self._post_ahead(pg, posted, parts, drain)
            except Exception as e:  # receives may be posted: the channel is out of step now
                raise KVTransferError(f"posting a receive failed: {e!r}") from e
            self._posted.append(posted)
            self._num_received += 1
        return posted

    def wait_posted(self, posted: PostedReceive, *, timeout_s: float | None = None) -> bool:
        """Wait until the oldest posted receive, `posted`, is in and drained, and check its
        header: True if the payload is VOID (its bytes are filler: drop what was drained).
        Raises KVTransferError like `recv` (a header that does not match, a marker included,
        breaks the channel); RuntimeError if `posted` is not the oldest outstanding."""
        if not self._posted or self._posted[0] is not posted:
            raise RuntimeError(f"{self._name()}: wait for posted receives in posting order")
        with self._op("recv", timeout_s) as (pg, deadline):
            header = self._posted_header(posted, deadline)
            is_void = check_posted(header, posted.seq, posted.expected)
            try:
                self._posted_payload(pg, posted, deadline)
            except (KVTransferError, RuntimeError):
                raise
            except Exception as e:  # a drain failed: the parts are consumed, not drained
                raise KVTransferError(f"draining a posted receive failed: {e!r}") from e
            if self._guard.is_closed:  # aborted meanwhile: what landed may be partial
                raise KVTransferError("the channel was closed while the payload came in")
            self._posted.popleft()
            return is_void

    @property
    def num_posted(self) -> int:
        """Receives posted ahead and not yet waited for."""
        return len(self._posted)

    def recv_header(self, *, timeout_s: float | None = None) -> tuple[int, int]:
        """Receive the peer's next header: (tag, nbytes), nbytes == MARKER for a marker. For
        a payload, the next call must be `recv_payload` with a tensor of exactly nbytes: the
        receiver learns which transfer comes next from the tag instead of predicting it."""
        self._check_nothing_posted()
        with self._op("recv", timeout_s) as (pg, deadline):
            return self._next_header(pg, deadline)

    def recv_payload(self, tensor: torch.Tensor, *, timeout_s: float | None = None) -> None:
        """Receive the payload announced by the last `recv_header` into `tensor`."""
        self.recv_payload_parts([tensor], timeout_s=timeout_s)

    def recv_payload_parts(
        self,
        parts: Sequence[torch.Tensor],
        *,
        drain: Callable[[int], object] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Receive the payload announced by the last `recv_header` into `parts`, draining
        each as in `recv_parts`. ValueError if the parts' sizes differ from the announced
        ones (nothing is received then: call again with the right parts)."""
        sizes = [self._checked_size(part) for part in parts]
        nbytes, part_nbytes = check_parts(0, sizes)
        if self._pending is None:
            raise RuntimeError(f"{self._name()}: recv_payload without an announced payload")
        if (nbytes, part_nbytes) != self._pending:
            raise ValueError(
                f"the announced payload is {self._pending[0]} bytes in parts of "
                f"{self._pending[1]}, the tensors {nbytes} in parts of {part_nbytes}"
            )
        with self._op("recv", timeout_s) as (pg, deadline):
            self._recv_payload(pg, parts, part_nbytes, drain, deadline)

    @property
    def pending_part_nbytes(self) -> int:
        """Part size of the payload announced by the last `recv_header` (0: none pending)."""
        return 0 if self._pending is None else self._pending[1]

    @property
    def is_broken(self) -> bool:
        """True once an operation failed; the channel then only refuses and closes."""
        return self._guard.is_broken

    def close(self) -> None:
        """Release the process group; abort it if broken or if an operation is in flight.
        Idempotent; any thread; returns without waiting for an operation in flight, which
        NCCL's abort cancels and which on gloo runs on to its timeout (torch cannot cancel a
        gloo wait). The peer's later operations fail; its pending ones fail at once on gloo
        (once this side's operations are over) and at their timeout on NCCL."""
        released = self._guard.close()
        if released is not None:
            self._teardown(*released)

    def __enter__(self) -> PairChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _checked_size(self, tensor: torch.Tensor) -> int:
        self._check_tensor(tensor)
        return tensor.numel() * tensor.element_size()

    def _post_header(
        self, pg: Any, seq: int, tag: int, nbytes: int, part_nbytes: int, flags: int = 0
    ) -> Any:
        """Post a header send (the caller waits for its work, at the latest with the payload's:
        the header buffer is reused by the next call)."""
        values = torch.tensor(
            header_values(seq, tag, nbytes, part_nbytes, flags), dtype=torch.int64
        )
        self._stage_header(values)
        return pg.send([self._send_header], self.address.peer_rank, HEADER_TAG)

    def _stage_header(self, values: torch.Tensor) -> None:
        """Put a header's values (a CPU tensor) into `_send_header`, ordered before the send
        that reads it."""
        self._send_header.copy_(values)

    def _check_nothing_posted(self) -> None:
        """RuntimeError (misuse: the channel stays usable) if receives are posted ahead: the
        next header belongs to the oldest of them."""
        if self._posted:
            raise RuntimeError(f"{self._name()}: reading a header with receives posted ahead")

    def _next_header(self, pg: Any, deadline: float) -> tuple[int, int]:
        """Receive and check the next header (magic, sequence); (tag, nbytes). A marker
        completes its sequence number at once; a payload's completes in _recv_payload."""
        if self._pending is not None:
            raise KVTransferError("a header arrived announcing a payload that was never received")
        header = self._receive_header(pg, deadline)
        _, _, tag, nbytes, part_nbytes, _ = header
        if check_next(header, self._num_received):
            self._num_received += 1
        else:
            self._pending = (nbytes, part_nbytes)
        return tag, nbytes

    def _receive_header(self, pg: Any, deadline: float) -> list[int]:
        work = pg.recv([self._recv_header], self.address.peer_rank, HEADER_TAG)
        self._complete([work], deadline)
        return self._recv_header.tolist()

    def _recv_payload(
        self,
        pg: Any,
        parts: Sequence[torch.Tensor],
        part_nbytes: int,
        drain: Callable[[int], object] | None,
        deadline: float,
    ) -> None:
        """Post the parts' receives, each followed by its drain; wait for all of it once."""
        del part_nbytes  # checked by the callers against the header
        for index, part in enumerate(parts):
            work = pg.recv([part], self.address.peer_rank, PAYLOAD_TAG)
            with self._draining():
                self._order_after(work, deadline)
                if drain is not None:
                    drain(index)
        self._after_drains()
        self._complete([], deadline)
        self._pending = None
        self._num_received += 1

    def _expect_header(self, pg: Any, seq: int, tag: int, nbytes: int, deadline: float) -> None:
        check_exact(self._receive_header(pg, deadline), header_values(seq, tag, nbytes, 0))

    def _name(self) -> str:
        return f"{self.backend} {describe(self.address)}"


def check_contiguous(tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError("channel tensors must be contiguous (gather into a staging tensor)")
