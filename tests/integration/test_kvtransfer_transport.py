"""KV blocks between real processes over gloo: gather -> send -> recv -> scatter, bit-exact;
several pairs through one rendezvous store; timeouts and a killed peer.

Every peer is a spawned process running one of the `*_role` functions below; roles report
`Outcome`s through a queue and the test process checks them against caches it rebuilds from
the same seeds. The rendezvous TCPStore server lives in the test process on a free port.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist

from contracts.errors import KVTransferError
from kvtransfer.channel import MAX_POSTED, PairChannel
from kvtransfer.chunking import split_for_overlap
from kvtransfer.coalesce import gather_blocks, scatter_blocks, staging_shape
from kvtransfer.header import WIRE_VERSION
from kvtransfer.staging import StagingPool
from kvtransfer.transport import (
    STORE_PREFIX,
    PairAddress,
    TransportConfig,
    check_wire_version,
    open_channel,
)

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 3, 4, 2, 8
SRC_BLOCKS, DST_BLOCKS = 24, 20  # the two caches differ in size: ids are independent
CONFIG = TransportConfig(backend="gloo", timeout_s=10.0, connect_timeout_s=20.0, gloo_hostname=HOST)
SHORT_TIMEOUT_S = 2.0
PEER_DEADLINE_S = 40.0  # the test process gives up on its peers after this


class TransferCase(NamedTuple):
    """One request's KV: num_tokens tokens in ceil(num_tokens / BLOCK_SIZE) blocks."""

    name: str
    num_tokens: int
    seed: int
    dtype: torch.dtype = torch.float32
    layers_per_chunk: int = NUM_LAYERS  # < NUM_LAYERS: shipped per layer group

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_tokens / BLOCK_SIZE)


CASES = (
    TransferCase("1-block", 4, seed=1),
    TransferCase("2-blocks", 8, seed=2),
    TransferCase("7-blocks", 28, seed=3),
    TransferCase("prompt-shorter-than-a-block", 3, seed=4),
    TransferCase("prompt-exactly-one-block", BLOCK_SIZE, seed=5),
    TransferCase("prompt-one-block-plus-one", BLOCK_SIZE + 1, seed=6),
    TransferCase(
        "7-blocks-bf16-per-layer-group", 27, seed=7, dtype=torch.bfloat16, layers_per_chunk=2
    ),
)


class Outcome(NamedTuple):
    """What a peer reports: a case's result (the destination cache, saved) or a failure."""

    peer: str
    case: str
    elapsed_s: float = 0.0
    error: str | None = None  # "KVTransferError: ..." or a traceback
    cache: bytes | None = None  # torch.save of a destination cache
    note: str = ""  # measurements worth printing


# ---------------------------------------------------------------------------------------------
# Deterministic data, rebuilt identically by every process


