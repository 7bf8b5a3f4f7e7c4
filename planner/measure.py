"""`tandem profile`: measure one engine on this machine into a Profile (planner.profile).

Every number is a real engine step (`Engine.step`: schedule, forward, sample, outputs):
- prefill: a request whose first `context` tokens are in the prefix cache (an earlier request
  computed them) and `tokens` new ones, so its one step is a chunk of `tokens` at `context`;
- decode: `batch` requests sharing one cached prompt of `context` tokens, each step of them
  timed once all have their first token (the median over `decode_steps` steps);
- transfer: `bytes` sent over a gloo pair channel (kvtransfer.transport.open_channel) between
  two threads of this process, timed from the send to the receiver's 1-byte acknowledgement.
The engine is built as `tandem serve` builds a worker's (engine defaults for the device, or
the sizes given); dummy weights of a named shape work (`--model dummy:llama-3-8b`).
"""

from __future__ import annotations

import platform
import random
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from contracts.sampling_params import SamplingParams
from planner.profile import Curve, Grid, Profile


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    """What to measure. Contexts of prefill chunks are rounded down to whole KV blocks."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    prefill_tokens: tuple[int, ...] = (16, 64, 256, 512)
    prefill_context: tuple[int, ...] = (0, 512)
    decode_batch: tuple[int, ...] = (1, 8, 32)
    decode_context: tuple[int, ...] = (64, 512)
    transfer_bytes: tuple[int, ...] = (1 << 16, 1 << 20, 1 << 24)
    repeats: int = 2
    decode_steps: int = 4
    max_num_seqs: int | None = None  # the serving engine's; None: the device's default
    max_num_batched_tokens: int | None = None
    kv_cache_bytes: int | None = None
    threads: int | None = None  # CPU: torch threads (a Ray worker of one CPU runs with 1)
    # Transfer times from a bandwidth measured elsewhere (GB/s) instead of the gloo pair: for a
    # GPU whose real path is NCCL between two cards (`bench.kvtransfer_nccl` measures it)
    transfer_gbps: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prefill_tokens", "prefill_context", "decode_batch", "decode_context",
                     "transfer_bytes"):  # fmt: skip
            values = getattr(self, name)
            minimum = 0 if name == "prefill_context" else 1
            if not values or any(type(v) is not int or v < minimum for v in values):
                raise ValueError(f"{name}={values!r} must be non-empty ints >= {minimum}")
            if list(values) != sorted(set(values)):
                raise ValueError(f"{name}={values!r} must be strictly ascending")
        if self.transfer_gbps is not None and not self.transfer_gbps > 0:
            raise ValueError(f"transfer_gbps={self.transfer_gbps!r} must be > 0 or None")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1 or None")
        for name in ("repeats", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def _engine(config: ProfileConfig):  # type: ignore[no-untyped-def]
    import torch

    from engine.config import EngineConfig, default_scheduler_config
    from engine.engine import Engine
    from engine.scheduler import SchedulerConfig

    device = "cuda" if config.device == "cuda" or (
        config.device == "auto" and torch.cuda.is_available()) else "cpu"  # fmt: skip
    memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 0
    if device == "cpu" and config.threads is not None:
        torch.set_num_threads(config.threads)
    serving = default_scheduler_config(device, memory)
    serving = SchedulerConfig(
        max_num_seqs=config.max_num_seqs or serving.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens or serving.max_num_batched_tokens,
    )
    measuring = SchedulerConfig(  # one step holds every chunk and every batch measured
        max_num_seqs=max(serving.max_num_seqs, max(config.decode_batch)),
        max_num_batched_tokens=max(serving.max_num_batched_tokens, max(config.prefill_tokens)),
    )
    engine = Engine(EngineConfig(model=config.model, device=config.device, dtype=config.dtype,
                                 kv_cache_bytes=config.kv_cache_bytes, scheduler=measuring,
                                 seed=config.seed))  # fmt: skip
    return engine, serving


def measure_profile(config: ProfileConfig, log: Callable[[str], None] = print) -> Profile:
    """Build the engine, measure, return the Profile (see the module docstring)."""
    engine, serving = _engine(config)
    rng = random.Random(config.seed)
    vocab = engine.model_config.vocab_size
    block_size = engine.config.block_size

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    prefill = []
    for tokens in config.prefill_tokens:
        row = [_prefill_s(engine, ids, tokens, c - c % block_size, config.repeats)
               for c in config.prefill_context]  # fmt: skip
        log(f"prefill {tokens} tokens at contexts {config.prefill_context}: "
            + ", ".join(f"{1000 * s:.1f}" for s in row) + " ms")  # fmt: skip
        prefill.append(tuple(row))
    decode = []
    for batch in config.decode_batch:
        row = [_decode_s(engine, ids, batch, c, config.decode_steps)
               for c in config.decode_context]  # fmt: skip
        log(f"decode batch {batch} at contexts {config.decode_context}: "
            + ", ".join(f"{1000 * s:.1f}" for s in row) + " ms")  # fmt: skip
        decode.append(tuple(row))
    transfer = measure_transfer(config.transfer_bytes, config.repeats)
    log(
        "transfer "
        + ", ".join(
            f"{b} B: {1000 * s:.2f} ms"
            for b, s in zip(config.transfer_bytes, transfer, strict=True)
        )
    )
    kv = engine.runner.kv_cache
    kv_bytes_per_token = kv.numel() * kv.element_size() // (engine.num_kv_blocks * block_size)
    contexts = tuple(sorted({c - c % block_size for c in config.prefill_context}))
    if len(contexts) != len(config.prefill_context):
        raise ValueError(f"prefill_context={config.prefill_context} collide once rounded "
                         f"down to whole blocks of {block_size}")  # fmt: skip
    return Profile(
        model=engine.model_id,
        device=f"{engine.device.type}:{_device_name(engine.device)}",
        machine=f"{platform.node()} {platform.processor() or platform.machine()}",
        block_size=block_size,
        num_kv_blocks=engine.num_kv_blocks,
        max_num_seqs=serving.max_num_seqs,
        max_num_batched_tokens=serving.max_num_batched_tokens,
        kv_bytes_per_token=int(kv_bytes_per_token),
        prefill=Grid(config.prefill_tokens, contexts, tuple(prefill)),
        decode=Grid(config.decode_batch, config.decode_context, tuple(decode)),
        transfer=Curve(config.transfer_bytes, tuple(transfer)),
    )


def _device_name(device) -> str:  # type: ignore[no-untyped-def]
    import torch

    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return f"{torch.get_num_threads()} threads"


def _run_to_end(engine, token_ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    """One request of `token_ids`, 1 token: its prompt's full blocks enter the prefix cache."""
    engine.add_request(uuid.uuid4().hex, prompt_token_ids=token_ids,
                       sampling_params=SamplingParams(max_tokens=1, ignore_eos=True))  # fmt: skip
    while engine.has_unfinished_requests():
        engine.step()


