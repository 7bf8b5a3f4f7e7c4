"""Forming a pair: one control connection plus one PairChannel between a prefill worker (the
sender, rank 0) and a decode worker (the receiver, rank 1), on demand, without a global world.

    decode worker                               prefill worker
      ReceiverEndpoint(host)                      connect_pair(endpoint.address, pair_key, ...)
        ControlListener  <--- TCP connect -----     ControlConnection + PairHello(pair_key)
        TCPStore server  <--- rendezvous ------     open_channel(rank 0)     (rank 1: accept)

The endpoint's address (host, control port, store port, and the decode worker's KV layout) is
what a decode worker publishes; pair keys are single-use (a new key for every pair formed, e.g.
"<prefill>/<decode>/<n>"). A sender whose KV layout differs from the address's (dtype, scale
scheme, geometry, model) is refused before it connects: at pairing time, not at its first
transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.errors import KVTransferError
from kvtransfer.control import ControlConnection, ControlListener
from kvtransfer.layout import KVLayout
from kvtransfer.messages import PairHello
from kvtransfer.transport import PairAddress, PairChannel, TransportConfig, open_channel


@dataclass(frozen=True, slots=True)
class EndpointAddress:
    host: str
    control_port: int
    store_port: int
    layout: KVLayout | None = None  # the receiver's KV layout, checked by connect_pair


class ReceiverEndpoint:
    """A decode worker's listening side: a control listener and the rendezvous store."""

    def __init__(self, host: str = "127.0.0.1", layout: KVLayout | None = None) -> None:
        self.listener = ControlListener(host)
        self.store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
        )
        self.address = EndpointAddress(host, self.listener.port, self.store.port, layout)

    def accept(
        self, config: TransportConfig, device: torch.device | str | None = None
    ) -> tuple[PairChannel, ControlConnection] | None:
        """The next pair a sender forms, or None if none connects within connect_timeout_s.
        Raises KVTransferError if the sender does not complete formation."""
        control = self.listener.accept(config.connect_timeout_s)
        if control is None:
            return None
        try:
            hello = control.recv(config.connect_timeout_s)
            if not isinstance(hello, PairHello):
                raise KVTransferError(f"expected PairHello first, got {type(hello).__name__}")
            address = PairAddress(self.address.host, self.address.store_port, hello.pair_key, 1)
            return open_channel(address, config, device), control
        except BaseException:
            control.close()
            raise

    def close(self) -> None:
        self.listener.close()


def connect_pair(
    endpoint: EndpointAddress,
    pair_key: str,
    config: TransportConfig,
    device: torch.device | str | None = None,
    layout: KVLayout | None = None,
) -> tuple[PairChannel, ControlConnection]:
    """Form the sender's side of a pair with the receiver at `endpoint`. Raises
    KVTransferError if the receiver does not take part within connect_timeout_s, or, before
    connecting, if `layout` and the endpoint's layout (both given) differ."""
    if layout is not None and endpoint.layout is not None:
        try:
            layout.check_compatible(endpoint.layout)
        except KVTransferError as e:
            raise KVTransferError(
                f"pair {pair_key!r} refused: the prefill (sender) and decode (receiver) KV "
                f"{e}; serve both with the same --kv-cache-dtype and model"
            ) from None
    control = ControlConnection.connect(
        endpoint.host, endpoint.control_port, config.connect_timeout_s
    )
    try:
        control.send(PairHello(pair_key))
        address = PairAddress(endpoint.host, endpoint.store_port, pair_key, 0)
        return open_channel(address, config, device), control
    except BaseException:
        control.close()
        raise