def random_cache(num_blocks: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """[NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM] of random raw bytes:
    NaN payloads, infinities and subnormals included, so any conversion would show."""
    shape = (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).view(shape)


def source_cache(case: TransferCase) -> torch.Tensor:
    return random_cache(SRC_BLOCKS, case.seed, case.dtype)


def initial_destination_cache(case: TransferCase) -> torch.Tensor:
    return random_cache(DST_BLOCKS, case.seed + 1000, case.dtype)


def case_block_ids(case: TransferCase) -> tuple[list[int], list[int]]:
    """Random source and destination block ids of the case, each set non-contiguous."""
    generator = torch.Generator().manual_seed(case.seed)
    return (
        scattered_ids(generator, SRC_BLOCKS, case.num_blocks),
        scattered_ids(generator, DST_BLOCKS, case.num_blocks),
    )


def scattered_ids(generator: torch.Generator, num_blocks: int, count: int) -> list[int]:
    """`count` distinct ids in random order that do not form one run of consecutive ids."""
    while True:
        ids = torch.randperm(num_blocks, generator=generator)[:count].tolist()
        if count == 1 or max(ids) - min(ids) + 1 != count:
            return ids


def expected_destination(case: TransferCase) -> torch.Tensor:
    src_ids, dst_ids = case_block_ids(case)
    expected = initial_destination_cache(case).clone()
    expected[:, :, dst_ids] = source_cache(case)[:, :, src_ids]
    return expected


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The transfer itself, as a prefill (sender) and a decode (receiver) side would run it


def send_case(
    channel: PairChannel, case: TransferCase, tag: int, max_chunks: int = 0, device: str = "cpu"
) -> None:
    """Gather and send the case's KV, chunk by chunk; stop after max_chunks if > 0."""
    src = source_cache(case).to(device)
    src_ids, _ = case_block_ids(case)
    chunks = split_for_overlap(src_ids, NUM_LAYERS, case.layers_per_chunk)
    for chunk in chunks[:max_chunks] if max_chunks else chunks:
        channel.send(gather_blocks(src, chunk.block_ids, layers=chunk.layers), tag=tag)


def receive_case(
    channel: PairChannel,
    case: TransferCase,
    tag: int,
    timeout_s: float | None = None,
    device: str = "cpu",
) -> torch.Tensor:
    """Receive the case's KV into a fresh destination cache through pooled staging; return it."""
    dst = initial_destination_cache(case).to(device)
    _, dst_ids = case_block_ids(case)
    pool = StagingPool(1 << 20, device, case.dtype, granularity_bytes=4096)
    for chunk in split_for_overlap(dst_ids, NUM_LAYERS, case.layers_per_chunk):
        lease = pool.acquire(staging_shape(dst, len(chunk.block_ids), chunk.layers))
        assert lease is not None, "the pool holds one chunk at a time"
        channel.recv(lease.tensor, tag=tag, timeout_s=timeout_s)
        scatter_blocks(dst, chunk.block_ids, lease.tensor, layers=chunk.layers)
        pool.release(lease)
    return dst


def saved(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor.cpu(), buffer)
    return buffer.getvalue()


def loaded(data: bytes | None) -> torch.Tensor:
    assert data is not None, "the peer reported no cache"
    return torch.load(io.BytesIO(data))


def timed_error(action: Callable[[], object]) -> tuple[float, str | None]:
    """(elapsed seconds, 'Type: message' of what action raised, or None)."""
    start = time.monotonic()
    try:
        action()
    except Exception as e:  # the outcome is reported, not handled
        return time.monotonic() - start, f"{type(e).__name__}: {e}"
    return time.monotonic() - start, None


# ---------------------------------------------------------------------------------------------
# Peer roles (run in spawned processes)

Report = Callable[[Outcome], None]


def address(port: int, pair_key: str, rank: int) -> PairAddress:
    return PairAddress(HOST, port, pair_key, rank)


def sender_role(report: Report, port: int, pair_key: str, cases: tuple[TransferCase, ...]) -> None:
    with open_channel(address(port, pair_key, 0), CONFIG) as channel:
        for tag, case in enumerate(cases):
            send_case(channel, case, tag)
        report(Outcome("sender", "all-sent"))


def receiver_role(
    report: Report, port: int, pair_key: str, cases: tuple[TransferCase, ...]
) -> None:
    with open_channel(address(port, pair_key, 1), CONFIG) as channel:
        for tag, case in enumerate(cases):
            start = time.monotonic()
            dst = receive_case(channel, case, tag)
            report(Outcome("receiver", case.name, time.monotonic() - start, cache=saved(dst)))


def hub_role(report: Report, port: int, rounds: tuple[tuple[str, ...], ...]) -> None:
    """Peer A: per round, sends CASES[1] to B and receives CASES[2] from C, both pairs formed
    and used at once from two threads, started in the round's order."""
    for round_index, order in enumerate(rounds):
        jobs: dict[str, Callable[[], None]] = {
            "A-B": lambda r=round_index: _send_one(port, f"A-B/{r}", 0, CASES[1]),
            "C-A": lambda r=round_index: report(_receive_one(port, f"C-A/{r}", 1, CASES[2], r)),
        }
        threads = [threading.Thread(target=_reporting(report, jobs[name])) for name in order]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def spoke_role(report: Report, port: int, name: str, num_rounds: int) -> None:
    """Peer B (receives CASES[1] from A) or C (sends CASES[2] to A), one pair per round."""
    for r in range(num_rounds):
        if name == "B":
            report(_receive_one(port, f"A-B/{r}", 1, CASES[1], r))
        else:
            _send_one(port, f"C-A/{r}", 0, CASES[2])


def _send_one(port: int, pair_key: str, rank: int, case: TransferCase) -> None:
    with open_channel(address(port, pair_key, rank), CONFIG) as channel:
        send_case(channel, case, tag=0)


def _receive_one(port: int, pair_key: str, rank: int, case: TransferCase, r: int) -> Outcome:
    with open_channel(address(port, pair_key, rank), CONFIG) as channel:
        dst = receive_case(channel, case, tag=0)
    return Outcome(f"{pair_key} rank {rank}", f"{case.name} round {r}", cache=saved(dst))


def _reporting(report: Report, job: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            job()
        except Exception:  # a thread's failure becomes an outcome the test asserts on
            report(Outcome("thread", "crashed", error=traceback.format_exc()))

    return run


def waiting_receiver_role(report: Report, port: int) -> None:
    """Forms two pairs; waits on one for data that never comes, then forms a third pair."""
    idle_recv = open_channel(address(port, "idle-recv", 0), CONFIG)
    idle_send = open_channel(address(port, "idle-send", 0), CONFIG)
    staging = torch.empty(16)
    elapsed_s, error = timed_error(lambda: idle_recv.recv(staging, timeout_s=SHORT_TIMEOUT_S))
    report(Outcome("waiting-receiver", "recv-timeout", elapsed_s, error))
    elapsed_s, error = timed_error(lambda: idle_recv.recv(staging, timeout_s=SHORT_TIMEOUT_S))
    report(Outcome("waiting-receiver", "recv-after-timeout", elapsed_s, error))
    # Formation waits for the peer, whose send times out first; closing idle_send earlier
    # would fail that send early instead.
    with open_channel(address(port, "after-timeout", 1), CONFIG) as channel:
        dst = receive_case(channel, CASES[2], tag=0)
    report(Outcome("waiting-receiver", "new-pair", cache=saved(dst)))
    idle_recv.close()
    idle_send.close()


def waiting_sender_role(report: Report, port: int) -> None:
    """The other side: sends where nobody receives, then uses the third pair normally."""
    idle_recv = open_channel(address(port, "idle-recv", 1), CONFIG)
    idle_send = open_channel(address(port, "idle-send", 1), CONFIG)
    staging = torch.zeros(16)
    elapsed_s, error = timed_error(lambda: idle_send.send(staging, timeout_s=SHORT_TIMEOUT_S))
    report(Outcome("waiting-sender", "send-timeout", elapsed_s, error))
    with open_channel(address(port, "after-timeout", 0), CONFIG) as channel:
        send_case(channel, CASES[2], tag=0)
    idle_recv.close()
    idle_send.close()


def doomed_sender_role(report: Report, port: int) -> None:
    """Sends the first layer group of a case, reports, then waits to be killed."""
    channel = open_channel(address(port, "doomed", 0), CONFIG)
    send_case(channel, CASES[-1], tag=0, max_chunks=1)
    report(Outcome("doomed-sender", "first-chunk-sent"))
    threading.Event().wait(PEER_DEADLINE_S)


def survivor_role(report: Report, port: int, timeout_s: float) -> None:
    channel = open_channel(address(port, "doomed", 1), CONFIG)
    elapsed_s, error = timed_error(lambda: receive_case(channel, CASES[-1], 0, timeout_s))
    report(Outcome("survivor", "recv-from-killed-peer", elapsed_s, error))
    channel.close()
    elapsed_s, error = timed_error(lambda: channel.recv(torch.empty(1)))
    report(Outcome("survivor", "recv-after-close", elapsed_s, error))


def _peer_main(
    outcomes: Connection, name: str, role: Callable[..., None], args: tuple[Any, ...]
) -> None:
    """Entry point of a spawned peer: run the role, report a failure as an outcome.

    Each peer reports through a pipe of its own: a peer killed while holding the lock of a
    shared queue would block every other peer's reports."""
    lock = threading.Lock()  # threads of one role report through the same pipe

    def report(outcome: Outcome) -> None:
        with lock:
            outcomes.send(outcome)

    try:
        role(report, *args)
    except BaseException:  # process main: every failure must reach the test
        report(Outcome(name, "crashed", error=traceback.format_exc()))
        raise
    finally:
        outcomes.close()


# ---------------------------------------------------------------------------------------------
# The test process side


class Peers:
    """Spawned peer processes and the pipes they report through; kills leftovers on exit."""

    def __init__(self) -> None:
        self._context = mp.get_context("spawn")
        self._processes: dict[str, Any] = {}
        self._readers: dict[str, Connection] = {}

    def start(self, name: str, role: Callable[..., None], *args: Any) -> None:
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_peer_main, args=(writer, name, role, args), name=name, daemon=True
        )
        process.start()
        writer.close()  # the child has its own end; ours would hide its EOF
        self._processes[name] = process
        self._readers[name] = reader

    def next_outcome(self, timeout_s: float = PEER_DEADLINE_S) -> Outcome:
        """The next outcome any peer reports; fails the test after timeout_s without one."""
        deadline = time.monotonic() + timeout_s
        while self._readers:
            remaining_s = max(0.0, deadline - time.monotonic())
            ready = mp_connection.wait(list(self._readers.values()), timeout=remaining_s)
            if not ready:
                break
            name = next(n for n, r in self._readers.items() if r is ready[0])
            try:
                outcome: Outcome = self._readers[name].recv()
            except EOFError:  # the peer exited and said all it had to say
                del self._readers[name]
                continue
            assert outcome.case != "crashed", f"peer {outcome.peer} crashed:\n{outcome.error}"
            return outcome
        alive = [n for n, p in self._processes.items() if p.is_alive()]
        pytest.fail(f"no outcome from peers within {timeout_s} s; alive: {alive}")

    def outcomes(self, count: int) -> dict[str, Outcome]:
        """The next `count` outcomes, by case name."""
        collected = [self.next_outcome() for _ in range(count)]
        return {outcome.case: outcome for outcome in collected}

    def kill(self, name: str) -> None:
        self._processes[name].kill()
        self._processes[name].join(timeout=5)

    def join(self) -> None:
        """Wait for every peer to exit; assert they exited cleanly."""
        for name, process in self._processes.items():
            process.join(timeout=PEER_DEADLINE_S)
            assert process.exitcode == 0, f"peer {name} exited with {process.exitcode}"

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self._processes.values():
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
        for reader in self._readers.values():
            reader.close()


@pytest.fixture(scope="module")
def store_port() -> Iterator[int]:
    """The port of a rendezvous TCPStore server on 127.0.0.1 (the OS picks a free port)."""
    server = dist.TCPStore(
        HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30)
    )
    yield server.port
    del server


