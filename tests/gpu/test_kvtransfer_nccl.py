"""NCCL pair channels between two processes on two GPUs: bit-exact KV transfer, the GPU memory a
pair costs, coalesced throughput, and a receive timeout that leaves the process able to form a
new pair. Run on the device machine (2 GPUs): `pytest tests/gpu/test_kvtransfer_nccl.py -s`.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from kvtransfer.channel import PairChannel
from kvtransfer.coalesce import gather_blocks, scatter_blocks, staging_shape
from kvtransfer.nccl import configure_nccl_environment
from kvtransfer.transport import PairAddress, TransportConfig, open_channel
from tests.integration.test_kvtransfer_transport import (
    CASES,
    HOST,
    Outcome,
    Peers,
    Report,
    bits,
    expected_destination,
    loaded,
    receive_case,
    saved,
    send_case,
    timed_error,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

CONFIG = TransportConfig(backend="nccl", timeout_s=30.0, connect_timeout_s=60.0)
TIMEOUT_S = 2.0
# A Llama-3-8B-like cache: 32 layers, 8 KV heads, head dim 128, 16-token blocks, bf16:
# 2 MiB per block; 128 blocks make a 256 MiB staging tensor.
BIG_LAYOUT = (32, 2, 512, 16, 8, 128)
NUM_BIG_BLOCKS, NUM_BIG_ROUNDS = 128, 5
MIB = 1 << 20


def _channel(port: int, key: str, rank: int, device: str) -> PairChannel:
    return open_channel(PairAddress(HOST, port, key, rank), CONFIG, device)


def _used_bytes() -> int:
    """Device memory in use outside torch's caching allocator (NCCL's share, mostly)."""
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def nccl_peer_role(report: Report, port: int, rank: int) -> None:
    """Rank 0 sends, rank 1 receives; each on GPU `rank`."""
    configure_nccl_environment()
    device = f"cuda:{rank}"
    torch.cuda.set_device(device)
    big = torch.randn(BIG_LAYOUT, device=device).to(torch.bfloat16)
    torch.cuda.synchronize()
    base_bytes = _used_bytes()

    channel = _channel(port, "nccl-exact", rank, device)
    formed_bytes = _used_bytes()
    for tag, case in enumerate(CASES):
        if rank == 0:
            send_case(channel, case, tag, device=device)
        else:
            dst = receive_case(channel, case, tag, device=device)
            report(Outcome(f"rank {rank}", case.name, cache=saved(dst)))

    ids = torch.randperm(BIG_LAYOUT[2])[:NUM_BIG_BLOCKS].tolist()
    staging = gather_blocks(big, ids)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(NUM_BIG_ROUNDS):
        if rank == 0:
            channel.send(gather_blocks(big, ids, out=staging))
        else:
            channel.recv(staging)
            scatter_blocks(big, ids, staging)
    torch.cuda.synchronize()
    elapsed_s = time.perf_counter() - start
    gb_per_s = NUM_BIG_ROUNDS * staging.numel() * staging.element_size() / elapsed_s / 1e9
    transferred_bytes = _used_bytes()

    second = _channel(port, "nccl-second", rank, device)
    (second.send if rank == 0 else second.recv)(staging[:1].contiguous())
    second_bytes = _used_bytes()
    second.close()
    channel.close()
    report(
        Outcome(
            f"rank {rank}",
            f"numbers rank {rank}",
            note=(
                f"pair after formation {(formed_bytes - base_bytes) / MIB:.0f} MiB, "
                f"after 256 MiB transfers {(transferred_bytes - base_bytes) / MIB:.0f} MiB, "
                f"second pair +{(second_bytes - transferred_bytes) / MIB:.0f} MiB; "
                f"gather+send / recv+scatter of {NUM_BIG_BLOCKS} blocks (256 MiB): "
                f"{gb_per_s:.0f} GB/s"
            ),
        )
    )
    _posted_ahead(report, port, rank, device)
    _timeout_then_new_pair(report, port, rank, device)


POSTED_LAYOUT = (4, 2, 32, 16, 8, 128)  # 4 layers, 32 blocks of 32 KiB per layer and K/V
POSTED_CHUNKS = (slice(0, 1), slice(1, 2), slice(2, 4))  # layers per payload; the 2nd is VOID
POSTED_IDS = [3, 7, 1, 30]


def _posted_ahead(report: Report, port: int, rank: int, device: str) -> None:
    """Receives posted before their headers (post_recv): header, part and scatter queued at
    once on NCCL, three payloads, the second flagged VOID."""
    with _channel(port, "nccl-posted", rank, device) as channel:
        if rank == 0:
            cache = torch.randn(POSTED_LAYOUT, device=device).to(torch.bfloat16)
            for index, layers in enumerate(POSTED_CHUNKS):
                staging = gather_blocks(cache, POSTED_IDS, layers=layers)
                channel.send_parts([staging], tag=4, void=index == 1)
            report(Outcome("rank 0", "posted-source", cache=saved(cache)))
            return
        cache = torch.zeros(POSTED_LAYOUT, dtype=torch.bfloat16, device=device)
        posts = []
        for layers in POSTED_CHUNKS:
            staging = torch.empty(staging_shape(cache, len(POSTED_IDS), layers), **like(cache))

            def drain(_: int, staging: torch.Tensor = staging, layers: slice = layers) -> None:
                scatter_blocks(cache, POSTED_IDS, staging, layers=layers)

            posts.append(channel.post_recv([staging], tag=4, drain=drain))
        voids = [channel.wait_posted(posted, timeout_s=30.0) for posted in posts]
        report(Outcome("rank 1", "posted", note=repr(voids), cache=saved(cache)))


def like(tensor: torch.Tensor) -> dict[str, object]:
    return {"dtype": tensor.dtype, "device": tensor.device}


def _timeout_then_new_pair(report: Report, port: int, rank: int, device: str) -> None:
    idle = _channel(port, "nccl-idle", rank, device)
    if rank == 1:
        buffer = torch.empty(16, device=device)
        elapsed_s, error = timed_error(lambda: idle.recv(buffer, timeout_s=TIMEOUT_S))
        report(Outcome("rank 1", "recv-timeout", elapsed_s, error))
        time.sleep(1.0)  # give torch's NCCL watchdog a few polls to see the failed work
    idle_close_s, _ = timed_error(idle.close)
    with _channel(port, "nccl-after", rank, device) as channel:
        if rank == 0:
            send_case(channel, CASES[2], tag=0, device=device)
        else:
            dst = receive_case(channel, CASES[2], tag=0, device=device)
            report(Outcome("rank 1", "new-pair", idle_close_s, cache=saved(dst)))


def test_nccl_pair_moves_kv_exactly_and_survives_a_timeout() -> None:
    server = dist.TCPStore(
        HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    with Peers() as peers:
        peers.start("rank 0", nccl_peer_role, server.port, 0)
        peers.start("rank 1", nccl_peer_role, server.port, 1)
        outcomes = peers.outcomes(len(CASES) + 6)
        peers.join()

    for case in CASES:
        received = loaded(outcomes[case.name].cache)
        assert torch.equal(bits(received), bits(expected_destination(case))), case.name
    source, posted = loaded(outcomes["posted-source"].cache), outcomes["posted"]
    assert posted.note == "[False, True, False]"
    landed = loaded(posted.cache)
    for layers in (POSTED_CHUNKS[0], POSTED_CHUNKS[2]):  # the VOID one's bytes are not data
        got, want = landed[layers][:, :, POSTED_IDS], source[layers][:, :, POSTED_IDS]
        assert torch.equal(bits(got), bits(want))
    for rank in (0, 1):
        print(f"\nNCCL pair, rank {rank}:", outcomes[f"numbers rank {rank}"].note)
    timeout = outcomes["recv-timeout"]
    print(f"recv timeout after {timeout.elapsed_s:.2f} s: {timeout.error}")
    assert timeout.error is not None and timeout.error.startswith("KVTransferError")
    assert TIMEOUT_S - 0.1 <= timeout.elapsed_s <= TIMEOUT_S + 3.0
    new_pair = outcomes["new-pair"]
    print(f"closing the broken pair took {new_pair.elapsed_s:.2f} s")
    assert torch.equal(bits(loaded(new_pair.cache)), bits(expected_destination(CASES[2])))
