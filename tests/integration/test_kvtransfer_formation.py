"""Forming KV pairs between real workers (in this process, no Ray): pairing is not held up by
connections that never complete a formation (docs/reliability.md, F6; issue 16 item 2), a peer
without the cluster secret is refused before any KV block is reserved (S5), and per-head FP8
workers pair only with workers holding the same calibrated scales."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

import decode_worker.actor as decode_actor
import prefill_worker.actor as prefill_actor
from contracts.errors import KVTransferError
from contracts.sampling_params import SamplingParams
from decode_worker.actor import EngineWorker
from engine.config import EngineConfig
from engine.scheduler import SchedulerConfig
from kvtransfer.codec import encode
from kvtransfer.control import ControlConnection
from kvtransfer.handshake import ClusterSecret, PeerRefused
from kvtransfer.layout import KVLayout
from kvtransfer.messages import PairChallenge, PairHello, PairProof, TransferOffer
from kvtransfer.pair import connect_pair
from kvtransfer.transport import TransportConfig
from prefill_worker.actor import PrefillWorker

pytestmark = [pytest.mark.integration]

HOST = "127.0.0.1"
FAST = TransportConfig(backend="gloo", timeout_s=5.0, connect_timeout_s=4.0, gloo_hostname=HOST)


def engine_config(kv_cache_dtype: str = "auto") -> EngineConfig:
    return EngineConfig(
        model="dummy:tiny", device="cpu", num_kv_blocks=64, block_size=4, seed=0,
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EngineWorker, PrefillWorker]]:
    """A decode worker with its endpoint open and a prefill worker, both forming pairs with
    a 4 s connect timeout."""
    monkeypatch.setattr(decode_actor, "transport_for", lambda engine, *host: FAST)
    monkeypatch.setattr(prefill_actor, "transport_for", lambda engine, *host: FAST)
    decode = EngineWorker(engine_config(), "decode-0")
    prefill = PrefillWorker(engine_config(), "prefill-0")
    try:
        yield decode, prefill
    finally:
        asyncio.run(prefill.disconnect("decode-0"))
        prefill.shutdown()
        decode.shutdown()


def test_idle_half_open_and_stale_connections_do_not_stall_pairing(
    workers: tuple[EngineWorker, PrefillWorker],
) -> None:
    decode, prefill = workers
    address = decode.open_endpoint(HOST)
    control = (address.host, address.control_port)
    stuck = [socket.create_connection(control) for _ in range(2)]  # idle: never say a word
    half_open = socket.create_connection(control)
    half_open.sendall(encode(PairHello("half/open", b"n" * 32))[:5])  # stops mid-frame
    stuck.append(half_open)
    for number in range(2):  # stale hellos: their senders gave up and went away
        stale = socket.create_connection(control)
        stale.sendall(encode(PairHello(f"gone/{number}", b"n" * 32)))
        stale.close()
    try:
        start = time.monotonic()
        asyncio.run(prefill.connect("decode-0", address, "prefill-0/decode-0/1"))
        elapsed_s = time.monotonic() - start
    finally:
        for sock in stuck:
            sock.close()
    assert elapsed_s < FAST.connect_timeout_s, f"formation took {elapsed_s:.1f} s"
    deadline = time.monotonic() + 10
    while len(decode.arrivals.receivers) != 1:  # the decode side adopted the pair
        assert time.monotonic() < deadline, "the decode worker never adopted the pair"
        time.sleep(0.01)
    # the pair works: a prompt's KV goes across
    result = asyncio.run(
        prefill.prefill("r1", list(range(1, 20)), SamplingParams(max_tokens=4), None, "decode-0")
    )  # fmt: skip
    assert result.kv is not None and result.kv.decode_worker == "decode-0"
    assert result.kv.num_tokens == 19 and result.usage.prompt_tokens == 19
    deadline = time.monotonic() + 20
    while asyncio.run(decode.stats()).kv.transfers_completed != 1:
        assert time.monotonic() < deadline, "the KV never arrived"
        time.sleep(0.02)


def test_a_peer_without_the_secret_is_refused_before_any_block_is_reserved(
    workers: tuple[EngineWorker, PrefillWorker],
) -> None:
    decode, prefill = workers
    address = decode.open_endpoint(HOST)
    free_blocks = decode.engine.block_manager.num_free_blocks
    # a worker of another cluster: it finds out the receiver does not share its secret
    with pytest.raises(PeerRefused, match="did not prove the KV cluster secret"):
        connect_pair(address, "intruder/1", FAST, secret=ClusterSecret(b"not-the-secret-0123"))
    # a peer that skips the handshake and offers KV at once
    offer = TransferOffer("t-1", "r-1", KVLayout("m", "float32", 4, 2, 2, 8), 4, (0,), 1000)
    with socket.create_connection((address.host, address.control_port)) as raw:
        raw.sendall(encode(offer))
        raw.settimeout(10)
        assert raw.recv(1024) == b"", "the receiver answered an offer before any handshake"
    # a peer that answers the challenge with a made-up proof
    control = ControlConnection.connect(address.host, address.control_port, 5)
    control.send(PairHello("forger/1", b"f" * 32))
    assert isinstance(control.recv(5), PairChallenge)
    control.send(PairProof(b"\0" * 32))
    with pytest.raises(KVTransferError, match="closed"):
        control.recv(10)
    deadline = time.monotonic() + 10
    while asyncio.run(decode.stats()).kv.pairs_refused != 3:
        assert time.monotonic() < deadline, asyncio.run(decode.stats()).kv.pairs_refused
        time.sleep(0.01)
    assert decode.arrivals.receivers == []
    assert decode.engine.block_manager.num_free_blocks == free_blocks
    asyncio.run(decode.check_integrity())
    # the cluster's own prefill worker still pairs
    asyncio.run(prefill.connect("decode-0", address, "prefill-0/decode-0/1"))
    assert asyncio.run(decode.stats()).kv.pairs_refused == 3


def test_per_head_fp8_workers_pair_only_with_the_same_scales(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers of the same model calibrate the same per-head scales and pair; a prefill worker
    whose calibration differs (here: 8x headroom instead of 2x, as another version of the
    code might calibrate) holds other scales, and its pair is refused before a block moves."""
    import engine.engine as engine_module
    from engine.kv_quant import calibrated_scales

    monkeypatch.setattr(decode_actor, "transport_for", lambda engine, *host: FAST)
    monkeypatch.setattr(prefill_actor, "transport_for", lambda engine, *host: FAST)
    decode = EngineWorker(engine_config("fp8"), "decode-0")
    same = PrefillWorker(engine_config("fp8"), "prefill-0")
    monkeypatch.setattr(
        engine_module, "calibrated_scales", lambda amax: calibrated_scales(amax, headroom=8.0)
    )
    other = PrefillWorker(engine_config("fp8"), "prefill-1")
    try:
        digests = [w.engine.kv_scales_digest for w in (decode, same, other)]
        assert digests[0] == digests[1] != digests[2] and None not in digests
        assert decode.layout.scale_scheme == f"per_head_fp32:{digests[0]}"
        assert decode.layout.dtype == "float8_e4m3fn"
        address = decode.open_endpoint(HOST)
        free_blocks = decode.engine.block_manager.num_free_blocks
        with pytest.raises(KVTransferError, match="the per-head FP8 KV scales differ"):
            asyncio.run(other.connect("decode-0", address, "prefill-1/decode-0/1"))
        assert decode.arrivals.receivers == []
        assert decode.engine.block_manager.num_free_blocks == free_blocks
        asyncio.run(same.connect("decode-0", address, "prefill-0/decode-0/1"))
        result = asyncio.run(
            same.prefill("r1", list(range(1, 20)), SamplingParams(max_tokens=4), None, "decode-0")
        )  # fmt: skip
        assert result.kv is not None and result.kv.num_tokens == 19
        deadline = time.monotonic() + 20
        while asyncio.run(decode.stats()).kv.transfers_completed != 1:
            assert time.monotonic() < deadline, "the KV never arrived"
            time.sleep(0.02)
    finally:
        asyncio.run(same.disconnect("decode-0"))
        for worker in (other, same, decode):
            worker.shutdown()
