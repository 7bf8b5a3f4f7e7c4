"""KV transfer between two GPUs through the pair channel: raw copy paths (gather -> channel ->
scatter; `/bare`: over a bare process group, the bound without the channel's framing), the full
protocol (KVSender -> KVReceiver, bit-exactness checked) and a transfer overlapped with a
dummy-weight prefill. Sender on cuda:0, receiver on cuda:1; `--cpu-dry-run` runs the same
orchestration over gloo on the CPU (a check of the script, not a measurement). The modes and
how each is timed: docs/benchmarks.md ("KV transfer through the channel").

    python -m bench.kvtransfer_nccl [--lengths 512,2048,8192] [--repeats 5] [--out f.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import hashlib
import itertools
import os
import queue
import secrets
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

from bench.common import machine_info, markdown_table, write_json
from kvtransfer.chunking import PIPELINE_PART_BYTES

SHAPES = {  # name -> (layers, kv heads, head dim), as in engine.model_config.NAMED_SHAPES
    "llama-3-8b": (32, 8, 128),
    "smollm2-135m": (30, 3, 64),
}
DRY_RUN_SHAPES = {"tiny": (2, 2, 16), "smollm2-135m": (30, 3, 64)}
BLOCK = 16
CACHE_TOKENS = 8192 * 2  # each cache holds twice the longest prompt, blocks scattered in it
DRY_RUN_CACHE_TOKENS = 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--protocol-modes",
        default="1024,64,direct",
        help="protocol runs: a pipelined part size in MiB, or 'direct' (direct_receive)",
    )
    parser.add_argument(
        "--raw-modes",
        default="coalesced,one_part,per_block",
        help="raw runs: coalesced (64 MiB parts), parts<N> (N MiB parts), one_part, per_block; "
        "a suffix @P copies with P persistent programs (engine.kernels.block_copy); a suffix "
        "/bare (after any @P) moves the parts over a bare process group instead of the channel",
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help="of " + ",".join(SHAPES))
    parser.add_argument(
        "--copy-programs",
        type=int,
        default=None,
        help="both sides' TransferConfig.copy_programs in the protocol and overlap runs",
    )
    parser.add_argument(
        "--overlap-layers-per-chunk",
        default="2",
        help="layers per chunk of the overlapped transfer; a comma list runs each in turn",
    )
    parser.add_argument(
        "--overlap-repeats", type=int, default=10, help="of each overlap mode (interleaved)"
    )
    parser.add_argument(
        "--nccl-max-ctas", type=int, default=16, help="TransportConfig.nccl_max_ctas; 0: NCCL's"
    )
    parser.add_argument(
        "--nccl-high-priority",
        action="store_true",
        help="TransportConfig.nccl_high_priority (NCCL's stream at high priority)",
    )
    parser.add_argument(
        "--receive-ahead",
        type=int,
        default=None,
        help="TransferConfig.receive_ahead (chunks posted ahead of their headers)",
    )
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument(
        "--kv-dtype",
        default="bf16",
        choices=("bf16", "fp8"),
        help="the caches' dtype; fp8: the engine's packed e4m3 blocks (engine.kv_quant: values, "
        "then a 4-byte scale per token and head), about half the bytes on the wire",
    )
    parser.add_argument("--out", default="bench/results/kvtransfer_nccl.json")
    parser.add_argument("--stack-dump-s", type=float, default=600.0)
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run the same orchestration on CPU over gloo (small caches, no overlap): a check "
        "of the script itself, not a measurement",
    )
    return parser.parse_args()


def device_of(args: argparse.Namespace, rank: int) -> str:
    return "cpu" if args.cpu_dry_run else f"cuda:{rank}"


def synchronize(args: argparse.Namespace) -> None:
    if not args.cpu_dry_run:
        torch.cuda.synchronize()


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int, int]]:
    """The shapes measured; the first one also runs the overlap (on a dummy model of it)."""
    if args.cpu_dry_run:
        return DRY_RUN_SHAPES
    return {name: SHAPES[name] for name in args.shapes.split(",")}


def cache_blocks(args: argparse.Namespace) -> int:
    return (DRY_RUN_CACHE_TOKENS if args.cpu_dry_run else CACHE_TOKENS) // BLOCK


def cache_for(args: argparse.Namespace, shape: str, device: str) -> torch.Tensor:
    """[layers, 2, blocks, BLOCK, heads, dim] bf16, or (--kv-dtype fp8) the packed FP8 blocks
    [..., heads, dim + 4] uint8 an engine with kv_cache_dtype="fp8" holds."""
    from engine.kv_quant import pack_blocks

    layers, heads, dim = shapes(args)[shape]
    generator = torch.Generator(device).manual_seed(0)
    cache = torch.randn(
        layers, 2, cache_blocks(args), BLOCK, heads, dim,
        generator=generator, device=device, dtype=torch.bfloat16,
    )  # fmt: skip
    return pack_blocks(cache) if args.kv_dtype == "fp8" else cache


def row_bytes(args: argparse.Namespace, dim: int) -> int:
    """Bytes of one token's K or V for one KV head in the cache (cache_for)."""
    from engine.kv_quant import packed_row_bytes

    return packed_row_bytes(dim) if args.kv_dtype == "fp8" else 2 * dim


