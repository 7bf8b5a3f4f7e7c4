"""ChannelGuard: the life of one pair channel, apart from what it moves.

One thread runs a channel's operations, each within a time limit; the first failure breaks the
channel for good (which messages matched is then unknown) and every later operation raises
KVTransferError; `close` releases the process group once, from any thread, and says whether it
must be aborted. The channel (kvtransfer.channel) runs every send and receive inside
`operation`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from contracts.errors import KVTransferError

logger = logging.getLogger(__name__)


class ChannelGuard:
    """Holds a channel's process group (and its store, kept alive with it) and its state:
    healthy, broken (with the reason) or closed."""

    def __init__(
        self, name: str, pg: Any, store: Any, timeout_s: float, backstop_timeout_s: float
    ) -> None:
        self.name = name  # names the channel in errors and logs
        self._timeout_s = timeout_s  # an operation's default limit
        self._backstop_timeout_s = backstop_timeout_s
        self._store = store  # kept alive with the process group
        self._pg = pg  # None once closed; an operation in flight holds its own reference
        self._op_lock = threading.Lock()  # held by the one thread running an operation
        self._state_lock = threading.Lock()  # guards _broken and _closed
        self._broken: str | None = None  # why the channel is broken, once it is
        self._closed = False

    @property
    def is_broken(self) -> bool:
        return self._broken is not None

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def is_busy(self) -> bool:
        """True while a thread runs an operation."""
        return self._op_lock.locked()

    def limit_s(self, timeout_s: float | None) -> float:
        """An operation's time limit; ValueError if out of (0, backstop_timeout_s]."""
        limit_s = self._timeout_s if timeout_s is None else timeout_s
        if not 0 < limit_s <= self._backstop_timeout_s:
            raise ValueError(f"timeout_s={limit_s} must be in (0, backstop_timeout_s]")
        return limit_s

    @contextmanager
    def operation(self, name: str, timeout_s: float | None) -> Iterator[tuple[Any, float]]:
        """Run one operation: single-threaded, on a healthy channel. Yields the process group
        (held for the operation even if `close` runs meanwhile) and a time.monotonic deadline.
        Any failure breaks the channel and surfaces as KVTransferError; a second thread gets
        RuntimeError."""
        limit_s = self.limit_s(timeout_s)
        if not self._op_lock.acquire(blocking=False):
            raise RuntimeError(f"{self.name}: used by two threads at once; one per pair")
        try:
            pg = self._check_usable(name)
            start = time.monotonic()
            try:
                yield pg, start + limit_s
            except KVTransferError as e:
                raise self._break(name, str(e), start) from e
            except RuntimeError as e:  # torch.distributed failures: timeout, peer gone, abort
                raise self._break(name, first_line(e), start) from e
            except Exception as e:  # a fill or drain failed: what was posted is unknown
                raise self._break(name, f"{type(e).__name__}: {first_line(e)}", start) from e
        finally:
            self._op_lock.release()

    def close(self) -> tuple[Any, bool] | None:
        """Mark the channel closed: (process group, whether it must be aborted: broken or an
        operation in flight) the first time, None after. Any thread."""
        with self._state_lock:
            if self._closed:
                return None
            self._closed = True
            pg, self._pg, self._store = self._pg, None, None
            return pg, self._broken is not None or self._op_lock.locked()

    def _check_usable(self, name: str) -> Any:
        """The process group, if the channel is open and healthy."""
        with self._state_lock:
            if self._closed:
                raise KVTransferError(f"{self.name}: {name} on a closed channel")
            if self._broken is not None:
                raise KVTransferError(f"{self.name}: {name} on a broken channel ({self._broken})")
            return self._pg

    def _break(self, name: str, reason: str, start: float) -> KVTransferError:
        with self._state_lock:
            already_broken = self._broken is not None
            if not already_broken and not self._closed:
                self._broken = f"{name} failed: {reason}"
        if already_broken:
            return KVTransferError(reason)
        elapsed_s = time.monotonic() - start
        message = f"{self.name}: {name} failed after {elapsed_s:.3f} s: {reason}"
        logger.warning("%s", message)
        return KVTransferError(message)


def first_line(error: BaseException) -> str:
    """torch.distributed errors carry a C++ stack trace after the first line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
