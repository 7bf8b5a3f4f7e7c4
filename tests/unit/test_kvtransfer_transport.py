"""kvtransfer.transport and kvtransfer.nccl without a peer: config validation, the NCCL
environment guard, completion polling. Transfers between real processes are in
tests/integration/test_kvtransfer_transport.py."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import pytest

from contracts.errors import KVTransferError
from kvtransfer import nccl
from kvtransfer.nccl import NCCL_ERROR_HANDLING_ENV, configure_nccl_environment
from kvtransfer.transport import PairAddress, TransportConfig, open_channel


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "mpi"}, "backend='mpi'"),
        ({"timeout_s": 0}, "timeout_s=0"),
        ({"connect_timeout_s": float("inf")}, "connect_timeout_s=inf"),
        ({"timeout_s": 700.0}, "backstop_timeout_s=600.0 must exceed"),
    ],
)
def test_transport_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransportConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"store_host": ""}, "store_host"),
        ({"store_port": 0}, "store_port=0"),
        ({"pair_key": ""}, "pair_key=''"),
        ({"rank": 2}, "rank=2"),
        ({"rank": True}, "rank=True"),
    ],
)
def test_pair_address_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "store_host": "127.0.0.1",
        "store_port": 29500,
        "pair_key": "p",
        "rank": 0,
    }
    with pytest.raises(ValueError, match=message):
        PairAddress(**(fields | kwargs))  # type: ignore[arg-type]


def test_peer_rank_is_the_other_one() -> None:
    assert PairAddress("h", 1, "k", 0).peer_rank == 1
    assert PairAddress("h", 1, "k", 1).peer_rank == 0


@pytest.mark.parametrize("value", ["1", "3", None])
def test_nccl_channels_refuse_an_environment_that_kills_the_process(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(NCCL_ERROR_HANDLING_ENV, raising=False)
    else:
        monkeypatch.setenv(NCCL_ERROR_HANDLING_ENV, value)
    address = PairAddress("127.0.0.1", 1, "never-formed", 0)  # nothing listens: never reached
    with pytest.raises(ValueError, match=NCCL_ERROR_HANDLING_ENV):
        open_channel(address, TransportConfig(backend="nccl"), "cuda:0")


def test_configure_nccl_environment_sets_clean_up_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NCCL_ERROR_HANDLING_ENV, raising=False)
    configure_nccl_environment()
    assert os.environ[NCCL_ERROR_HANDLING_ENV] == "2"
    monkeypatch.setenv(NCCL_ERROR_HANDLING_ENV, "3")
    with pytest.raises(ValueError, match="'3'"):
        configure_nccl_environment()


def _timer_slack_ns() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(30, 0, 0, 0, 0))  # PR_GET_TIMERSLACK


class _DoneAfter:
    """An event stand-in: done at the n-th query."""

    def __init__(self, n: int) -> None:
        self.left = n

    def query(self) -> bool:
        self.left -= 1
        return self.left <= 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is Linux's")
def test_a_polling_thread_cuts_its_own_timer_slack_only() -> None:
    """_poll (NCCL completion) first cuts its thread's timer slack, so its short sleeps last
    about what they ask; other threads (the engine's) keep theirs."""
    seen: dict[str, int] = {}

    def poller() -> None:
        seen["before"] = _timer_slack_ns()
        nccl._poll(_DoneAfter(3), time.monotonic() + 5.0)
        seen["after"] = _timer_slack_ns()

    main_before = _timer_slack_ns()
    thread = threading.Thread(target=poller)
    thread.start()
    thread.join(10)
    assert seen["before"] == main_before != nccl.POLL_TIMER_SLACK_NS
    assert seen["after"] == nccl.POLL_TIMER_SLACK_NS
    assert _timer_slack_ns() == main_before


def test_poll_gives_up_at_its_deadline() -> None:
    with pytest.raises(KVTransferError, match="timed out"):
        nccl._poll(_DoneAfter(10**9), time.monotonic() + 0.05)