def scattered_blocks(args: argparse.Namespace, num_tokens: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(cache_blocks(args), generator=generator)[
        : -(-num_tokens // BLOCK)
    ].tolist()


def sha(cache: torch.Tensor, block_ids: list[int] | tuple[int, ...]) -> str:
    from kvtransfer.coalesce import gather_blocks

    data = gather_blocks(cache, list(block_ids)).view(torch.uint8).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


RAW_NAMES = {
    "coalesced": "coalesced, 64 MiB parts",
    "one_part": "coalesced, one message",
    "per_block": "one message per block",
}


def raw_modes(args: argparse.Namespace) -> list[str]:
    modes = args.raw_modes.split(",")
    for mode in modes:
        base, _, link = mode.partition("/")
        kind, _, programs = base.partition("@")
        known = kind in ("coalesced", "one_part", "per_block") or (
            kind.startswith("parts") and kind[5:].isdigit()
        )
        if not known or (programs and not programs.isdigit()) or link not in ("", "bare"):
            raise SystemExit(f"--raw-modes: {mode!r} is not one of the forms in --help")
    return modes


def raw_name(mode: str) -> str:
    base, _, link = mode.partition("/")
    name = RAW_NAMES.get(base, base)
    return f"{name}, bare process group" if link else name


def is_bare(mode: str) -> bool:
    return mode.endswith("/bare")


def copy_programs_of(mode: str) -> int | None:
    """The persistent program count a raw mode copies with (None: torch's copies)."""
    _, _, programs = mode.partition("/")[0].partition("@")
    return int(programs) if programs else None


def groups_of(ids: list[int], mode: str) -> list[list[int]]:
    """The block groups sent as one payload each: all blocks, or one per block."""
    return [[b] for b in ids] if mode.startswith("per_block") else [ids]


def parts_of(staging: torch.Tensor, mode: str) -> tuple[slice, ...]:
    """The pipelined parts of a staging tensor (coalesced: 64 MiB; partsN: N MiB), or one part
    (the others)."""
    from kvtransfer.chunking import pipeline_parts

    kind = mode.partition("/")[0].partition("@")[0]
    if kind == "coalesced":
        kind = "parts64"
    if not kind.startswith("parts"):
        return (slice(0, staging.shape[0]),)
    layer_bytes = staging[0].numel() * staging.element_size()
    return pipeline_parts(staging.shape[0], layer_bytes, part_bytes=int(kind[5:]) << 20)


def prepared(cache: torch.Tensor, group: list[int], unique: bool) -> tuple[torch.Tensor, Any]:
    """A group's staging tensor and block index, made before the clock starts (KVSender and
    KVReceiver also build them before the payload moves)."""
    from kvtransfer.coalesce import block_index, staging_shape

    staging = torch.empty(staging_shape(cache, len(group)), dtype=cache.dtype, device=cache.device)
    return staging, block_index(cache, group, unique=unique)


def send_group(
    channel: Any, cache: torch.Tensor, ready: tuple[torch.Tensor, Any], mode: str
) -> None:
    """Gather a group into its staging tensor and send it, part by part as it is gathered."""
    from kvtransfer.coalesce import gather_blocks

    staging, ids = ready
    parts = parts_of(staging, mode)
    programs = copy_programs_of(mode)

    def fill(i: int) -> None:
        gather_blocks(cache, ids, staging[parts[i]], layers=parts[i], num_programs=programs)

    channel.send_parts([staging[p] for p in parts], fill=fill)


def recv_group(
    channel: Any, cache: torch.Tensor, ready: tuple[torch.Tensor, Any], mode: str
) -> None:
    """Receive a group into its staging tensor, scattering each part as it arrives."""
    from kvtransfer.coalesce import scatter_blocks

    staging, ids = ready
    parts = parts_of(staging, mode)
    programs = copy_programs_of(mode)

    def drain(i: int) -> None:
        scatter_blocks(cache, ids, staging[parts[i]], layers=parts[i], num_programs=programs)

    channel.recv_parts([staging[p] for p in parts], drain=drain)


class BareLink:
    """A bare 2-rank process group with the two calls the raw modes make (`send_parts`,
    `recv_parts`) and none of PairChannel's per-message costs (header message, its host-side
    copy, host polling of completions): the bound the channel's raw columns compare with. The
    receiver scatters on a side stream that waits for each part's receive, as NCCL channels
    do. Formed from the raw channel's store (blocks until both sides joined)."""

    def __init__(self, args: argparse.Namespace, store: Any, rank: int) -> None:
        store = torch.distributed.PrefixStore("bare", store)
        self.peer = 1 - rank
        self.side = None if args.cpu_dry_run else torch.cuda.Stream()
        if args.cpu_dry_run:
            gloo = torch.distributed.ProcessGroupGloo
            options = gloo._Options()  # type: ignore[attr-defined]
            options._devices = [gloo.create_device(hostname="127.0.0.1")]
            self.pg = gloo(store, rank, 2, options)
            return
        nccl_options = torch.distributed.ProcessGroupNCCL.Options()
        if args.nccl_max_ctas:
            nccl_options.config.min_ctas, nccl_options.config.max_ctas = 1, args.nccl_max_ctas
        self.pg = torch.distributed.ProcessGroupNCCL(store, rank, 2, nccl_options)

    def send_parts(self, parts: list[torch.Tensor], fill: Any) -> None:
        works = []
        for index, part in enumerate(parts):
            fill(index)
            works.append(self.pg.send([part], self.peer, 0))
        for work in works:
            work.wait()

    def recv_parts(self, parts: list[torch.Tensor], drain: Any) -> None:
        if self.side is None:  # gloo: the host waits for each part
            for index, part in enumerate(parts):
                self.pg.recv([part], self.peer, 0).wait()
                drain(index)
            return
        current = torch.cuda.current_stream()
        for index, part in enumerate(parts):
            work = self.pg.recv([part], self.peer, 0)
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                work.wait()  # the side stream waits for this part, not the host
                drain(index)
        current.wait_stream(self.side)


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---- the two processes -------------------------------------------------------------------------


def receiver_main(args: argparse.Namespace, queue_out: Any, queue_in: Any) -> None:
    faulthandler.dump_traceback_later(args.stack_dump_s)  # where a stuck run hangs
    from engine.block_manager import BlockManager
    from kvtransfer.layout import KVLayout
    from kvtransfer.nccl import configure_nccl_environment
    from kvtransfer.pair import ReceiverEndpoint
    from kvtransfer.receiver import KVReceiver
    from kvtransfer.staging import StagingPool
    from kvtransfer.transport import PairAddress, open_channel

    configure_nccl_environment()
    device = device_of(args, 1)
    if not args.cpu_dry_run:
        torch.cuda.set_device(device)
    endpoint = ReceiverEndpoint("127.0.0.1")
    config = transport_config(args)
    raw_store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    queue_out.put(("endpoint", (endpoint.address, raw_store.port)))  # the raw channel's own
    raw = open_channel(PairAddress("127.0.0.1", raw_store.port, "raw", 1), config, device)
    bare = BareLink(args, raw_store, 1) if any(map(is_bare, raw_modes(args))) else None
    go = torch.empty(1, device=device)
    for shape in shapes(args):
        cache = cache_for(args, shape, device).zero_()
        for length in lengths(args):
            ids = scattered_blocks(args, length, seed=length + 1)
            for mode in raw_modes(args):
                times = []
                ready = [prepared(cache, group, unique=True) for group in groups_of(ids, mode)]
                for _ in range(args.repeats + 1):
                    raw.recv(go)
                    start = time.perf_counter()
                    for group in ready:
                        recv_group(bare if is_bare(mode) else raw, cache, group, mode)
                    synchronize(args)
                    times.append(time.perf_counter() - start)
                queue_out.put(("raw", shape, length, mode, times[1:]))
    # the protocol: one pair per shape, until the driver says the sender is done with it
    for shape in shapes(args):
        cache = cache_for(args, shape, device).zero_()
        layout = KVLayout.of_cache(cache, shape)
        manager = BlockManager(cache.shape[2], BLOCK, enable_prefix_caching=False)
        pair = endpoint.accept(config, device)
        assert pair is not None
        receiver = KVReceiver(
            pair[0], pair[1], cache, layout, manager.reserve, manager.release,
            StagingPool(2 << 30, device, cache.dtype),
            transfer_config(args),
        )  # fmt: skip
        finished = False
        while not finished:
            finished = not queue_in.empty() and queue_in.get() == "next"
            for kv in receiver.poll():
                result = receiver.result(kv.transfer_id)
                timeline = result.timeline if result is not None else ()
                queue_out.put(
                    ("arrived", kv.transfer_id, kv.completed_at, sha(cache, kv.block_ids),
                     timeline)
                )  # fmt: skip
                manager.release(kv.owner)
            if receiver.failure and not finished:  # fine if the sender closed after its last
                try:
                    finished = queue_in.get(timeout=10) == "next"
                except queue.Empty:
                    raise RuntimeError(receiver.failure) from None
            time.sleep(0.0005)
        manager.check_integrity([], ())
        receiver.close()
    queue_out.put(("bye",))


def sender_main(args: argparse.Namespace, queue_out: Any, queue_in: Any) -> None:
    faulthandler.dump_traceback_later(args.stack_dump_s)  # where a stuck run hangs
    from kvtransfer.nccl import configure_nccl_environment
    from kvtransfer.transport import PairAddress, open_channel

    configure_nccl_environment()
    device = device_of(args, 0)
    if not args.cpu_dry_run:
        torch.cuda.set_device(device)
    _, (endpoint, raw_port) = queue_in.get()
    config = transport_config(args)
    free_before = 0 if args.cpu_dry_run else torch.cuda.mem_get_info()[0]
    raw = open_channel(PairAddress("127.0.0.1", raw_port, "raw", 0), config, device)
    bare = None
    if any(map(is_bare, raw_modes(args))):
        store = torch.distributed.TCPStore(
            "127.0.0.1", raw_port, is_master=False, timeout=timedelta(seconds=120)
        )
        bare = BareLink(args, store, 0)
    go = torch.ones(1, device=device)
    for shape in shapes(args):
        cache = cache_for(args, shape, device)
        for length in lengths(args):
            ids = scattered_blocks(args, length, seed=length + 1)
            for mode in raw_modes(args):
                print(f"sender: raw {shape} {length} {mode}", file=sys.stderr, flush=True)
                ready = [prepared(cache, group, unique=False) for group in groups_of(ids, mode)]
                for _ in range(args.repeats + 1):
                    synchronize(args)
                    raw.send(go)
                    for group in ready:
                        send_group(bare if is_bare(mode) else raw, cache, group, mode)
    pair_bytes = 0
    if not args.cpu_dry_run:
        pair_bytes = free_before - torch.cuda.mem_get_info()[0] - torch.cuda.memory_reserved()
    queue_out.put(("pair_memory", pair_bytes))
    for shape in shapes(args):
        protocol_runs(args, shape, endpoint, queue_out, queue_in)
        queue_out.put(("shape_done", shape))
    queue_out.put(("bye",))


def protocol_runs(
    args: argparse.Namespace, shape: str, endpoint: Any, queue_out: Any, queue_in: Any
) -> None:
    from engine.block_manager import BlockManager
    from kvtransfer.layout import KVLayout
    from kvtransfer.pair import connect_pair
    from kvtransfer.sender import KVSender
    from kvtransfer.staging import StagingPool

    device = device_of(args, 0)
    engine = None
    if shape == next(iter(shapes(args))) and not args.no_overlap:  # overlap prefills here
        engine = dummy_engine(args, shape, device)
        cache = engine.runner.kv_cache
        cache.copy_(cache_for(args, shape, device))
        manager = engine.block_manager
    else:
        cache = cache_for(args, shape, device)
        manager = BlockManager(cache.shape[2], BLOCK, enable_prefix_caching=False)
    layout = KVLayout.of_cache(cache, shape)
    channel, control = connect_pair(endpoint, f"protocol-{shape}", transport_config(args), device)
    sender = KVSender(
        channel, control, cache, layout, manager.release,
        StagingPool(2 << 30, device, cache.dtype),
        transfer_config(args),
    )  # fmt: skip
    if engine is not None:  # first: an experimental protocol mode that fails ends this pair
        overlap_runs(args, sender, engine, queue_out, queue_in)
    for mode, length in itertools.product(protocol_modes(args), lengths(args)):
        print(f"sender: protocol {shape} {length} {mode}", file=sys.stderr, flush=True)
        # the receiver follows the part size or the slices each header announces
        direct = mode == "direct"
        part_bytes = PIPELINE_PART_BYTES if direct else int(mode) << 20
        sender.config = dataclasses.replace(
            sender.config, part_bytes=part_bytes, direct_receive=direct
        )
        ids = scattered_blocks(args, length, seed=length + 7)
        for rep in range(args.repeats + 1):
            transfer_id = f"{shape}-{length}-{mode}-{rep}"
            digest = sha(cache, ids)  # before the clock starts: hashing holds CPU and GIL
            manager.hold(transfer_id, ids)
            synchronize(args)
            started = time.monotonic()
            handle = sender.submit(transfer_id, transfer_id, ids, length, transfer_id=transfer_id)
            result = handle.wait(60)
            if not result.ok and direct:  # the experimental mode: keep the other results
                print(f"sender: direct protocol failed: {result}", file=sys.stderr, flush=True)
                sender.close()
                return
            assert result.ok, result
            queue_out.put(("protocol", shape, length, mode, rep, started, digest, result.timeline))
            wait_digested(queue_in, transfer_id)
    manager.check_integrity([], ())
    sender.close()


def wait_digested(queue_in: Any, transfer_id: str) -> None:
    """Wait until the receiver has hashed `transfer_id`'s blocks (the driver forwards its
    word), so no hashing overlaps the next timed transfer."""
    while queue_in.get(timeout=120) != ("digested", transfer_id):
        pass


def dummy_engine(args: argparse.Namespace, shape: str, device: str) -> Any:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.scheduler import SchedulerConfig

    return Engine(
        EngineConfig(  # "cuda": this process's current device (set at start)
            model=f"dummy:{shape}", device=device.split(":")[0], dtype="bfloat16",
            kv_cache_dtype="fp8" if args.kv_dtype == "fp8" else "auto",
            kv_cache_scales="per_token",  # the packed blocks cache_for makes
            num_kv_blocks=cache_blocks(args), block_size=BLOCK, cuda_graphs=False,
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4096),
        )
    )  # fmt: skip


def overlap_runs(
    args: argparse.Namespace, sender: Any, engine: Any, queue_out: Any, queue_in: Any
) -> None:
    """A 2,048-token prefill of the dummy 8B model on cuda:0, its KV shipped as written."""
    import threading

    from contracts.sampling_params import SamplingParams
    from engine.scheduler import ScheduledSequence, SchedulerOutput
    from engine.sequence import Sequence

    length = overlap_tokens(args)
    cuda = not args.cpu_dry_run
    runner = engine.runner
    num_layers = runner.kv_cache.shape[0]
    for rep, per_chunk, mode in itertools.product(
        range(args.overlap_repeats + 1),
        overlap_chunkings(args),
        ("prefill_only", "transfer_only", "overlapped"),
    ):
        prompt = [1 + i % 100 for i in range(length)]
        seq = Sequence(f"p{rep}-{per_chunk}-{mode}", prompt, SamplingParams(), b"r")
        assert engine.block_manager.allocate_slots(seq, length)
        batch = SchedulerOutput([ScheduledSequence(seq, length)], [])
        events = [torch.cuda.Event() if cuda else None for _ in range(num_layers)]
        issued = [threading.Event() for _ in range(num_layers)]

        def hook(layer: int, events: Any = events, issued: Any = issued) -> None:
            if events[layer] is not None:
                events[layer].record()
            issued[layer].set()

        def chunk_ready(
            index: int, events: Any = events, issued: Any = issued, per_chunk: int = per_chunk
        ) -> None:
            last = min((index + 1) * per_chunk, num_layers) - 1
            issued[last].wait()
            if events[last] is not None:
                events[last].synchronize()

        transfer_id = f"ov-{rep}-{per_chunk}-{mode}"
        if mode == "transfer_only":
            runner.execute(batch)  # the KV exists before the clock starts
        synchronize(args)
        runner.model.layer_hook = hook if mode == "overlapped" else None
        started = time.monotonic()
        handle = None
        if mode != "prefill_only":
            engine.block_manager.hold(transfer_id, seq.block_ids)
            handle = sender.submit(
                transfer_id, transfer_id, seq.block_ids, length,
                layers_per_chunk=per_chunk if mode == "overlapped" else None,
                chunk_ready=chunk_ready if mode == "overlapped" else None,
                transfer_id=transfer_id,
            )  # fmt: skip
        if mode != "transfer_only":
            runner.execute(batch)
            if cuda:  # the prefill's stream only: the transfer's work is not the prefill's
                torch.cuda.current_stream().synchronize()
        prefill_end = time.monotonic()
        runner.model.layer_hook = None
        queue_out.put(("overlap", per_chunk, mode, rep, started, prefill_end, transfer_id))
        if handle is not None:
            result = handle.wait(60)
            assert result.ok, result
            if mode == "overlapped":
                queue_out.put(
                    ("overlap_sent", per_chunk, rep, prefill_end, transfer_id, result.timeline)
                )
            wait_digested(queue_in, transfer_id)
        engine.block_manager.free(seq)
    engine.block_manager.check_integrity([], ())


def transport_config(args: argparse.Namespace) -> Any:
    from kvtransfer.transport import TransportConfig

    backend = "gloo" if args.cpu_dry_run else "nccl"
    return TransportConfig(
        backend=backend, timeout_s=60.0, connect_timeout_s=120.0, gloo_hostname="127.0.0.1",
        nccl_max_ctas=args.nccl_max_ctas or None, nccl_high_priority=args.nccl_high_priority,
    )  # fmt: skip


def transfer_config(args: argparse.Namespace) -> Any:
    """Both sides' protocol configuration (the sender's part size is set per protocol mode)."""
    from kvtransfer.protocol import TransferConfig

    config = TransferConfig(checksum=False, copy_programs=args.copy_programs)
    if args.receive_ahead is not None:
        config = dataclasses.replace(config, receive_ahead=args.receive_ahead)
    return config


def overlap_chunkings(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in args.overlap_layers_per_chunk.split(",")]


def overlap_tokens(args: argparse.Namespace) -> int:
    return 512 if args.cpu_dry_run else 2048


def lengths(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in args.lengths.split(",")]


def protocol_modes(args: argparse.Namespace) -> list[str]:
    modes = args.protocol_modes.split(",")
    for mode in modes:
        if mode != "direct" and not mode.isdigit():
            raise SystemExit(f"--protocol-modes: {mode!r} is neither a MiB count nor 'direct'")
    return modes


# ---- driver ------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if not args.cpu_dry_run:
        assert torch.cuda.device_count() >= 2, "needs two GPUs"
    # the protocol pair proves a cluster secret (kvtransfer.handshake): one for this run
    os.environ.setdefault("TANDEM_KV_SECRET", secrets.token_hex(16))
    ctx = mp.get_context("spawn")
    to_sender, to_receiver, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    receiver = ctx.Process(target=receiver_main, args=(args, results, to_receiver))
    sender = ctx.Process(target=sender_main, args=(args, results, to_sender))
    receiver.start()
    kind, address = results.get(timeout=120)
    sender.start()
    to_sender.put((kind, address))
    messages: list[tuple] = []
    byes = 0
    while byes < 2:
        try:
            message = results.get(timeout=5)
        except queue.Empty:
            failed = [p for p in (sender, receiver) if p.exitcode not in (None, 0)]
            if failed:
                print(f"{failed[0].name} exited with {failed[0].exitcode}: partial results")
                for process in (sender, receiver):
                    process.kill()
                break
            continue
        messages.append(message)
        if message[0] == "shape_done":
            to_receiver.put("next")
        if message[0] == "arrived":
            to_sender.put(("digested", message[1]))
        byes += message[0] == "bye"
    sender.join(60)
    receiver.join(60)
    report(args, messages)


def collect(args: argparse.Namespace, messages: list[tuple]) -> dict[str, Any]:
    """Per-measurement timings from the two processes' messages."""
    raw = {(m[1], m[2], m[3]): m[4] for m in messages if m[0] == "raw"}
    arrivals = {m[1]: (m[2], m[3], dict(m[4])) for m in messages if m[0] == "arrived"}
    protocol: dict[tuple[str, int, str], list[float]] = {}
    steps: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    mismatches = []
    for message in (m for m in messages if m[0] == "protocol"):
        _, shape, length, mode, rep, started, digest, sent_timeline = message
        transfer_id = f"{shape}-{length}-{mode}-{rep}"
        if transfer_id not in arrivals:
            continue  # the run broke off
        done_at, received_digest, received = arrivals[transfer_id]
        if received_digest != digest:
            mismatches.append(transfer_id)
        if rep > 0:  # rep 0 is the warm-up
            protocol.setdefault((shape, length, mode), []).append(done_at - started)
            sent = dict(sent_timeline)
            steps.setdefault((shape, length, mode), []).append(
                protocol_steps(started, sent, received)
            )
    # layers per chunk -> mode -> [(prefill s, end s)], both from the clock's start
    overlap: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for _, per_chunk, mode, rep, started, prefill_end, transfer_id in (
        m for m in messages if m[0] == "overlap"
    ):
        if rep > 0:
            end = arrivals[transfer_id][0] if transfer_id in arrivals else prefill_end
            by_mode = overlap.setdefault(per_chunk, {})
            by_mode.setdefault(mode, []).append((prefill_end - started, end - started))
    # layers per chunk -> step -> times after the prefill's end
    chunk_steps: dict[int, dict[str, list[float]]] = {}
    for _, per_chunk, rep, prefill_end, transfer_id, sent_timeline in (
        m for m in messages if m[0] == "overlap_sent"
    ):
        if rep == 0 or transfer_id not in arrivals:
            continue
        received = {f"R:{k}": v for k, v in arrivals[transfer_id][2].items()}
        steps_of = chunk_steps.setdefault(per_chunk, {})
        for name, when in [*((f"S:{k}", v) for k, v in sent_timeline), *received.items()]:
            steps_of.setdefault(name, []).append(when - prefill_end)
    pair_memory = next((m[1] for m in messages if m[0] == "pair_memory"), 0)
    return {
        "chunk_steps": chunk_steps,
        "raw": raw,
        "protocol": protocol,
        "steps": steps,
        "overlap": overlap,
        "pair_memory": pair_memory,
        "mismatches": mismatches,
    }


# (name, from, to): S = sender's timeline, R = receiver's, "submit" = the clock's start
STEPS = (
    ("submit->Offer out", "submit", "S:offer"),
    ("Offer->Ready in", "S:offer", "S:ready"),
    ("  of which: S stages chunk 0", "S:offer", "S:staged"),
    ("  S Offer->R reserved", "S:offer", "R:offer"),
    ("  R reserved->S Ready in", "R:offer", "S:ready"),
    ("Ready->1st header in", "S:ready", "R:first_header"),
    ("header->data in", "R:first_header", "R:data"),
    ("data->complete", "R:data", "R:end"),
    ("S: send returned - R: data", "R:data", "S:sent"),
    ("S: Ack in - R: complete", "R:end", "S:end"),
)


def protocol_steps(
    started: float, sent: dict[str, float], received: dict[str, float]
) -> dict[str, float]:
    """Seconds of each protocol step (STEPS) of one transfer, from both sides' timelines."""
    times = {"submit": started}
    times.update({f"S:{k}": v for k, v in sent.items()})
    times.update({f"R:{k}": v for k, v in received.items()})
    steps = {name: times[b] - times[a] for name, a, b in STEPS if a in times and b in times}
    steps["direct"] = float("S:direct" in times)
    return steps


def protocol_header(mode: str) -> str:
    return "protocol, direct" if mode == "direct" else f"protocol, {mode} MiB parts"


def overlap_chunk_table(chunk_steps: dict[str, list[float]]) -> str:
    """When each chunk of the overlapped transfers was ready, sent and in, in ms after the
    prefill's end (median over repeats; negative: before it ended)."""
    chunks = sorted(int(k[len("S:sent") :]) for k in chunk_steps if k[len("S:sent") :].isdigit())
    columns = (("S:ready", "layers computed"), ("S:sent", "sender's send returned"),
               ("R:header", "receiver has header"), ("R:posted", "receiver posted it ahead"),
               ("R:in", "receiver has data"))  # fmt: skip
    rows = []
    for chunk in chunks:
        cells = [str(chunk)]
        for prefix, _ in columns:
            times = chunk_steps.get(f"{prefix}{chunk}")
            cells.append(f"{1e3 * median(times):.2f}" if times else "-")
        rows.append(cells)
    end = chunk_steps.get("R:end")
    table = markdown_table(["chunk", *(f"{name} (ms)" for _, name in columns)], rows)
    tail = f"receiver complete: {1e3 * median(end):.2f} ms after the prefill's end" if end else ""
    return f"\noverlapped transfer, per chunk, ms after the prefill's end (median)\n{table}\n{tail}"


def overlap_summary(by_mode: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Medians of the interleaved overlap modes and how much of the transfer stayed exposed:
    prefill + transfer (until the receiver has it all) minus the prefill alone. Also the
    prefill's own time beside the transfer, which tells a slower prefill from a late tail."""
    prefill = median([p for p, _ in by_mode["prefill_only"]])
    transfer = median([t for _, t in by_mode["transfer_only"]])
    together = median([t for _, t in by_mode["overlapped"]])
    prefill_beside = median([p for p, _ in by_mode["overlapped"]])
    exposed = max(together - prefill, 0.0)
    return {
        "prefill_s": prefill,
        "transfer_s": transfer,
        "overlapped_s": together,
        "prefill_beside_transfer_s": prefill_beside,
        "exposed_s": exposed,
        "hidden_fraction": 1 - exposed / transfer,
    }


def overlap_line(
    args: argparse.Namespace, per_chunk: int, summary: dict[str, float], samples: int
) -> str:
    ms = {k: 1e3 * v for k, v in summary.items() if k.endswith("_s")}
    return (
        f"\noverlap, {next(iter(shapes(args)))}, {overlap_tokens(args):,} tokens, {per_chunk} "
        f"layers per chunk, median of {samples}: prefill alone {ms['prefill_s']:.2f} ms, "
        f"transfer alone {ms['transfer_s']:.2f} ms, prefill + transfer "
        f"{ms['overlapped_s']:.2f} ms (the prefill itself {ms['prefill_beside_transfer_s']:.2f} "
        f"ms): exposed {ms['exposed_s']:.2f} ms, "
        f"{100 * summary['hidden_fraction']:.0f}% of the transfer hidden"
    )


def report(args: argparse.Namespace, messages: list[tuple]) -> None:
    data = collect(args, messages)
    raw, protocol, overlap = data["raw"], data["protocol"], data["overlap"]
    pair_memory, mismatches = data["pair_memory"], data["mismatches"]
    device = (
        "CPU (dry run, not a measurement)" if args.cpu_dry_run else torch.cuda.get_device_name(0)
    )
    rows = []
    for shape, (layers, heads, dim) in shapes(args).items():
        for length in lengths(args):
            nbytes = -(-length // BLOCK) * BLOCK * layers * 2 * heads * row_bytes(args, dim)
            cells = [shape, f"{length:,}", f"{nbytes / 2**20:.1f}"]
            timings = [raw.get((shape, length, m)) for m in raw_modes(args)]
            timings += [protocol.get((shape, length, m)) for m in protocol_modes(args)]
            for times in timings:
                seconds = median(times) if times else None
                cells.append(
                    "-"
                    if seconds is None
                    else f"{1e3 * seconds:.2f} ms, {nbytes / seconds / 1e9:.0f} GB/s"
                )
            rows.append(cells)
    table = markdown_table(
        [
            "shape",
            "tokens",
            "KV MiB",
            *(raw_name(m) for m in raw_modes(args)),
            *(protocol_header(m) for m in protocol_modes(args)),
        ],
        rows,
    )
    step_rows = [
        [shape, f"{length:,}", mode, f"{sum(s['direct'] for s in samples):.0f}/{len(samples)}"]
        + [
            f"{1e3 * median([s[name] for s in samples if name in s]):.3f}"
            if any(name in s for s in samples)
            else "-"
            for name, _, _ in STEPS
        ]
        for (shape, length, mode), samples in data["steps"].items()
    ]
    step_table = markdown_table(
        ["shape", "tokens", "mode", "went direct", *(f"{name} (ms)" for name, _, _ in STEPS)],
        step_rows,
    )
    lines = [
        f"\nKV transfer, {args.kv_dtype} KV, 2x {device}, median of {args.repeats}",
        table,
        "\nprotocol steps, median (S: sender, R: receiver; the same host's monotonic clock)",
        step_table,
    ]
    summary: dict[int, dict[str, float]] = {}
    for per_chunk, by_mode in overlap.items():
        if len(by_mode) != 3:
            continue  # the run broke off
        summary[per_chunk] = overlap_summary(by_mode)
        lines.append(overlap_line(args, per_chunk, summary[per_chunk], len(by_mode["overlapped"])))
    for per_chunk, steps_of in data["chunk_steps"].items():
        lines.append(f"\n{per_chunk} layers per chunk:" + overlap_chunk_table(steps_of))
    lines.append(
        f"GPU memory of one NCCL pair (outside torch's allocator): {pair_memory / 2**20:.0f} MiB"
    )
    lines.append(f"protocol transfers not bit-exact: {mismatches or 'none'}")
    print("\n".join(lines))
    write_json(
        args.out,
        {
            "config": vars(args),
            "machine": machine_info(),
            "device": device,
            "raw": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in raw.items()},
            "protocol": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in protocol.items()},
            "protocol_steps": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in data["steps"].items()},
            "overlap": summary,
            "pair_memory_bytes": pair_memory,
            "mismatches": mismatches,
            "table": table,
            "step_table": step_table,
        },
    )


if __name__ == "__main__":
    main()
