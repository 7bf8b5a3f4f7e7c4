"""The control connection of a pair: framed messages (kvtransfer.codec) over one TCP socket.

A reader refuses a bad frame header before reading any payload, and a refused frame closes the
connection (after garbage the stream cannot be trusted). Until the peer has proven the cluster
secret only the handshake's small frames are accepted (`restrict`). One thread reads (`recv`: a
timeout returns None and keeps a partial frame), any number send (`send` is locked).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Collection

from contracts.errors import KVTransferError
from kvtransfer.codec import HEADER_BYTES, MAX_PAYLOAD_BYTES, decode, encode, read_header
from kvtransfer.messages import Message, MessageType

logger = logging.getLogger(__name__)

_RECV_BYTES = 1 << 16


class ControlConnection:
    """One end of a control connection. Any failure raises KVTransferError and closes it."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # small frames go out at once
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = peer
        self._sock = sock
        self._send_lock = threading.Lock()
        self._buffer = bytearray()
        self._closed = threading.Event()
        self._allowed: frozenset[MessageType] | None = None  # None: every type
        self._max_payload_bytes = MAX_PAYLOAD_BYTES

    def restrict(
        self, types: Collection[MessageType] | None, max_payload_bytes: int = MAX_PAYLOAD_BYTES
    ) -> None:
        """From the next frame on, refuse (and close) any frame not of `types` (None: any) or
        with a payload over max_payload_bytes, on its header, before reading the payload."""
        self._allowed = None if types is None else frozenset(types)
        self._max_payload_bytes = max_payload_bytes

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float) -> ControlConnection:
        """Connect to a ControlListener. Raises KVTransferError if it cannot within timeout_s."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise KVTransferError(f"control connection to {host}:{port} failed: {e}") from e
        return cls(sock, f"{host}:{port}")

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, msg: Message, timeout_s: float = 10.0) -> None:
        """Send one message. Raises KVTransferError if the connection is closed or broken."""
        frame = encode(msg)
        with self._send_lock:
            self._check_open("send")
            try:
                self._sock.settimeout(timeout_s)
                self._sock.sendall(frame)
            except OSError as e:
                self.close()
                raise KVTransferError(f"control send to {self.peer} failed: {e}") from e

    def recv(self, timeout_s: float | None) -> Message | None:
        """The next message, or None if none completed within timeout_s (None: wait forever).

        Raises KVTransferError when the peer closed the connection, the connection failed, or
        a frame was refused (the connection is closed then).
        """
        self._check_open("recv")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            message = self._take_frame()
            if message is not None:
                return message
            try:  # a peer that trickles bytes gets no more time than one that is silent
                left_s = None if deadline is None else deadline - time.monotonic()
                if left_s is not None and left_s <= 0:
                    return None
                self._sock.settimeout(left_s)
                data = self._sock.recv(_RECV_BYTES)
            except TimeoutError:
                return None
            except OSError as e:
                self.close()
                raise KVTransferError(f"control recv from {self.peer} failed: {e}") from e
            if not data:
                self.close()
                raise KVTransferError(f"control connection closed by {self.peer}")
            self._buffer += data

    def close(self) -> None:
        """Close the socket; idempotent, any thread. A reader blocked in recv wakes with an
        error."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):  # not connected any more
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _take_frame(self) -> Message | None:
        if len(self._buffer) < HEADER_BYTES:
            return None
        try:
            msg_type, payload_bytes = read_header(self._buffer[:HEADER_BYTES])
            if self._allowed is not None and msg_type not in self._allowed:
                allowed = ", ".join(sorted(t.name for t in self._allowed))
                raise KVTransferError(f"{msg_type.name} frame where only {allowed} may come")
            if payload_bytes > self._max_payload_bytes:
                raise KVTransferError(
                    f"{msg_type.name} payload of {payload_bytes} bytes, at most "
                    f"{self._max_payload_bytes} here"
                )
            end = HEADER_BYTES + payload_bytes
            if len(self._buffer) < end:
                return None
            message = decode(self._buffer[:end])
        except KVTransferError as e:
            self.close()
            logger.warning("control frame from %s refused: %s", self.peer, e)
            raise KVTransferError(f"control frame from {self.peer} refused: {e}") from None
        del self._buffer[:end]
        return message

    def _check_open(self, name: str) -> None:
        if self._closed.is_set():
            raise KVTransferError(f"control {name}: the connection to {self.peer} is closed")


class ControlListener:
    """Accepts control connections on (host, port); port 0 picks a free one (see `port`), or
    on `sock`, a socket already listening (kvtransfer.network.listen_socket)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None
    ) -> None:
        self.host = host
        self._sock = sock if sock is not None else socket.create_server((host, port))
        self.port: int = self._sock.getsockname()[1]

    def accept(self, timeout_s: float | None) -> ControlConnection | None:
        """The next incoming connection, or None after timeout_s."""
        self._sock.settimeout(timeout_s)
        try:
            sock, address = self._sock.accept()
        except TimeoutError:
            return None
        sock.setblocking(True)
        return ControlConnection(sock, f"{address[0]}:{address[1]}")

    def close(self) -> None:
        """Stop listening at once: shutdown() first, since close() alone leaves the socket
        listening while another thread still waits in accept() on it (Linux)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
