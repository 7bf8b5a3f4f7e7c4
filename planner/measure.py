"""`tandem profile`: measure one engine on this machine into a Profile (planner.profile).

Every step time is a real engine step (`Engine.step`: schedule, forward, sample, outputs),
each point's repeats kept beside their median:
- prefill: a request whose first `context` tokens are in the prefix cache (an earlier request
  computed them) and `tokens` new ones, so its one step is a chunk of `tokens` at `context`;
- decode: `batch` requests sharing one cached prompt of `context` tokens, each step of them
  timed once all have their first token (`decode_steps` steps);
- mixed: a fresh chunk of `tokens` in one step beside `batch` such decodes (batch 0: alone);
- overhead: the real engine loop (worker.engine_loop.EngineLoop) serving requests one at a
  time, then a batch at once: per step, its time outside `Engine.step`; per request, submit to
  its first output at the caller less the engine steps it waited for (planner.overhead);
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
from planner.overhead import measure_loop_overhead
from planner.profile import Curve, Grid, Mixed, Profile


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
    # mixed steps: a fresh chunk of each of `mixed_tokens` beside each of `mixed_batch` decodes
    # (0: the chunk alone) of `mixed_context` tokens; () measures none
    mixed_tokens: tuple[int, ...] = (64, 256)
    mixed_batch: tuple[int, ...] = (0, 8, 32)
    mixed_context: int = 256
    loop_requests: int = 8  # the engine loop's overhead: requests one at a time (0: none) ...
    loop_batch: int = 8  # ... then this many at once
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
                     "transfer_bytes", "mixed_tokens", "mixed_batch"):  # fmt: skip
            values = getattr(self, name)
            if name.startswith("mixed") and not self.mixed_tokens:
                continue
            minimum = 0 if name in ("prefill_context", "mixed_batch") else 1
            if not values or any(type(v) is not int or v < minimum for v in values):
                raise ValueError(f"{name}={values!r} must be non-empty ints >= {minimum}")
            if list(values) != sorted(set(values)):
                raise ValueError(f"{name}={values!r} must be strictly ascending")
        if self.transfer_gbps is not None and not self.transfer_gbps > 0:
            raise ValueError(f"transfer_gbps={self.transfer_gbps!r} must be > 0 or None")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1 or None")
        for name in ("repeats", "decode_steps", "mixed_context", "loop_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.mixed_tokens and (self.mixed_batch[0] != 0 or len(self.mixed_batch) < 2):
            raise ValueError(f"mixed_batch={self.mixed_batch!r} must start at 0 (the chunk "
                             "alone) and hold a batch beside it")  # fmt: skip
        if self.loop_requests < 0:
            raise ValueError(f"loop_requests={self.loop_requests} must be >= 0")


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
    mixed_tokens = max(config.mixed_tokens) + max(config.mixed_batch) if config.mixed_tokens else 0
    measuring = SchedulerConfig(  # one step holds every chunk and every batch measured
        max_num_seqs=max(serving.max_num_seqs, max(config.decode_batch),
                         max(config.mixed_batch) + 1, config.loop_batch),
        max_num_batched_tokens=max(serving.max_num_batched_tokens, max(config.prefill_tokens),
                                   mixed_tokens),
    )  # fmt: skip
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
        log(f"prefill {tokens} tokens at contexts {config.prefill_context}: {_ms(row)}")
        prefill.append(row)
    decode = []
    for batch in config.decode_batch:
        row = [_decode_s(engine, ids, batch, c, config.decode_steps)
               for c in config.decode_context]  # fmt: skip
        log(f"decode batch {batch} at contexts {config.decode_context}: {_ms(row)}")
        decode.append(row)
    mixed = None
    if config.mixed_tokens:
        rows = []
        for tokens in config.mixed_tokens:
            row = [_mixed_s(engine, ids, tokens, batch, config.mixed_context, config.repeats)
                   for batch in config.mixed_batch]  # fmt: skip
            log(f"mixed: {tokens} new tokens beside {config.mixed_batch} decodes at context "
                f"{config.mixed_context}: {_ms(row)}")  # fmt: skip
            rows.append(row)
        mixed = Mixed(_grid(config.mixed_tokens, config.mixed_batch, rows), config.mixed_context)
    overhead = None
    if config.loop_requests:
        overhead = measure_loop_overhead(engine, ids, config.loop_requests, config.loop_batch,
                                         config.decode_steps)  # fmt: skip
        log(f"engine loop: {overhead.describe()}")
    transfer = transfer_times_s(config)
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
        prefill=_grid(config.prefill_tokens, contexts, prefill),
        decode=_grid(config.decode_batch, config.decode_context, decode),
        transfer=Curve(config.transfer_bytes, tuple(transfer)),
        mixed=mixed,
        overhead=overhead,
    )


def _grid(rows: tuple[int, ...], columns: tuple[int, ...], times: list[list[list[float]]]) -> Grid:
    """A Grid of each point's median and its repeats."""
    medians = tuple(tuple(statistics.median(point) for point in row) for row in times)
    return Grid(rows, columns, medians, tuple(tuple(tuple(p) for p in row) for row in times))


