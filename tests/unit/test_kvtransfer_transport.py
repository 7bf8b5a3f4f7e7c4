"""kvtransfer.transport without a peer: config validation and the NCCL environment guard.
Transfers between real processes are in tests/integration/test_kvtransfer_transport.py."""

from __future__ import annotations

import os

import pytest

from kvtransfer.transport import (
    NCCL_ERROR_HANDLING_ENV,
    PairAddress,
    TransportConfig,
    configure_nccl_environment,
    open_channel,
)


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