def _timed_step(engine) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    engine.step()
    return time.perf_counter() - started


def _prefill_s(engine, ids, tokens: int, context: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of one step that prefills `tokens` new tokens after `context` cached."""
    prefix = ids(context)
    if context:
        _run_to_end(engine, prefix)
    times = []
    for index in range(repeats + 1):  # the first is a warm-up
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        engine.add_request(uuid.uuid4().hex, prompt_token_ids=prefix + ids(tokens),
                           sampling_params=params)  # fmt: skip
        step_s = _timed_step(engine)
        assert not engine.has_unfinished_requests(), "a prefill chunk took more than one step"
        if index:
            times.append(step_s)
    return statistics.median(times)


def _decode_s(engine, ids, batch: int, context: int, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of a decode step of `batch` sequences of about `context` tokens."""
    prompt = ids(context)
    _run_to_end(engine, prompt)
    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    request_ids = [uuid.uuid4().hex for _ in range(batch)]
    for request_id in request_ids:
        engine.add_request(request_id, prompt_token_ids=prompt, sampling_params=params)
    engine.step()  # every prompt's uncached tail, and each one's first token
    times = [_timed_step(engine) for _ in range(steps + 1)][1:]  # the first is a warm-up
    for request_id in request_ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(times)


def measure_transfer(sizes_bytes: tuple[int, ...], repeats: int) -> list[float]:
    """Median seconds to move each size over a gloo pair channel (the module docstring)."""
    import torch
    import torch.distributed as dist

    from kvtransfer.transport import PairAddress, TransportConfig, open_channel

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    key = f"profile-{uuid.uuid4().hex[:8]}"
    config = TransportConfig(backend="gloo")
    results: list[float] = []
    failures: list[BaseException] = []

    def receiver() -> None:
        try:
            with open_channel(PairAddress("127.0.0.1", port, key, 1), config) as channel:
                ack = torch.ones(1, dtype=torch.uint8)
                for size in sizes_bytes:
                    buffer = torch.empty(size, dtype=torch.uint8)
                    for _ in range(repeats + 1):
                        channel.recv(buffer)
                        channel.send(ack)
        except BaseException as e:  # reported by the sending thread
            failures.append(e)

    thread = threading.Thread(target=receiver, daemon=True)
    thread.start()
    with open_channel(PairAddress("127.0.0.1", port, key, 0), config) as channel:
        ack = torch.empty(1, dtype=torch.uint8)
        for size in sizes_bytes:
            payload = torch.ones(size, dtype=torch.uint8)
            times = []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                channel.send(payload)
                channel.recv(ack)
                times.append(time.perf_counter() - started)
            results.append(statistics.median(times[1:]))
    thread.join(timeout=60)
    del store
    if failures:
        raise failures[0]
    return results