@pytest.fixture(scope="module")
def transferred(store_port: int) -> dict[str, Outcome]:
    """Every case of CASES sent over one gloo pair, in order; the receiver's outcomes."""
    with Peers() as peers:
        peers.start("sender", sender_role, store_port, "exact", CASES)
        peers.start("receiver", receiver_role, store_port, "exact", CASES)
        outcomes = peers.outcomes(len(CASES) + 1)
        peers.join()
    return outcomes


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_transfer_is_bit_exact(transferred: dict[str, Outcome], case: TransferCase) -> None:
    outcome = transferred[case.name]
    assert outcome.error is None
    received = loaded(outcome.cache)
    _, dst_ids = case_block_ids(case)
    assert torch.equal(bits(received), bits(expected_destination(case)))
    untouched = [b for b in range(DST_BLOCKS) if b not in dst_ids]
    initial = initial_destination_cache(case)
    assert torch.equal(bits(received[:, :, untouched]), bits(initial[:, :, untouched]))


def test_two_pairs_through_one_store_run_concurrently(store_port: int) -> None:
    rounds = (("A-B", "C-A"), ("C-A", "A-B"))
    with Peers() as peers:
        peers.start("A", hub_role, store_port, rounds)
        peers.start("B", spoke_role, store_port, "B", len(rounds))
        peers.start("C", spoke_role, store_port, "C", len(rounds))
        outcomes = peers.outcomes(2 * len(rounds))
        peers.join()

    for r in range(len(rounds)):
        for case in (CASES[1], CASES[2]):
            outcome = outcomes[f"{case.name} round {r}"]
            assert outcome.error is None
            assert torch.equal(bits(loaded(outcome.cache)), bits(expected_destination(case)))


