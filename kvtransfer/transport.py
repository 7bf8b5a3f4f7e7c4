"""How a worker forms its pair channels: the transport config, a side's pair address, the
rendezvous-store steps of formation, and `open_channel`, which picks the backend.

The channel itself (kvtransfer.channel: the role-neutral interface and its wire rules) has two
implementations, kvtransfer.gloo (CPU tensors over TCP) and kvtransfer.nccl (CUDA tensors);
docs/kvtransfer.md describes the wire format and failure rules. A shared rendezvous TCPStore
keeps a few hundred bytes per pair ever formed (kvtransfer.pair gives each formation a store of
its own instead). Nothing here pickles: only tensors and store keys cross the process boundary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from contracts.errors import KVTransferError
from kvtransfer.guard import first_line
from kvtransfer.header import WIRE_VERSION

if TYPE_CHECKING:
    from kvtransfer.channel import PairChannel

__all__ = [
    "BACKENDS",
    "STORE_PREFIX",
    "WIRE_VERSION",
    "PairAddress",
    "TransportConfig",
    "check_wire_version",
    "claim_rank",
    "describe",
    "open_channel",
    "pair_store",
]

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
STORE_PREFIX = "tandem/kv/"


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
    # its kernels take from prefill; its bandwidth and memory per value: docs/benchmarks.md.

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
            raise KVTransferError(f"{describe(address)}: no time left to form the pair")
        config = replace(config, connect_timeout_s=min(timeout_s, config.connect_timeout_s))
    start = time.monotonic()
    channel_class = _channel_class(config.backend)
    device = channel_class.prepare_device(device)
    try:
        rendezvous = pair_store(address, config, store)
        claim_rank(rendezvous, address)
        check_wire_version(rendezvous, address)
        pg = channel_class.make_process_group(rendezvous, address, config, device)
    except RuntimeError as e:  # torch.distributed's errors are RuntimeError kinds
        raise KVTransferError(f"{describe(address)}: formation failed: {first_line(e)}") from e
    channel = channel_class(address, config, (rendezvous, store), pg, device)
    try:
        channel.handshake(config.connect_timeout_s - (time.monotonic() - start))
    except BaseException:
        channel.close()
        raise
    logger.debug("%s: formed in %.3f s", describe(address), time.monotonic() - start)
    return channel


def _channel_class(backend: str) -> type[PairChannel]:
    """The channel class of `backend` (imported here: the channels import this module)."""
    if backend == "nccl":
        from kvtransfer.nccl import NcclPairChannel

        return NcclPairChannel
    from kvtransfer.gloo import GlooPairChannel

    return GlooPairChannel


def pair_store(address: PairAddress, config: TransportConfig, store: Any = None) -> Any:
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


def claim_rank(store: Any, address: PairAddress) -> None:
    """Refuse a pair key that already formed (stale keys of the old group would mislead the
    rendezvous) or a rank both sides claim."""
    if store.add(f"claim/{address.rank}", 1) != 1:
        raise KVTransferError(
            f"{describe(address)}: rank {address.rank} of this pair key is already taken; "
            "pair keys are single-use"
        )


def check_wire_version(store: Any, address: PairAddress) -> None:
    """Publish this side's WIRE_VERSION and refuse a peer that published another (the wait for
    it is bounded by the store's connect timeout)."""
    store.set(f"version/{address.rank}", str(WIRE_VERSION))
    peer = store.get(f"version/{address.peer_rank}").decode()
    if peer != str(WIRE_VERSION):
        raise KVTransferError(
            f"{describe(address)}: the peer speaks KV wire version {peer}, this side "
            f"{WIRE_VERSION}; upgrade both ends of a pair together"
        )


def describe(address: PairAddress) -> str:
    return f"pair {address.pair_key!r} rank {address.rank}"