def _ms(row: list[list[float]]) -> str:
    return ", ".join(f"{1000 * statistics.median(point):.1f}" for point in row) + " ms"


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


def _prefill_s(engine, ids, tokens: int, context: int, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds of `repeats` steps that each prefill `tokens` new tokens after `context` cached."""
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
    return times


def _decode_s(engine, ids, batch: int, context: int, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds of `steps` decode steps of `batch` sequences of about `context` tokens."""
    prompt = ids(context)
    _run_to_end(engine, prompt)
    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    request_ids = [uuid.uuid4().hex for _ in range(batch)]
    for request_id in request_ids:
        engine.add_request(request_id, prompt_token_ids=prompt, sampling_params=params)
    engine.step()  # every prompt's uncached tail, and each one's first token
    times = [_timed_step(engine) for _ in range(steps + 1)][1:]  # the first is a warm-up
    _end(engine, request_ids)
    return times


def _end(engine, request_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
    for request_id in request_ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()


def _mixed_s(engine, ids, tokens: int, batch: int, context: int, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds of `repeats` steps that each hold a fresh chunk of `tokens` (nothing cached
    before it) beside `batch` decodes of about `context` tokens (batch 0: the chunk alone)."""
    prompt = ids(context)
    _run_to_end(engine, prompt)
    params = SamplingParams(max_tokens=2 * repeats + 4, ignore_eos=True)
    decoding = [uuid.uuid4().hex for _ in range(batch)]
    for request_id in decoding:
        engine.add_request(request_id, prompt_token_ids=prompt, sampling_params=params)
    if batch:
        engine.step()  # every prompt's uncached tail, and each one's first token
        engine.step()  # a decode step: warm
    times = []
    for index in range(repeats + 1):  # the first is a warm-up
        chunk = uuid.uuid4().hex
        alone = SamplingParams(max_tokens=1, ignore_eos=True)
        engine.add_request(chunk, prompt_token_ids=ids(tokens), sampling_params=alone)
        step_s = _timed_step(engine)
        if engine.scheduler.num_unfinished != batch:
            raise RuntimeError(
                f"mixed step: a chunk of {tokens} tokens beside {batch} decodes of {context} "
                f"tokens did not finish in one step (preempted: {engine.num_kv_blocks} KV "
                "blocks too few for it? give more --kv-cache-gb or smaller --mixed-*)"
            )
        if index:
            times.append(step_s)
    _end(engine, decoding)
    return times


def transfer_times_s(config: ProfileConfig) -> list[float]:
    """Each size's seconds: at `transfer_gbps` when given (a bandwidth measured elsewhere),
    else measured over a gloo pair here (measure_transfer)."""
    if config.transfer_gbps is not None:
        return [size / (config.transfer_gbps * 1e9) for size in config.transfer_bytes]
    return measure_transfer(config.transfer_bytes, config.repeats)


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