def test_timeouts_raise_and_a_new_pair_forms_afterwards(store_port: int) -> None:
    with Peers() as peers:
        peers.start("waiting-receiver", waiting_receiver_role, store_port)
        peers.start("waiting-sender", waiting_sender_role, store_port)
        outcomes = peers.outcomes(4)
        peers.join()

    for case in ("recv-timeout", "send-timeout"):
        outcome = outcomes[case]
        assert outcome.error is not None and outcome.error.startswith(KVTransferError.__name__)
        assert SHORT_TIMEOUT_S - 0.1 <= outcome.elapsed_s <= SHORT_TIMEOUT_S + 2.0, outcome
    after = outcomes["recv-after-timeout"]
    assert after.error is not None and "broken channel" in after.error
    assert after.elapsed_s < 0.5
    new_pair = outcomes["new-pair"]
    assert new_pair.error is None
    assert torch.equal(bits(loaded(new_pair.cache)), bits(expected_destination(CASES[2])))


def test_killed_peer_fails_the_survivor_within_its_timeout(store_port: int) -> None:
    timeout_s = 5.0
    with Peers() as peers:
        peers.start("doomed-sender", doomed_sender_role, store_port)
        peers.start("survivor", survivor_role, store_port, timeout_s)
        assert peers.next_outcome().case == "first-chunk-sent"
        peers.kill("doomed-sender")
        outcomes = peers.outcomes(2)

    failed = outcomes["recv-from-killed-peer"]
    assert failed.error is not None and failed.error.startswith(KVTransferError.__name__), failed
    assert failed.elapsed_s < timeout_s, "the peer's death, not the timeout, ended the wait"
    closed = outcomes["recv-after-close"]
    assert closed.error is not None and "closed channel" in closed.error


