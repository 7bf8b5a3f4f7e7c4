"""Point-to-point channels between exactly two workers, for KV payloads.

A `PairChannel` is a 2-rank torch.distributed process group built directly from a rendezvous
`TCPStore` (no `init_process_group`, no global state), so one process holds as many channels as
it has peers, formed on demand and closed independently:

    rendezvous store                        given by the caller (kvtransfer.pair: the pair's
      "tandem/kv/<pair_key>/<scope>/..."    own, over its control connection, see
                                            kvtransfer.rendezvous), else a TCPStore client of
                                            (host, port) (tests, benchmarks)
         |                      |
      rank 0 (prefill A)    rank 1 (decode B)     PairAddress(host, port, pair_key, rank)

Every payload travels behind a 48-byte header, so a desynchronised pair fails loudly instead of
writing one request's KV into another's blocks:

    header  int64[6] = [MAGIC, seq, tag, nbytes, part_nbytes, flags]   then   payload (nbytes)

    seq counts payloads on this channel (both sides count); tag is the caller's id for the
    payload (e.g. transfer number); the receiver checks them all, before posting the payload
    receive where it reads the header first (gloo; `recv_header`), once the payload is in where
    it posted both at once (see "posted ahead" below), and raises KVTransferError on any
    difference. flags: VOID marks a payload whose bytes are not data.

    A payload may go as several parts (`send_parts` / `recv_parts`), one NCCL message each,
    all of part_nbytes but the last (the rest): the sender fills part i + 1 (a gather) while
    part i is on the link, the receiver empties part i (a scatter) while part i + 1 arrives.
    The parts and the copies around them are queued on the CUDA streams and waited for once,
    at the end (at most the header is waited for on the host before the parts are posted):

      sender stream:   [fill 0][fill 1][fill 2]
      link:                    [part 0][part 1][part 2]
      receiver stream:                 [drain 0][drain 1][drain 2]

    A payload may also go as a group (`send_group` / `recv_group`): tensors of any sizes (e.g.
    slices of a KV cache, so the receiver needs no scatter), announced by part_nbytes = minus
    their number and posted together: on NCCL in one NCCL group (coalesced: one launch moves
    them all), on gloo one message each.

    A header with nbytes = MARKER (-1) and no payload stands in for a payload that will not
    come (`send_marker`: an aborted transfer), so both sides' counts stay in step. A receiver
    either names the payload it expects (`recv`) or reads the next header and routes by its
    tag (`recv_header`, then `recv_payload` unless it was a marker).

    A receiver that knows what comes next may post a payload's receives before its header
    arrives (`post_recv`, then `wait_posted` in the same order; at most MAX_POSTED at once):
    header, parts and drains are all queued at once, and the header is checked when they are
    done. The sender's kernel then never waits on the GPU for the receiver's host to read a
    header first: NCCL's send kernel holds its SMs until the receive is posted, which slows
    whatever the sender's GPU computes beside it (a prefill). Such a payload must come: a
    marker cannot stand in for it, so a sender that gives up sends a payload of the announced
    size flagged VOID instead (`send_parts(..., void=True)`). Its bytes land and are drained
    like any payload's (into memory the expected payload owns); `wait_posted` tells the
    receiver to treat them as no data. On NCCL, `recv` and `recv_parts` post header and
    payload together too; a marker in place of their payload then fails by timeout.

Ordering: both sides must issue sends and receives in the same order. A channel belongs to one
transfer thread per side (concurrent use raises RuntimeError); that thread follows the control
protocol (kvtransfer.messages), which fixes the order. Different pairs run in parallel.

Failure: every send/recv waits for its operations with a timeout (gloo: `Work.wait(timeout)`;
NCCL: the host polls a CUDA event recorded after them, so torch never sees a timed-out wait);
the process group's own timeout stays longer, as a backstop (NCCL: `backstop_timeout_s`; gloo:
the formation's limit, which also bounds gloo's connect: an operation passes its own). A timeout, a
dead peer or a bad header raises KVTransferError and breaks the channel for good: which
messages matched is unknown, so every later call raises too. `close()` it and form a new pair
under a new pair key (keys are single-use: a reused key is refused at formation). A VOID
payload where `recv` expected data raises KVTransferError too, but leaves the channel in step
and usable. Formation checks that both ends speak this wire format (WIRE_VERSION, through the
rendezvous store, before any message): a peer of another version is refused instead of being
sent headers of a size it does not expect (gloo aborts the process on that).

Two implementations share everything but process-group construction, the tensors they accept
and teardown, which differ in kind, hence a base class with two subclasses rather than flags:

- `GlooPairChannel` (CPU tensors, TCP): closing (or any timeout: gloo then closes the pair
  itself) drops the connection; the peer's pending operations fail at once. Costs a TCP
  connection and a few gloo threads, no tensor memory.
- `NcclPairChannel` (CUDA tensors, kvtransfer.nccl): one NCCL communicator per pair. Its
  process environment, teardown, GPU memory per pair and completion polling are described
  there.

A shared rendezvous TCPStore keeps a few hundred bytes per pair ever formed (kvtransfer.pair
gives each formation a store of its own instead). This module never
pickles: only tensors and store keys cross the process boundary.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from contracts.errors import KVTransferError

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
MAGIC = 0x54414E44454D4B56  # "TANDEMKV"
HEADER_NUMEL = 6  # [MAGIC, seq, tag, nbytes, part_nbytes, flags] int64
MARKER = -1  # nbytes of a header sent instead of a payload (send_marker)
VOID = 1  # header flag: the payload's bytes are not data (a stopped transfer's filler)
MAX_POSTED = 8  # receives a channel may have posted ahead of their headers at once
WIRE_VERSION = 2  # of the header format and message rules; 2: the flags field, VOID
STORE_PREFIX = "tandem/kv/"
_HEADER_TAG = 1  # gloo slot of headers (NCCL ignores tags)
_PAYLOAD_TAG = 2  # gloo slot of payloads
_MAX_TAG = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """How a worker forms and uses its channels (one config per worker)."""

    backend: str = "gloo"  # "gloo" (CPU tensors) or "nccl" (CUDA tensors)
    timeout_s: float = 30.0  # default limit of one send or recv
    connect_timeout_s: float = 60.0  # limit of rendezvous plus handshake
    backstop_timeout_s: float = 600.0  # the process group's own timeout; above the others
    gloo_hostname: str | None = None  # address gloo listens on; None: gloo's default device
    nccl_max_ctas: int | None = 16  # NCCL blocks (channels) per pair; None: NCCL's default
    nccl_high_priority: bool = False  # NCCL's stream of a pair at high priority: its kernels
    # start ahead of queued compute (a prefill's GEMMs) instead of waiting for SMs to free up

    # nccl_max_ctas bounds a pair's GPU memory (NCCL's buffers are per channel) and the SMs
    # its kernels take from prefill. Measured on 2x H100 (one 256 MiB message): NCCL's
    # default 328 GB/s, 776 + 1032 MiB for the first pair; 16: 314 GB/s, 132 + 260 MiB;
    # 8: 250 GB/s, 68 + 132 MiB (rank 0 + rank 1).

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")
        for name in ("timeout_s", "connect_timeout_s", "backstop_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name}={value!r} must be a positive finite number")
        if not isinstance(self.nccl_high_priority, bool):
            raise ValueError(f"nccl_high_priority={self.nccl_high_priority!r} must be a bool")
        if self.nccl_max_ctas is not None and (
            type(self.nccl_max_ctas) is not int or not 1 <= self.nccl_max_ctas <= 64
        ):
            raise ValueError(f"nccl_max_ctas={self.nccl_max_ctas!r} must be None or in [1, 64]")
        if self.backstop_timeout_s <= max(self.timeout_s, self.connect_timeout_s):
            raise ValueError(
                f"backstop_timeout_s={self.backstop_timeout_s} must exceed timeout_s and "
                "connect_timeout_s: it is the backstop behind them"
            )


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


@dataclass(frozen=True, slots=True)
class PairAddress:
    """Where and as whom one side joins a pair: both sides use the same store and key."""

    store_host: str
    store_port: int
    pair_key: str  # unique per pair formation, e.g. "prefill-3/decode-1/7"
    rank: int  # 0 or 1; the two sides take different ranks
    scope: str = field(default="", repr=False)  # rendezvous keys live under pair_key/scope

    def __post_init__(self) -> None:
        if not self.store_host:
            raise ValueError("store_host must be non-empty")
        if type(self.store_port) is not int or not 0 < self.store_port < 65536:
            raise ValueError(f"store_port={self.store_port!r} must be an int in [1, 65535]")
        if not isinstance(self.pair_key, str) or not self.pair_key:
            raise ValueError(f"pair_key={self.pair_key!r} must be a non-empty str")
        if self.rank not in (0, 1) or type(self.rank) is not int:
            raise ValueError(f"rank={self.rank!r} must be 0 or 1")

    @property
    def peer_rank(self) -> int:
        return 1 - self.rank


def open_channel(
    address: PairAddress,
    config: TransportConfig,
    device: torch.device | str | None = None,
    timeout_s: float | None = None,
    store: Any = None,
) -> PairChannel:
    """Form this side of a pair: blocks until the peer joins and the handshake completes.

    `device` is the CUDA device of an NCCL channel (ignored for gloo). `timeout_s` bounds the
    whole formation (default connect_timeout_s; what is left of a deadline, when the caller
    spent part of it already). Returns a ready channel. Raises KVTransferError if the peer does
    not join in time, the key was already used, or the handshake fails. Called from the
    pair's transfer thread. `store`: the rendezvous store (a torch.distributed.Store, kept
    alive by the channel); None: a TCPStore client of (address.store_host, store_port).
    """
    if timeout_s is not None:
        if timeout_s <= 0:
            raise KVTransferError(f"{_describe(address)}: no time left to form the pair")
        config = replace(config, connect_timeout_s=min(timeout_s, config.connect_timeout_s))
    if config.backend == "nccl":
        from kvtransfer.nccl import NcclPairChannel  # it builds on this module

        return NcclPairChannel.connect(address, config, device, store)
    return GlooPairChannel.connect(address, config, device, store)


class PairChannel(ABC):
    """One side of a 2-rank channel. Use from one thread; `close` may come from any thread
    but does not cancel a gloo operation in flight: stop waiting by a short timeout_s."""

    backend: ClassVar[str]
    # recv/recv_parts post header and parts together (see recv_parts): NCCL only, where a
    # payload of another size cannot take the process down
    _named_receives_ahead: ClassVar[bool] = False

    def __init__(
        self, address: PairAddress, config: TransportConfig, store: Any, pg: Any, device: Any
    ) -> None:
        self.address = address
        self.config = config
        self.device = torch.device(device)
        self._store = store  # kept alive with the process group
        self._pg = pg  # None once closed; an operation in flight holds its own reference
        self._op_lock = threading.Lock()  # held by the one thread running send/recv
        self._state_lock = threading.Lock()  # guards _broken and _closed
        self._broken: str | None = None  # why the channel is broken, once it is
        self._closed = False
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

    # -- formation ----------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: PairAddress,
        config: TransportConfig,
        device: torch.device | str | None,
        rendezvous: Any = None,
    ) -> PairChannel:
        """Rendezvous, build the process group, handshake (see open_channel)."""
        start = time.monotonic()
        device = cls._prepare(device)
        try:
            store = _pair_store(address, config, rendezvous)
            _claim_rank(store, address)
            _check_wire_version(store, address)
            pg = cls._make_process_group(store, address, config, device)
        except RuntimeError as e:  # torch.distributed's errors are RuntimeError kinds
            raise KVTransferError(
                f"{_describe(address)}: formation failed: {_first_line(e)}"
            ) from e
        channel = cls(address, config, (store, rendezvous), pg, device)
        try:
            channel._handshake(config.connect_timeout_s - (time.monotonic() - start))
        except BaseException:
            channel.close()
            raise
        logger.debug("%s: formed in %.3f s", _describe(address), time.monotonic() - start)
        return channel

    @staticmethod
    @abstractmethod
    def _prepare(device: torch.device | str | None) -> torch.device:
        """The device this channel's tensors live on, after checking that this process can run
        the backend (ValueError if not)."""

    @staticmethod
    @abstractmethod
    def _make_process_group(
        store: Any, address: PairAddress, config: TransportConfig, device: torch.device
    ) -> Any:
        """A 2-rank process group over `store`; blocks until the peer has joined."""

    def _handshake(self, timeout_s: float) -> None:
        """One header from rank 0 to rank 1 (seq -1): proves both ends are connected and, on
        NCCL, creates the communicator. Does not count as a payload."""
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
        bytes as no data (the filler of a payload the peer posted ahead, see the module
        docstring). Returns once every part is sent and may be reused. Raises like `send`;
        ValueError for parts of mismatched sizes.
        """
        sizes = [self._checked_size(part) for part in parts]
        nbytes, part_nbytes = _check_parts(tag, sizes)
        flags = VOID if void else 0
        with self._op("send", timeout_s) as (pg, deadline):
            works = [self._post_header(pg, self._num_sent, tag, nbytes, part_nbytes, flags)]
            for index, part in enumerate(parts):
                if fill is not None:
                    fill(index)
                works.append(pg.send([part], self.address.peer_rank, _PAYLOAD_TAG))
            self._complete(works, deadline)
            self._num_sent += 1

    def send_group(
        self, tensors: Sequence[torch.Tensor], *, tag: int = 0, timeout_s: float | None = None
    ) -> None:
        """Send one payload made of `tensors` (contiguous, on this channel's device, of any
        sizes, at least one byte each), posted together (see the module docstring); the peer
        receives it with `recv_group` over tensors of the same sizes in the same order.
        Returns once all are sent. Raises like `send`."""
        sizes = [self._checked_size(tensor) for tensor in tensors]
        _check_tag(tag)
        if not sizes or 0 in sizes:
            raise ValueError(f"a group needs one or more non-empty tensors, got sizes {sizes}")
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
        _check_tag(tag)
        if not sizes or 0 in sizes:
            raise ValueError(f"a group needs one or more non-empty tensors, got sizes {sizes}")
        self._check_nothing_posted()
        with self._op("recv", timeout_s) as (pg, deadline):
            got_tag, got_nbytes = self._next_header(pg, deadline)
            got = (got_tag, got_nbytes, self.pending_part_nbytes)
            _check_header_fields(got, (tag, sum(sizes), -len(sizes)))  # -n: a group of n
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
        _check_tag(tag)
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
        nbytes, part_nbytes = _check_parts(tag, sizes)
        self._check_nothing_posted()
        if self._named_receives_ahead:
            self._limit_s(timeout_s)  # ValueError before anything is posted
            posted = self.post_recv(parts, tag=tag, drain=drain)
            if self.wait_posted(posted, timeout_s=timeout_s):
                raise KVTransferError(f"{self._name()}: the payload tagged {tag} is VOID")
            return
        with self._op("recv", timeout_s) as (pg, deadline):
            got_tag, got_nbytes = self._next_header(pg, deadline)
            got = (got_tag, got_nbytes, self.pending_part_nbytes)
            _check_header_fields(got, (tag, nbytes, part_nbytes))
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
        nbytes, part_nbytes = _check_parts(tag, sizes)
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
            magic, seq, tag, nbytes, part_nbytes, flags = self._posted_header(posted, deadline)
            if magic != MAGIC or seq != posted.seq or flags & ~VOID:
                raise KVTransferError(
                    f"bad header: magic {magic:#x}, seq {seq} (expected {posted.seq}), "
                    f"flags {flags:#x}"
                )
            _check_header_fields((tag, nbytes, part_nbytes), posted.expected)
            try:
                self._posted_payload(pg, posted, deadline)
            except (KVTransferError, RuntimeError):
                raise
            except Exception as e:  # a drain failed: the parts are consumed, not drained
                raise KVTransferError(f"draining a posted receive failed: {e!r}") from e
            if self._closed:  # aborted meanwhile: what landed may be partial
                raise KVTransferError("the channel was closed while the payload came in")
            self._posted.popleft()
            return bool(flags & VOID)

    @property
    def num_posted(self) -> int:
        """Receives posted ahead and not yet waited for."""
        return len(self._posted)

    def settle(self, timeout_s: float) -> bool:
        """After a failure (the channel closed or broken): wait up to timeout_s until no
        device work queued by this channel's receives (drains) can still run, so memory they
        write may be handed to someone else. True once settled (always on gloo, whose drains
        run on the caller's thread); False if device work is still pending."""
        return True

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
        nbytes, part_nbytes = _check_parts(0, sizes)
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
        return self._broken is not None

    def close(self) -> None:
        """Release the process group; abort it if broken or if an operation is in flight.
        Idempotent; any thread; returns without waiting for an operation in flight, which
        NCCL's abort cancels and which on gloo runs on to its timeout (torch cannot cancel a
        gloo wait). The peer's later operations fail; its pending ones fail at once on gloo
        (once this side's operations are over) and at their timeout on NCCL."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            pg, self._pg, self._store = self._pg, None, None
            must_abort = self._broken is not None or self._op_lock.locked()
        self._teardown(pg, must_abort)

    def __enter__(self) -> PairChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _complete(self, works: list[Any], deadline: float) -> None:
        """Wait until the operations in `works` (in the order posted) and the device work queued
        on the current stream so far are complete, or `deadline` (time.monotonic) passes."""
        for work in works:
            _wait(work, deadline)

    def _order_after(self, work: Any, deadline: float) -> None:
        """Make work queued next on the current stream run after `work`; on gloo, wait for it."""
        _wait(work, deadline)

    def _post_group(
        self, pg: Any, post: Callable[..., Any], tensors: Sequence[torch.Tensor]
    ) -> list[Any]:
        """Post one send or receive per tensor (gloo: each its own message); their works."""
        return [post([tensor], self.address.peer_rank, _PAYLOAD_TAG) for tensor in tensors]

    def _draining(self) -> AbstractContextManager[object]:
        """Where drains run: on NCCL a stream of their own (see NcclPairChannel)."""
        return nullcontext()

    def _after_drains(self) -> None:
        """Order the current stream after every drain queued so far (nothing on gloo)."""
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
        posted.works.append(pg.recv([header], self.address.peer_rank, _HEADER_TAG))
        posted.parts, posted.drain = tuple(parts), drain

    def _posted_header(self, posted: PostedReceive, deadline: float) -> list[int]:
        """Wait for a posted receive's header (NCCL: for all of it); the header's values."""
        _wait(posted.works[0], deadline)
        return self._posted_headers[posted.seq % MAX_POSTED].tolist()

    def _posted_payload(self, pg: Any, posted: PostedReceive, deadline: float) -> None:
        """After its header checked out: receive a posted receive's parts, draining each."""
        for index, part in enumerate(posted.parts):
            _wait(pg.recv([part], self.address.peer_rank, _PAYLOAD_TAG), deadline)
            if posted.drain is not None:
                posted.drain(index)

    def _checked_size(self, tensor: torch.Tensor) -> int:
        self._check_tensor(tensor)
        return tensor.numel() * tensor.element_size()

    @abstractmethod
    def _check_tensor(self, tensor: torch.Tensor) -> None:
        """ValueError unless the backend can move `tensor` as is."""

    @abstractmethod
    def _teardown(self, pg: Any, must_abort: bool) -> None:
        """Free the process group; abort it if an operation may still be pending."""

    @contextmanager
    def _op(self, name: str, timeout_s: float | None) -> Iterator[tuple[Any, float]]:
        """Run one operation: single-threaded, on a healthy channel. Yields the process group
        (held for the operation even if `close` runs meanwhile) and a time.monotonic deadline.
        Any failure breaks the channel and surfaces as KVTransferError."""
        limit_s = self._limit_s(timeout_s)
        if not self._op_lock.acquire(blocking=False):
            raise RuntimeError(f"{self._name()}: used by two threads at once; one per pair")
        try:
            pg = self._check_usable(name)
            start = time.monotonic()
            try:
                yield pg, start + limit_s
            except KVTransferError as e:
                raise self._break(name, str(e), start) from e
            except RuntimeError as e:  # torch.distributed failures: timeout, peer gone, abort
                raise self._break(name, _first_line(e), start) from e
            except Exception as e:  # a fill or drain failed: what was posted is unknown
                raise self._break(name, f"{type(e).__name__}: {_first_line(e)}", start) from e
        finally:
            self._op_lock.release()

    def _limit_s(self, timeout_s: float | None) -> float:
        """An operation's time limit; ValueError if out of (0, backstop_timeout_s]."""
        limit_s = self.config.timeout_s if timeout_s is None else timeout_s
        if not 0 < limit_s <= self.config.backstop_timeout_s:
            raise ValueError(f"timeout_s={limit_s} must be in (0, backstop_timeout_s]")
        return limit_s

    def _check_usable(self, name: str) -> Any:
        """The process group, if the channel is open and healthy."""
        with self._state_lock:
            if self._closed:
                raise KVTransferError(f"{self._name()}: {name} on a closed channel")
            if self._broken is not None:
                raise KVTransferError(
                    f"{self._name()}: {name} on a broken channel ({self._broken})"
                )
            return self._pg

    def _break(self, name: str, reason: str, start: float) -> KVTransferError:
        with self._state_lock:
            already_broken = self._broken is not None
            if not already_broken and not self._closed:
                self._broken = f"{name} failed: {reason}"
        if already_broken:
            return KVTransferError(reason)
        elapsed_s = time.monotonic() - start
        message = f"{self._name()}: {name} failed after {elapsed_s:.3f} s: {reason}"
        logger.warning("%s", message)
        return KVTransferError(message)

    def _post_header(
        self, pg: Any, seq: int, tag: int, nbytes: int, part_nbytes: int, flags: int = 0
    ) -> Any:
        """Post a header send (the caller waits for its work, at the latest with the payload's:
        the header buffer is reused by the next call)."""
        values = torch.tensor([MAGIC, seq, tag, nbytes, part_nbytes, flags], dtype=torch.int64)
        self._stage_header(values)
        return pg.send([self._send_header], self.address.peer_rank, _HEADER_TAG)

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
        magic, seq, tag, nbytes, part_nbytes, flags = header
        is_marker = nbytes == MARKER and part_nbytes == 0
        ok = magic == MAGIC and seq == self._num_received and flags == 0  # VOID: posted only
        if not ok or not (is_marker or _parts_ok(header)):
            raise KVTransferError(
                f"bad header: magic {magic:#x}, seq {seq} (expected {self._num_received}), "
                f"nbytes {nbytes}, part_nbytes {part_nbytes}, flags {flags:#x}"
            )
        if is_marker:
            self._num_received += 1
        else:
            self._pending = (nbytes, part_nbytes)
        return tag, nbytes

    def _receive_header(self, pg: Any, deadline: float) -> list[int]:
        work = pg.recv([self._recv_header], self.address.peer_rank, _HEADER_TAG)
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
            work = pg.recv([part], self.address.peer_rank, _PAYLOAD_TAG)
            with self._draining():
                self._order_after(work, deadline)
                if drain is not None:
                    drain(index)
        self._after_drains()
        self._complete([], deadline)
        self._pending = None
        self._num_received += 1

    def _expect_header(self, pg: Any, seq: int, tag: int, nbytes: int, deadline: float) -> None:
        got = self._receive_header(pg, deadline)
        want = [MAGIC, seq, tag, nbytes, 0, 0]
        if got != want:
            names = ("magic", "seq", "tag", "nbytes", "part_nbytes", "flags")
            diffs = [f"{n} {g} != {w}" for n, g, w in zip(names, got, want, strict=True) if g != w]
            raise KVTransferError(
                "header does not match (received != expected): " + ", ".join(diffs)
            )

    def _name(self) -> str:
        return f"{self.backend} {_describe(self.address)}"


