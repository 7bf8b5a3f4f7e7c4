"""The KV-transfer protocol between real processes (TCP control + gloo data): bit-exact
transfers, many concurrent transfers over several pairs, and the fault scenarios of
docs/reliability.md (aborts from either side, a receiver that never confirms, a killed peer, a
stalled sender). Every scenario ends with check_integrity() of both block managers."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from kvtransfer.protocol import TransferConfig
from tests.integration.kvtransfer_peers import NUM_LAYERS, Report, Spec, run_role

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = TransferConfig(lease_s=1.5, ready_timeout_s=5.0, stall_timeout_s=2.0, done_timeout_s=3.0)
CTX = mp.get_context("spawn")


class Peer:
    def __init__(self, role: str, params: dict[str, Any]) -> None:
        self.conn, child = CTX.Pipe()
        self.process = CTX.Process(target=run_role, args=(role, params, child), daemon=True)
        self.process.start()

    def receive(self, timeout_s: float = 60.0) -> Any:
        assert self.conn.poll(timeout_s), "peer did not report in time"
        return self.conn.recv()

    def report(self, timeout_s: float = 90.0) -> Report:
        while True:
            message = self.receive(timeout_s)
            if isinstance(message, Report):
                assert message.error is None, message.error
                return message

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)


@contextmanager
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    try:
        yield started
    finally:
        for peer in started:
            if peer.process.is_alive():
                peer.process.kill()
            peer.process.join(10)


def start_receiver(started: list[Peer], transfer_ids: list[str], **params: Any) -> Peer:
    peer = Peer("receiver", {"transfer_ids": transfer_ids, **params})
    started.append(peer)
    return peer


def start_sender(
    started: list[Peer], endpoints: list[Any], specs: list[Spec], **params: Any
) -> Peer:
    peer = Peer(
        "sender", {"endpoints": endpoints, "specs": specs, "name": f"s{len(started)}", **params}
    )
    started.append(peer)
    return peer


def assert_clean(*reports: Report) -> None:
    for report in reports:
        assert report.integrity.startswith("ok"), report.integrity
        assert report.integrity.endswith("ok"), report.integrity


@pytest.mark.parametrize(
    "config",
    [
        TransferConfig(),  # CRC-32 compared: the receiver acks on Done
        TransferConfig(checksum=False, part_bytes=1),  # acks on the last chunk; 1-layer parts
        TransferConfig(direct_receive=True),  # fresh destination blocks: slices land directly
    ],
    ids=["crc-ack-on-done", "ack-on-data-pipelined", "direct-crc"],
)
def test_transfers_are_bit_exact_for_every_size_and_chunking(config: TransferConfig) -> None:
    specs = [
        Spec("shorter-than-a-block", 3, seed=1),
        Spec("exactly-one-block", 4, seed=2),
        Spec("block-plus-one", 5, seed=3),
        Spec("seven-blocks", 27, seed=4),
        Spec("per-layer-chunks", 26, seed=5, layers_per_chunk=1),
        Spec("two-layer-chunks", 17, seed=6, layers_per_chunk=3),
    ]
    ids = [s.transfer_id for s in specs]
    for dtype in (torch.float32, torch.bfloat16):
        with peers() as started:
            receiver = start_receiver(started, ids, dtype=dtype, config=config)
            endpoint = receiver.receive()
            sender = start_sender(started, [endpoint], specs, dtype=dtype, config=config)
            sent, received = sender.report(), receiver.report()
        both = {t: (sent.results[t], received.results.get(t)) for t in ids}  # with reasons
        assert {t: r[0] for t, r in sent.results.items()} == dict.fromkeys(ids, "completed"), both
        assert {t: r[0] for t, r in received.results.items()} == dict.fromkeys(ids, "completed")
        assert received.digests == sent.digests
        assert sent.metrics["bytes_sent"] == received.metrics["bytes_received"] > 0
        assert_clean(sent, received)
        # each side's timeline: its steps in order, per chunk when there are several
        chunks = range(NUM_LAYERS)  # "per-layer-chunks": one chunk per layer
        sender_steps = sent.steps["per-layer-chunks"]
        assert [s for s in sender_steps if s.startswith("sent")] == [
            *(f"sent{i}" for i in chunks),
            "sent",
        ]
        assert sender_steps.index("ready") < sender_steps.index("sent0")
        receiver_steps = received.steps["per-layer-chunks"]
        assert [s for s in receiver_steps if s.startswith("in")] == [f"in{i}" for i in chunks]
        assert receiver_steps.index("first_header") < receiver_steps.index("in0")
        # one-part chunks after the first are posted ahead of their headers (posts_ahead)
        chunk1 = "header1" if config.direct_receive else "posted1"
        assert (
            receiver_steps.index("in0") < receiver_steps.index(chunk1) < receiver_steps.index("in1")
        )
        if not config.direct_receive:  # chunks in several parts are read header-first
            posted = "posted1" in received.steps["two-layer-chunks"]
            assert posted is (config.part_bytes > 1 << 20)
        assert "sent0" not in sent.steps["seven-blocks"]  # one chunk: no per-chunk steps


def test_chunks_posted_ahead_wait_for_staging_when_the_receivers_pool_is_short() -> None:
    """Staging for one 1-layer chunk only (4 KiB): the receiver lands the oldest chunk posted
    ahead before it leases staging for the next, and the transfer is still bit-exact."""
    specs = [Spec("short-pool", 26, seed=8, layers_per_chunk=1)]  # 3.5 KiB per chunk
    with peers() as started:
        receiver = start_receiver(started, ["short-pool"], staging_bytes=4096)
        endpoint = receiver.receive()
        sender = start_sender(started, [endpoint], specs)
        sent, received = sender.report(), receiver.report()
    results = (sent.results["short-pool"], received.results["short-pool"])
    assert results[0][0] == results[1][0] == "completed", results
    assert received.digests == sent.digests
    steps = received.steps["short-pool"]
    assert steps.index("in1") < steps.index("posted2") < steps.index("in2")  # one at a time
    assert_clean(sent, received)


@pytest.mark.parametrize(
    "config, slow",
    [
        (TransferConfig(), "ack"),
        (TransferConfig(checksum=False), "ack"),
        (TransferConfig(checksum=False), "sender"),
    ],
    ids=["ack-on-done", "ack-on-data", "ack-on-data-before-the-sender-is-done"],
)
def test_a_receiver_closed_as_its_transfer_completes_still_acks_it(
    config: TransferConfig, slow: str
) -> None:
    """The receiver's owner sees the transfer completed and closes at once (the test role
    does). With the Ack still on its way out (slowed by 0.5 s), close() waits for it. With
    the Ack and then the close reaching a sender still busy after its last send (0.3 s), the
    Ack counts: the sender ends the transfer completed either way, not failed by the closed
    pair, and only once its bytes are counted (the pair's failure ended it first: the CI run
    saw bytes_sent short of bytes_received by a chunk)."""
    specs = [Spec("closed-right-after", 9, seed=9, layers_per_chunk=1)]
    with peers() as started:
        receiver = start_receiver(
            started, ["closed-right-after"], slow_ack=slow == "ack", config=config
        )
        endpoint = receiver.receive()
        sender = start_sender(
            started, [endpoint], specs, config=config, slow_after_send=slow == "sender"
        )
        sent, received = sender.report(), receiver.report()
    results = (sent.results["closed-right-after"], received.results["closed-right-after"])
    assert results[0][0] == results[1][0] == "completed", results
    assert received.digests == sent.digests
    assert sent.metrics["bytes_sent"] == received.metrics["bytes_received"] > 0
    assert_clean(sent, received)


def test_many_concurrent_transfers_between_several_senders_and_receivers() -> None:
    rng = random.Random(7)
    num_receivers, num_senders, per_pair = 2, 2, 6
    specs_by_sender = [
        [
            Spec(f"s{s}-r{r}-{i}", rng.randint(1, 30), seed=rng.randrange(10**6),
                 layers_per_chunk=rng.choice([1, 2, NUM_LAYERS]), endpoint=r)
            for r in range(num_receivers)
            for i in range(per_pair)
        ]
        for s in range(num_senders)
    ]  # fmt: skip
    for specs in specs_by_sender:
        rng.shuffle(specs)  # interleave the pairs in random order
    with peers() as started:
        receivers = [
            start_receiver(
                started,
                [s.transfer_id for specs in specs_by_sender for s in specs if s.endpoint == r],
                num_pairs=num_senders,
            )
            for r in range(num_receivers)
        ]
        endpoints = [r.receive() for r in receivers]
        senders = [start_sender(started, endpoints, specs) for specs in specs_by_sender]
        sent = [s.report() for s in senders]
        received = [r.report() for r in receivers]
    sent_digests = {k: v for report in sent for k, v in report.digests.items()}
    received_digests = {k: v for report in received for k, v in report.digests.items()}
    assert len(sent_digests) == num_senders * num_receivers * per_pair
    assert received_digests == sent_digests
    for report in sent + received:
        assert {status for status, _ in report.results.values()} == {"completed"}
    assert_clean(*sent, *received)


def run_fault(
    specs: list[Spec],
    sender_params: dict[str, Any] | None = None,
    receiver_params: dict[str, Any] | None = None,
    kill: str | None = None,
    config: TransferConfig = FAST,
) -> tuple[Report | None, Report | None, float]:
    """One sender, one receiver; `kill` ("sender"/"receiver") dies once a transfer is live.
    Returns the reports of the survivors and the seconds from the kill to the last report."""
    ids = [s.transfer_id for s in specs]
    with peers() as started:
        receiver = start_receiver(started, ids, config=config, **(receiver_params or {}))
        endpoint = receiver.receive()
        sender = start_sender(started, [endpoint], specs, config=config, **(sender_params or {}))
        killed_at = time.monotonic()
        if kill is not None:
            assert receiver.receive() == "live"
            (sender if kill == "sender" else receiver).kill()
            killed_at = time.monotonic()
        sent = None if kill == "sender" else sender.report()
        received = None if kill == "receiver" else receiver.report()
        return sent, received, time.monotonic() - killed_at


def test_sender_aborts_mid_transfer() -> None:
    specs = [Spec("a", 30, seed=1, layers_per_chunk=1, behavior="abort_at_1"), Spec("b", 9, seed=2)]
    sent, received, _ = run_fault(specs)
    assert sent is not None and received is not None
    assert sent.results["a"] == ("aborted", "aborted by test")
    assert received.results["a"][0] == "aborted"
    # chunk 1 was posted ahead (one-layer chunks of one part): it and every later chunk came
    # as VOID filler, and the channel stayed in step
    assert "posted1" in received.steps["a"]
    assert sent.results["b"][0] == received.results["b"][0] == "completed", "the pair lives on"
    assert received.digests["b"] == sent.digests["b"]
    assert_clean(sent, received)


def test_receiver_aborts_mid_transfer() -> None:
    specs = [Spec("a", 30, seed=1, layers_per_chunk=1, behavior="slow")]
    sent, received, _ = run_fault(specs, receiver_params={"abort_when_live": True})
    assert sent is not None and received is not None
    assert sent.results["a"][0] == "aborted"
    assert "client cancelled" in sent.results["a"][1]
    assert received.results["a"] == ("aborted", "client cancelled")
    assert_clean(sent, received)


def test_lease_frees_the_senders_blocks_when_the_receiver_never_confirms() -> None:
    specs = [Spec("a", 10, seed=1)]
    sent, received, _ = run_fault(specs, receiver_params={"no_ack": True, "deadline_s": 4.0})
    assert sent is not None and received is not None
    assert sent.results["a"][0] == "lease_expired"
    assert sent.metrics["leases_expired"] == 1
    assert sent.seconds["a"] >= FAST.lease_s
    assert_clean(sent, received)


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_killed_peer_the_survivor_errors_within_its_timeout_and_frees(victim: str) -> None:
    specs = [Spec("a", 30, seed=1, layers_per_chunk=1, behavior="slow"), Spec("b", 5, seed=2)]
    sent, received, seconds = run_fault(specs, kill=victim)
    survivor = received if victim == "sender" else sent
    assert survivor is not None
    assert {status for status, _ in survivor.results.values()} == {"failed"}, survivor.results
    assert seconds < FAST.stall_timeout_s + FAST.ready_timeout_s + 5
    assert_clean(survivor)


def test_stalled_sender_times_out_on_both_sides_and_frees() -> None:
    specs = [Spec("a", 30, seed=1, layers_per_chunk=1, behavior="stall_at_1")]
    sent, received, _ = run_fault(specs)
    assert sent is not None and received is not None
    assert received.results["a"][0] == "failed"
    assert "timed out" in received.results["a"][1] or "failed" in received.results["a"][1]
    assert received.seconds["a"] < FAST.stall_timeout_s + 3
    assert sent.results["a"][0] == "failed"
    assert_clean(sent, received)


def test_decoding_from_a_real_prefills_transferred_kv_equals_one_engine() -> None:
    from tests.conftest import greedy, make_engine, prompt_ids

    lengths = {"short": 3, "one-block": 4, "block-plus-one": 5, "long": 37}
    prompts = {rid: prompt_ids(seed=n, length=n) for rid, n in lengths.items()}
    max_tokens = 10
    with peers() as started:
        decode = Peer("decode_engine", {"prompts": prompts, "max_tokens": max_tokens})
        started.append(decode)
        endpoint = decode.receive()
        prefill = Peer("prefill_engine", {"prompts": prompts, "endpoint": endpoint})
        started.append(prefill)
        decode.conn.send(prefill.receive())  # the first tokens, as a router would pass them
        sent, received = prefill.report(), decode.report()
    reference = make_engine(num_kv_blocks=64, block_size=4)
    for rid, prompt in prompts.items():
        expected = reference.generate([prompt], greedy(max_tokens=max_tokens))[0].token_ids
        assert received.results[rid][1] == ",".join(map(str, expected)), rid
    assert_clean(sent)
    assert received.integrity == "ok"


def test_a_pickle_sent_to_the_control_channel_is_refused_unexecuted(tmp_path: Any) -> None:
    import pickle
    import socket

    from contracts.errors import KVTransferError
    from kvtransfer.pair import ReceiverEndpoint
    from tests.integration.kvtransfer_peers import HOST, TRANSPORT

    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self) -> Any:  # unpickling it would create the marker file
            return (open, (str(marker), "w"))

    endpoint = ReceiverEndpoint(HOST)
    try:
        with socket.create_connection((HOST, endpoint.address.control_port)) as sock:
            sock.sendall(pickle.dumps(Exploit()))
            with pytest.raises(KVTransferError, match=r"a pickle stream, refused"):
                endpoint.accept(TRANSPORT)
            sock.settimeout(5)
            assert sock.recv(1) == b"", "the receiver hangs up on a refused frame"
    finally:
        endpoint.close()
    assert not marker.exists(), "the pickle was executed"


def test_an_offer_without_room_waits_for_it_then_is_refused_after_half_the_ready_timeout() -> None:
    """A receiver whose room frees as arrived KV is attached (a TP decode engine's staging
    region, `wait_for_room`) defers an offer that does not fit instead of refusing it: the
    sender sees a later Ready. First's 4 blocks of 6 are held a while after they arrive;
    second's 3 wait for them, and are refused ("no free KV blocks") if they stay held past
    half the Ready timeout (here 5 s of 10). Without waiting, second is refused at once.

    The sender gives up on its own at the whole Ready timeout ("no Ready within"): the margin
    between the two is what a loaded machine may delay the receiver's refusal by. With FAST's
    5 s (refusal at 2.5 s, holds of 3.5 s) a CI run on 2 busy cores saw the sender's timeout
    instead (2026-12-07); at 10 s the refusal comes at 5 s (the hold lasts 6 s), 5 s before the
    sender's own timeout."""
    specs = [Spec("first", 16, seed=1), Spec("second", 12, seed=2)]
    config = dataclasses.replace(FAST, ready_timeout_s=10.0)
    held_briefly = {"num_blocks": 6, "wait_for_room": True, "hold_s": 0.3}
    sent, received, _ = run_fault(specs, receiver_params=held_briefly, config=config)
    assert sent is not None and received is not None
    assert {t: r[0] for t, r in sent.results.items()} == {
        "first": "completed", "second": "completed"
    }  # fmt: skip
    assert_clean(sent, received)

    held_long = {"num_blocks": 6, "wait_for_room": True, "hold_s": 6.0}
    sent, received, _ = run_fault(specs, receiver_params=held_long, config=config)
    assert sent is not None and received is not None
    assert sent.results["first"][0] == "completed"
    assert sent.results["second"] == ("failed", "receiver refused: no free KV blocks for 3 blocks")
    assert_clean(sent, received)


