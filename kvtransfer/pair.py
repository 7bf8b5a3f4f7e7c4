"""Forming a pair on demand: one control connection plus one PairChannel between a prefill worker
(the sender, rank 0: `connect_pair`) and a decode worker (the receiver, rank 1:
`ReceiverEndpoint`), without a global world: handshake on the cluster secret, rendezvous over
the same connection, then the channel. Every step is bounded by connect_timeout_s; pair keys are
single-use; a sender of another KV layout is refused before it connects. Unauthenticated
connections are capped apart from authenticated ones, so idle sockets cannot keep a real peer
from pairing. The formation step by step: docs/kvtransfer.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from contracts.errors import KVTransferError
from kvtransfer.channel import PairChannel
from kvtransfer.control import ControlConnection, ControlListener
from kvtransfer.handshake import ClusterSecret, PeerRefused, check_sender, prove_as_sender
from kvtransfer.layout import KVLayout
from kvtransfer.network import EndpointAddress, KVNetworkConfig, listen_socket
from kvtransfer.rendezvous import ControlStore, serve_rendezvous
from kvtransfer.transport import PairAddress, TransportConfig, open_channel

logger = logging.getLogger(__name__)

MAX_HANDSHAKING = 32  # unauthenticated connections a receiver holds at once
MAX_UNAUTHENTICATED_PER_SOURCE = 8  # of them from one peer address (one host's workers)
HANDSHAKE_TIMEOUT_S = 5.0  # for a peer to prove the secret (at most connect_timeout_s)
MAX_FORMING = 16  # authenticated formations (rendezvous, process group) at once
ACCEPT_BACKOFF_S = 0.1  # after a failed accept() (EMFILE, ECONNABORTED), before the next
_ACCEPT_POLL_S = 0.5  # how often `serve` looks whether the endpoint was closed

# Why a connection was refused (tandem_kv_pairs_refused_total's `reason`): it did not prove the
# cluster secret (wrong proof, silence past the handshake deadline, closed or garbage first), or
# it came over the limits on unauthenticated connections.
REFUSAL_REASONS = ("unproven", "over_limit")

OnPair = Callable[[PairChannel, ControlConnection], None]

# Rendezvous keys of the layout check (module docstring): the sender's KVLayout.to_wire() (empty:
# none stated), then the receiver's verdict (empty: accepted, else the refusal, utf-8).
LAYOUT_KEY = "tandem/kv_layout"
VERDICT_KEY = "tandem/kv_layout_verdict"


class ReceiverEndpoint:
    """A decode worker's listening side: a control listener on `host` only (the rendezvous
    runs over its connections). `secret`: the cluster's (default: from the environment, see
    kvtransfer.handshake); `network`: the port range (default: any free port)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        secret: ClusterSecret | None = None,
        network: KVNetworkConfig | None = None,
        layout: KVLayout | None = None,
    ) -> None:
        self.secret = secret if secret is not None else ClusterSecret.from_environment()
        network = network or KVNetworkConfig()
        self.listener = ControlListener(host, sock=listen_socket(host, network))
        try:
            self.address = EndpointAddress(host, self.listener.port, layout)
        except BaseException:
            self.listener.close()
            raise
        self._lock = threading.Lock()  # guards the counts, _sources, _live and adoption
        self._refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self._num_accept_errors = 0
        self._handshaking = threading.BoundedSemaphore(MAX_HANDSHAKING)
        self._sources: dict[str, int] = {}  # unauthenticated connections by peer address
        self._forming = threading.BoundedSemaphore(MAX_FORMING)
        self._live: set[ControlConnection] = set()  # connections of formations under way
        self._closed = threading.Event()

    @property
    def num_refused(self) -> int:
        """Formations refused: the peer did not prove the cluster secret (wrong secret, no
        answer in time, a connection that stalled or closed first), or too many at once."""
        with self._lock:
            return sum(self._refused.values())

    @property
    def refused_by_reason(self) -> dict[str, int]:
        """num_refused by REFUSAL_REASONS."""
        with self._lock:
            return dict(self._refused)

    @property
    def num_accept_errors(self) -> int:
        """accept() calls that failed (EMFILE, ECONNABORTED, ...) and were retried."""
        with self._lock:
            return self._num_accept_errors

    def accept(
        self, config: TransportConfig, device: torch.device | str | None = None
    ) -> tuple[PairChannel, ControlConnection] | None:
        """The next pair a sender forms, on this thread, or None if none connects within
        connect_timeout_s. Raises PeerRefused if the peer does not prove the cluster secret,
        KVTransferError if it does not complete formation."""
        control = self.listener.accept(config.connect_timeout_s)
        if control is None:
            return None
        return self._form(control, config, device)

    def serve(
        self, config: TransportConfig, device: torch.device | str | None, on_pair: OnPair
    ) -> threading.Thread:
        """Accept pairs until `close`, each formed on a thread of its own; `on_pair(channel,
        control)` runs on that thread for every pair formed. Returns the accepting thread."""
        thread = threading.Thread(
            target=self._accept_loop, args=(config, device, on_pair), name="kv-accept",
            daemon=True,
        )  # fmt: skip
        thread.start()
        return thread

    def close(self) -> None:
        """Stop listening and end every formation under way (their connections close); a
        formation that completes anyway is closed, not handed to on_pair. Idempotent."""
        with self._lock:
            self._closed.set()
            live, self._live = self._live, set()
        self.listener.close()
        for control in live:
            control.close()

    def _accept_loop(
        self, config: TransportConfig, device: torch.device | str | None, on_pair: OnPair
    ) -> None:
        while not self._closed.is_set():
            try:
                control = self.listener.accept(_ACCEPT_POLL_S)
            except OSError as e:
                if self._closed.is_set():
                    return
                with self._lock:
                    self._num_accept_errors += 1
                logger.warning("KV endpoint accept failed (retrying): %s", e)
                self._closed.wait(ACCEPT_BACKOFF_S)
                continue
            if control is None:
                continue
            source = control.peer.rpartition(":")[0]
            with self._lock:
                per_source = self._sources.get(source, 0)
                admitted = (
                    per_source < MAX_UNAUTHENTICATED_PER_SOURCE
                    and self._handshaking.acquire(blocking=False)
                )
                if admitted:
                    self._sources[source] = per_source + 1
            if not admitted:
                self._count_refused(
                    "over_limit",
                    f"{control.peer}: too many unauthenticated connections ({per_source} from "
                    f"{source}, at most {MAX_UNAUTHENTICATED_PER_SOURCE}; at most "
                    f"{MAX_HANDSHAKING} in all)",
                )
                control.close()
                continue
            threading.Thread(
                target=self._form_and_hand_over, args=(control, source, config, device, on_pair),
                name="kv-form", daemon=True,
            ).start()  # fmt: skip

    def _form_and_hand_over(
        self,
        control: ControlConnection,
        source: str | None,
        config: TransportConfig,
        device: torch.device | str | None,
        on_pair: OnPair,
    ) -> None:
        try:
            channel, control = self._form(control, config, device, source)
        except PeerRefused:
            return  # counted and logged
        except Exception as e:  # one failed formation must not stop the others
            logger.warning("a KV pair from %s did not form: %s", control.peer, e)
            return
        with self._lock:  # close() either ran before (nothing adopted) or runs after
            adopt = not self._closed.is_set()
            if adopt:
                try:
                    on_pair(channel, control)
                except Exception:
                    logger.exception("a formed KV pair could not be adopted")
                    adopt = False
        if not adopt:
            channel.close()
            control.close()

    def _form(
        self,
        control: ControlConnection,
        config: TransportConfig,
        device: torch.device | str | None,
        source: str | None = None,
    ) -> tuple[PairChannel, ControlConnection]:
        """Handshake (in an unauthenticated slot when `source` is given: `serve`), then the
        rendezvous and process group in an authenticated slot."""
        start = time.monotonic()
        deadline = start + config.connect_timeout_s
        unauthenticated = source
        try:
            with self._lock:
                closed = self._closed.is_set()
                if not closed:
                    self._live.add(control)
            if closed:
                raise KVTransferError("the KV endpoint is closed")
            try:
                handshake_deadline = start + min(HANDSHAKE_TIMEOUT_S, config.connect_timeout_s)
                pair_key, scope = check_sender(control, self.secret, handshake_deadline)
            except PeerRefused as e:
                self._count_refused("unproven", str(e))
                raise
            if unauthenticated is not None:  # proven: its slot is free for the next peer
                self._release_unauthenticated(unauthenticated)
                unauthenticated = None
            if not self._forming.acquire(timeout=max(deadline - time.monotonic(), 0)):
                raise KVTransferError(f"pair {pair_key!r}: {MAX_FORMING} formations under way")
            try:
                return self._rendezvous(control, pair_key, scope, config, device, deadline)
            finally:
                self._forming.release()
        except BaseException:
            control.close()
            raise
        finally:
            if unauthenticated is not None:
                self._release_unauthenticated(unauthenticated)
            with self._lock:
                self._live.discard(control)

    def _release_unauthenticated(self, source: str) -> None:
        with self._lock:
            left = self._sources.pop(source, 1) - 1
            if left:
                self._sources[source] = left
        self._handshaking.release()

    def _rendezvous(
        self,
        control: ControlConnection,
        pair_key: str,
        scope: str,
        config: TransportConfig,
        device: torch.device | str | None,
        deadline: float,
    ) -> tuple[PairChannel, ControlConnection]:
        """The rendezvous over `control` into a store of this formation, then the channel."""
        address = PairAddress(self.address.host, self.address.control_port, pair_key, 1, scope)
        store = dist.HashStore()  # this formation's; the sender reaches it through control
        failure: list[BaseException] = []
        serving = threading.Thread(
            target=_serve, args=(control, store, deadline, failure), name="kv-rendezvous",
            daemon=True,
        )  # fmt: skip
        serving.start()
        refusal = self._check_sender_layout(store, pair_key, deadline)
        if refusal is not None:  # the sender reads it, then closes; the serving thread ends
            serving.join(max(deadline - time.monotonic(), 0))
            control.close()
            raise KVTransferError(refusal)
        channel = open_channel(address, config, device, deadline - time.monotonic(), store)
        serving.join(max(deadline - time.monotonic(), 0))
        if serving.is_alive() or failure:
            channel.close()
            why = failure[0] if failure else "no end of the rendezvous in time"
            raise KVTransferError(f"pair {pair_key!r}: {why}")
        return channel, control

    def _check_sender_layout(self, store: Any, pair_key: str, deadline: float) -> str | None:
        """Wait for the sender's layout in the rendezvous store, check it against this
        endpoint's, and answer under VERDICT_KEY. The refusal, or None if accepted."""
        try:
            store.wait([LAYOUT_KEY], timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
            stated = bytes(store.get(LAYOUT_KEY))
        except RuntimeError:  # torch's store timeout
            raise KVTransferError(
                f"pair {pair_key!r}: no KV layout from the sender in time"
            ) from None
        refusal = None
        if self.address.layout is not None:
            prefix = f"pair {pair_key!r} refused by the decode (receiver) side: "
            if not stated:
                refusal = prefix + "the prefill (sender) stated no KV layout"
            else:
                try:
                    sender = KVLayout.from_wire(stated)
                except KVTransferError as e:
                    refusal = prefix + str(e)
                else:
                    refusal = _checked(sender, self.address.layout, prefix)
        store.set(VERDICT_KEY, (refusal or "").encode())
        return refusal

    def _count_refused(self, reason: str, detail: str) -> None:
        with self._lock:
            self._refused[reason] += 1
        logger.warning("KV pair refused (%s): %s", reason, detail)


def _serve(
    control: ControlConnection, store: Any, deadline: float, failure: list[BaseException]
) -> None:
    try:
        serve_rendezvous(control, store, deadline)
    except BaseException as e:  # reported to the forming thread
        failure.append(e)
        control.close()  # the sender's store calls fail at once


def connect_pair(
    endpoint: EndpointAddress,
    pair_key: str,
    config: TransportConfig,
    device: torch.device | str | None = None,
    secret: ClusterSecret | None = None,
    layout: KVLayout | None = None,
) -> tuple[PairChannel, ControlConnection]:
    """Form the sender's side of a pair with the receiver at `endpoint`, proving the cluster
    secret (default: from the environment). Raises PeerRefused if the receiver does not
    prove it, KVTransferError if the receiver does not take part within connect_timeout_s,
    or, before connecting, if `layout` and the endpoint's layout (both given) differ."""
    if layout is not None and endpoint.layout is not None:
        try:
            layout.check_compatible(endpoint.layout)
        except KVTransferError as e:
            refusal = _layout_refusal(e, layout, endpoint.layout)
            raise KVTransferError(f"pair {pair_key!r} refused: {refusal}") from None
    secret = secret if secret is not None else ClusterSecret.from_environment()
    deadline = time.monotonic() + config.connect_timeout_s
    control = ControlConnection.connect(
        endpoint.host, endpoint.control_port, config.connect_timeout_s
    )
    try:
        scope = prove_as_sender(control, pair_key, secret, deadline)
        address = PairAddress(endpoint.host, endpoint.control_port, pair_key, 0, scope)
        store = ControlStore(control, deadline)
        try:  # the receiver checks the layout before the process group forms
            store.set(LAYOUT_KEY, b"" if layout is None else layout.to_wire())
            refusal = bytes(store.get(VERDICT_KEY)).decode("utf-8", "replace")
        except RuntimeError as e:
            raise KVTransferError(f"pair {pair_key!r}: {e}") from None
        if refusal:
            raise KVTransferError(refusal)
        channel = open_channel(address, config, device, deadline - time.monotonic(), store)
        try:
            store.finish()
        except BaseException:
            channel.close()
            raise
        return channel, control
    except BaseException:
        with contextlib.suppress(Exception):
            control.close()
        raise


def _checked(sender: KVLayout, receiver: KVLayout, prefix: str) -> str | None:
    try:
        sender.check_compatible(receiver)
    except KVTransferError as e:
        return prefix + _layout_refusal(e, sender, receiver)
    return None


def _layout_refusal(mismatch: KVTransferError, sender: KVLayout, receiver: KVLayout) -> str:
    """Both ends' layouts in words: what differs, and how each splits its KV heads (which
    may differ: every transfer carries every head)."""
    return (
        f"the prefill (sender, tensor_parallel_size {sender.tensor_parallel_size}) and decode "
        f"(receiver, tensor_parallel_size {receiver.tensor_parallel_size}) KV {mismatch}; "
        "serve both with the same --kv-cache-dtype, --kv-cache-scales and model"
    )