class GlooPairChannel(PairChannel):
    """A pair over gloo: CPU tensors over TCP."""

    backend = "gloo"

    @staticmethod
    def _prepare(device: torch.device | str | None) -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def _make_process_group(
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
        _check_contiguous(tensor)

    def _teardown(self, pg: Any, must_abort: bool) -> None:
        """Cancel this side's pending operation, where torch's gloo has abort() (2.13 does);
        the sockets close when the last reference to the process group goes, which fails the
        peer's pending operations. Nothing to flush: every operation was waited for."""
        abort = getattr(pg, "abort", None)
        if abort is not None:
            abort()


def _wait(work: Any, deadline: float) -> None:
    """Wait for a work handle until `deadline` (time.monotonic); torch raises on timeout."""
    remaining_s = deadline - time.monotonic()
    if remaining_s <= 0:
        raise KVTransferError("timed out")
    if not work.wait(timedelta(seconds=remaining_s)):
        raise KVTransferError("operation aborted")


def _pair_store(address: PairAddress, config: TransportConfig, store: Any = None) -> Any:
    """`store` (else a TCPStore client of its own: formation blocks in store waits, a client
    shared by concurrent formations would serialise them) under the pair's prefix."""
    if store is None:
        store = dist.TCPStore(
            address.store_host,
            address.store_port,
            is_master=False,
            timeout=timedelta(seconds=config.connect_timeout_s),
            wait_for_workers=False,
        )
    scope = f"/{address.scope}" if address.scope else ""
    return dist.PrefixStore(STORE_PREFIX + address.pair_key + scope, store)


def _claim_rank(store: Any, address: PairAddress) -> None:
    """Refuse a pair key that already formed (stale keys of the old group would mislead the
    rendezvous) or a rank both sides claim."""
    if store.add(f"claim/{address.rank}", 1) != 1:
        raise KVTransferError(
            f"{_describe(address)}: rank {address.rank} of this pair key is already taken; "
            "pair keys are single-use"
        )


def _check_wire_version(store: Any, address: PairAddress) -> None:
    """Publish this side's WIRE_VERSION and refuse a peer that published another (the wait for
    it is bounded by the store's connect timeout)."""
    store.set(f"version/{address.rank}", str(WIRE_VERSION))
    peer = store.get(f"version/{address.peer_rank}").decode()
    if peer != str(WIRE_VERSION):
        raise KVTransferError(
            f"{_describe(address)}: the peer speaks KV wire version {peer}, this side "
            f"{WIRE_VERSION}; upgrade both ends of a pair together"
        )


def _gloo_device(hostname: str | None) -> Any:
    if hostname is None:
        return dist.ProcessGroupGloo.create_default_device()
    return dist.ProcessGroupGloo.create_device(hostname=hostname)


def _check_contiguous(tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError("channel tensors must be contiguous (gather into a staging tensor)")


def _check_parts(tag: int, sizes: list[int]) -> tuple[int, int]:
    """(nbytes, part_nbytes) of a payload in parts of these sizes, after checking the tag and
    that every part but the last has the first one's size and the last is not larger."""
    _check_tag(tag)
    if not sizes:
        raise ValueError("a payload needs at least one part")
    nbytes, part_nbytes = sum(sizes), sizes[0]
    if any(size != part_nbytes for size in sizes[:-1]) or sizes[-1] > part_nbytes:
        raise ValueError(f"parts of {sizes} bytes: all but the last must be equal, the last <=")
    if (nbytes == 0 and len(sizes) > 1) or (nbytes > 0 and 0 in sizes):
        raise ValueError(f"parts of {sizes} bytes: an empty part is only allowed alone")
    return nbytes, part_nbytes


def _parts_ok(header: list[int]) -> bool:
    """Whether a payload header's sizes describe parts that can be received: nbytes > 0 in
    parts of part_nbytes > 0, or an empty payload (nbytes = part_nbytes = 0, one part)."""
    nbytes, part_nbytes = header[3], header[4]
    if part_nbytes < 0:  # a group of -part_nbytes tensors, each of one byte or more
        return nbytes >= -part_nbytes
    if nbytes == 0:
        return part_nbytes == 0
    return 0 < part_nbytes <= nbytes


def _check_header_fields(got: tuple[int, int, int], want: tuple[int, int, int]) -> None:
    """KVTransferError naming each of (tag, nbytes, part_nbytes) received != expected."""
    if got != want:
        names = ("tag", "nbytes", "part_nbytes")
        diffs = [f"{n} {g} != {w}" for n, g, w in zip(names, got, want, strict=True) if g != w]
        raise KVTransferError("header does not match (received != expected): " + ", ".join(diffs))


def _check_tag(tag: int) -> None:
    if type(tag) is not int or not 0 <= tag <= _MAX_TAG:
        raise ValueError(f"tag={tag!r} must be an int in [0, 2**63)")


def _describe(address: PairAddress) -> str:
    return f"pair {address.pair_key!r} rank {address.rank}"


def _first_line(error: BaseException) -> str:
    """torch.distributed errors carry a C++ stack trace after the first line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