def test_receiver_refuses_a_different_layout_and_a_transfer_it_has_no_room_for() -> None:
    specs = [Spec("too-big", 40, seed=1), Spec("fits", 8, seed=2)]
    sent, received, _ = run_fault(specs, receiver_params={"num_blocks": 6})
    assert sent is not None and received is not None
    assert sent.results["too-big"] == (
        "failed",
        "receiver refused: no free KV blocks for 10 blocks",
    )
    assert sent.results["fits"][0] == received.results["fits"][0] == "completed"
    assert_clean(sent, received)

    specs = [Spec("a", 8, seed=1)]
    sent, received, _ = run_fault(specs, receiver_params={"dtype": torch.bfloat16})
    assert sent is not None and received is not None
    status, reason = sent.results["a"]
    assert status == "failed"
    assert reason == "receiver refused: layouts differ: dtype bfloat16 != float32"
    assert_clean(sent, received)


def test_a_refusal_keeps_its_reason_when_the_receiver_closes_right_after() -> None:
    """The receiver refuses (layouts differ) and closes at once; the sender's control thread
    reads the refusal, then the hang-up, before its transfer thread has seen the refusal (a
    loaded machine; forced here: chunk 0 is ready only once the pair has failed). The pair's
    failure ended the transfer with "control connection closed by ..." instead of the reason
    (the earlier test failed so under load)."""
    specs = [Spec("a", 8, seed=1, behavior="busy_until_pair_fails")]
    sent, received, _ = run_fault(specs, receiver_params={"dtype": torch.bfloat16})
    assert sent is not None and received is not None
    assert sent.results["a"] == (
        "failed", "receiver refused: layouts differ: dtype bfloat16 != float32"
    )  # fmt: skip
    assert_clean(sent, received)
