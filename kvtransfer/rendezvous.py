"""A pair's rendezvous over its authenticated control connection: the sender's torch.distributed
store operations travel as StoreRequest frames (ControlStore) to the receiver, which answers
from an in-memory store of that formation alone (`serve_rendezvous`). No store listens anywhere,
so nobody without the cluster secret can read or overwrite the addresses gloo and NCCL
exchange. A Python store must outlive its C++ holders (PairChannel keeps a reference). Details
and what was checked on which torch: docs/kvtransfer.md.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from contracts.errors import KVTransferError
from kvtransfer.control import ControlConnection
from kvtransfer.messages import (
    MAX_REASON_BYTES,
    MAX_STORE_KEY_BYTES,
    MAX_STORE_VALUE_BYTES,
    MessageType,
    StoreOp,
    StoreReply,
    StoreRequest,
)

_MIN_WAIT_S = 0.001
_MAX_REQUEST_BYTES = 1 + 2 + MAX_STORE_KEY_BYTES + 2 * (4 + MAX_STORE_VALUE_BYTES) + 8
_MAX_REPLY_BYTES = 1 + 4 + MAX_STORE_VALUE_BYTES + 8 + 2 + MAX_REASON_BYTES


class ControlStore(dist.Store):  # type: ignore[misc]
    """The sender's store: every operation is a StoreRequest to the receiver (see above).
    Operations raise RuntimeError (torch.distributed's kind: formation reports them as a failed
    formation) when the receiver refuses or the deadline (time.monotonic) passes."""

    def __init__(self, control: ControlConnection, deadline: float) -> None:
        super().__init__()
        self._control = control
        self._deadline = deadline
        self._lock = threading.Lock()
        self._local: Any = None  # a HashStore once finished
        control.restrict({MessageType.STORE_REPLY}, _MAX_REPLY_BYTES)

    def finish(self) -> None:
        """Tell the receiver the rendezvous is over; from now on answer locally."""
        with self._lock:
            if self._local is None:
                self._local = dist.HashStore()
                self._control.restrict(None)
                self._control.send(StoreRequest(StoreOp.DONE), self._left_s())

    # -- torch.distributed.Store ------------------------------------------------------------

    def set(self, key: str, value: bytes | str) -> None:
        self._call(StoreOp.SET, key, _bytes(value))

    def get(self, key: str) -> bytes:
        return self._call(StoreOp.GET, key).value

    def add(self, key: str, amount: int) -> int:
        return self._call(StoreOp.ADD, key, amount=amount).number

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        return self._call(StoreOp.COMPARE_SET, key, _bytes(expected), _bytes(desired)).value

    def check(self, keys: list[str]) -> bool:
        return all(self._call(StoreOp.CHECK, key).number for key in keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        for key in keys:
            self._call(StoreOp.WAIT, key, timeout_s=None if timeout is None else _s(timeout))

    def delete_key(self, key: str) -> bool:
        return bool(self._call(StoreOp.DELETE, key).number)

    def num_keys(self) -> int:
        return self._call(StoreOp.NUM_KEYS).number

    def clone(self) -> ControlStore:
        return self  # one connection; requests are serialised by the lock

    # -----------------------------------------------------------------------------------------

    def _call(
        self,
        op: StoreOp,
        key: str = "",
        value: bytes = b"",
        desired: bytes = b"",
        amount: int = 0,
        timeout_s: float | None = None,
    ) -> StoreReply:
        with self._lock:
            if self._local is not None:
                return _apply(self._local, StoreRequest(op, key, value, desired, amount))
            left_s = self._left_s()
            if op in (StoreOp.GET, StoreOp.WAIT):
                amount = max(1, int(1000 * min(left_s, timeout_s or left_s)))
            try:
                self._control.send(StoreRequest(op, key, value, desired, amount), left_s)
                reply = self._control.recv(self._left_s())
            except KVTransferError as e:
                raise RuntimeError(f"rendezvous {op.name} {key!r}: {e}") from None
            if reply is None:
                raise RuntimeError(f"rendezvous {op.name} {key!r}: no answer in time")
            if not isinstance(reply, StoreReply):
                self._control.close()
                raise RuntimeError(f"rendezvous: expected StoreReply, got {type(reply).__name__}")
            if not reply.ok:
                raise RuntimeError(f"rendezvous {op.name} {key!r}: {reply.error}")
            return reply

    def _left_s(self) -> float:
        left_s = self._deadline - time.monotonic()
        if left_s <= 0:
            raise RuntimeError("rendezvous timed out")
        return left_s


def serve_rendezvous(control: ControlConnection, store: Any, deadline: float) -> None:
    """The receiver's side: answer the sender's StoreRequests from `store` (the formation's
    HashStore) until its DONE. Raises KVTransferError if the connection fails, anything but
    a StoreRequest arrives, or `deadline` (time.monotonic) passes first."""
    control.restrict({MessageType.STORE_REQUEST}, _MAX_REQUEST_BYTES)
    while True:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise KVTransferError(f"{control.peer}: the rendezvous did not finish in time")
        request = control.recv(left_s)
        if request is None:
            continue
        if not isinstance(request, StoreRequest):
            raise KVTransferError(
                f"{control.peer}: expected StoreRequest during the rendezvous, got "
                f"{type(request).__name__}"
            )
        if request.op is StoreOp.DONE:
            control.restrict(None)
            return
        if request.op in (StoreOp.GET, StoreOp.WAIT):  # never past the formation's deadline
            limit_s = min(request.amount / 1000, deadline - time.monotonic())
            request = StoreRequest(request.op, request.key, amount=int(1000 * limit_s))
        control.send(_apply(store, request), max(deadline - time.monotonic(), _MIN_WAIT_S))


def _apply(store: Any, request: StoreRequest) -> StoreReply:
    """One operation on a local store; failures (a key that never came) are a reply too."""
    op, key = request.op, request.key
    try:
        if op is StoreOp.SET:
            store.set(key, request.value)
            return StoreReply(True)
        if op in (StoreOp.GET, StoreOp.WAIT):
            limit_s = max(request.amount / 1000, _MIN_WAIT_S)
            store.wait([key], timedelta(seconds=limit_s))
            return StoreReply(True, store.get(key) if op is StoreOp.GET else b"")
        if op is StoreOp.ADD:
            return StoreReply(True, number=int(store.add(key, request.amount)))
        if op is StoreOp.CHECK:
            return StoreReply(True, number=int(store.check([key])))
        if op is StoreOp.COMPARE_SET:
            return StoreReply(True, bytes(store.compare_set(key, request.value, request.desired)))
        if op is StoreOp.DELETE:
            return StoreReply(True, number=int(store.delete_key(key)))
        if op is StoreOp.NUM_KEYS:
            return StoreReply(True, number=int(store.num_keys()))
    except RuntimeError as e:  # torch's store errors: a wait that timed out
        return StoreReply(False, error=_first_line(e)[:200])
    return StoreReply(False, error=f"operation {op.name} not served")


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _s(timeout: timedelta) -> float:
    return max(timeout.total_seconds(), _MIN_WAIT_S)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