# ---------------------------------------------------------------------------------------------
# Both ends in this process (threads): the guards of the header and of the one-thread rule


def in_process_pair(port: int, pair_key: str) -> tuple[PairChannel, PairChannel]:
    """Both sides of a pair, formed concurrently by two threads of this process."""
    channels: dict[int, PairChannel] = {}

    def form(rank: int) -> None:
        channels[rank] = open_channel(address(port, pair_key, rank), CONFIG)

    threads = [threading.Thread(target=form, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(channels) == {0, 1}, "formation failed"
    return channels[0], channels[1]


def in_background(action: Callable[[], object]) -> Callable[[], str | None]:
    """Start `action` on a thread; the returned function joins it and gives its error."""
    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(timed_error(action)[1]))
    thread.start()

    def join() -> str | None:
        thread.join(timeout=PEER_DEADLINE_S)
        assert result, "the background action did not finish"
        return result[0]

    return join


@pytest.mark.parametrize(
    "sent, expected, message",
    [
        ((torch.zeros(8), 7), (torch.zeros(8), 8), "tag 7 != 8"),
        ((torch.zeros(8), 0), (torch.zeros(9), 0), "nbytes 32 != 36"),
    ],
    ids=["tag", "size"],
)
def test_mismatched_header_breaks_the_pair_loudly(
    store_port: int,
    sent: tuple[torch.Tensor, int],
    expected: tuple[torch.Tensor, int],
    message: str,
) -> None:
    sender, receiver = in_process_pair(store_port, f"mismatch-{message}")
    with sender, receiver:
        join_send = in_background(lambda: sender.send(sent[0], tag=sent[1], timeout_s=3.0))
        _, error = timed_error(lambda: receiver.recv(expected[0], tag=expected[1]))
        receiver.close()  # the sender's pending payload send fails now, not at its timeout
        send_elapsed_s = time.monotonic()
        send_error = join_send()
        send_elapsed_s = time.monotonic() - send_elapsed_s

    assert error is not None and message in error and KVTransferError.__name__ in error
    assert send_error is not None and KVTransferError.__name__ in send_error
    assert send_elapsed_s < 2.0
    assert receiver.is_broken and sender.is_broken


def test_a_channel_refuses_a_second_thread(store_port: int) -> None:
    first, second = in_process_pair(store_port, "one-thread")
    with first, second:
        join_recv = in_background(lambda: first.recv(torch.empty(4), timeout_s=1.0))
        deadline = time.monotonic() + 5.0
        while not first._guard.is_busy and time.monotonic() < deadline:
            time.sleep(0.005)  # poll until the background recv holds the channel
        _, error = timed_error(lambda: first.send(torch.empty(4)))
        recv_error = join_recv()

    assert error is not None and error.startswith("RuntimeError") and "one per pair" in error
    assert recv_error is not None and "Timed out" in recv_error


def test_close_from_another_thread_does_not_wait_for_the_pending_recv(store_port: int) -> None:
    waiting, peer = in_process_pair(store_port, "close-while-busy")
    with peer:
        join_recv = in_background(lambda: waiting.recv(torch.empty(4), timeout_s=1.0))
        deadline = time.monotonic() + 5.0
        while not waiting._guard.is_busy and time.monotonic() < deadline:
            time.sleep(0.005)  # poll until the background recv holds the channel
        close_s, close_error = timed_error(waiting.close)
        recv_error = join_recv()  # gloo: runs on to its own timeout
        _, later_error = timed_error(lambda: waiting.recv(torch.empty(4)))

    assert close_error is None and close_s < 0.5
    assert recv_error is not None and recv_error.startswith(KVTransferError.__name__)
    assert later_error is not None and "closed channel" in later_error


def test_a_group_lands_directly_in_cache_slices(store_port: int) -> None:
    """send_group / recv_group: slices of a staging tensor go straight into a contiguous run of
    destination blocks, one slice per (layer, K/V), no scatter."""
    src = random_cache(12, seed=30, dtype=torch.bfloat16)
    dst = torch.zeros_like(src)
    staging = gather_blocks(src, [7, 2, 9])  # [NUM_LAYERS, 2, 3 blocks, ...]
    pieces = [(layer, kv) for layer in range(NUM_LAYERS) for kv in range(2)]
    sender, receiver = in_process_pair(store_port, "group")
    with sender, receiver:
        join_send = in_background(lambda: sender.send_group([staging[p] for p in pieces]))
        receiver.recv_group([dst[layer, kv, 4:7] for layer, kv in pieces])
        assert join_send() is None
        join_send = in_background(lambda: sender.send_group([staging[0, 0], staging[0, 1]]))
        _, error = timed_error(lambda: receiver.recv_group([dst[0, 0, 4:7]] * 3, timeout_s=3.0))
        receiver.close()
        join_send()

    expected = torch.zeros_like(dst)
    scatter_blocks(expected, [4, 5, 6], staging)
    assert torch.equal(bits(dst), bits(expected))
    assert error is not None and "part_nbytes -2 != -3" in error


def test_posted_receives_land_in_order_and_flag_void_payloads(store_port: int) -> None:
    """post_recv before anything is sent: headers, parts and drains all queued at once; each
    waited for in posting order; a payload sent with void=True is flagged, not refused."""
    sender, receiver = in_process_pair(store_port, "posted")
    payloads = [torch.arange(8.0), torch.full((8,), 7.0), torch.arange(6.0) * 3]
    tags = [5, 5, 6]
    with sender, receiver:
        landed = [torch.zeros(8), torch.zeros(8), torch.zeros(6)]
        drained: list[tuple[int, float]] = []
        posts = [
            receiver.post_recv(
                [landed[i]], tag=tags[i], drain=lambda part, i=i: drained.append((i, part))
            )
            for i in range(3)
        ]
        assert receiver.num_posted == 3
        _, early = timed_error(lambda: receiver.recv_header(timeout_s=1.0))
        _, out_of_order = timed_error(lambda: receiver.wait_posted(posts[1], timeout_s=1.0))

        def send_all() -> None:
            for i, payload in enumerate(payloads):
                sender.send_parts([payload], tag=tags[i], void=i == 1)

        join_send = in_background(send_all)
        voids = [receiver.wait_posted(posted, timeout_s=5.0) for posted in posts]
        assert join_send() is None
        # the pair goes on with ordinary, header-first payloads
        join_send = in_background(lambda: sender.send(torch.ones(3), tag=9))
        after = torch.zeros(3)
        receiver.recv(after, tag=9)
        assert join_send() is None

    assert early is not None and "posted ahead" in early and early.startswith("RuntimeError")
    assert out_of_order is not None and "posting order" in out_of_order
    assert voids == [False, True, False]
    assert drained == [(0, 0), (1, 0), (2, 0)]  # gloo: each drain once its part is in
    for got, want in zip(landed, payloads, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(after, torch.ones(3))


def test_a_posted_receive_refuses_a_different_payload_and_bounds_the_window(
    store_port: int,
) -> None:
    sender, receiver = in_process_pair(store_port, "posted-mismatch")
    with sender, receiver:
        slots = [receiver.post_recv([torch.zeros(4)], tag=1) for _ in range(MAX_POSTED)]
        _, full = timed_error(lambda: receiver.post_recv([torch.zeros(4)], tag=1))
        join_send = in_background(lambda: sender.send(torch.zeros(5), tag=1, timeout_s=3.0))
        _, error = timed_error(lambda: receiver.wait_posted(slots[0], timeout_s=3.0))
        receiver.close()
        join_send()

    assert full is not None and f"{MAX_POSTED} receives already posted" in full
    assert error is not None and KVTransferError.__name__ in error and "nbytes 20 != 16" in error
    assert receiver.is_broken


def test_named_receives_posted_ahead_refuse_bad_limits_before_posting_and_void_payloads(
    store_port: int,
) -> None:
    """recv / recv_parts the NCCL way (header and payload posted together), here on gloo: a
    bad timeout is refused before anything is posted, a VOID payload raises but leaves the
    channel in step."""
    sender, receiver = in_process_pair(store_port, "named-ahead")
    receiver._named_receives_ahead = True  # NCCL's behaviour
    with sender, receiver:
        _, bad_limit = timed_error(lambda: receiver.recv(torch.zeros(4), timeout_s=1e9))
        assert receiver.num_posted == 0
        join_send = in_background(lambda: sender.send_parts([torch.ones(4)], tag=3, void=True))
        _, void = timed_error(lambda: receiver.recv(torch.zeros(4), tag=3, timeout_s=5.0))
        assert join_send() is None
        join_send = in_background(lambda: sender.send(torch.full((4,), 2.0), tag=4))
        after = torch.zeros(4)
        receiver.recv(after, tag=4, timeout_s=5.0)
        assert join_send() is None

    assert bad_limit is not None and bad_limit.startswith("ValueError")
    assert void is not None and KVTransferError.__name__ in void and "VOID" in void
    assert torch.equal(after, torch.full((4,), 2.0))


def test_a_failing_drain_breaks_the_channel(store_port: int) -> None:
    sender, receiver = in_process_pair(store_port, "bad-drain")

    def drain(part: int) -> None:
        raise ValueError(f"no room for part {part}")

    with sender, receiver:
        posted = receiver.post_recv([torch.zeros(4)], tag=1, drain=drain)
        join_send = in_background(lambda: sender.send(torch.ones(4), tag=1))
        _, error = timed_error(lambda: receiver.wait_posted(posted, timeout_s=5.0))
        assert join_send() is None

    assert error is not None and KVTransferError.__name__ in error and "no room" in error
    assert receiver.is_broken


def test_a_failing_fill_or_header_first_drain_breaks_the_channel(store_port: int) -> None:
    """A fill (the sender's gather) that raises after its header went out, or a drain of a
    header-first receive that raises: the channel is out of step, so it breaks, whatever the
    exception's type, and later calls refuse."""

    def fill(part: int) -> None:
        raise IndexError(f"block index out of range in part {part}")

    def drain(part: int) -> None:
        raise KeyError(f"part {part}")

    sender, receiver = in_process_pair(store_port, "bad-fill")
    with sender, receiver:
        join_recv = in_background(lambda: receiver.recv(torch.zeros(4), tag=5, timeout_s=1.0))
        _, fill_error = timed_error(
            lambda: sender.send_parts([torch.ones(2)] * 2, tag=5, fill=fill, timeout_s=5.0)
        )
        recv_error = join_recv()  # the header came, the payload never does
        _, after = timed_error(lambda: sender.send(torch.ones(2), tag=6, timeout_s=1.0))
    assert fill_error is not None and KVTransferError.__name__ in fill_error
    assert "IndexError: block index out of range in part 0" in fill_error
    assert after is not None and "broken channel" in after and "IndexError" in after
    assert recv_error is not None and KVTransferError.__name__ in recv_error

    sender, receiver = in_process_pair(store_port, "bad-header-first-drain")
    with sender, receiver:
        join_send = in_background(
            lambda: sender.send_parts([torch.ones(2)] * 2, tag=7, timeout_s=5.0)
        )
        _, drain_error = timed_error(
            lambda: receiver.recv_parts([torch.zeros(2)] * 2, tag=7, drain=drain, timeout_s=5.0)
        )
    send_error = join_send()  # part 1 was never taken: it fails once the receiver closed
    assert send_error is not None and KVTransferError.__name__ in send_error
    assert drain_error is not None and KVTransferError.__name__ in drain_error
    assert "KeyError" in drain_error and receiver.is_broken


def test_formation_refuses_a_peer_of_another_wire_version(store_port: int) -> None:
    store = dist.PrefixStore(
        STORE_PREFIX + "old-peer",
        dist.TCPStore(HOST, store_port, is_master=False, timeout=timedelta(seconds=10)),
    )
    store.set("version/1", "1")  # an older peer published its version first
    _, error = timed_error(lambda: check_wire_version(store, address(store_port, "old", 0)))
    assert error is not None and KVTransferError.__name__ in error
    assert f"wire version 1, this side {WIRE_VERSION}" in error
